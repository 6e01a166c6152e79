"""The chassis controller core: events in, desired flows out. No I/O, no clock, no globals.

The core keeps the local view (``Topology``) and, per owner (the apps' static flows, a
network, a port), the flows the apps want for it. An event updates the view, marks the owners
it touches, recomputes only those (incremental), and reports derived events: a port bound or
unbound here or on another chassis, including a remote port that moved between chassis.
``recompute_all`` rebuilds everything from scratch; tests assert that both agree.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ferry.core import migration
from ferry.core.apps import ALL_APPS, fip, security
from ferry.core.apps.base import App, Context
from ferry.core.migration import Intent
from ferry.core.pipeline import check_flow, table
from ferry.core.topology import Location, Placed, Topology, Vif
from ferry.model.objects import (
    Chassis,
    LiveFallback,
    LogicalPort,
    LogicalRouter,
    LogicalSwitch,
    Migration,
    MigrationMode,
    NbObject,
    SecurityGroup,
    SecurityGroupRule,
    Subnet,
)
from ferry.switch.flow import Flow, FlowError

Owner = tuple[str, str]  # ("static", app) | ("network", id) | ("port", id)
FlowKey = tuple[int, int, object]

# Cookies say which app and which object own a flow: app index in the top byte, owner kind in
# the next, the object's key below. Flows are deleted only by (key, cookie): never loosely.
_KIND = {"static": 0, "network": 1, "port": 2}


@dataclass(frozen=True)
class PortBound:
    """A port is now at ``location`` as seen from this chassis (Local or Remote)."""

    port_id: str
    location: Placed


@dataclass(frozen=True)
class PortUnbound:
    """A port is no longer at ``location`` as seen from this chassis."""

    port_id: str
    location: Placed


DerivedEvent = PortBound | PortUnbound
Output = DerivedEvent | Intent
"""What the core reports: ports (un)bound as seen here, and migration intents to publish."""


class ChassisCore:
    """One chassis' controller logic; many can run side by side in one process."""

    def __init__(self, chassis: str, apps: Sequence[App] = ALL_APPS,
                 tunnel_ofport: int | None = None,
                 migration_mode: MigrationMode = MigrationMode.LIVE,
                 live_fallback: LiveFallback = LiveFallback.SOURCE_UNPLUG) -> None:
        self.topology = Topology(chassis, migration_mode=migration_mode,
                                 live_fallback=live_fallback)
        self.apps = tuple(apps)
        self.tunnel_ofport = tunnel_ofport
        self.patch_ofports: dict[str, int] = {}
        """Physical network → br-int's patch port to its bridge (the bridge mappings)."""
        self._owned: dict[Owner, frozenset[Flow]] = {}
        self._locations: dict[str, Location] = {}
        self.recompute_all()

    @property
    def chassis(self) -> str:
        return self.topology.chassis

    # -- inputs ------------------------------------------------------------------------------

    def set_tunnel_ofport(self, ofport: int | None) -> list[Output]:
        self.tunnel_ofport = ofport
        return self.recompute_all()

    def set_patch_ofports(self, ofports: dict[str, int]) -> list[Output]:
        """The patch ports of this chassis' bridge mappings (physical network → ofport)."""
        self.patch_ofports = dict(ofports)
        return self.recompute_all()

    def nb_updated(self, obj: NbObject) -> list[Output]:
        """A northbound object was created or changed."""
        old = self.topology.put(obj)
        return self._changed(old, obj)

    def nb_deleted(self, table: str, id: str) -> list[Output]:
        old = self.topology.remove(table, id)
        return self._changed(old, None) if old is not None else []

    def nb_resync(self, objects: Iterable[NbObject], topics: set[str]) -> list[Output]:
        """Replace every object of ``topics`` by a snapshot (after a compacted watch)."""
        for objs in self.topology.objects.values():
            for id in [i for i, o in objs.items() if o.topic in topics]:
                del objs[id]
        for obj in objects:
            self.topology.put(obj)
        return self.recompute_all()

    def vif_online(self, vif: Vif) -> list[Output]:
        zones = security.ct_zones(self.topology)
        self.topology.vifs[vif.iface_id] = vif
        out = self._refresh_ports([vif.iface_id, *self._rezoned(zones)])
        port = self.topology.get(LogicalPort, vif.iface_id)
        return out + (migration.on_vif_online(self.topology, port) if port else [])

    def vif_offline(self, iface_id: str) -> list[Output]:
        zones = security.ct_zones(self.topology)
        if self.topology.vifs.pop(iface_id, None) is None:
            return []
        out = self._refresh_ports([iface_id, *self._rezoned(zones)])
        port = self.topology.get(LogicalPort, iface_id)
        return out + (migration.on_vif_offline(self.topology, port) if port else [])

    def packet_in(self, table_id: int, cookie: int) -> list[Output]:
        """A packet-in from this chassis' switch: the table and cookie of the flow that sent
        it. Only the live-migration activation report means anything; the rest is ignored."""
        key = port_key_of(cookie)
        if table_id != table("activation") or key is None:
            return []
        port = next((p for p in self.topology.table(LogicalPort).values()
                     if p.tunnel_key == key), None)
        if port is None:
            return []
        return list(migration.on_activated(self.topology, port))

    # -- outputs -----------------------------------------------------------------------------

    def desired(self) -> dict[FlowKey, Flow]:
        """Every flow this chassis wants installed, by OpenFlow identity."""
        out: dict[FlowKey, Flow] = {}
        for owner, flows in self._owned.items():
            for f in flows:
                prev = out.get(f.key)
                if prev is not None and prev != f:
                    raise FlowError(f"{owner}: two owners want different flows at {prev.key}: "
                                    f"{prev} / {f}")
                out[f.key] = f
        return out

    def hosted_fips(self) -> dict[tuple[str, str], fip.Hosted]:
        """The floating IPs this chassis announces (see ``apps.fip.hosted``)."""
        ctx = Context(self.topology, self.tunnel_ofport, self._port_cookie, self.patch_ofports)
        return fip.hosted(ctx, self._locations)

    def location(self, port_id: str) -> Location:
        return self._locations.get(port_id)

    # -- computation -------------------------------------------------------------------------

    def recompute_all(self) -> list[Output]:
        topo = self.topology
        owners: set[Owner] = {("static", a.name) for a in self.apps}
        owners |= {("network", n) for n in topo.table(LogicalSwitch)}
        owners |= {("port", p) for p in topo.table(LogicalPort)}
        self._owned = {}
        events = self._relocate(list(topo.table(LogicalPort)) + list(self._locations))
        for owner in owners:
            self._compute(owner)
        return events

    def _changed(self, old: NbObject | None, new: NbObject | None) -> list[Output]:
        events = self._changed_l2(old, new)
        owners = self._routing_dependents(old, new)
        ports, nets = fip.affected(self.topology, old, new)
        owners |= {("port", p) for p in ports} | {("network", n) for n in nets}
        for owner in sorted(owners):
            self._compute(owner)
        return events

    def _routing_dependents(self, old: NbObject | None, new: NbObject | None) -> set[Owner]:
        """What routing recomputes when a router, or a port, subnet or network one lists,
        changes: the router's interface ports (each owns what leaves the router through it,
        from all its interfaces) and every port of its networks (their l3_nexthop entries
        exist only where a router is), for the router before and after the change."""
        topo = self.topology
        routers: list[LogicalRouter] = []
        for obj in (old, new):
            if isinstance(obj, LogicalRouter):
                routers.append(obj)
            elif isinstance(obj, LogicalPort):
                routers += topo.routers_touching(port_id=obj.id)
            elif isinstance(obj, Subnet):
                routers += topo.routers_touching(subnet_id=obj.id)
            elif isinstance(obj, LogicalSwitch):
                routers += topo.routers_touching(network_id=obj.id)
        owners: set[Owner] = set()
        nets: set[str] = set()
        for router in routers:
            for rp in router.ports:
                owners.add(("port", rp.port_id))
                for o in (topo.get(Subnet, rp.subnet_id), topo.get(LogicalPort, rp.port_id)):
                    if o is not None:
                        nets.add(o.network_id)
        for net in nets:
            owners |= {("port", p.id) for p in topo.ports_of(net)}
        return owners

    def _changed_l2(self, old: NbObject | None, new: NbObject | None) -> list[Output]:
        obj = new if new is not None else old
        topo = self.topology
        if isinstance(obj, LogicalPort | Migration):
            port_id = obj.id if isinstance(obj, LogicalPort) else obj.port_id
            nets = {o.network_id for o in (old, new) if isinstance(o, LogicalPort)}
            port = topo.get(LogicalPort, port_id)
            if port is not None:
                nets.add(port.network_id)
            events = self._relocate([port_id])
            self._compute(("port", port_id))
            for net in nets:
                self._compute(("network", net))
            for pid in security.affected_ports(topo, old, new):
                self._compute(("port", pid))
            if port is not None:
                events += migration.on_port_changed(topo, port)
            return events
        if isinstance(obj, LogicalSwitch):
            self._compute(("network", obj.id))
            ports = [p.id for p in topo.ports_of(obj.id)]
            for p in ports:
                self._compute(("port", p))
            return []
        if isinstance(obj, SecurityGroup | SecurityGroupRule):
            # Members of the group, and ports whose rules name it as remote group.
            for pid in security.affected_ports(topo, old, new):
                self._compute(("port", pid))
            return []
        if isinstance(obj, Chassis):
            return self._refresh_ports(
                [p.id for p in topo.table(LogicalPort).values() if p.host == obj.id])
        return []

    def _refresh_ports(self, port_ids: list[str]) -> list[Output]:
        """Relocate ports and recompute them and their networks."""
        events = self._relocate(port_ids)
        nets: set[str] = set()
        for pid in port_ids:
            self._compute(("port", pid))
            port = self.topology.get(LogicalPort, pid)
            if port is not None:
                nets.add(port.network_id)
        for net in nets:
            self._compute(("network", net))
        return events

    def _rezoned(self, before: dict[str, int]) -> list[str]:
        """Ports whose conntrack zone changed since ``before`` (another VIF came or went and
        collided with theirs): their security flows name the zone."""
        after = security.ct_zones(self.topology)
        return sorted(p for p in before.keys() & after.keys() if before[p] != after[p])

    def _relocate(self, port_ids: Iterable[str]) -> list[Output]:
        events: list[Output] = []
        for pid in dict.fromkeys(port_ids):
            port = self.topology.get(LogicalPort, pid)
            new = self.topology.locate(port) if port is not None else None
            old = self._locations.get(pid)
            if old == new:
                continue
            if old is not None:
                events.append(PortUnbound(pid, old))
            if new is not None:
                events.append(PortBound(pid, new))
                self._locations[pid] = new
            else:
                self._locations.pop(pid, None)
        return events

    def _port_cookie(self, app: App, port: LogicalPort) -> int:
        return cookie_of(self.apps.index(app), "port", port.tunnel_key)

    def _compute(self, owner: Owner) -> None:
        kind, id = owner
        ctx = Context(self.topology, self.tunnel_ofport, self._port_cookie, self.patch_ofports)
        flows: list[Flow] = []
        for index, app in enumerate(self.apps):
            produced: Iterable[Flow] = ()
            if kind == "static" and app.name == id:
                produced = app.static_flows(ctx)
            elif kind == "network":
                net = self.topology.get(LogicalSwitch, id)
                if net is not None:
                    produced = app.network_flows(ctx, net)
            elif kind == "port":
                port = self.topology.get(LogicalPort, id)
                net = self.topology.network(port) if port is not None else None
                if port is not None and net is not None:
                    produced = app.port_flows(ctx, port, net, self._locations.get(id))
            cookie = self._cookie(index, kind, id)
            flows += [check_flow(app.name, _with_cookie(f, cookie)) for f in produced]
        if flows:
            self._owned[owner] = frozenset(flows)
        else:
            self._owned.pop(owner, None)

    def _cookie(self, app_index: int, kind: str, id: str) -> int:
        key = 0
        if kind == "network":
            net = self.topology.get(LogicalSwitch, id)
            key = net.tunnel_key if net else 0
        elif kind == "port":
            port = self.topology.get(LogicalPort, id)
            key = port.tunnel_key if port else 0
        return cookie_of(app_index, kind, key)


