"""A chassis' local view of the topology, and where each port is.

Pure data: the northbound objects this chassis has received, and the VIFs its OVSDB reports.
``locate`` answers the one question every app asks: is this port here (on which OpenFlow
port), on another chassis (which one), or nowhere?
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TypeVar

from ferry.model.objects import Chassis, LogicalPort, LogicalSwitch, NbObject

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


Location = Local | Remote | None


@dataclass
class Topology:
    """Objects by table and id, plus this chassis' VIFs by iface-id."""

    chassis: str
    objects: dict[str, dict[str, NbObject]] = field(default_factory=dict)
    vifs: dict[str, Vif] = field(default_factory=dict)

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
        host = port.host
        if host is None or not port.admin_state_up:
            return None
        if host == self.chassis:
            vif = self.vifs.get(port.id)
            return Local(vif.ofport) if vif is not None else None
        ch = self.get(Chassis, host)
        return Remote(ch.id, str(ch.tunnel_ip)) if ch is not None else None

    def network(self, port: LogicalPort) -> LogicalSwitch | None:
        return self.get(LogicalSwitch, port.network_id)

    def remote_chassis_of(self, network_id: str) -> dict[str, str]:
        """Other chassis hosting a port of the network: name → tunnel IP."""
        out: dict[str, str] = {}
        for port in self.ports_of(network_id):
            loc = self.locate(port)
            if isinstance(loc, Remote):
                out[loc.chassis] = loc.tunnel_ip
        return dict(sorted(out.items()))

    def local_ofports_of(self, network_id: str) -> list[int]:
        out = []
        for port in self.ports_of(network_id):
            loc = self.locate(port)
            if isinstance(loc, Local):
                out.append(loc.ofport)
        return sorted(out)
