"""Who held the CPUs while a probe client was late: a host-wide trace of the scheduler's
switches and wakeups (``perf record``) read back as per-CPU slices of who ran when, on
CLOCK_MONOTONIC like the probe's records.

The lab's chassis, its probe and its control plane share the host's cores. A client that sends
late is starved of CPU (it paces at SCHED_FIFO); the slices of its late interval say by whom:
each chassis' ovs-vswitchd main thread (which, in the userspace datapath, also forwards), its
revalidator threads (a revalidation round retranslates every datapath flow after a flow-table
or MAC-learning change), the probe's own processes, the lab's hypervisor, or anything else.
"""

from __future__ import annotations

import bisect
import re
import shutil
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ferry.lab.migrate import HYPERVISOR_RT_PRIORITY
from ferry.probe.runner import PROBE_RT_PRIORITY

THREAD_CLASSES = ("ovs main", "ovs revalidator", "ovs other", "probe", "hypervisor", "other",
                  "idle", "unknown")
UNKNOWN = "?"
"""The comm of a slice that was idle, then some thread, with no record of when it switched."""


def kernel_prio(fifo_priority: int) -> int:
    """The ``prio`` sched_switch shows for a SCHED_FIFO thread of that priority."""
    return 99 - fifo_priority


@dataclass(frozen=True)
class Slice:
    """One thread on one CPU from ``start`` to ``end`` (ns, CLOCK_MONOTONIC)."""

    start: int
    end: int
    comm: str
    pid: int
    prio: int


def thread_class(s: Slice) -> str:
    if s.comm == UNKNOWN:
        return "unknown"
    if s.pid == 0:
        return "idle"
    if s.comm == "ovs-vswitchd":
        return "ovs main"
    if s.comm.startswith("revalidator"):
        return "ovs revalidator"
    if s.comm.startswith(("handler", "urcu", "pmd", "ovs_rcu", "ct_clean", "ipf_clean")):
        return "ovs other"
    if s.comm.startswith("python"):
        if s.prio == kernel_prio(PROBE_RT_PRIORITY):
            return "probe"
        if s.prio == kernel_prio(HYPERVISOR_RT_PRIORITY):
            return "hypervisor"
    return "other"


_EVENT = re.compile(r"\[(\d+)\]\s+(\d+)\.(\d+):\s+sched:(sched_switch|sched_wakeup):\s+(.*)")
_SWITCH = re.compile(r"prev_comm=(.*?) prev_pid=(\d+) prev_prio=(-?\d+) prev_state=\S+ ==> "
                     r"next_comm=(.*?) next_pid=(\d+) next_prio=(-?\d+)")
_WAKEUP = re.compile(r"comm=(.*?) pid=(\d+) prio=(-?\d+) target_cpu=(\d+)")


def parse(lines: Iterable[str]) -> dict[int, list[Slice]]:
    """``perf script -F cpu,time,event,trace --ns`` output of sched_switch and sched_wakeup,
    in time order → per CPU, its slices in time order.

    Each slice ends at a switch and belongs to that switch's ``prev``: the thread that ran up
    to it. Some kernels do not report a CPU's switches out of its idle thread (here: every
    one on CPU 1, with perf and ftrace alike), so a CPU can go from idle to a thread with
    no record; the thread's wakeup, reported by whoever woke it, says when it started, and
    the time before that stays idle. Without that wakeup (a timer's, on the idle CPU itself,
    goes unreported too) the whole gap is ``unknown``. What a CPU ran before its first switch
    in the trace is left out."""
    cpus: dict[int, list[Slice]] = {}
    since: dict[int, tuple[int, int]] = {}  # cpu → (time of its last switch, pid switched to)
    woken: dict[int, int] = {}  # pid → its last wakeup
    for line in lines:
        m = _EVENT.search(line)
        if m is None:
            continue
        cpu = int(m.group(1))
        t = int(m.group(2)) * 1_000_000_000 + int(m.group(3).ljust(9, "0")[:9])
        if m.group(4) == "sched_wakeup":
            w = _WAKEUP.match(m.group(5))
            if w is not None:
                woken[int(w.group(2))] = t
            continue
        sw = _SWITCH.match(m.group(5))
        if sw is None:
            continue
        comm, pid, prio = sw.group(1), int(sw.group(2)), int(sw.group(3))
        if cpu in since:
            start, expected = since[cpu]
            if pid != expected and expected == 0:  # an unreported exit from idle
                began = woken.get(pid, start)
                if began <= start:  # nor its wakeup: idle, then the thread, but when?
                    comm, pid, prio = UNKNOWN, -1, 0
                else:
                    cpus.setdefault(cpu, []).append(Slice(start, began, f"swapper/{cpu}", 0,
                                                          120))
                    start = began
            cpus.setdefault(cpu, []).append(Slice(start, t, comm, pid, prio))
        since[cpu] = (t, int(sw.group(5)))
    return cpus


def occupancy(cpus: dict[int, list[Slice]], a: int, b: int) -> Counter[str]:
    """ns per thread class within [a, b), summed over the CPUs."""
    held: Counter[str] = Counter()
    for slices in cpus.values():
        i = max(0, bisect.bisect_right(slices, a, key=lambda s: s.start) - 1)
        while i < len(slices) and slices[i].start < b:
            s = slices[i]
            overlap = min(s.end, b) - max(s.start, a)
            if overlap > 0:
                held[thread_class(s)] += overlap
            i += 1
    return held


class SchedError(RuntimeError):
    pass


class SchedTrace:
    """``perf record`` of every CPU's switches and wakeups into ``path``, between start() and
    stop(); read() parses it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self, within_s: float = 10.0) -> None:
        if shutil.which("perf") is None:
            raise SchedError("perf not found: install linux-perf (scripts/install.sh does)")
        self.path.unlink(missing_ok=True)
        log = self.path.with_suffix(".log")
        # setpriv: a perf whose parent died (a killed bench) stops instead of recording on.
        with log.open("wb") as err:
            self._proc = subprocess.Popen(
                ["setpriv", "--pdeathsig", "INT", "perf", "record", "-q", "-e",
                 "sched:sched_switch", "-e", "sched:sched_wakeup", "-a", "-k", "mono", "-o",
                 str(self.path)], stdout=subprocess.DEVNULL, stderr=err)
        # perf writes the file's header once its events are set up on every CPU.
        deadline = time.monotonic() + within_s
        while not (self.path.exists() and self.path.stat().st_size > 0):
            if self._proc.poll() is not None:
                raise SchedError(f"perf record exited with {self._proc.returncode}: "
                                 f"{log.read_text(errors='replace').strip()[:300]}")
            if time.monotonic() > deadline:
                self.stop()
                raise SchedError(f"perf record did not start within {within_s:g} s")
            time.sleep(0.01)

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def read(self) -> dict[int, list[Slice]]:
        out = subprocess.run(["perf", "script", "-i", str(self.path), "-F",
                              "cpu,time,event,trace", "--ns"], capture_output=True, text=True,
                             check=False)
        if out.returncode != 0:
            raise SchedError(f"perf script -i {self.path}: {out.stderr.strip()[:300]}")
        return parse(out.stdout.splitlines())


def while_late(cpus: dict[int, list[Slice]],
               windows: Iterable[tuple[int, int]]) -> tuple[Counter[str], int]:
    """What ran during the (due, sent) windows of late sends: ns per thread class summed over
    windows and CPUs, and the CPU time those windows spanned (window times CPUs)."""
    held: Counter[str] = Counter()
    span = 0
    for due, sent in windows:
        held.update(occupancy(cpus, due, sent))
        span += (sent - due) * len(cpus)
    return held, span
