"""The chassis agent: the I/O edge around the pure core.

Inputs: the store (per-topic watches), OVSDB (VIF events). Output: flows on br-int through
OpenFlow. The agent registers its chassis, makes sure br-int, the Geneve port and the
controller target exist, subscribes to the global topic and to the project of every local VIF,
and keeps the switch's flows equal to the core's desired flows.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ferry.agent.datapath import apply_conntrack_settings
from ferry.agent.flowsync import FlowSync
from ferry.agent.migrations import MigrationPublisher
from ferry.agent.route_events import RouteEvents, RouteEventsError, vswitchd_netns
from ferry.agent.subscriptions import Change, Deleted, Resynced, Subscriptions, Updated
from ferry.agent.tunnel_routes import POLL_S, REFRESH_S, SETTLE_S, TunnelRoutes
from ferry.core.apps import fip
from ferry.core.chassis import ChassisCore, Output, PortBound, PortUnbound
from ferry.core.migration import Activated, ack_phase
from ferry.core.topology import Local, Vif
from ferry.model.northbound import InvalidObject, Northbound
from ferry.model.objects import (
    Chassis,
    LiveFallback,
    LogicalPort,
    Migration,
    MigrationMode,
    MigrationStatus,
)
from ferry.store.base import GLOBAL, Store, StoreError
from ferry.switch.flow import Output as FlowOutput
from ferry.switch.openflow import ConnectionLost, PacketIn, Switch
from ferry.switch.ovsdb import ChassisOvsdb, VifOffline, VifOnline

log = logging.getLogger(__name__)

ACTIVATION_REPORT_HOLD_S = 0.03
"""How long an activation report waits before it is published. Measured in the lab (2 cores,
one process for all controllers; runs of 40 live migrations, 50 ms pause; mean downtime beyond
the pause up to the source unplug, L2/L3/FIP, averaged over the runs): no report at all
2.17/2.19/2.19 ms (3 runs); published at once 2.60/2.53/2.38 (2 runs); held 30 ms
2.38/2.35/2.33 (3 runs). The run-to-run spread was about 0.2 ms."""


@dataclass
class AgentConfig:
    """What a chassis agent needs to know about its node."""

    chassis: str
    tunnel_ip: str
    ovsdb_url: str
    rundir: Path = field(default_factory=lambda: Path("/run/ferry"))
    bridge: str = "br-int"
    tunnel_port: str = "geneve0"
    bridge_mappings: dict[str, str] = field(default_factory=dict)
    migration_mode: MigrationMode = MigrationMode.LIVE
    """How migrations this chassis claims are run (a port's binding profile may override)."""
    live_fallback: LiveFallback = LiveFallback.SOURCE_UNPLUG
    """Live mode, for migrations this chassis claims: what switches a port that the VM's
    first frame never activated (a port's binding profile may override)."""
    ovs_rundir: Path | None = None
    """ovs-vswitchd's run directory (its control socket); default: the OVSDB socket's."""
    pin_tunnel_routes: bool = True
    """Pin the routes to the other chassis' tunnel IPs in OVS (:mod:`ferry.agent.tunnel_routes`)."""

    @property
    def vswitchd_rundir(self) -> Path | None:
        if self.ovs_rundir is not None:
            return self.ovs_rundir
        if self.ovsdb_url.startswith("unix:"):
            return Path(self.ovsdb_url[5:]).parent
        return None

    @property
    def controller_socket(self) -> Path:
        return self.rundir / f"ferry-{self.chassis}.ofp"

    @property
    def synced_file(self) -> Path:
        """Holds the agent's PID once its switch is reconciled with what it wants."""
        return self.rundir / f"ferry-{self.chassis}.synced"


class ChassisAgent:
    def __init__(self, config: AgentConfig, store: Store,
                 clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time) -> None:
        self.config = config
        self.store = store
        self.nb = Northbound(store)
        self.clock = clock
        self.core = ChassisCore(config.chassis, migration_mode=config.migration_mode,
                                live_fallback=config.live_fallback)
        self.switch = Switch(f"{config.chassis}/{config.bridge}",
                             on_packet_in=self._on_packet_in)
        self.flows = FlowSync(config.chassis, self.switch, self.core.desired,
                              len(self.core.apps), clock)
        self.switch.on_connected = self._on_switch_connected
        self.flows.on_reconciled = self._mark_synced
        self.ovsdb = ChassisOvsdb(config.ovsdb_url, chassis=config.chassis, bridge=config.bridge)
        self.subs = Subscriptions(config.chassis, store, self._on_change)
        self._vif_names: dict[str, VifOnline] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._port_topics: dict[str, str] = {}
        self.ready = asyncio.Event()
        self.listeners: list[Callable[[Output], None]] = []
        self.migrations = MigrationPublisher(config.chassis, self.nb, wall)
        self.wall = wall
        self._intents: asyncio.Queue[Output] = asyncio.Queue()
        self._ack_tasks: set[asyncio.Task[None]] = set()
        self._announced: set[tuple[str, str]] = set()
        rundir = config.vswitchd_rundir
        self.routes = (TunnelRoutes(config.chassis, rundir)
                       if config.pin_tunnel_routes and rundir is not None else None)
        self._routes_now = asyncio.Event()
        self._route_events: RouteEvents | None = None
        self._route_events_stale = True  # (re)opened at the start and on every reconnect

    @property
    def name(self) -> str:
        return self.config.chassis

    async def start(self) -> None:
        cfg = self.config
        cfg.rundir.mkdir(parents=True, exist_ok=True)
        cfg.synced_file.unlink(missing_ok=True)
        await self._register()
        await self.switch.listen(f"unix:{cfg.controller_socket}")
        await self.ovsdb.start()
        await self.ovsdb.set_chassis_config(system_id=cfg.chassis, tunnel_ip=cfg.tunnel_ip,
                                            bridge_mappings=cfg.bridge_mappings)
        tunnel_ofport = await self.ovsdb.ensure_integration_bridge(
            f"unix:{cfg.controller_socket}", tunnel_port=cfg.tunnel_port)
        self.core.set_tunnel_ofport(tunnel_ofport)
        self.core.set_patch_ofports(await self.ovsdb.ensure_patch_ports(cfg.bridge_mappings))
        await self.subs.subscribe(GLOBAL)
        self._tasks = [
            asyncio.create_task(self.flows.run(), name=f"flows-{self.name}"),
            asyncio.create_task(self._vif_loop(), name=f"vifs-{self.name}"),
            asyncio.create_task(self._intent_loop(), name=f"intents-{self.name}"),
        ]
        if self.routes is not None:
            self._tasks.append(asyncio.create_task(self._route_loop(), name=f"routes-{self.name}"))
        self.flows.mark_dirty()
        await self.flows.wait_synced()
        self.ready.set()
        log.info("chassis %s: ready (tunnel %s, geneve ofport %d)", self.name, cfg.tunnel_ip,
                 tunnel_ofport)

    def _on_switch_connected(self, switch: Switch) -> None:
        self.flows.on_connected(switch)
        rundir = self.config.vswitchd_rundir
        if rundir is not None:  # a (re)started ovs-vswitchd has forgotten its settings
            task = asyncio.create_task(apply_conntrack_settings(self.name, rundir))
            self._ack_tasks.add(task)
            task.add_done_callback(self._ack_tasks.discard)
            self._route_events_stale = True  # and its pinned routes
            self._routes_now.set()

    def _remote_tunnel_ips(self) -> set[str]:
        return {str(ch.tunnel_ip) for ch in self.core.topology.table(Chassis).values()
                if ch.id != self.name}

    async def _route_loop(self) -> None:
        """Keep the tunnel routes pinned: at once when the set of other chassis changes or
        ovs-vswitchd (re)connects; after each change of the kernel's routes where OVS reads
        them (``SETTLE_S`` later, as OVS re-reads its copy first); and every ``REFRESH_S``
        (``POLL_S`` if the kernel's notifications cannot be had)."""
        assert self.routes is not None
        loop = asyncio.get_running_loop()
        done: set[str] | None = None
        last = 0.0
        try:
            while True:
                if self._route_events_stale:
                    self._listen_to_routes()
                every = REFRESH_S if self._route_events is not None else POLL_S
                remotes = self._remote_tunnel_ips()
                if self._routes_now.is_set() or remotes != done or loop.time() - last >= every:
                    self._routes_now.clear()
                    await self.routes.sync(remotes)
                    done, last = remotes, loop.time()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._routes_now.wait(), 1.0)
        finally:
            if self._route_events is not None:
                self._route_events.close()

    def _listen_to_routes(self) -> None:
        """(Re)open the kernel's route notifications in ovs-vswitchd's namespace."""
        rundir = self.config.vswitchd_rundir
        assert rundir is not None
        self._route_events_stale = False
        if self._route_events is not None:
            self._route_events.close()
            self._route_events = None
        loop = asyncio.get_running_loop()

        def changed() -> None:
            for delay in SETTLE_S:
                loop.call_later(delay, self._routes_now.set)

        try:
            events = RouteEvents(vswitchd_netns(rundir), changed)
            events.start()
        except RouteEventsError as e:
            log.warning("chassis %s: no route notifications (%s): tunnel route pins follow "
                        "the kernel's routes every %.0f s", self.name, e, POLL_S)
            return
        self._route_events = events

    def _mark_synced(self) -> None:
        tmp = self.config.synced_file.with_suffix(".tmp")
        tmp.write_text(f"{os.getpid()}\n")
        tmp.replace(self.config.synced_file)

    async def _register(self) -> None:
        cfg = self.config
        want = Chassis(id=cfg.chassis, name=cfg.chassis, tunnel_ip=cfg.tunnel_ip,  # type: ignore[arg-type]
                       bridge_mappings=cfg.bridge_mappings)
        have = await self.nb.get(Chassis, cfg.chassis)
        if have is None:
            await self.nb.create(want)
        elif have.model_copy(update={"version": 0}) != want:
            await self.nb.update(want.model_copy(update={"version": have.version}))
        log.info("chassis %s: registered with tunnel IP %s", cfg.chassis, cfg.tunnel_ip)

    async def stop(self) -> None:
        for task in [*self._tasks, *self._ack_tasks]:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.subs.close()
        with contextlib.suppress(Exception):
            await self.ovsdb.close()
        await self.switch.close()

    async def wait(self) -> None:
        """Until the agent's tasks end (they end only by failing or being cancelled)."""
        await asyncio.gather(*self._tasks)

    async def run_forever(self) -> None:
        await self.start()
        try:
            await asyncio.gather(*self._tasks)
        finally:
            await self.stop()

    # -- inputs ------------------------------------------------------------------------------

    def _on_change(self, change: Change) -> None:
        if isinstance(change, Updated):
            events = self.core.nb_updated(change.obj)
            if isinstance(change.obj, Migration) and change.obj.status in (
                MigrationStatus.DONE, MigrationStatus.ROLLED_BACK
            ):
                # The datapath may have learned flows for it (live mode): reconcile against
                # the switch so that none outlives the migration.
                self.flows.request_reconcile()
        elif isinstance(change, Deleted):
            events = self.core.nb_deleted(change.table, change.id)
        elif isinstance(change, Resynced):
            events = self.core.nb_resync(change.objects, {change.topic})
        self.flows.mark_dirty()
        self._derived(events)
        self._announce_fips()

    def _on_packet_in(self, event: PacketIn) -> None:
        """The datapath reports a live migration's activation. It already forwards right, so
        the report waits ``ACTIVATION_REPORT_HOLD_S``: publishing it makes every controller
        recompute and send flows, which at once would compete for CPU with the datapath
        during the very milliseconds the VM's first packets flow."""
        now = self.wall()
        events = [dataclasses.replace(e, at=now) if isinstance(e, Activated) else e
                  for e in self.core.packet_in(event.table_id, event.cookie)]
        if events:
            asyncio.get_running_loop().call_later(ACTIVATION_REPORT_HOLD_S, self._derived,
                                                  events)

    async def _vif_loop(self) -> None:
        async for event in self.ovsdb.events():
            if isinstance(event, VifOnline):
                self._vif_names[event.name] = event
                await self._ensure_topic_of(event.iface_id)
                events = self.core.vif_online(Vif(event.iface_id, event.ofport, event.name))
            elif isinstance(event, VifOffline):
                self._vif_names.pop(event.name, None)
                still = [v for v in self._vif_names.values() if v.iface_id == event.iface_id]
                if still:  # another interface carries the same port: it stays online
                    v = still[0]
                    events = self.core.vif_online(Vif(v.iface_id, v.ofport, v.name))
                else:
                    events = self.core.vif_offline(event.iface_id)
            log.info("chassis %s: %s", self.name, event)
            self.flows.mark_dirty()
            self._derived(events)
            self._announce_fips()

    async def _ensure_topic_of(self, port_id: str) -> None:
        """Subscribe to the project of a local VIF's port (waiting for the port to exist)."""
        if port_id in self._port_topics:
            return
        delay = 0.05
        while True:
            rec = await self.store.get("port", port_id)
            if rec is not None:
                break
            log.warning("chassis %s: VIF for unknown port %s; waiting for it", self.name,
                        port_id)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)
        self._port_topics[port_id] = rec.topic
        await self.subs.subscribe(rec.topic)

    def _derived(self, events: list[Output]) -> None:
        """Log location changes, queue migration intents, time flow acks of migrations."""
        for e in events:
            if isinstance(e, PortBound | PortUnbound):
                log.info("chassis %s: port %s %s %s", self.name, e.port_id,
                         type(e).__name__, e.location)
                phase = ack_phase(self.core.topology, e.port_id)
                if phase is not None:  # what these flows follow, as seen now
                    self._after_ack(self._record_ack(e.port_id, phase))
                if isinstance(e.location, Local):
                    up = isinstance(e, PortBound)
                    self._after_ack(self._set_status(e.port_id, up))
            else:
                self._intents.put_nowait(e)
            for listener in self.listeners:
                listener(e)

    def _announce_fips(self) -> None:
        """Floating IPs this chassis newly hosts: once their flows are acked, a gratuitous
        ARP (the external fabric learns where the FIP's MAC is now) and an ARP request for
        the external subnet's gateway (its answer teaches the datapath's mac_binding)."""
        hosted = self.core.hosted_fips()
        new = {k: h for k, h in hosted.items() if k not in self._announced}
        self._announced = set(hosted)
        if new:
            self._after_ack(self._send_announcements(list(new.values())))

    async def _send_announcements(self, items: list[fip.Hosted]) -> None:
        for h in items:
            frames = [fip.arp_frame(1, h.mac, h.fip_ip, h.fip_ip)]
            if h.gateway is not None:
                frames.append(fip.arp_frame(1, h.mac, h.fip_ip, h.gateway))
            try:
                for frame in frames:
                    await self.switch.packet_out(frame, [FlowOutput(h.patch_ofport)])
            except (ConnectionLost, OSError) as e:
                log.warning("chassis %s: floating IP %s: announcement not sent: %s",
                            self.name, h.fip_ip, e)
                continue
            log.info("chassis %s: floating IP %s announced (gratuitous ARP, MAC %s, patch "
                     "port %d)", self.name, h.fip_ip, h.mac, h.patch_ofport)

    async def _intent_loop(self) -> None:
        while True:
            intent = await self._intents.get()
            if not isinstance(intent, PortBound | PortUnbound):
                await self.migrations.publish(intent)

    def _after_ack(self, work: Coroutine[Any, Any, None]) -> None:
        """Run ``work`` once the flows of everything seen so far are acked by the switch."""
        generation = self.flows.generation

        async def run() -> None:
            await self.flows.wait_synced(generation)
            await work

        task = asyncio.create_task(run())
        self._ack_tasks.add(task)
        task.add_done_callback(self._ack_tasks.discard)

    async def _record_ack(self, port_id: str, phase: str) -> None:
        await self.migrations.acked(port_id, phase, self.wall())

    async def _set_status(self, port_id: str, up: bool) -> None:
        """Port status ACTIVE once its local flows are installed (what Nova waits for);
        DOWN when its VIF is gone from the chassis it is bound to."""
        def change(p: LogicalPort) -> LogicalPort:
            if up and self.core.location(port_id) is None:
                return p
            if not up and (p.host != self.name or self.core.location(port_id) is not None):
                return p  # bound elsewhere, or moved on (a migration's source): not ours
            return p.model_copy(update={"status": "ACTIVE" if up else "DOWN"})

        try:
            await self.nb.modify(LogicalPort, port_id, change)
        except (StoreError, InvalidObject) as e:
            log.warning("chassis %s: port %s: could not set status: %s", self.name, port_id, e)
