"""Distributed routing in the core, by walking packets through three chassis' desired flows.

Router R joins net1 (10.0.0.0/24, VNI 5) and net2 (10.0.1.0/24, VNI 6); net3 (10.0.2.0/24)
is not on any router. VMs: a1 (net1) on ch1, a2 (net1) on ch2, c1 (net1) on ch3, b1 (net2) on
ch2, b2 (net2) on ch3, d1 (net3) on ch1. ch1 hosts no port of net2: it routes to net2 without
ever seeing that network's broadcasts (the hard case for a migration of b1).
"""

from __future__ import annotations

from typing import Any

import pytest

from ferry.core.chassis import ChassisCore
from ferry.core.pipeline import table
from ferry.core.topology import Vif
from ferry.core.walk import Conntrack, Walk, walk
from ferry.model.objects import (
    BindingStatus,
    ExtraRoute,
    FixedIP,
    LogicalPort,
    LogicalRouter,
    LogicalSwitch,
    Migration,
    MigrationMode,
    MigrationStatus,
    PortBinding,
    RouterPort,
    SecurityGroup,
    SecurityGroupRule,
    Subnet,
)
from ferry.switch.flow import DecTtl, Flow
from ferry.switch.openflow import Switch
from tests.fabric import CARRIED, TUNNEL_OFPORT, Fabric, P, fresh_copy, three_chassis
from tests.test_openflow import events, ovs, switch  # noqa: F401  (real OVS fixtures)

TTL = "ip_ttl"
"""The walk's name for the IP TTL (OpenFlow has no field for it; dec_ttl is an action)."""

RI1_MAC, RI2_MAC, RI3_MAC = "fa:16:3e:00:01:01", "fa:16:3e:00:01:02", "fa:16:3e:00:01:03"
RI1_MAC6, RI2_MAC6 = "fa:16:3e:00:06:01", "fa:16:3e:00:06:02"
NETS = {"net1": (5, "s1", "10.0.0.0/24"), "net2": (6, "s2", "10.0.1.0/24"),
        "net3": (7, "s3", "10.0.2.0/24")}
VMS: dict[str, tuple[str, str, int, str, str, int]] = {
    # name: (network, chassis, ofport, mac, ip, key)
    "a1": ("net1", "ch1", 10, "fa:16:3e:00:00:a1", "10.0.0.11", 11),
    "a2": ("net1", "ch2", 11, "fa:16:3e:00:00:a2", "10.0.0.12", 12),
    "c1": ("net1", "ch3", 11, "fa:16:3e:00:00:c1", "10.0.0.31", 13),
    "b1": ("net2", "ch2", 10, "fa:16:3e:00:00:b1", "10.0.1.21", 21),
    "b2": ("net2", "ch3", 12, "fa:16:3e:00:00:b2", "10.0.1.22", 22),
    "d1": ("net3", "ch1", 13, "fa:16:3e:00:00:d1", "10.0.2.5", 31),
}
GW = {"net1": ("ri1", RI1_MAC, "10.0.0.1", 901), "net2": ("ri2", RI2_MAC, "10.0.1.1", 902),
      "net3": ("ri3", RI3_MAC, "10.0.2.1", 903)}


class RoutedFabric(Fabric):
    """The shared fabric, plus what routing needs of it: the TTL carried across tunnels, and
    dec_ttl, which ``ferry.core.walk`` does not simulate (yet). Here dec_ttl decrements the
    walked packet's TTL and, as OVS does, drops a packet whose TTL would reach 0. Exact for
    this pipeline: a packet is routed at most once per chassis, before any output."""

    def _inject(self, chassis: str, pkt: dict[str, Any], out: list[Any], hops: int) -> None:
        assert hops < 4, "packet bounced between chassis"
        my_ip = next(ip for ip, name in self.tunnel_ips.items() if name == chassis)
        for port, sent in walk_ttl(list(self.cores[chassis].desired().values()), pkt,
                                   self.learned[chassis], conntrack=self.conntrack[chassis]):
            if port != TUNNEL_OFPORT:
                out.append((chassis, port, sent))
                continue
            dst = self.tunnel_ips[sent["tun_ipv4_dst"]]
            assert dst != chassis, "tunnelled to itself"
            inner = {k: sent[k] for k in (*CARRIED, TTL) if k in sent}
            inner.update(in_port=TUNNEL_OFPORT, tunnel_id=sent["tunnel_id"], tun_ipv4_src=my_ip)
            self._inject(dst, inner, out, hops + 1)


