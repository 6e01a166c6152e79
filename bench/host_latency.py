"""How late this host wakes a real-time thread: the floor under any 1 kHz probe figure.

One process per CPU, pinned there at SCHED_FIFO (default 98, above everything the lab runs),
sleeps to every millisecond for ``--seconds`` and records how late it woke. On bare metal this
is tens of microseconds. In a VM whose idle vCPUs halt, a wake-up waits for the host to run
the vCPU again, and the host may also preempt a running one: every wake-up that comes a
millisecond or more late would widen the gap of a probe client that needed the CPU then, in
any mode, migration or not (the bench's in-place floor shows them too). Run it on an idle
machine, and compare with `bench/migration.py`'s tails.

    .venv/bin/python bench/host_latency.py [--seconds 20] [--priority 98]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from rich.console import Console
from rich.table import Table

from ferry.probe.hostwatch import PERIOD_NS, realtime_on, wake_ups


def measure(cpu: int, seconds: float, priority: int) -> list[int]:
    """Wake-up lateness (ns) of a 1 kHz SCHED_FIFO sleeper pinned to ``cpu``."""
    realtime_on(cpu, priority)
    return [late for _, late in wake_ups(seconds)]


def pct(values: list[int], q: float) -> float:
    return values[min(len(values) - 1, int(q * len(values)))] / 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--priority", type=int, default=98, help="SCHED_FIFO priority, 1..99")
    ap.add_argument("--cpu", type=int, help=argparse.SUPPRESS)  # one worker
    a = ap.parse_args()
    if not 1 <= a.priority <= 99:
        ap.error(f"--priority {a.priority}: SCHED_FIFO priorities are 1..99")
    if a.seconds <= 0:
        ap.error(f"--seconds {a.seconds}: must be positive")
    if a.cpu is not None:
        print(json.dumps(sorted(measure(a.cpu, a.seconds, a.priority))))
        return
    cpus = sorted(os.sched_getaffinity(0))
    workers = {cpu: subprocess.Popen([sys.executable, __file__, "--cpu", str(cpu),
                                      "--seconds", str(a.seconds), "--priority",
                                      str(a.priority)], stdout=subprocess.PIPE, text=True)
               for cpu in cpus}
    table = Table(title=f"wake-up lateness of a 1 kHz SCHED_FIFO {a.priority} sleeper per CPU, "
                        f"{a.seconds:g} s (µs)")
    for col in ("cpu", "wake-ups", "p50", "p99", "p99.9", "max", "≥ 1 ms"):
        table.add_column(col, justify="right")
    for cpu, proc in workers.items():
        out, _ = proc.communicate()
        if proc.returncode != 0:
            raise SystemExit(f"cpu {cpu}: worker failed ({proc.returncode}); root is needed "
                             "for SCHED_FIFO")
        late: list[int] = json.loads(out)
        table.add_row(str(cpu), str(len(late)), f"{pct(late, 0.5):.0f}", f"{pct(late, 0.99):.0f}",
                      f"{pct(late, 0.999):.0f}", f"{late[-1] / 1e3:.0f}",
                      str(sum(1 for x in late if x >= PERIOD_NS)))
    Console().print(table)


if __name__ == "__main__":
    main()
