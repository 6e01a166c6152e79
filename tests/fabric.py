"""Several chassis cores in one process, joined by a simulated Geneve underlay.

A packet leaves a chassis through its tunnel port with ``tunnel_id`` and ``tun_ipv4_dst``
set; the fabric hands it to the chassis owning that IP, on its tunnel port, with only the
tunnel metadata carried over (registers do not cross chassis).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ferry.core.chassis import ChassisCore, Output
from ferry.core.topology import Vif
from ferry.core.walk import Conntrack, walk
from ferry.model.objects import (
    Chassis,
    FixedIP,
    LogicalPort,
    LogicalSwitch,
    NbObject,
    PortBinding,
    Subnet,
)

TUNNEL_OFPORT = 1
CARRIED = ("eth_src", "eth_dst", "eth_type", "arp_op", "arp_spa", "arp_tpa", "arp_sha",
           "arp_tha", "ipv4_src", "ipv4_dst", "ip_proto", "udp_src", "udp_dst", "tcp_src",
           "tcp_dst", "icmpv4_type", "icmpv4_code", "ipv6_src", "ipv6_dst", "icmpv6_type",
           "icmpv6_code")


@dataclass
class Fabric:
    cores: dict[str, ChassisCore] = field(default_factory=dict)
    tunnel_ips: dict[str, str] = field(default_factory=dict)
    learned: dict[str, dict[Any, Any]] = field(default_factory=dict)
    """Flows each chassis' datapath learned (learn actions), as OVS keeps them."""
    conntrack: dict[str, Conntrack] = field(default_factory=dict)
    """Each chassis' connection tracker (not shared: a migration does not carry it)."""
    reported: dict[str, list[Output]] = field(default_factory=dict)
    """What each core made of the packet-ins its switch sent to it (connection id 0)."""

    def add_chassis(self, name: str, tunnel_ip: str) -> ChassisCore:
        core = ChassisCore(name, tunnel_ofport=TUNNEL_OFPORT)
        self.cores[name] = core
        self.learned[name] = {}
        self.conntrack[name] = Conntrack()
        self.reported[name] = []
        self.tunnel_ips[tunnel_ip] = name
        return core

    def publish(self, *objs: NbObject) -> None:
        for obj in objs:
            for core in self.cores.values():
                core.nb_updated(obj)

    def delete(self, obj: NbObject) -> None:
        for core in self.cores.values():
            core.nb_deleted(obj.TABLE, obj.id)

    def plug(self, chassis: str, port_id: str, ofport: int) -> None:
        self.cores[chassis].vif_online(Vif(port_id, ofport, f"tap{ofport}"))

    def unplug(self, chassis: str, port_id: str) -> None:
        self.cores[chassis].vif_offline(port_id)

    def send(self, chassis: str, in_port: int, **pkt: Any) -> list[tuple[str, int, dict[str, Any]]]:
        """Inject a packet on a chassis port; every (chassis, ofport, packet) it reaches."""
        out: list[tuple[str, int, dict[str, Any]]] = []
        self._inject(chassis, {"in_port": in_port, **pkt}, out, hops=0)
        return out

    def deliveries(self, chassis: str, in_port: int, **pkt: Any) -> list[tuple[str, int]]:
        return sorted((c, p) for c, p, _ in self.send(chassis, in_port, **pkt))

    def _inject(self, chassis: str, pkt: dict[str, Any], out: list[Any], hops: int) -> None:
        assert hops < 4, "packet bounced between chassis"
        flows = list(self.cores[chassis].desired().values())
        my_ip = next(ip for ip, name in self.tunnel_ips.items() if name == chassis)
        w = walk(flows, pkt, learned=self.learned[chassis], conntrack=self.conntrack[chassis])
        for p in w.to_controller:
            if p.action.controller_id == 0:
                self.reported[chassis] += self.cores[chassis].packet_in(p.table, p.cookie)
        for d in w.outputs:
            if d.port == TUNNEL_OFPORT:
                dst = self.tunnel_ips[d.packet["tun_ipv4_dst"]]
                assert dst != chassis, "tunnelled to itself"
                inner = {k: d.packet[k] for k in CARRIED if k in d.packet}
                inner.update(in_port=TUNNEL_OFPORT, tunnel_id=d.packet["tunnel_id"],
                             tun_ipv4_src=my_ip)
                self._inject(dst, inner, out, hops + 1)
            else:
                out.append((chassis, d.port, d.packet))


def fresh_copy(core: ChassisCore) -> ChassisCore:
    """A core started from scratch on the same final state (objects and VIFs)."""
    new = ChassisCore(core.chassis, tunnel_ofport=core.tunnel_ofport)
    for objs in core.topology.objects.values():
        for obj in objs.values():
            new.nb_updated(obj)
    for vif in core.topology.vifs.values():
        new.vif_online(vif)
    return new


P = "projA"


def net1_port(id: str, key: int, mac: str, ip: str, bindings: list[PortBinding],
              version: int = 1) -> LogicalPort:
    """A port on the three-chassis fabric's network net1 (subnet s1, 10.0.0.0/24)."""
    return LogicalPort(id=id, topic=P, network_id="net1", mac=mac, tunnel_key=key,
                       version=version, bindings=bindings,
                       fixed_ips=[FixedIP(subnet_id="s1", ip_address=ip)])  # type: ignore[arg-type]


def three_chassis() -> Fabric:
    """ch1..ch3 (tunnel IPs 192.168.254.1-3), each knowing all three, and network net1."""
    f = Fabric()
    for i in (1, 2, 3):
        f.add_chassis(f"ch{i}", f"192.168.254.{i}")
    for i in (1, 2, 3):
        f.publish(Chassis(id=f"ch{i}", tunnel_ip=f"192.168.254.{i}", version=1))
    f.publish(LogicalSwitch(id="net1", topic=P, tunnel_key=5, version=1),
              Subnet(id="s1", topic=P, network_id="net1", cidr="10.0.0.0/24", version=1))
    return f
