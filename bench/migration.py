"""Live migrations under the 1 kHz probe on one real lab, both migration modes side by side
(spec: the spec's three steps; live: bound to both chassis, activated in the datapath), with
the given pause and with no pause at all; and, as the floor they are measured against, the
same pause with no migration at all (in-place: the VM frozen and resumed on its own VIF, with
its RARP; the downtime it shows comes from the probe's 1 ms spacing and the pause mechanics,
not from any flow change). Per traffic class (L2: clients on the VM's network;
L3: clients on another subnet, through a distributed router; FIP: the lab's outside host, to
the VM's floating IP over the external network), per mode and per pause:

- downtime beyond the pause p50/p99/max, within 500 ms of the pause, and again counting only
  gaps that start before Nova's source unplug ("to-unplug"): deleting a port stalls the lab's
  userspace datapath on that chassis for 5-20 ms whatever the controller does (docs/measuring.md);
- convergence (the first switch the controllers follow: the destination datapath's report of
  the activation in live mode, held 30 ms by its agent before it is published; step 2, or
  step 3 when Nova moves the binding first → every chassis' flows acked for one) p50/p99;
- packets lost, duplicated and reordered;
- "send late max": the most a probe client sent behind its schedule within its downtime gap
  (a client starved of CPU sends late: that share of the gap is the instrument's);
- the destination's datapath flows just before (p50): ``--background-flows N`` gives every
  chassis about N more (:mod:`ferry.probe.background`), as on a busy hypervisor;
- with ``--hops`` (:mod:`ferry.probe.capture`, tcpdump on the destination's links): where each
  class' first packet after the resume waited (how late its client sent it, its travel to the
  destination chassis, then the time that chassis held it) and how many packets the
  destination dropped after the RARP;
- with ``--sched`` (:mod:`ferry.probe.sched`, a host-wide ``perf`` sched_switch trace): how
  many clients sent their first packet after the resume more than 0.2 ms late, and who held
  the CPUs meanwhile (each chassis' ovs-vswitchd main thread, its revalidators, the probe, the
  lab's hypervisor, anything else, or nothing), as shares of those cores' time;
- with ``--binding-activation before-unplug`` or ``at-pause``: Nova's own orders, where the
  destination binding (the spec's step 3) is activated before the source unplug, or already
  when libvirt reports the source paused (ferry.lab.migrate.BINDING_ACTIVATIONS);
- with ``--host-watch`` (:mod:`ferry.probe.hostwatch`, a SCHED_FIFO 98 sleeper per CPU, above
  everything the lab runs): how many runs had the host itself stall 1 ms or more within their
  window (a wake-up that late is the kernel's or the VM host's, not the lab's load), and the
  downtime figures of the other runs beside those of all.

    .venv/bin/python bench/migration.py --migrations 10 [--store etcd] [--pause-ms 50]
        [--background-flows 1000] [--hops] [--ovs-rt-priority 20] [--normal-rcu]
        [--classes L2,L3,FIP] [--sched] [--host-watch]
        [--binding-activation after-unplug|before-unplug|at-pause]

Every ovs-vswitchd runs at SCHED_FIFO ``--ovs-rt-priority`` (default: below the probe's
clients, above everything else the lab runs but its hypervisor, see ferry.demo.OVS_RT_PRIORITY;
0: normal scheduling). The host's RCU grace periods
are expedited while the lab runs unless ``--normal-rcu`` (ferry.lab.host).

``OUT/bench.json`` (``--out``) keeps the arguments, every table cell's figures and every run's
own (per class, its hops with ``--hops``, the host's worst stall in its window with
``--host-watch``), for a look at the runs behind a tail.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
from collections.abc import Iterator
from pathlib import Path

from rich.console import Console
from rich.table import Table

from ferry.demo import (
    OVS_RT_PRIORITY,
    TRAFFIC_CLASSES,
    MigrationResult,
    class_of,
    run_demo,
    summary,
)
from ferry.lab.migrate import BINDING_ACTIVATIONS, IN_PLACE, LINKS
from ferry.probe.background import MAX_BACKGROUND_FLOWS
from ferry.probe.hostwatch import HostWatch, worst_within
from ferry.probe.runner import PROBE_RT_PRIORITY
from ferry.probe.sched import THREAD_CLASSES, SchedTrace, while_late

HOST_STALL_NS = 1_000_000
"""A wake-up of the host watcher this late (or later) within a run's window marks the run."""
LATE_NS = 200_000
"""A first send after the resume this late (or later) counts as late in the ``--sched`` table."""


def pct(values: list[float], q: float) -> float:
    vs = sorted(values)
    return vs[min(len(vs) - 1, max(0, math.ceil(q * len(vs)) - 1))]


