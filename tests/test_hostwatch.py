"""The host watcher: late wake-ups of a top-priority sleeper, per CPU, in time."""

from __future__ import annotations

from pathlib import Path

from ferry.probe.hostwatch import HostWatch, worst_within
from tests.recording import run_while_recording

MS = 1_000_000


def test_worst_within_takes_stalls_that_overlap_the_window() -> None:
    stalls = [(0, 100 * MS, 3 * MS), (1, 200 * MS, 1 * MS), (0, 300 * MS, 5 * MS)]
    assert worst_within(stalls, 102 * MS, 150 * MS) == 3 * MS  # began before, ran into it
    assert worst_within(stalls, 150 * MS, 250 * MS) == 1 * MS
    assert worst_within(stalls, 104 * MS, 199 * MS) == 0
    assert worst_within(stalls, 0, 400 * MS) == 5 * MS


HOG = """
import os, time
os.sched_setaffinity(0, {0})
os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(99))
t0 = time.monotonic_ns()
while time.monotonic_ns() - t0 < 5_000_000:
    pass
print(t0, time.monotonic_ns())
"""


def test_a_thread_above_the_watcher_shows_as_a_stall_of_its_length(tmp_path: Path) -> None:
    watch = HostWatch(tmp_path)
    t0, t1 = run_while_recording(watch, HOG)
    on_cpu0 = [(due, late) for cpu, due, late in watch.stalls() if cpu == 0]
    # The 5 ms the hog held CPU 0 at SCHED_FIFO 99: one wake-up due within it, late to its end.
    assert any(t0 - MS <= due <= t0 + MS and due + late >= t1 - MS // 2
               for due, late in on_cpu0), (t0, t1, on_cpu0)
    assert worst_within(watch.stalls(), t0, t1) >= 4 * MS
