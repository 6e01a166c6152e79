"""Run a Python snippet while a recorder (anything with start() and stop()) records."""

from __future__ import annotations

import subprocess
import sys
from typing import Protocol


class Recorder(Protocol):
    def start(self) -> None: ...

    def stop(self) -> None: ...


def run_while_recording(recorder: Recorder, code: str) -> list[int]:
    """The integers the snippet prints (its CLOCK_MONOTONIC marks)."""
    recorder.start()
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             check=True, timeout=30).stdout
    finally:
        recorder.stop()
    return [int(x) for x in out.split()]
