"""A chassis' local view of the topology, and where each port is.

Pure data: the northbound objects this chassis has received, and the VIFs its OVSDB reports.
``locate`` answers the one question every app asks: is this port here (on which OpenFlow
port), on another chassis (which one), or nowhere?
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TypeVar

from ferry.model.objects import (
    Chassis,
    FloatingIP,
    LiveFallback,
    LogicalPort,
    LogicalRouter,
    LogicalSwitch,
    Migration,
    MigrationMode,
    MigrationStatus,
    NbObject,
    Subnet,
)

T = TypeVar("T", bound=NbObject)


@dataclass(frozen=True)
class Vif:
    """An OVS interface on br-int whose external_ids:iface-id names a logical port."""

    iface_id: str
    ofport: int
    name: str


@dataclass(frozen=True)
class Local:
    ofport: int


@dataclass(frozen=True)
class Remote:
    chassis: str
    tunnel_ip: str


@dataclass(frozen=True)
class Outgoing:
    """Live migration, on the source: the VM runs here until it resumes on ``dest``."""

    ofport: int
    dest: Remote


@dataclass(frozen=True)
class Incoming:
    """Live migration, on the destination: plugged here, activated by the VM's first frame
    (in the datapath); until then its traffic still goes to ``source``."""

    ofport: int
    source: Remote


@dataclass(frozen=True)
class Both:
    """Live migration, seen from any other chassis: send to both, the datapath picks."""

    source: Remote
    dest: Remote


@dataclass(frozen=True)
class Distributed:
    """A router's interface: present on every chassis that hosts its network."""


ROUTER_INTERFACE_OWNERS = ("network:router_interface", "network:router_interface_distributed")

Placed = Local | Remote | Outgoing | Incoming | Both | Distributed
Location = Placed | None


