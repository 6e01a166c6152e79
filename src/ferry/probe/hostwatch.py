"""The host's own stalls: one process per CPU, pinned there at SCHED_FIFO 98 (above everything
the lab runs: OVS, the probe, the hypervisor), sleeps to every millisecond and records each
wake-up that came late. Nothing in the lab can delay it by more than an interrupt; a late
wake-up is the kernel or, in a VM, the host not running the vCPU. A probe client that needed
the CPU at that moment was held as long, migration or not.

    python -m ferry.probe.hostwatch --cpu N --out FILE [--seconds S]   # until SIGTERM

Records (``FILE``, little-endian): ``due i64 | late i64`` (CLOCK_MONOTONIC ns), for every
wake-up at least ``--record-us`` late.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

from ferry.probe.agent import sleep_until, tight_timers

PRIORITY = 98
PERIOD_NS = 1_000_000
RECORD = struct.Struct("<qq")
PR_SET_PDEATHSIG = 1


def realtime_on(cpu: int, priority: int = PRIORITY) -> None:
    tight_timers()
    os.sched_setaffinity(0, {cpu})
    os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(priority))


class HostWatch:
    """A watcher per CPU of this process' affinity, between start() and stop()."""

    def __init__(self, out_dir: Path, record_us: float = 200.0) -> None:
        self.out_dir = out_dir
        self.record_us = record_us
        self._procs: dict[int, subprocess.Popen[bytes]] = {}

    def path(self, cpu: int) -> Path:
        return self.out_dir / f"hostwatch-cpu{cpu}.rec"

    def start(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        for cpu in sorted(os.sched_getaffinity(0)):
            self.path(cpu).unlink(missing_ok=True)
            self._procs[cpu] = subprocess.Popen(
                [sys.executable, "-m", "ferry.probe.hostwatch", "--cpu", str(cpu), "--out",
                 str(self.path(cpu)), "--record-us", str(self.record_us)],
                stderr=subprocess.PIPE)
        for cpu, proc in self._procs.items():  # each creates its file once real-time
            while not self.path(cpu).exists():
                if proc.poll() is not None:
                    err = proc.stderr.read().decode() if proc.stderr else ""
                    self.stop()
                    raise RuntimeError(f"host watcher on CPU {cpu} exited: {err.strip()}")
                time.sleep(0.005)

    def stop(self) -> None:
        procs, self._procs = self._procs, {}
        for proc in procs.values():
            proc.send_signal(signal.SIGTERM)
        for proc in procs.values():
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def stalls(self) -> list[tuple[int, int, int]]:
        """(cpu, due, late) of every recorded late wake-up, in time order."""
        out = []
        for f in self.out_dir.glob("hostwatch-cpu*.rec"):
            cpu = int(f.stem.removeprefix("hostwatch-cpu"))
            data = f.read_bytes()
            for i in range(0, len(data) - len(data) % RECORD.size, RECORD.size):
                due, late = RECORD.unpack_from(data, i)
                out.append((cpu, due, late))
        return sorted(out, key=lambda s: s[1])


def wake_ups(seconds: float | None = None) -> Iterator[tuple[int, int]]:
    """(due, late) of every wake-up of a sleeper to each millisecond, for ``seconds`` (None:
    until SIGTERM). After a stall it carries on from now: the slots it missed are not woken
    for, in a burst that would count one stall many times."""
    due = time.monotonic_ns()
    end = None if seconds is None else due + int(seconds * 1e9)
    while not _Stop.requested and (end is None or due < end):
        due += PERIOD_NS
        late = sleep_until(due)
        yield due, late
        if late > PERIOD_NS:
            due += (late // PERIOD_NS) * PERIOD_NS


def worst_within(stalls: list[tuple[int, int, int]], a: int, b: int) -> int:
    """The latest wake-up (ns) of any CPU whose lateness overlaps [a, b]; 0 if none."""
    return max((late for _, due, late in stalls if due <= b and due + late >= a), default=0)


class _Stop:
    requested = False


def _on_term(signum: int, frame: FrameType | None) -> None:
    _Stop.requested = True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ferry.probe.hostwatch", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu", type=int, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--record-us", type=float, default=200.0)
    p.add_argument("--seconds", type=float, help="stop after this long (default: on SIGTERM)")
    a = p.parse_args(argv)
    signal.signal(signal.SIGTERM, _on_term)
    # A watcher whose parent died (a killed bench) must not spin on at SCHED_FIFO 98.
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() == 1:  # the parent died before the line above
        return 0
    realtime_on(a.cpu)
    threshold = int(a.record_us * 1000)
    with a.out.open("wb", buffering=0) as f:
        for due, late in wake_ups(a.seconds):
            if late >= threshold:
                f.write(RECORD.pack(due, late))
    return 0


if __name__ == "__main__":
    sys.exit(main())