def walk_ttl(flows: list[Flow], pkt: dict[str, Any], learned: dict[Any, Any],
             table: int = 0, conntrack: Conntrack | None = None
             ) -> list[tuple[int, dict[str, Any]]]:
    """``walk`` with dec_ttl applied to the outputs (see RoutedFabric)."""
    decrementing = {f.key for f in flows if DecTtl() in f.actions}
    plain = [Flow(f.table, f.priority, f.match, tuple(a for a in f.actions if a != DecTtl()),
                  f.cookie) for f in flows]
    result: Walk = walk(plain, pkt, table, learned=learned, conntrack=conntrack)
    decs = sum(1 for f in result.trace if f.key in decrementing)
    if decs == 0:
        return [(d.port, d.packet) for d in result.outputs]
    if pkt.get(TTL, 64) - decs < 1:
        return []
    return [(d.port, {**d.packet, TTL: pkt.get(TTL, 64) - decs}) for d in result.outputs]


def vm_port(name: str, version: int = 1, bindings: list[PortBinding] | None = None
            ) -> LogicalPort:
    net, ch, _, mac, ip, key = VMS[name]
    return LogicalPort(id=name, topic=P, network_id=net, mac=mac, tunnel_key=key,
                       version=version,
                       bindings=bindings if bindings is not None else [PortBinding(host=ch)],
                       fixed_ips=[FixedIP(subnet_id=NETS[net][1],
                                          ip_address=ip)])  # type: ignore[arg-type]


def interface_port(net: str, version: int = 1) -> LogicalPort:
    pid, mac, ip, key = GW[net]
    return LogicalPort(id=pid, topic=P, network_id=net, mac=mac, tunnel_key=key,
                       version=version, device_owner="network:router_interface",
                       device_id="R", port_security_enabled=False,
                       fixed_ips=[FixedIP(subnet_id=NETS[net][1],
                                          ip_address=ip)])  # type: ignore[arg-type]


def router(version: int = 1, nets: tuple[str, ...] = ("net1", "net2"),
           routes: tuple[tuple[str, str], ...] = (), **kw: Any) -> LogicalRouter:
    return LogicalRouter(
        id="R", topic=P, version=version,
        ports=tuple(RouterPort(port_id=GW[n][0], subnet_id=NETS[n][1]) for n in nets),
        routes=tuple(ExtraRoute(destination=d, nexthop=h)  # type: ignore[arg-type]
                     for d, h in routes), **kw)


def build(router_first: bool = False) -> RoutedFabric:
    """The topology above, published in the API's order (interface ports before the router
    lists them) or, with ``router_first``, the router first (a resync's order)."""
    base = three_chassis()
    f = RoutedFabric()
    f.cores, f.tunnel_ips, f.learned = base.cores, base.tunnel_ips, base.learned
    f.conntrack = base.conntrack
    for net, (vni, sub, cidr) in NETS.items():
        f.publish(LogicalSwitch(id=net, topic=P, tunnel_key=vni, version=1),
                  Subnet(id=sub, topic=P, network_id=net, cidr=cidr, version=1,
                         gateway_ip=GW[net][2]))  # type: ignore[arg-type]
    if router_first:
        f.publish(router())
    for name, (_, ch, ofport, *_rest) in VMS.items():
        f.publish(vm_port(name))
        f.plug(ch, name, ofport)
    f.publish(interface_port("net1"), interface_port("net2"), interface_port("net3"))
    if not router_first:
        f.publish(router())
    return f