@dataclass
class Topology:
    """Objects by table and id, plus this chassis' VIFs by iface-id."""

    chassis: str
    objects: dict[str, dict[str, NbObject]] = field(default_factory=dict)
    vifs: dict[str, Vif] = field(default_factory=dict)
    migration_mode: MigrationMode = MigrationMode.LIVE
    """The deployment's migration mode for claims this chassis makes."""
    live_fallback: LiveFallback = LiveFallback.SOURCE_UNPLUG
    """The deployment's live-mode fallback for claims this chassis makes."""
    home_vifs: set[str] = field(default_factory=set)
    """VIFs that were plugged here while their port was bound here: a migration's source
    side. Such a VIF never claims its port back once the binding has moved away."""

    def table(self, cls: type[T]) -> dict[str, T]:
        return self.objects.setdefault(cls.TABLE, {})  # type: ignore[return-value]

    def get(self, cls: type[T], id: str) -> T | None:
        return self.table(cls).get(id)

    def put(self, obj: NbObject) -> NbObject | None:
        """Store ``obj``; returns what it replaced. Older versions never replace newer ones."""
        objs = self.objects.setdefault(obj.TABLE, {})
        old = objs.get(obj.id)
        if old is not None and old.version > obj.version > 0:
            return old
        objs[obj.id] = obj
        return old

    def remove(self, table: str, id: str) -> NbObject | None:
        return self.objects.get(table, {}).pop(id, None)

    def ports_of(self, network_id: str) -> list[LogicalPort]:
        return sorted((p for p in self.table(LogicalPort).values()
                       if p.network_id == network_id), key=lambda p: p.id)

    def locate(self, port: LogicalPort) -> Location:
        """Where ``port`` is, as this chassis must forward to it.

        Local: bound here and its VIF is plugged here. Remote: bound to another registered
        chassis. Anything else (unbound, bound here but not plugged, bound to an unknown
        chassis) is nowhere. A VIF plugged here for a port bound elsewhere does not make the
        port local: no chassis takes a port it was not given.
        """
        if port.device_owner in ROUTER_INTERFACE_OWNERS:
            return Distributed() if port.admin_state_up else None
        host = self.effective_host(port)
        if host is None or not port.admin_state_up:
            return None
        live = self.live_migration(port)
        if live is not None:
            return self._locate_live(port, live)
        if host == self.chassis:
            vif = self.vifs.get(port.id)
            return Local(vif.ofport) if vif is not None else None
        return self.remote(host)

    def remote(self, chassis: str) -> Remote | None:
        ch = self.get(Chassis, chassis)
        return Remote(ch.id, str(ch.tunnel_ip)) if ch is not None else None

    def live_migration(self, port: LogicalPort) -> Migration | None:
        """The port's valid live-mode migration while it is bound to both chassis: not yet
        activated, and before step 2 (or, with the ``binding`` fallback, before step 3)."""
        m = self.active_migration(port)
        if m is None or m.mode is not MigrationMode.LIVE or m.activated or (
            m.status is MigrationStatus.SOURCE_UNPLUGGED and not _waits_for_binding(m)
        ):
            return None
        return m

    def _locate_live(self, port: LogicalPort, m: Migration) -> Location:
        source, dest = self.remote(m.source_chassis), self.remote(m.dest_chassis)
        if source is None or dest is None:
            return None
        vif = self.vifs.get(port.id)
        if self.chassis == m.dest_chassis:
            return Incoming(vif.ofport, source) if vif is not None else source
        if self.chassis == m.source_chassis:
            return Outgoing(vif.ofport, dest) if vif is not None else dest
        return Both(source, dest)

    def active_migration(self, port: LogicalPort) -> Migration | None:
        """The port's migration in progress, if it is a valid one.

        Valid: it moves the port away from its current binding host, to a chassis the API
        authorized (a binding for it, or binding:profile migrating_to). A record that fails
        this, whoever wrote it, is ignored: no chassis takes a port it was not given.
        """
        m = self.get(Migration, port.id)
        if m is None or not m.in_progress:
            return None
        if m.source_chassis != port.host or not authorized(port, m.dest_chassis):
            return None
        return m

    def effective_host(self, port: LogicalPort) -> str | None:
        """Where the port's traffic goes: its binding host, or the migration's destination
        once the source reported the VIF gone (the spec's step 2; in live mode unless its
        fallback waits for the binding) or the destination reported the port activated."""
        m = self.active_migration(port)
        if m is not None and (m.activated or (m.status is MigrationStatus.SOURCE_UNPLUGGED
                                              and not _waits_for_binding(m))):
            return m.dest_chassis
        return port.host

    def network(self, port: LogicalPort) -> LogicalSwitch | None:
        return self.get(LogicalSwitch, port.network_id)

    def remote_chassis_of(self, network_id: str) -> dict[str, str]:
        """Other chassis hosting a port of the network: name → tunnel IP."""
        out: dict[str, str] = {}
        for port in self.ports_of(network_id):
            for r in remotes_of(self.locate(port)):
                out[r.chassis] = r.tunnel_ip
        return dict(sorted(out.items()))

    def local_ports_of(self, network_id: str) -> list[LogicalPort]:
        """The network's ports plugged here (a migration's source and destination too)."""
        return [p for p in self.ports_of(network_id)
                if isinstance(self.locate(p), Local | Outgoing | Incoming)]

    def has_local_port(self, network_id: str) -> bool:
        return bool(self.local_ports_of(network_id))

    # -- routers (read-only views for the L3 app and for what a change must recompute) -------

    def router_interfaces(self, router: LogicalRouter) -> list[tuple[LogicalPort, Subnet]]:
        """The interfaces a router routes through here, in the router's order: its port and
        subnet both known, the port an interface that is up (Distributed) on the subnet's
        network. An interface the API is still adding or removing (router and port are two
        writes) is left out until both sides agree."""
        if not router.admin_state_up:
            return []
        out = []
        for rp in router.ports:
            port, subnet = self.get(LogicalPort, rp.port_id), self.get(Subnet, rp.subnet_id)
            if (port is not None and subnet is not None
                    and port.network_id == subnet.network_id
                    and isinstance(self.locate(port), Distributed)):
                out.append((port, subnet))
        return out

    def routers_of_network(self, network_id: str) -> list[LogicalRouter]:
        """Routers with an interface (as ``router_interfaces`` sees it) on the network."""
        return [r for r in self._routers()
                if any(p.network_id == network_id for p, _ in self.router_interfaces(r))]

    def routers_touching(self, network_id: str | None = None, subnet_id: str | None = None,
                         port_id: str | None = None) -> list[LogicalRouter]:
        """Routers that list the port, the subnet, or a subnet or port of the network,
        whether or not those are known yet: what a change of one of them may affect."""
        out = []
        for r in self._routers():
            for rp in r.ports:
                subnet, port = self.get(Subnet, rp.subnet_id), self.get(LogicalPort, rp.port_id)
                nets = {o.network_id for o in (subnet, port) if o is not None}
                if rp.port_id == port_id or rp.subnet_id == subnet_id or network_id in nets:
                    out.append(r)
                    break
        return out

    # -- floating IPs (read-only views for the fip app) --------------------------------------

    def floating_ips_of(self, port_id: str) -> list[FloatingIP]:
        """The floating IPs associated with the port, by id."""
        return sorted((f for f in self.table(FloatingIP).values() if f.port_id == port_id),
                      key=lambda f: f.id)

    def subnets_of(self, network_id: str) -> list[Subnet]:
        return sorted((s for s in self.table(Subnet).values() if s.network_id == network_id),
                      key=lambda s: s.id)

    def _routers(self) -> list[LogicalRouter]:
        return sorted(self.table(LogicalRouter).values(), key=lambda r: r.id)


def _waits_for_binding(m: Migration) -> bool:
    return m.mode is MigrationMode.LIVE and m.fallback is LiveFallback.BINDING


def authorized(port: LogicalPort, chassis: str) -> bool:
    """Has the API given ``chassis`` this port (a binding for it, or migrating_to it)?"""
    if port.binding_for(chassis) is not None:
        return True
    active = port.active_binding
    return active is not None and active.profile.get("migrating_to") == chassis


def remotes_of(loc: Location) -> list[Remote]:
    """The other chassis a location involves."""
    if isinstance(loc, Remote):
        return [loc]
    if isinstance(loc, Outgoing):
        return [loc.dest]
    if isinstance(loc, Incoming):
        return [loc.source]
    if isinstance(loc, Both):
        return [loc.source, loc.dest]
    return []