def figures(results: list[MigrationResult], cls: str) -> dict[str, float]:
    rows = [r.by_class[cls] for r in results if cls in r.by_class]
    conv = [r.converged_ms for r in results if r.converged_ms is not None]
    out: dict[str, float] = {"n": len(rows)}
    # Per-class values a run may lack (no capture, no gap) are NaN or absent: left out.
    for key, name in (("beyond_pause_ms", "beyond"), ("switch_beyond_ms", "switch"),
                      ("send_late_ms", "late"), ("travel_ms", "travel"), ("held_ms", "held"),
                      ("first_late_ms", "first_late")):
        vs = [v for row in rows if not math.isnan(v := row.get(key, math.nan))]
        if vs:
            out.update({f"{name}_p50": pct(vs, 0.5), f"{name}_p99": pct(vs, 0.99),
                        f"{name}_max": max(vs)})
    if conv:
        out.update(converge_p50=pct(conv, 0.5), converge_p99=pct(conv, 0.99))
    flows = [r.dest_flows for r in results if r.dest_flows is not None]
    if flows:
        out["dest_flows_p50"] = pct([float(f) for f in flows], 0.5)
    for k in ("lost", "duplicated", "reordered"):
        out[k] = sum(row[k] for row in rows)
    if any("dest_dropped" in row for row in rows):
        out["dest_dropped"] = sum(row.get("dest_dropped", 0) for row in rows)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--migrations", type=int, default=10, help="per mode and per pause")
    ap.add_argument("--store", choices=["memory", "etcd"], default="memory")
    ap.add_argument("--chassis", type=int, default=3)
    ap.add_argument("--pause-ms", type=float, default=50.0)
    ap.add_argument("--modes", default=f"spec,live,{IN_PLACE}",
                    help=f"comma-separated: spec, live, {IN_PLACE} (no migration: the floor)")
    ap.add_argument("--unplug-delay-ms", type=float, default=100.0)
    ap.add_argument("--rate-hz", type=float, default=1000.0)
    ap.add_argument("--clients", type=int, default=1, help="probe clients per traffic class")
    ap.add_argument("--links", choices=LINKS, default="steady",
                    help="steady: VIF links stay up as QEMU's taps do; flap: the source link "
                         "goes down at the pause, the destination's comes up at the resume")
    ap.add_argument("--background-flows", type=int, default=0,
                    help="about this many more datapath flows on every chassis, all along")
    ap.add_argument("--hops", action="store_true",
                    help="capture the probe packets entering the destination chassis "
                         "(tcpdump) and show where each class' first packet after the resume "
                         "waited, and how many the destination dropped after the RARP")
    ap.add_argument("--ovs-rt-priority", type=int, default=OVS_RT_PRIORITY, metavar="N",
                    help="every chassis' ovs-vswitchd at SCHED_FIFO N (default "
                         f"{OVS_RT_PRIORITY}: below the probe's clients, which pace at "
                         f"SCHED_FIFO {PROBE_RT_PRIORITY} and stand for VMs on other hosts; "
                         "0: normal scheduling, where OVS waits for the CPU at a live "
                         "activation)")
    ap.add_argument("--classes", default=",".join(TRAFFIC_CLASSES.values()),
                    help="comma-separated traffic classes the probe sends (default all: "
                         f"{', '.join(TRAFFIC_CLASSES.values())}); fewer is less forwarding "
                         "load on the lab's cores, with the same lab and flows")
    ap.add_argument("--normal-rcu", action="store_true",
                    help="leave the host's RCU grace periods as they are (default: expedited "
                         "while the lab runs, so that a port deletion does not stall the "
                         "userspace datapath; see ferry.lab.host)")
    ap.add_argument("--sched", action="store_true",
                    help="trace the host's scheduler (perf) during the migrations and show "
                         "who held the CPUs while the probe's clients sent late at the resume")
    ap.add_argument("--host-watch", action="store_true",
                    help="watch the host's own stalls (a SCHED_FIFO 98 sleeper per CPU) and "
                         "show the figures of the runs it did not stall beside those of all")
    ap.add_argument("--binding-activation", choices=BINDING_ACTIVATIONS, default="after-unplug",
                    help="when Nova activates the destination's port binding: after-unplug "
                         "(the spec's order), before-unplug (Nova's post-live-migration with "
                         "port bindings), at-pause (Nova's default: on libvirt's event that "
                         "the source paused)")
    ap.add_argument("--out", type=Path, default=Path("out/bench-migration"))
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    modes = a.modes.split(",")
    unknown = sorted(set(modes) - {"spec", "live", IN_PLACE})
    if not 0 <= a.background_flows <= MAX_BACKGROUND_FLOWS:
        ap.error(f"--background-flows {a.background_flows}: must be in 0..{MAX_BACKGROUND_FLOWS}")
    if not 0 <= a.ovs_rt_priority <= 99:
        ap.error(f"--ovs-rt-priority {a.ovs_rt_priority}: must be in 0..99 (SCHED_FIFO)")
    classes = a.classes.split(",")
    if not classes or set(classes) - set(TRAFFIC_CLASSES.values()):
        ap.error(f"--classes {a.classes!r}: want some of "
                 f"{', '.join(TRAFFIC_CLASSES.values())}")
    if unknown or not modes:
        ap.error(f"--modes {a.modes!r}: unknown {', '.join(unknown)}; want spec, live, "
                 f"{IN_PLACE}")
    pauses = [a.pause_ms] + ([0.0] if a.pause_ms else [])
    # Interleaved, so that both modes see the same lab in the same state over time.
    plan: list[tuple[str | None, float]] = [
        (modes[i % len(modes)], pause) for pause in pauses
        for i in range(a.migrations * len(modes))]
    sched = SchedTrace(a.out / "sched.data") if a.sched else None
    watch = HostWatch(a.out / "hostwatch") if a.host_watch else None
    results = asyncio.run(run_demo(a.chassis, a.store, len(plan), a.pause_ms,
                                   a.unplug_delay_ms, a.rate_hz, a.out, plan=plan,
                                   clients_per_class=a.clients, links=a.links,
                                   background=a.background_flows, capture=a.hops,
                                   ovs_rt_priority=a.ovs_rt_priority,
                                   expedite_rcu=not a.normal_rcu, classes=classes,
                                   sched=sched, host_watch=watch,
                                   binding_activation=a.binding_activation))
    console = Console(width=150)
    console.print(summary(results, f"store {a.store}"))
    table = Table(title=f"downtime beyond the pause per traffic class, store {a.store}, "
                        f"{a.rate_hz:.0f} Hz probe, {a.links} VIF links, "
                        f"{a.background_flows} background flows, binding activated "
                        f"{a.binding_activation}, ovs-vswitchd at "
                        f"{f'SCHED_FIFO {a.ovs_rt_priority}' if a.ovs_rt_priority else 'normal'} "
                        f"priority, {'normal' if a.normal_rcu else 'expedited'} RCU "
                        "(ms); p50/p99/max "
                        "within 500 ms of the pause, and only up to Nova's source unplug")
    for col in ("class", "mode", "pause ms", "n", "p50", "p99", "max", "to-unplug p50",
                "to-unplug p99", "to-unplug max", "converge p50", "converge p99", "lost",
                "dup", "reord", "dest flows", "send late max"):
        table.add_column(col, justify="right")
    grid = list(cells(results, plan, classes, pauses, modes))
    report = {}
    for cls, pause, mode, rs in grid:
        f = figures(rs, cls)
        report[f"{cls}/{mode}/{pause:g}"] = f
        add_row(table, cls, mode, pause, f)
    console.print(table)
    if a.hops:
        console.print(hops_table(report, classes, pauses, modes))
    if sched is not None:
        console.print(sched_table(sched, grid))
    if watch is not None:
        console.print(host_table(watch, grid))
    stalls = watch.stalls() if watch is not None else None
    runs = [{**dataclasses.asdict(r), "host_stall_ms": None if stalls is None
             else worst_within(stalls, *stall_span(r)) / 1e6} for r in results]
    (a.out / "bench.json").write_text(json.dumps(
        {"args": {k: str(v) for k, v in vars(a).items()}, "figures": report, "runs": runs},
        indent=1))