@pytest.fixture
def fab() -> RoutedFabric:
    return build()


def ip_packet(src: str, dst_ip: str, ttl: int = 64, **kw: Any) -> dict[str, Any]:
    """What VM ``src`` sends to ``dst_ip`` through its gateway (its router's MAC)."""
    net, _, _, mac, ip, _ = VMS[src]
    return {"eth_src": mac, "eth_dst": GW[net][1], "eth_type": 0x0800, "ipv4_src": ip,
            "ipv4_dst": dst_ip, "ip_proto": 17, "udp_src": 4000, "udp_dst": 5000, TTL: ttl,
            **kw}


def send(f: Fabric, src: str, dst_ip: str, **kw: Any) -> list[tuple[str, int, dict[str, Any]]]:
    _, ch, ofport, *_ = VMS[src]
    return f.send(ch, ofport, **ip_packet(src, dst_ip, **kw))


def where(f: Fabric, src: str, dst_ip: str, **kw: Any) -> list[tuple[str, int]]:
    return sorted((c, p) for c, p, _ in send(f, src, dst_ip, **kw))


def at(vm: str) -> list[tuple[str, int]]:
    _, ch, ofport, *_ = VMS[vm]
    return [(ch, ofport)]


# -- routing -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("src", "dst"), [
    ("a1", "b1"),  # ch1 → ch2
    ("b1", "a1"),  # the reply, routed on ch2
    ("a2", "b1"),  # same chassis, other network
    ("c1", "b1"),  # ch3 → ch2
    ("b2", "a2"),  # ch3 → ch2
])
def test_routed_to_the_right_port_and_no_other(fab: RoutedFabric, src: str, dst: str) -> None:
    out = send(fab, src, VMS[dst][4])
    assert [(c, p) for c, p, _ in out] == at(dst)
    pkt = out[0][2]
    dst_net = VMS[dst][0]
    assert pkt["eth_src"] == GW[dst_net][1]      # from the router's MAC on the dest network
    assert pkt["eth_dst"] == VMS[dst][3]         # to the VM's own MAC
    assert (pkt["ipv4_src"], pkt["ipv4_dst"]) == (VMS[src][4], VMS[dst][4])
    assert pkt[TTL] == 63


def test_routed_across_chassis_with_the_destination_networks_vni(fab: RoutedFabric) -> None:
    """On the wire between ch1 and ch2 the packet is already in net2: no router there."""
    flows = list(fab.cores["ch1"].desired().values())
    sent = walk_ttl(flows, {"in_port": 10, **ip_packet("a1", "10.0.1.21")}, {})
    assert [(p, s["tunnel_id"], s["tun_ipv4_dst"]) for p, s in sent] == [
        (TUNNEL_OFPORT, 6, "192.168.254.2")]


def test_ttl_is_decremented_and_expired_packets_are_dropped(fab: RoutedFabric) -> None:
    assert [p[TTL] for _, _, p in send(fab, "a1", "10.0.1.21", ttl=2)] == [1]
    assert send(fab, "a1", "10.0.1.21", ttl=1) == []


def test_not_routed_to_unrouted_networks_or_unknown_addresses(fab: RoutedFabric) -> None:
    assert where(fab, "a1", VMS["d1"][4]) == []       # net3: not on the router
    assert where(fab, "a1", "10.0.1.99") == []        # net2, but no such port
    assert where(fab, "a1", "172.16.0.1") == []       # no route
    # d1 sends to net3's interface MAC (an interface port not on R): nothing is routed.
    assert where(fab, "d1", VMS["a1"][4]) == []


