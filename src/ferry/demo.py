"""``ferry demo``: live migration on a lab of real OVS chassis, measured by real packets.

Builds a lab (embedded store, or etcd with one controller process per chassis): a VM with a
floating IP, probe clients on its network (L2), on another subnet behind a distributed router
(L3) and the lab's outside host (FIP). Under a 1 kHz UDP probe from every client it first
pauses the VM in place (no migration: the floor), then migrates it back and forth; prints the
downtime figures per run and writes the delivery timelines as PNGs. The lab is removed at the
end, also on failure.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import statistics
from collections.abc import Sequence
from contextlib import AsyncExitStack, ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from ferry.lab.cli import BindingActivationOpt
from ferry.lab.host import rcu_expedited
from ferry.lab.lab import EXTERNAL_PHYSNET, Lab, LabError, destroy_leftovers
from ferry.lab.migrate import (
    IN_PLACE,
    LINKS,
    MigrationRun,
    migrate,
    pause_in_place,
)
from ferry.lab.netns import wait_for
from ferry.lab.neutron import Neutron
from ferry.lab.nova import boot
from ferry.lab.ovs_instance import OvsError
from ferry.lab.services import start_control_plane
from ferry.probe.background import MAX_BACKGROUND_FLOWS, background_flows, datapath_flows
from ferry.probe.capture import Capture, Hops, hops
from ferry.probe.hostwatch import HostWatch
from ferry.probe.records import ProbeData
from ferry.probe.report import build_report, downtime_window
from ferry.probe.runner import OUTSIDE, PROBE_RT_PRIORITY, Probe, now_ns
from ferry.probe.sched import SchedTrace

console = Console(width=120)  # the summary table is wider than a pipe's default 80


@dataclass
class MigrationResult:
    number: int
    source: str
    dest: str
    pause_ms: float
    downtime_ms: float | None
    beyond_pause_ms: float | None
    lost: int
    duplicated: int
    reordered: int
    converged_ms: float | None  # activation report (live) or step 2 → last chassis acked
    plot: str
    mode: str = "?"
    by_class: dict[str, dict[str, float]] = field(default_factory=dict)
    """Per traffic class (L2, L3, FIP), worst client: beyond_pause_ms (±500 ms around the
    pause), switch_beyond_ms (the same, but only up to Nova's source unplug), send_late_ms
    (how late a client sent within its gap: the instrument's share); lost, duplicated,
    reordered."""
    switch_beyond_ms: float | None = None
    """Downtime beyond the pause up to Nova's source unplug: the switch itself, without the
    forwarding stall that deleting a port causes in OVS's userspace datapath (docs/measuring.md)."""
    dest_flows: int | None = None
    """Datapath flows on the destination just before: each revalidation round there (the
    activation's switch waits for one) retranslates all of them."""
    hops: list[Hops] = field(default_factory=list)
    """With a capture: per client, where its first packet after the resume waited."""
    window_ns: tuple[int, int] = (0, 0)
    """The reported window (CLOCK_MONOTONIC ns): the pause and AROUND_MS on each side."""
    first_sends: list[tuple[str, int, int]] = field(default_factory=list)
    """Per client, its first packet sent after the resume: (client, when it was due, when it
    was sent), CLOCK_MONOTONIC ns; what ran in between: :mod:`ferry.probe.sched`."""


OVS_RT_PRIORITY = 20
"""Where the demo and the bench put every ovs-vswitchd (SCHED_FIFO): above the lab's VMs and
agents, below the probe (``PROBE_RT_PRIORITY``, clients that stand for VMs on other hosts) and
the lab's hypervisor process. ``ovs-ctl``'s nice -10 loses to any real-time process, and at a
live activation OVS needs its cores at once (docs/measuring.md; ``--ovs-rt-priority 0`` shows
it)."""

AROUND_MS = 500.0
"""Each migration's downtime is the longest gap within this much of its pause."""

TRAFFIC_CLASSES = {"c": "L2", "r": "L3", OUTSIDE: "FIP"}
"""Probe clients by name prefix: c* share the VM's network; r* reach it through a router;
the lab's outside host reaches it by its floating IP over the external network."""


def class_of(client: str) -> str:
    """The traffic class of one of :func:`build`'s probe clients (by its name's prefix)."""
    return next(cls for prefix, cls in TRAFFIC_CLASSES.items() if client.startswith(prefix))


async def build(lab: Lab, api: Neutron, n_clients: int
                ) -> tuple[str, list[str], dict[str, str]]:
    """The VM on chassis 1; ``n_clients`` L2 clients (same network) and as many L3 clients
    (another subnet, routed by a distributed router), spread over the chassis from the last.
    Each probe client paces 1 kHz with a busy-wait at real-time priority: on two cores,
    more than a few of them starve OVS and inflate every figure."""
    net = await api.create("network", name="demo-net")
    sub = await api.create("subnet", network_id=net["id"], cidr="10.20.0.0/24", ip_version=4,
                           name="demo-subnet")
    net2 = await api.create("network", name="demo-net2")
    sub2 = await api.create("subnet", network_id=net2["id"], cidr="10.21.0.0/24",
                            ip_version=4, name="demo-subnet2")
    public = await api.create("network", name="public", **{
        "router:external": True, "provider:network_type": "flat",
        "provider:physical_network": EXTERNAL_PHYSNET})
    await api.create("subnet", network_id=public["id"], cidr="172.24.4.0/24", ip_version=4,
                     gateway_ip=lab.outside_ip, enable_dhcp=False)
    router = await api.create("router", name="demo-router",
                              external_gateway_info={"network_id": public["id"]})
    for s in (sub, sub2):
        await api.call("PUT", f"/routers/{router['id']}/add_router_interface",
                       {"subnet_id": s["id"]})
    chassis = [ch.name for ch in lab.state.chassis]
    vm_port = await api.create("port", network_id=net["id"], name="vm")
    await api.call("POST", "/security-group-rules", {"security_group_rule": {
        "security_group_id": vm_port["security_groups"][0], "direction": "ingress",
        "ethertype": "IPv4", "protocol": "udp", "remote_ip_prefix": "172.24.4.0/24"}})
    fip = await api.create("floatingip", floating_network_id=public["id"],
                           port_id=vm_port["id"])
    await boot(lab, api, "vm", vm_port["id"], chassis[0])
    clients = []
    for prefix, network in (("c", net), ("r", net2)):
        for i in range(n_clients):
            port = await api.create("port", network_id=network["id"],
                                    name=f"client-{prefix}{i + 1}")
            name = f"{prefix}{i + 1}"
            # The first client on the last chassis: the VM starts on the first.
            await boot(lab, api, name, port["id"], chassis[(len(chassis) - 1 + i) %
                                                           len(chassis)])
            clients.append(name)
    clients.append(OUTSIDE)
    return "vm", clients, {OUTSIDE: fip["floating_ip_address"]}


def convergence_ms(run: MigrationRun) -> float | None:
    """From the first switch the controllers follow to the last chassis' flows acked for one.
    The switches: live mode's activation (the destination datapath's report, which the agent
    holds 30 ms before publishing), step 2 (the source unplugged) and step 3 (the binding
    moved: ``done``). Nova's early activation can bring two close together, and each chassis
    acks the one it saw first."""
    stamps: dict[str, float] = (run.record or {}).get("timestamps", {})
    phases = {"activated": "activated", "source_unplugged": "source_unplugged",
              "done": "bound"}  # ack phase → the record's timestamp of that switch
    starts = [stamps[s] for s in phases.values() if s in stamps]
    first_ack: dict[str, float] = {}
    for key, t in stamps.items():
        chassis, _, phase = key.removeprefix("acked.").rpartition(".")
        if key.startswith("acked.") and chassis and phase in phases:
            first_ack[chassis] = min(t, first_ack.get(chassis, t))
    if not starts or not first_ack:
        return None
    return (max(first_ack.values()) - min(starts)) * 1000


async def one_migration(lab: Lab, api: Neutron, number: int, dest: str, clients: list[str],
                        out: Path, pause_ms: float, unplug_delay_ms: float,
                        rate_hz: float, mode: str | None = None,
                        targets: dict[str, str] | None = None,
                        links: str = "steady", capture: bool = False,
                        binding_activation: str = "after-unplug") -> MigrationResult:
    """One migration (or in-place pause) under the probe. ``capture``: also record the probe
    packets entering the destination chassis (:mod:`ferry.probe.capture`) for ``hops``.
    ``binding_activation``: when Nova activates the destination binding
    (:data:`ferry.lab.migrate.BINDING_ACTIVATIONS`)."""
    run_dir = out / f"migration{number}"
    await asyncio.to_thread(shutil.rmtree, run_dir, True)  # a previous demo's records
    dest_flows = await asyncio.to_thread(datapath_flows, lab, dest)
    probe = Probe(lab, "vm", clients, out_dir=run_dir, rate_hz=rate_hz, max_duration_s=60,
                  targets=targets)
    cap = (Capture(lab.ingress_links(dest), lab.chassis(dest).tunnel_ip, run_dir / "capture")
           if capture else None)
    await probe.astart()
    try:
        # Traffic all through the reported window (AROUND_MS each side of the pause): the
        # probe's start and stop are not part of any migration.
        await probe.await_delivered(100)
        if cap is not None:
            await asyncio.to_thread(cap.start)
        await probe.await_delivered(1, since_ns=now_ns() + int(AROUND_MS * 1e6))
        if mode == IN_PLACE:
            run = await pause_in_place(lab, "vm", pause_ms)
        else:
            run = await migrate(lab, api, "vm", dest, pause_ms=pause_ms,
                                unplug_delay_ms=unplug_delay_ms, mode=mode, links=links,
                                binding_activation=binding_activation)
        await probe.await_delivered(200, since_ns=max(
            int(run.events["done"]), run.pause_window_ns[1] + int(AROUND_MS * 1e6)))
    finally:
        try:
            await probe.astop()
        finally:
            if cap is not None:
                await asyncio.to_thread(cap.stop)
    from ferry.probe.plot import plot_timeline  # matplotlib: only when there is a run to plot

    pause = run.pause_window_ns
    data = probe.data()  # the records, read once for the reports, the plot and the hops
    report = build_report(data, pause, AROUND_MS)
    unplug = run.events.get("unplugging")
    switch = build_report(data, pause, AROUND_MS, None if unplug is None else int(unplug))
    plot = plot_timeline(data, out / f"migration{number}.png", pause, xlim_ms=(-100, 400))
    total = report.total
    found = hops_of(data, cap, run) if cap is not None else []
    by_class: dict[str, dict[str, float]] = {}
    for cls in TRAFFIC_CLASSES.values():
        members = [c for c in report.clients if class_of(c.name) == cls]
        beyond = [c.downtime_beyond_pause_ms for c in members
                  if c.downtime_beyond_pause_ms is not None]
        at_switch = [c.downtime_beyond_pause_ms for c in switch.clients
                     if class_of(c.name) == cls and c.downtime_beyond_pause_ms is not None]
        late = [c.send_late_in_gap_ms for c in members if c.send_late_in_gap_ms is not None]
        if members:
            by_class[cls] = {"beyond_pause_ms": _worst(beyond),
                             "send_late_ms": _worst(late),
                             "switch_beyond_ms": _worst(at_switch),
                             "lost": sum(c.lost for c in members),
                             "duplicated": sum(c.duplicated for c in members),
                             "reordered": sum(c.reordered for c in members)}
            mine = [h for h in found if class_of(h.client) == cls]
            held = [h.held_ms for h in mine if h.held_ms is not None]
            travel = [h.to_chassis_ms for h in mine if h.to_chassis_ms is not None]
            first_late = [h.sent_late_ms for h in mine if h.sent_late_ms is not None]
            if mine:
                by_class[cls].update(held_ms=_worst(held), travel_ms=_worst(travel),
                                     first_late_ms=_worst(first_late),
                                     dest_dropped=sum(h.dropped for h in mine))
    return MigrationResult(number, run.source, run.dest, (pause[1] - pause[0]) / 1e6,
                           report.downtime_ms, report.downtime_beyond_pause_ms, total.lost,
                           total.duplicated, total.reordered, convergence_ms(run), str(plot),
                           run.mode, by_class, switch.downtime_beyond_pause_ms, dest_flows,
                           found, downtime_window(pause, int(AROUND_MS * 1e6)),
                           first_sends(data, int(run.events["resumed"])))


def first_sends(data: ProbeData, resumed_ns: int) -> list[tuple[str, int, int]]:
    """Per client, (name, due, sent) of its first packet sent at or after the resume."""
    out = []
    for c in data.clients:
        first = min(((t, late) for _, t, late in c.sent if t >= resumed_ns), default=None)
        if first is not None:
            out.append((c.name, first[0] - first[1], first[0]))
    return out


def _worst(values: list[float]) -> float:
    """The largest of a class' per-client values; NaN when no client has one."""
    return max(values, default=float("nan"))


def hops_of(data: ProbeData, cap: Capture, run: MigrationRun) -> list[Hops]:
    """Per client, where its first packet after the resume waited (the capture is of the
    chassis the VM resumed on; drops are counted within AROUND_MS of the RARP)."""
    seen = cap.arrivals()
    resumed = int(run.events["resumed"])
    announced = int(run.events.get("announced", resumed))
    return [hops(c.name, c.probe_id, c.sent, c.delivered, seen, resumed, announced,
                 int(AROUND_MS * 1e6)) for c in data.clients]


async def run_demo(chassis: int, store: str, migrations: int, pause_ms: float,
                   unplug_delay_ms: float, rate_hz: float, out: Path,
                   keep_lab: bool = False,
                   plan: list[tuple[str | None, float]] | None = None,
                   clients_per_class: int = 1, links: str = "steady",
                   background: int = 0, capture: bool = False,
                   ovs_rt_priority: int = 0, expedite_rcu: bool = False,
                   classes: Sequence[str] | None = None,
                   sched: SchedTrace | None = None,
                   host_watch: HostWatch | None = None,
                   binding_activation: str = "after-unplug") -> list[MigrationResult]:
    """``plan``: (mode, pause) per migration; default ``migrations`` times (deployment's, pause).
    ``links``: how the VIFs show the pause and resume (:data:`ferry.lab.migrate.LINKS`,
    checked by :func:`ferry.lab.migrate.pre_migration`). ``background``: about that many
    datapath flows on every chassis of the VM's network, all along
    (:mod:`ferry.probe.background`, sent by the first L2 client). ``capture``: see
    :func:`one_migration`. ``ovs_rt_priority``: every ovs-vswitchd at that SCHED_FIFO
    priority (:meth:`ferry.lab.lab.Lab.set_ovs_realtime`; 0: normal scheduling).
    ``expedite_rcu``: the host's RCU grace periods expedited while the lab runs
    (:mod:`ferry.lab.host`: no port-deletion stall in the userspace datapath). ``classes``:
    the traffic classes the probe sends (default all of :data:`TRAFFIC_CLASSES`); the lab
    and its topology are the same, only the probe's load changes. ``sched``: traced from the
    first migration to the last (who ran on which CPU, :mod:`ferry.probe.sched`);
    ``host_watch``: the host's own stalls over the same time (:mod:`ferry.probe.hostwatch`).
    ``binding_activation``: see :func:`one_migration`."""
    plan = plan or [(None, pause_ms)] * migrations
    lab = await asyncio.to_thread(Lab.create, chassis)
    console.print(f"lab {lab.prefix}: {chassis} chassis, store {store}, ovs-vswitchd "
                  + (f"at SCHED_FIFO {ovs_rt_priority}" if ovs_rt_priority
                     else "at normal priority") + ", RCU grace periods "
                  + ("expedited" if expedite_rcu else "as the host has them"), highlight=False)
    host = ExitStack()
    try:
        if expedite_rcu:
            try:
                host.enter_context(rcu_expedited())
            except LabError as e:
                raise LabError(f"{e}; --normal-rcu leaves the host's setting alone") from None
        await asyncio.to_thread(start_control_plane, lab, store)
        if ovs_rt_priority:
            try:
                await asyncio.to_thread(lab.set_ovs_realtime, ovs_rt_priority)
            except OvsError as e:
                raise LabError(f"{e}; --ovs-rt-priority 0 leaves OVS at normal priority"
                               ) from None
        api_url = lab.service("api").url  # type: ignore[union-attr]
        assert api_url is not None
        async with Neutron(api_url) as api, AsyncExitStack() as stack:
            _, clients, targets = await build(lab, api, clients_per_class)
            if classes is not None:
                clients = [c for c in clients if class_of(c) in classes]
            names = [ch.name for ch in lab.state.chassis]
            if background:
                stack.enter_context(background_flows(lab, clients[0], background))
                await wait_flows(lab, lab.vm(clients[0]).active_vif.chassis,  # type: ignore[union-attr]
                                 background)
                console.print("background: datapath flows per chassis " + ", ".join(
                    f"{n} {datapath_flows(lab, n)}" for n in names), highlight=False)
            results = []
            # Both started from this thread, which lives as long as the run: what they start
            # exits when the thread that started it does (PR_SET_PDEATHSIG).
            if sched is not None:  # the migrations only, not the lab's building
                sched.start()
                stack.push_async_callback(asyncio.to_thread, sched.stop)
            if host_watch is not None:
                host_watch.start()
                stack.callback(host_watch.stop)
            here = names[0]
            moves = 0
            for i, (mode, pause) in enumerate(plan):
                # Back and forth between the first two chassis, then across all of them.
                dest = names[1] if here == names[0] else names[0]
                if moves >= 2 and len(names) > 2:
                    dest = names[(names.index(here) + 1) % len(names)]
                if mode == IN_PLACE:
                    dest = here
                else:
                    moves += 1
                r = await one_migration(lab, api, i + 1, dest, clients, out, pause,
                                        unplug_delay_ms, rate_hz, mode, targets,
                                        links=links, capture=capture,
                                        binding_activation=binding_activation)
                results.append(r)
                here = dest
                move = ("no migration, paused in place on " + r.source if r.mode == IN_PLACE
                        else f"{r.source} → {r.dest}")
                console.print(f"run {r.number} ({r.mode}): {move}: downtime "
                              f"{_ms(r.downtime_ms)} ms, beyond the pause "
                              f"{_ms(r.beyond_pause_ms)} ms", highlight=False)
            return results
    finally:
        host.close()
        if keep_lab:
            console.print(f"lab {lab.prefix} kept: ferry lab down --lab {lab.prefix}")
        else:
            await asyncio.to_thread(lab.destroy)
            await asyncio.to_thread(destroy_leftovers, lab.prefix)


async def wait_flows(lab: Lab, chassis: str, count: int, within_s: float = 30.0) -> None:
    """Until the chassis' datapath holds at least ``count`` flows."""
    await asyncio.to_thread(wait_for, lambda: datapath_flows(lab, chassis) >= count, within_s,
                            0.2, f"{count} datapath flows on {chassis}")


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def summary(results: list[MigrationResult], mode: str) -> Table:
    t = Table(title=f"live migration under a 1 kHz probe ({mode})")
    for col in ("#", "mode", "move", "pause ms", "downtime ms", "beyond pause ms",
                "before unplug ms", "lost", "dup", "reord", "converged ms"):
        t.add_column(col, justify="right")
    for r in results:
        move = f"{r.source[-1]}→{r.dest[-1]}" if r.source[-1].isdigit() else f"{r.source}→{r.dest}"
        t.add_row(str(r.number), r.mode, move, f"{r.pause_ms:.1f}",
                  _ms(r.downtime_ms), _ms(r.beyond_pause_ms), _ms(r.switch_beyond_ms),
                  str(r.lost), str(r.duplicated), str(r.reordered), _ms(r.converged_ms))
    return t


def stats(values: list[float | None]) -> dict[str, float]:
    vs = sorted(v for v in values if v is not None)
    if not vs:
        return {}
    return {"p50": statistics.median(vs), "max": vs[-1], "min": vs[0]}


def demo_command(
    store: Annotated[str, typer.Option(help="memory (embedded, one process) or etcd (a real "
                                       "etcd, one controller process per chassis)")] = "memory",
    chassis: Annotated[int, typer.Option(min=2, max=8)] = 3,
    migrations: Annotated[int, typer.Option(min=1, max=100)] = 4,
    pause_ms: Annotated[float, typer.Option(min=0, help="The VM's own pause.")] = 50.0,
    unplug_delay_ms: Annotated[float, typer.Option(
        min=0, help="Resume → Nova's post-migration (source unplug, activation).")] = 100.0,
    rate_hz: Annotated[float, typer.Option(min=10, max=10000)] = 1000.0,
    out: Annotated[Path, typer.Option(help="Where the timelines and figures go.")] = Path(
        "out/demo"),
    keep_lab: Annotated[bool, typer.Option(help="Leave the lab up afterwards (to look).")
                        ] = False,
    clients: Annotated[int, typer.Option(
        min=1, max=4, help="Probe clients per traffic class (L2 and L3).")] = 1,
    links: Annotated[str, typer.Option(
        help="steady: VIF links stay up, as QEMU's taps do (the pause freezes the VM on the "
             "source; its link goes with Nova's unplug); flap: the source link goes down at "
             "the pause and the destination's comes up at the resume.")] = "steady",
    background_flows: Annotated[int, typer.Option(
        min=0, max=MAX_BACKGROUND_FLOWS,
        help="About this many more datapath flows on every chassis, all along, as on a busy "
             "hypervisor (frames to unknown MACs from a client VM, N/3 per second).")] = 0,
    ovs_rt_priority: Annotated[int, typer.Option(
        min=0, max=99,
        help="Every ovs-vswitchd at this SCHED_FIFO priority, below the probe's "
             f"{PROBE_RT_PRIORITY} (its clients stand for VMs on other hosts); 0: normal "
             "scheduling.")] = OVS_RT_PRIORITY,
    expedite_rcu: Annotated[bool, typer.Option(
        "--expedite-rcu/--normal-rcu",
        help="Expedited RCU grace periods on this host while the lab runs (put back after): "
             "deleting a port (Nova's unplug) then does not stall the chassis' userspace "
             "datapath for 5-25 ms.")] = True,
    binding_activation: BindingActivationOpt = "after-unplug",
) -> None:
    """Migrate a VM back and forth on a lab of real OVS chassis and report the downtime."""
    if store not in ("memory", "etcd"):
        raise typer.BadParameter(f"{store!r}: memory or etcd", param_hint="--store")
    if links not in LINKS:
        raise typer.BadParameter(f"{links!r}: {' or '.join(LINKS)}", param_hint="--links")
    out.mkdir(parents=True, exist_ok=True)
    # First the same pause with no migration: the floor the migrations are compared with.
    plan: list[tuple[str | None, float]] = [(IN_PLACE, pause_ms)] + [(None, pause_ms)] * migrations
    everything = asyncio.run(run_demo(chassis, store, len(plan), pause_ms, unplug_delay_ms,
                                      rate_hz, out, keep_lab, plan=plan,
                                      clients_per_class=clients, links=links,
                                      background=background_flows,
                                      ovs_rt_priority=ovs_rt_priority,
                                      expedite_rcu=expedite_rcu,
                                      binding_activation=binding_activation))
    console.print(summary(everything, f"store {store}"))
    floor, results = everything[0], everything[1:]
    beyond = stats([r.beyond_pause_ms for r in results])
    switch = stats([r.switch_beyond_ms for r in results])
    conv = stats([r.converged_ms for r in results])
    figures: dict[str, Any] = {"store": store, "pause_ms": pause_ms, "links": links,
                               "binding_activation": binding_activation,
                               "background_flows": background_flows,
                               "ovs_rt_priority": ovs_rt_priority,
                               "expedited_rcu": expedite_rcu,
                               "downtime_beyond_pause_ms": beyond,
                               "downtime_beyond_pause_before_unplug_ms": switch,
                               "convergence_ms": conv,
                               "floor_beyond_pause_ms": floor.beyond_pause_ms,
                               "floor": asdict(floor),
                               "migrations": [asdict(r) for r in results]}
    (out / "figures.json").write_text(json.dumps(figures, indent=1))
    console.print(f"downtime beyond the pause: p50 {beyond.get('p50', 0):.1f} ms, max "
                  f"{beyond.get('max', 0):.1f} ms (up to Nova's source unplug: p50 "
                  f"{switch.get('p50', 0):.1f} ms, max {switch.get('max', 0):.1f} ms); the same "
                  f"pause with no migration: {_ms(floor.beyond_pause_ms)} ms; plots and "
                  f"figures.json in {out}", highlight=False)