def add_row(table: Table, cls: str, mode: str, pause: float, f: dict[str, float]) -> None:
    table.add_row(cls, mode, f"{pause:g}", str(int(f["n"])),
                  *(f"{f.get(k, float('nan')):.1f}" for k in (
                      "beyond_p50", "beyond_p99", "beyond_max", "switch_p50", "switch_p99",
                      "switch_max", "converge_p50", "converge_p99")),
                  *(str(int(f[k])) for k in ("lost", "duplicated", "reordered")),
                  f"{f.get('dest_flows_p50', float('nan')):.0f}",
                  f"{f.get('late_max', float('nan')):.1f}")


Cell = tuple[str, float, str, list[MigrationResult]]


def cells(results: list[MigrationResult], plan: list[tuple[str | None, float]],
          classes: list[str], pauses: list[float], modes: list[str]) -> Iterator[Cell]:
    """(class, pause, mode, the runs of that mode and pause) in the tables' order."""
    for cls in classes:
        for pause in pauses:
            for mode in modes:
                yield cls, pause, mode, [r for r, (m, p) in zip(results, plan, strict=True)
                                         if m == mode and p == pause]


def stall_span(r: MigrationResult) -> tuple[int, int]:
    """Where a host stall counts against a run: its window, stretched to the end of the
    longest gap it counts (a gap that starts in the window is counted whole, tail included)."""
    start, end = r.window_ns
    longest = r.downtime_ms if math.isfinite(r.downtime_ms) else 0.0
    return start, end + int(longest * 1e6)