def test_a_packet_from_a_tunnel_is_never_routed_again(fab: RoutedFabric) -> None:
    """A frame for the router's MAC arriving from another chassis (a chassis that does not
    know the router floods it) is not routed there: routing happens where it entered."""
    pkt = {**ip_packet("a1", "10.0.1.21"), "in_port": TUNNEL_OFPORT, "tunnel_id": 5,
           "tun_ipv4_src": "192.168.254.1"}
    assert [d.port for d in walk(list(fab.cores["ch2"].desired().values()), pkt).outputs
            if d.port == 10] == []


# -- the gateway answers ping --------------------------------------------------------------------


@pytest.mark.parametrize(("src", "gw_ip"), [
    ("a1", "10.0.0.1"), ("a2", "10.0.0.1"), ("c1", "10.0.0.1"),   # its own gateway, anywhere
    ("b1", "10.0.1.1"),
    ("a1", "10.0.1.1"),                                           # the router's other address
])
def test_gateway_ping_is_answered_on_the_vms_chassis(fab: RoutedFabric, src: str,
                                                     gw_ip: str) -> None:
    out = send(fab, src, gw_ip, ip_proto=1, icmpv4_type=8)
    assert [(c, p) for c, p, _ in out] == at(src)
    reply = out[0][2]
    net, _, _, mac, ip, _ = VMS[src]
    assert reply["icmpv4_type"] == 0
    assert (reply["ipv4_src"], reply["ipv4_dst"]) == (gw_ip, ip)
    assert (reply["eth_src"], reply["eth_dst"]) == (GW[net][1], mac)


def test_other_traffic_to_the_gateway_is_not_answered(fab: RoutedFabric) -> None:
    assert where(fab, "a1", "10.0.0.1") == []                         # UDP
    assert where(fab, "a1", "10.0.0.1", ip_proto=1, icmpv4_type=0) == []  # not a request


# -- with security groups -------------------------------------------------------------------------


def test_routed_packets_meet_the_destinations_security_groups(fab: RoutedFabric) -> None:
    """b1 admits ICMP from net1 only; routing changes no address a rule looks at, so its
    rules see the routed packet as sent, and the stateful reply goes back routed."""
    fab.publish(SecurityGroup(id="sg", topic=P, version=1),
                SecurityGroupRule(id="in", topic=P, security_group_id="sg",
                                  direction="ingress", protocol="icmp",
                                  remote_ip_prefix="10.0.0.0/24", version=1),  # type: ignore[arg-type]
                SecurityGroupRule(id="out", topic=P, security_group_id="sg", direction="egress",
                                  version=1))  # type: ignore[arg-type]
    fab.publish(vm_port("b1", 2).model_copy(update={"security_groups": ("sg",)}))
    assert where(fab, "a1", "10.0.1.21") == []                             # UDP: no rule
    assert where(fab, "a1", "10.0.1.21", ip_proto=1, icmpv4_type=8) == at("b1")
    reply = {**ip_packet("b1", "10.0.0.11"), "ip_proto": 1, "icmpv4_type": 0}
    del reply["udp_src"], reply["udp_dst"]
    _, ch, ofport, *_ = VMS["b1"]
    assert fab.deliveries(ch, ofport, **reply) == at("a1")
    # b2 (net2, through its gateway) is not in 10.0.0.0/24: not admitted.
    assert where(fab, "b2", "10.0.1.21", ip_proto=1, icmpv4_type=8) == []


# -- extra routes --------------------------------------------------------------------------------


