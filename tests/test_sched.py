"""The scheduler trace that says who held the CPUs while a probe client was late."""

from __future__ import annotations

from pathlib import Path

from ferry.lab.migrate import HYPERVISOR_RT_PRIORITY
from ferry.probe.runner import PROBE_RT_PRIORITY
from ferry.probe.sched import SchedTrace, Slice, kernel_prio, occupancy, parse, thread_class
from tests.recording import run_while_recording


def switch(cpu: int, us: int, prev: tuple[str, int, int], nxt: tuple[str, int, int]) -> str:
    """A line of ``perf script -F cpu,time,trace --ns``: at 100 s + ``us`` µs."""
    return (f"[{cpu:03d}] 100.{us * 1000:09d}: sched:sched_switch: prev_comm={prev[0]} "
            f"prev_pid={prev[1]} prev_prio={prev[2]} prev_state=S ==> next_comm={nxt[0]} "
            f"next_pid={nxt[1]} next_prio={nxt[2]}")


def wakeup(cpu: int, us: int, who: tuple[str, int, int], target: int) -> str:
    return (f"[{cpu:03d}] 100.{us * 1000:09d}: sched:sched_wakeup: comm={who[0]} pid={who[1]} "
            f"prio={who[2]} target_cpu={target:03d}")


IDLE0, IDLE1 = ("swapper/0", 0, 120), ("swapper/1", 0, 120)
MAIN, REVAL = ("ovs-vswitchd", 11, 79), ("revalidator5", 19, 79)
CLIENT = ("python", 30, kernel_prio(PROBE_RT_PRIORITY))
HYPERVISOR, KWORKER = ("python", 31, kernel_prio(HYPERVISOR_RT_PRIORITY)), ("kworker/0:1", 40, 120)
TRACE = "\n".join([
    switch(0, 0, IDLE0, MAIN),
    switch(1, 100, IDLE1, REVAL),
    switch(0, 400, MAIN, CLIENT),
    switch(1, 500, REVAL, IDLE1),
    "not a switch line",
    switch(0, 600, CLIENT, KWORKER),
    wakeup(0, 800, HYPERVISOR, target=1),
    # CPU 1 leaves idle for the hypervisor with no record of it (as CPU 1 does here).
    switch(1, 1000, HYPERVISOR, IDLE1),
    switch(0, 1000, KWORKER, IDLE0),
    # ... and for a kworker woken with no record of it either: when it began is unknown.
    switch(1, 1300, KWORKER, IDLE1),
])
S = 100 * 1_000_000_000


def test_parse_gives_each_cpu_its_slices_in_order() -> None:
    cpus = parse(TRACE.splitlines())
    assert [(s.start - S, s.end - S, s.comm) for s in cpus[0]] == [
        (0, 400_000, "ovs-vswitchd"), (400_000, 600_000, "python"),
        (600_000, 1_000_000, "kworker/0:1")]
    assert [(s.start - S, s.end - S, s.comm, s.prio) for s in cpus[1]] == [
        (100_000, 500_000, "revalidator5", 79), (500_000, 800_000, "swapper/1", 120),
        (800_000, 1_000_000, "python", 49), (1_000_000, 1_300_000, "?", 0)]
    assert thread_class(cpus[1][-1]) == "unknown"


def test_occupancy_splits_a_window_by_thread_class() -> None:
    cpus = parse(TRACE.splitlines())
    held = occupancy(cpus, S + 200_000, S + 800_000)
    assert dict(held) == {"ovs main": 200_000, "probe": 200_000, "other": 200_000,
                          "ovs revalidator": 300_000, "idle": 300_000}
    assert sum(held.values()) == 2 * 600_000  # both CPUs, the whole window


def test_thread_classes() -> None:
    def cls(comm: str, pid: int = 7, prio: int = 120) -> str:
        return thread_class(Slice(0, 1, comm, pid, prio))

    assert cls("swapper/1", pid=0) == "idle"
    assert cls("ovs-vswitchd", prio=kernel_prio(20)) == "ovs main"
    assert cls("urcu2") == "ovs other"
    assert cls("python", prio=kernel_prio(PROBE_RT_PRIORITY)) == "probe"
    assert cls("python", prio=kernel_prio(HYPERVISOR_RT_PRIORITY)) == "hypervisor"
    assert cls("python") == "other"  # e.g. a controller, at normal priority
    assert cls("ip") == "other"


BURNER = """
import ctypes, time
import os
ctypes.CDLL(None).prctl(15, b"revalidator-t", 0, 0, 0)  # PR_SET_NAME
os.sched_setaffinity(0, {0})  # this VM's kernel reports no exit from idle on CPU 1
def burn(ns):
    t = time.monotonic_ns()
    while time.monotonic_ns() - t < ns:
        pass
burn(100_000_000)
t_sleep = time.monotonic_ns()
time.sleep(0.1)
t_woke = time.monotonic_ns()
burn(100_000_000)
print(t_sleep, t_woke, time.monotonic_ns())
"""
MS = 1_000_000


def test_a_real_trace_sees_a_thread_run_sleep_and_run_on_the_probes_clock(
        tmp_path: Path) -> None:
    trace = SchedTrace(tmp_path / "sched.data")
    t_sleep, t_woke, t_done = run_while_recording(trace, BURNER)
    cpus = trace.read()

    def busy(a: int, b: int) -> float:
        """The share of [a, b) the burner ran (its name puts it among the revalidators)."""
        return occupancy(cpus, a, b)["ovs revalidator"] / (b - a)

    # Running just before the sleep and after it (give or take other work preempting it),
    # and not while asleep, on the probe's clock to well under a millisecond.
    assert busy(t_sleep - 20 * MS, t_sleep) > 0.8
    assert busy(t_sleep + MS // 2, t_woke - MS // 2) < 0.01
    assert busy(t_woke + MS // 2, t_done) > 0.8