def host_table(watch: HostWatch, grid: list[Cell]) -> Table:
    stalls = watch.stalls()
    table = Table(title=f"downtime beyond the pause (ms) of the runs the host did not stall "
                        f"(no wake-up of a SCHED_FIFO 98 sleeper {HOST_STALL_NS / 1e6:g} ms "
                        "late or more within the run's window or a gap it counts), in the whole "
                        "window and up to "
                        "Nova's source unplug, beside all runs")
    for col in ("class", "mode", "pause ms", "host-stalled runs", "worst stall ms", "p50",
                "p99", "max", "to-unplug p99", "to-unplug max", "all: p99", "all: max"):
        table.add_column(col, justify="right")

    def fig(vs: list[float], q: float) -> str:
        return f"{pct(vs, q):.1f}" if vs else "-"

    for cls, pause, mode, runs in grid:
        rs = [r for r in runs if cls in r.by_class]
        stall = {r.number: worst_within(stalls, *stall_span(r)) for r in rs}
        quiet = [r.by_class[cls] for r in rs if stall[r.number] < HOST_STALL_NS]
        calm = [c["beyond_pause_ms"] for c in quiet]
        switch = [c["switch_beyond_ms"] for c in quiet if not math.isnan(c["switch_beyond_ms"])]
        every = [r.by_class[cls]["beyond_pause_ms"] for r in rs]
        table.add_row(cls, mode, f"{pause:g}", f"{len(rs) - len(calm)}/{len(rs)}",
                      f"{max(stall.values(), default=0) / 1e6:.1f}", fig(calm, 0.5),
                      fig(calm, 0.99), fig(calm, 1.0), fig(switch, 0.99), fig(switch, 1.0),
                      fig(every, 0.99), fig(every, 1.0))
    return table


def sched_table(sched: SchedTrace, grid: list[Cell]) -> Table:
    cpus = sched.read()
    table = Table(title=f"the first packet after the resume, per class: clients that sent it "
                        f"{LATE_NS / 1e6:g} ms late or more (all runs), how late (p50 of "
                        "those), and who held the host's CPUs meanwhile (% of those cores' "
                        f"time, {len(cpus)} CPUs)")
    for col in ("class", "mode", "pause ms", "late", "late p50 ms", *THREAD_CLASSES):
        table.add_column(col, justify="right")
    for cls, pause, mode, runs in grid:
        sends = [(due, sent) for r in runs
                 for client, due, sent in r.first_sends if class_of(client) == cls]
        late = [(due, sent) for due, sent in sends if sent - due >= LATE_NS]
        held, span = while_late(cpus, late)
        p50 = pct([(s - d) / 1e6 for d, s in late], 0.5) if late else float("nan")
        table.add_row(cls, mode, f"{pause:g}", f"{len(late)}/{len(sends)}", f"{p50:.2f}",
                      *(f"{100 * held[k] / span:.0f}" if span else "-"
                        for k in THREAD_CLASSES))
    return table


def hops_table(report: dict[str, dict[str, float]], classes: list[str], pauses: list[float],
               modes: list[str]) -> Table:
    table = Table(title="the first packet after the resume, per class (worst client, ms): "
                        "how late its client sent it (the instrument, starved of CPU), its "
                        "travel from its sending to its arrival in the destination chassis "
                        "(the sender's chassis and the underlay), then held there until the "
                        "VM got it; and packets the destination dropped after the RARP "
                        "(all runs)")
    for col in ("class", "mode", "pause ms", "sent late p50", "sent late p99", "travel p50",
                "travel p99", "held p50", "held p99", "held max", "dropped"):
        table.add_column(col, justify="right")
    for cls in classes:
        for pause in pauses:
            for mode in modes:
                f = report[f"{cls}/{mode}/{pause:g}"]
                table.add_row(cls, mode, f"{pause:g}",
                              *(f"{f.get(k, float('nan')):.2f}"
                                for k in ("first_late_p50", "first_late_p99", "travel_p50",
                                          "travel_p99", "held_p50", "held_p99", "held_max")),
                              str(int(f.get("dest_dropped", 0))))
    return table


if __name__ == "__main__":
    main()