def test_extra_routes_longest_prefix_first(fab: RoutedFabric) -> None:
    fab.publish(router(2, routes=(("192.168.50.0/24", "10.0.1.21"),   # via b1
                                  ("10.0.1.64/26", "10.0.1.22"),      # inside net2, via b2
                                  ("0.0.0.0/0", "10.0.1.22"))))       # default, via b2
    out = send(fab, "a1", "192.168.50.7")
    assert [(c, p) for c, p, _ in out] == at("b1")
    pkt = out[0][2]
    assert (pkt["eth_src"], pkt["eth_dst"], pkt["ipv4_dst"], pkt[TTL]) == (
        RI2_MAC, VMS["b1"][3], "192.168.50.7", 63)
    assert where(fab, "a1", "10.0.1.70") == at("b2")       # the /26 beats the connected /24
    assert where(fab, "a1", "10.0.1.21") == at("b1")       # the /24 still holds outside it
    assert where(fab, "a1", "8.8.8.8") == at("b2")         # default route


def test_extra_route_follows_its_nexthop(fab: RoutedFabric) -> None:
    """The nexthop is resolved in l3_nexthop: when b1 moves, the route moves with it."""
    fab.publish(router(2, routes=(("192.168.50.0/24", "10.0.1.21"),)))
    fab.unplug("ch2", "b1")
    fab.plug("ch3", "b1", 20)
    fab.publish(vm_port("b1", 2, [PortBinding(host="ch3")]))
    assert where(fab, "a1", "192.168.50.7") == [("ch3", 20)]


def test_same_destination_twice_picks_one_nexthop_everywhere(fab: RoutedFabric) -> None:
    fab.publish(router(2, routes=(("192.168.50.0/24", "10.0.1.22"),
                                  ("192.168.50.0/24", "10.0.1.21"))))
    for src in ("a1", "a2", "c1"):
        assert where(fab, src, "192.168.50.7") == at("b1")   # the lower nexthop


# -- a routed flow follows a live migration ------------------------------------------------------


class Migrating:
    """b1 live-migrates ch2 → ch3 (as in test_core_live), while a1 (ch1), a2 (ch2) and c1 (ch3)
    send to it through the router."""

    SRC, DST = ("ch2", 10), ("ch3", 20)

    def __init__(self, f: RoutedFabric) -> None:
        self.f, self.pv, self.mv = f, 1, 0

    def port(self, bindings: list[PortBinding]) -> None:
        self.pv += 1
        self.f.publish(vm_port("b1", self.pv, bindings))

    def record(self, status: MigrationStatus, activated: bool = False) -> None:
        self.mv += 1
        self.f.publish(Migration(id="b1", topic=P, port_id="b1", source_chassis="ch2",
                                 dest_chassis="ch3", status=status, mode=MigrationMode.LIVE,
                                 activated=activated, version=self.mv))

    def step1(self) -> None:
        self.port([PortBinding(host="ch2", profile={"migrating_to": "ch3"}),
                   PortBinding(host="ch3", status=BindingStatus.INACTIVE)])
        self.f.cores["ch3"].vif_online(Vif("b1", self.DST[1], "tap20"))
        self.record(MigrationStatus.PLUGGED)

    def rarp(self) -> None:
        self.f.send("ch3", self.DST[1], eth_src=VMS["b1"][3], eth_dst="ff:ff:ff:ff:ff:ff",
                    eth_type=0x8035)

    def finish(self) -> None:
        self.f.unplug("ch2", "b1")
        self.record(MigrationStatus.SOURCE_UNPLUGGED)
        self.port([PortBinding(host="ch3")])
        self.record(MigrationStatus.DONE)
        for name, core in self.f.cores.items():  # the agent's reconcile at the end
            desired = core.desired()
            self.f.learned[name] = {k: fl for k, fl in self.f.learned[name].items()
                                    if desired.get(k) == fl}

    def routed_to_b1(self) -> dict[str, list[tuple[str, int]]]:
        return {src: where(self.f, src, "10.0.1.21") for src in ("a1", "a2", "c1")}

    def replies(self) -> list[tuple[str, int]]:
        ch, ofport = self.DST
        return sorted((c, p) for c, p, _ in self.f.send(ch, ofport, **ip_packet("b1",
                                                                                "10.0.0.11")))