def cookie_of(app_index: int, kind: str, key: int) -> int:
    """App index in the top byte, owner kind in the next, the owner's key below."""
    return (app_index + 1) << 56 | _KIND[kind] << 48 | key


def app_index_of(cookie: int) -> int:
    """The app index in a cookie made by :func:`cookie_of` (-1 for a cookie of 0)."""
    return (cookie >> 56) - 1


def port_key_of(cookie: int) -> int | None:
    """The port's key in the cookie of a flow that a port owns (:func:`cookie_of`), else None."""
    if cookie >> 48 & 0xFF != _KIND["port"]:
        return None
    return cookie & ((1 << 48) - 1)


def _with_cookie(flow: Flow, cookie: int) -> Flow:
    if flow.cookie == cookie:
        return flow
    return Flow(flow.table, flow.priority, flow.match, flow.actions, cookie)


@dataclass(frozen=True)
class FlowDiff:
    adds: list[Flow]
    modifies: list[Flow]
    deletes: list[Flow]

    def __bool__(self) -> bool:
        return bool(self.adds or self.modifies or self.deletes)

    def __len__(self) -> int:
        return len(self.adds) + len(self.modifies) + len(self.deletes)


def diff_flows(desired: dict[FlowKey, Flow], installed: dict[FlowKey, Flow]) -> FlowDiff:
    """What to send so that ``installed`` becomes ``desired``.

    A flow whose actions changed is modified in place (strict, same cookie); one whose owner
    (cookie) changed is deleted under its old cookie and added under the new one.
    """
    adds, modifies, deletes = [], [], []
    for key, flow in desired.items():
        have = installed.get(key)
        if have is None:
            adds.append(flow)
        elif have.cookie != flow.cookie:
            deletes.append(have)
            adds.append(flow)
        elif have.actions != flow.actions:
            modifies.append(flow)
    deletes += [f for k, f in installed.items() if k not in desired]
    return FlowDiff(adds, modifies, deletes)