def test_a_routed_flow_follows_a_live_migration(fab: RoutedFabric) -> None:
    m = Migrating(fab)

    def everyone_at(where: tuple[str, int]) -> dict[str, list[tuple[str, int]]]:
        return {src: [where] for src in ("a1", "a2", "c1")}

    assert m.routed_to_b1() == everyone_at(m.SRC)
    m.step1()
    assert m.routed_to_b1() == everyone_at(m.SRC)   # dual delivery: once
    m.rarp()
    # Activated in the datapath: every sender's routed packet now reaches ch3 only, also
    # from ch1, which hosts no port of net2 and saw no RARP (it sends to both chassis).
    assert m.routed_to_b1() == everyone_at(m.DST)
    assert m.replies() == at("a1")  # b1 answers from its new chassis, routed there
    m.finish()
    assert m.routed_to_b1() == everyone_at(m.DST)
    assert m.replies() == at("a1")
    for core in fab.cores.values():
        assert core.desired() == fresh_copy(core).desired(), core.chassis


# -- incremental, idempotent, reversible ---------------------------------------------------------


def l3_flows(core: ChassisCore) -> set[Flow]:
    return {f for f in core.desired().values() if f.table in (32, 34)}


def test_the_tables_do_not_depend_on_the_order_of_publication() -> None:
    a, b = build(), build(router_first=True)
    for name in a.cores:
        assert a.cores[name].desired() == b.cores[name].desired(), name


def test_incremental_equals_full_recompute(fab: RoutedFabric) -> None:
    def check() -> None:
        for core in fab.cores.values():
            incremental = dict(core.desired())
            core.recompute_all()
            assert core.desired() == incremental, core.chassis
            assert fresh_copy(core).desired() == incremental, core.chassis

    check()
    fab.publish(router(2, routes=(("192.168.50.0/24", "10.0.1.21"),)))
    check()
    fab.publish(router(3, nets=("net1", "net2", "net3")))           # net3 joins
    check()
    assert where(fab, "a1", VMS["d1"][4]) == at("d1")
    fab.publish(router(4, nets=("net1", "net3")))                   # net2 leaves: router first
    fab.delete(interface_port("net2"))                              # then its port
    check()
    assert where(fab, "a1", VMS["b1"][4]) == []
    assert where(fab, "a1", VMS["d1"][4]) == at("d1")
    fab.publish(LogicalSwitch(id="net3", topic=P, tunnel_key=7, version=2, name="renamed"))
    fab.publish(Subnet(id="s3", topic=P, network_id="net3", cidr="10.0.2.0/24", version=2,
                       gateway_ip="10.0.2.1"))  # type: ignore[arg-type]
    check()
    fab.delete(router(5))
    check()
    assert all(not l3_flows(core) for core in fab.cores.values())


def test_same_events_twice_and_revert_leave_identical_tables(fab: RoutedFabric) -> None:
    before = {n: dict(c.desired()) for n, c in fab.cores.items()}

    def same() -> bool:
        return {n: dict(c.desired()) for n, c in fab.cores.items()} == before

    fab.publish(router())
    fab.publish(interface_port("net2"))
    assert same()
    fab.publish(router(2, routes=(("192.168.50.0/24", "10.0.1.21"),)))
    assert not same()
    fab.publish(router(3))
    assert same()
    fab.publish(router(4, admin_state_up=False))
    assert all(not l3_flows(c) for c in fab.cores.values())
    fab.publish(router(5))
    assert same()
    # remove_router_interface (router, then port), add_router_interface (port, then router).
    fab.publish(router(6, nets=("net1",)))
    fab.delete(interface_port("net2"))
    assert not same()
    fab.publish(interface_port("net2", 2))
    fab.publish(router(7))
    assert same()
    fab.publish(interface_port("net1", 3).model_copy(update={"admin_state_up": False}))
    # An interface that is down is no router MAC any more: net1 floods the frame, unrouted.
    assert at("b1")[0] not in where(fab, "a1", VMS["b1"][4])
    fab.publish(interface_port("net1", 4))
    assert same()


# -- IPv6: the same flows over the other address family ------------------------------------------


def dual_stack() -> RoutedFabric:
    """The topology with IPv6 subnets added on net1 and net2 (their own interface ports, as
    the API adds one per subnet) and an IPv6 address for b1."""
    f = build()
    v6 = {"net1": ("s61", "2001:db8:1::/64", "2001:db8:1::1", RI1_MAC6),
          "net2": ("s62", "2001:db8:2::/64", "2001:db8:2::1", RI2_MAC6)}
    for net, (sub, cidr, gw, mac) in v6.items():
        f.publish(Subnet(id=sub, topic=P, network_id=net, cidr=cidr, version=1,
                         gateway_ip=gw))  # type: ignore[arg-type]
        pid, _, _, key = GW[net]
        f.publish(LogicalPort(id=f"{pid}6", topic=P, network_id=net, mac=mac, tunnel_key=key + 10,
                              version=1, device_owner="network:router_interface", device_id="R",
                              fixed_ips=[FixedIP(subnet_id=sub, ip_address=gw)]))  # type: ignore[list-item]
    b1 = vm_port("b1")
    f.publish(b1.model_copy(update={"version": 2, "fixed_ips": (
        *b1.fixed_ips, FixedIP(subnet_id="s62", ip_address="2001:db8:2::21"))}))  # type: ignore[arg-type]
    r = router()
    f.publish(r.model_copy(update={"version": 2, "ports": (
        *r.ports, RouterPort(port_id="ri16", subnet_id="s61"),
        RouterPort(port_id="ri26", subnet_id="s62"))}))
    return f


def test_ipv6_routes_and_answers_echo_like_ipv4() -> None:
    """IPv6 subnets on the same router: routed with the nexthop in reg0..reg3, echo
    answered. Walked from l2_lookup on, as a VM's IPv6 passes port security and neighbour
    discovery only once the L2 app handles them."""
    f = dual_stack()
    flows = list(f.cores["ch1"].desired().values())
    base = {"in_port": 10, "metadata": 5, "reg6": 11, "eth_src": VMS["a1"][3],
            "eth_dst": RI1_MAC6, "eth_type": 0x86DD, "ipv6_src": "2001:db8:1::11", "ip_proto": 17}
    routed = walk_ttl(flows, {**base, "ipv6_dst": "2001:db8:2::21"}, {}, table=30)
    assert [(p, s["tunnel_id"], s["eth_dst"], s["eth_src"], s[TTL]) for p, s in routed] == [
        (TUNNEL_OFPORT, 6, VMS["b1"][3], RI2_MAC6, 63)]
    echo = walk(flows, {**base, "ipv6_dst": "2001:db8:2::1", "ip_proto": 58,
                        "icmpv6_type": 128}, table=30).outputs
    assert [(d.port, d.packet["icmpv6_type"], d.packet["ipv6_src"], d.packet["ipv6_dst"])
            for d in echo] == [(10, 129, "2001:db8:2::1", "2001:db8:1::11")]
    assert walk_ttl(flows, {**base, "ipv6_dst": "2001:db8:2::99"}, {}, table=30) == []


@pytest.mark.ovs
async def test_flows_read_back_from_ovs_exactly_as_written(switch: Switch) -> None:  # noqa: F811
    """Flow sync compares what OVS reports with what the core wants: every L3 flow (IPv4
    and IPv6: the nexthop registers, moves, ICMP rewrites) must come back unchanged."""
    f = dual_stack()
    flows = [fl for fl in f.cores["ch1"].desired().values()
             if fl.table in (table("l3_route"), table("l3_nexthop"))]
    assert {fl.match["eth_type"] for fl in flows} == {0x0800, 0x86DD}
    await switch.apply(adds=flows)
    assert set(await switch.dump_flows()) == set(flows)
