"""Security groups in the core, by walking packets (and conntrack) through three chassis.

net1 (10.0.0.0/24): w1 (web) and o1 (no groups) on ch1, w2 (web) on ch2, d1 (db) on ch3.
  web: ingress tcp 80 from anywhere, ingress icmp from 10.0.0.16/28, egress everything.
  db:  ingress tcp 5432 from members of web, egress udp 53 to 10.0.0.21/32 only.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from ferry.core.apps import security
from ferry.core.apps.security import ZONE_MAX, ZONE_MIN, ct_zones
from ferry.core.chassis import ChassisCore
from ferry.core.pipeline import table
from ferry.core.topology import Vif
from ferry.core.walk import Conntrack, walk
from ferry.model.objects import (
    FixedIP,
    LogicalPort,
    PortBinding,
    SecurityGroup,
    SecurityGroupRule,
)
from ferry.switch.openflow import Switch
from tests.fabric import Fabric, P, fresh_copy, net1_port, three_chassis
from tests.test_openflow import events, ovs, switch  # noqa: F401  (real OVS fixtures)

PORTS = {  # name: (chassis, ofport, key, mac, ip, groups)
    "w1": ("ch1", 10, 11, "fa:16:3e:00:00:a1", "10.0.0.11", ("web",)),
    "o1": ("ch1", 11, 12, "fa:16:3e:00:00:a2", "10.0.0.12", ()),
    "w2": ("ch2", 10, 21, "fa:16:3e:00:00:b1", "10.0.0.21", ("web",)),
    "d1": ("ch3", 10, 31, "fa:16:3e:00:00:c1", "10.0.0.31", ("db",)),
}


def rule(id: str, group: str, direction: str, **kw: Any) -> SecurityGroupRule:
    return SecurityGroupRule(id=id, topic=P, security_group_id=group, direction=direction,
                             version=1, **kw)


RULES = [
    rule("web-http", "web", "ingress", protocol="tcp", port_range_min=80, port_range_max=80),
    rule("web-icmp", "web", "ingress", protocol="icmp", remote_ip_prefix="10.0.0.16/28"),
    rule("web-out", "web", "egress"),
    rule("db-pg", "db", "ingress", protocol="tcp", port_range_min=5432, port_range_max=5432,
         remote_group_id="web"),
    rule("db-dns", "db", "egress", protocol="udp", port_range_min=53, port_range_max=53,
         remote_ip_prefix="10.0.0.21/32"),
]


def port(name: str, version: int = 1, **update: Any) -> LogicalPort:
    ch, _, key, mac, ip, groups = PORTS[name]
    p = net1_port(name, key, mac, ip, [PortBinding(host=ch)], version)
    return p.model_copy(update={"security_groups": groups, **update})


@pytest.fixture
def fab() -> Fabric:
    f = three_chassis()
    f.publish(SecurityGroup(id="web", topic=P, version=1),
              SecurityGroup(id="db", topic=P, version=1), *RULES)
    for name, (ch, ofport, *_) in PORTS.items():
        f.publish(port(name))
        f.plug(ch, name, ofport)
    return f


def pkt(src: str, dst: str, proto: str, sport: int = 0, dport: int = 0) -> dict[str, Any]:
    s, d = PORTS[src], PORTS[dst]
    out: dict[str, Any] = {"eth_src": s[3], "eth_dst": d[3], "eth_type": 0x0800,
                           "ipv4_src": s[4], "ipv4_dst": d[4]}
    if proto == "icmp":
        out.update(ip_proto=1, icmpv4_type=sport)
    else:
        out.update(ip_proto=6 if proto == "tcp" else 17, **{f"{proto}_src": sport,
                                                            f"{proto}_dst": dport})
    return out


MOVED: dict[int, dict[str, tuple[str, int]]] = {}
"""Per fabric (by id): ports a test moved, name → (chassis, ofport)."""


def vif(fab: Fabric, name: str) -> tuple[str, int]:
    return MOVED.get(id(fab), {}).get(name, PORTS[name][:2])


def send(fab: Fabric, src: str, dst: str, proto: str, sport: int = 0, dport: int = 0) -> bool:
    """Does the packet reach ``dst``'s VIF (and nothing else)?"""
    got = fab.deliveries(*vif(fab, src), **pkt(src, dst, proto, sport, dport))
    assert got in ([], [vif(fab, dst)]), got
    return got == [vif(fab, dst)]


def exchange(fab: Fabric, client: str, server: str, proto: str, dport: int,
             sport: int = 40000) -> tuple[bool, bool]:
    """A request and, if it arrived, its reply: (request delivered, reply delivered)."""
    request, answer = ((8, 0), (0, 8)) if proto == "icmp" else ((sport, dport), (dport, sport))
    if not send(fab, client, server, proto, *request):
        return False, False
    return True, send(fab, server, client, proto, *answer)


def test_ingress_admits_exactly_its_rules(fab: Fabric) -> None:
    assert exchange(fab, "o1", "w1", "tcp", 80) == (True, True)       # same chassis
    assert exchange(fab, "d1", "w2", "tcp", 80, 41000) == (False, False)  # d1 may not send tcp
    assert exchange(fab, "o1", "w2", "tcp", 80, 41001) == (True, True)  # across chassis
    assert exchange(fab, "o1", "w1", "tcp", 22) == (False, False)
    assert exchange(fab, "o1", "w1", "udp", 80) == (False, False)


def test_cidr_rule_and_stateful_icmp(fab: Fabric) -> None:
    assert not send(fab, "w1", "w2", "icmp", 0)  # an echo reply nobody asked for: invalid
    # w2 (10.0.0.21) is in 10.0.0.16/28, o1 (10.0.0.12) is not.
    assert exchange(fab, "w2", "w1", "icmp", 0) == (True, True)
    assert exchange(fab, "o1", "w1", "icmp", 0) == (False, False)
    # The reply w1 → w2 reached w2 although w2's own ICMP rule does not admit 10.0.0.11:
    # it is the reply of a connection w2 started. w1's own echo request does not.
    assert exchange(fab, "w1", "w2", "icmp", 0) == (False, False)  # /28 excludes .11


def test_remote_group_follows_membership(fab: Fabric) -> None:
    assert exchange(fab, "w1", "d1", "tcp", 5432) == (True, True)  # w1 is in web
    assert exchange(fab, "w2", "d1", "tcp", 5432) == (True, True)
    assert exchange(fab, "o1", "d1", "tcp", 5432, 40001) == (False, False)
    fab.publish(port("o1", 2, security_groups=("web",)))  # ch3 must recompute d1
    assert exchange(fab, "o1", "d1", "tcp", 5432, 40002) == (True, True)
    fab.publish(port("w1", 2, security_groups=()))
    assert exchange(fab, "w1", "d1", "tcp", 5432, 40003) == (False, False)


def test_udp_needs_both_sides_egress_and_ingress(fab: Fabric) -> None:
    # d1's egress admits udp 53 to w2, but w2's ingress does not admit it.
    assert exchange(fab, "d1", "w2", "udp", 53) == (False, False)
    assert exchange(fab, "d1", "w1", "udp", 53) == (False, False)  # d1's egress: w2 only
    fab.publish(rule("web-dns", "web", "ingress", protocol="udp", port_range_min=53,
                     port_range_max=53, remote_ip_prefix="10.0.0.31/32"))
    assert exchange(fab, "d1", "w2", "udp", 53, 40005) == (True, True)
    assert exchange(fab, "d1", "w1", "udp", 53, 40006) == (False, False)


def test_unfiltered_ports_and_infrastructure_pass(fab: Fabric) -> None:
    # o1 has no groups: anything reaches it and leaves it.
    assert exchange(fab, "w1", "o1", "udp", 9999) == (True, True)
    # Port security off: no filtering either.
    fab.publish(port("d1", 2, security_groups=(), port_security_enabled=False))
    assert exchange(fab, "o1", "d1", "tcp", 22) == (True, True)
    # ARP from a filtered port is answered; DHCP discovery leaves it.
    ch, ofport, _, mac, ip, _ = PORTS["w1"]
    arp = {"eth_src": mac, "eth_dst": "ff:ff:ff:ff:ff:ff", "eth_type": 0x0806, "arp_op": 1,
           "arp_sha": mac, "arp_spa": ip, "arp_tpa": "10.0.0.21"}
    assert fab.deliveries(ch, ofport, **arp) == [(ch, ofport)]
    dhcp = {"eth_src": mac, "eth_dst": "ff:ff:ff:ff:ff:ff", "eth_type": 0x0800,
            "ipv4_src": "0.0.0.0", "ipv4_dst": "255.255.255.255", "ip_proto": 17,
            "udp_src": 68, "udp_dst": 67}
    # It leaves w1 and reaches the unfiltered o1 (and d1, whose port security was just turned
    # off); the filtered w2 gets no broadcast its ingress rules do not admit: floods go
    # through each port's ingress security groups like unicast does.
    assert fab.deliveries(ch, ofport, **dhcp) == [("ch1", 11), ("ch3", 10)]


def test_broadcasts_meet_the_receivers_ingress_rules(fab: Fabric) -> None:
    bcast = {"eth_dst": "ff:ff:ff:ff:ff:ff", "eth_type": 0x0800, "ip_proto": 17,
             "udp_src": 5000, "udp_dst": 9999, "ipv4_dst": "10.0.0.255"}
    ch, ofport, _, mac, ip, _ = PORTS["w1"]
    # web admits no UDP: the other web member does not get w1's broadcast, nor does d1 (db
    # admits only TCP from web); o1, in no group, does.
    assert fab.deliveries(ch, ofport, eth_src=mac, ipv4_src=ip, **bcast) == [("ch1", 11)]
    fab.publish(rule("web-udp", "web", "ingress", protocol="udp", port_range_min=9999,
                     port_range_max=9999, remote_group_id="web"))
    out = fab.deliveries(ch, ofport, eth_src=mac, ipv4_src=ip, **bcast)
    assert out == [("ch1", 11), ("ch2", 10)]
    # From o1, in no group, the rule (remote group web) does not admit it.
    ch, ofport, _, mac, ip, _ = PORTS["o1"]
    assert ("ch2", 10) not in fab.deliveries(ch, ofport, eth_src=mac, ipv4_src=ip, **bcast)


def test_rule_removal_keeps_connections_another_rule_allows(fab: Fabric) -> None:
    assert exchange(fab, "w1", "d1", "tcp", 5432) == (True, True)
    wide = rule("db-range", "db", "ingress", protocol="tcp", port_range_min=5000,
                port_range_max=6000, remote_ip_prefix="10.0.0.0/24")
    fab.publish(wide)
    fab.delete(RULES[3])  # db-pg goes; db-range still admits w1 → d1:5432
    assert exchange(fab, "w1", "d1", "tcp", 5432) == (True, True)
    assert fab.conntrack["ch3"].committed, "the connection kept its entry"
    fab.delete(wide)  # now nothing admits it: its original direction stops
    assert not send(fab, "w1", "d1", "tcp", 40000, 5432)
    assert exchange(fab, "w2", "d1", "tcp", 5432, 40010) == (False, False)


def test_replies_pass_only_for_connections_the_rules_admitted(fab: Fabric) -> None:
    # d1 may not start tcp to w1:80, so w1's "reply" is not a reply: w1's egress admits it
    # (egress everything) but d1's ingress only admits 5432 from web.
    assert not send(fab, "d1", "w1", "tcp", 40000, 80)
    assert not send(fab, "w1", "d1", "tcp", 80, 40000)


def test_a_connection_survives_the_server_moving(fab: Fabric) -> None:
    """d1 moves ch3 → ch2: ch2 has no conntrack entry for w1's connection. The client's next
    segment is picked up as new there (OVS's userspace tracker does that with a TCP segment
    without SYN), admitted by the rule and committed; the server's answers are replies."""
    assert exchange(fab, "w1", "d1", "tcp", 5432) == (True, True)
    fab.unplug("ch3", "d1")
    fab.publish(port("d1", 2, bindings=(PortBinding(host="ch2"),)))
    fab.plug("ch2", "d1", 20)
    MOVED[id(fab)] = {"d1": ("ch2", 20)}
    try:
        assert fab.conntrack["ch2"].zone(ct_zones(fab.cores["ch2"].topology)["d1"]) == set()
        assert exchange(fab, "w1", "d1", "tcp", 5432) == (True, True)
        # The server speaking first through egress rules that do not admit it is the case
        # the module docstring leaves open; the client's next segment restores it (above).
    finally:
        MOVED.pop(id(fab))


def test_ipv6_rules_by_ethertype(fab: Fabric) -> None:
    fab.publish(rule("web-v6", "web", "ingress", ethertype="IPv6", protocol="tcp",
                     port_range_min=443, port_range_max=443,
                     remote_ip_prefix="2001:db8::/64"))
    core = fab.cores["ch1"]
    flows = list(core.desired().values())
    ct = Conntrack()

    def to_w1(src: str, dport: int, proto: int = 6) -> bool:
        p = {"in_port": 1, "reg7": 11, "metadata": 5, "eth_type": 0x86DD, "ipv6_src": src,
             "ipv6_dst": "2001:db8::11", "ip_proto": proto, "tcp_src": 40000,
             "tcp_dst": dport}
        return walk(flows, p, table("sg_ingress"), conntrack=ct).ports == [10]

    assert to_w1("2001:db8::5", 443)
    assert not to_w1("2001:db8:1::5", 443)
    assert not to_w1("2001:db8::5", 80)  # the IPv4 rule for 80 says nothing about IPv6


@pytest.mark.parametrize(("lo", "hi"), [(80, 80), (1000, 1999), (0, 65535), (1, 65534),
                                        (5000, 6000)])
def test_port_ranges_are_exact(lo: int, hi: int) -> None:
    blocks = security.port_range_masks(lo, hi) if (lo, hi) != (0, 65535) else []
    covered = {p for p in range(65536) for b in blocks
               if (p & b[1] if isinstance(b, tuple) else p) == (b[0] if isinstance(b, tuple)
                                                                 else b)}
    assert covered == (set(range(lo, hi + 1)) if blocks else set())


def test_zones_are_unique_and_stable(fab: Fabric) -> None:
    zones = ct_zones(fab.cores["ch1"].topology)
    assert set(zones) == {"w1", "o1"}
    assert len(set(zones.values())) == 2
    assert all(ZONE_MIN <= z <= ZONE_MAX for z in zones.values())
    assert ct_zones(fresh_copy(fab.cores["ch1"]).topology) == zones


@pytest.fixture
def colliding(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every iface hashes to the same zone: the allocation is all collisions."""
    security._allocate_zones.cache_clear()
    monkeypatch.setattr(security, "_preferred_zone", lambda iface: 7)
    yield
    security._allocate_zones.cache_clear()


def test_a_zone_collision_moves_a_port_and_recomputes_it(fab: Fabric, colliding: None) -> None:
    for c in fab.cores.values():
        c.recompute_all()  # under the colliding hash
    core = fab.cores["ch1"]
    assert ct_zones(core.topology) == {"o1": 7, "w1": 8}
    a0 = net1_port("a0", 13, "fa:16:3e:00:00:a0", "10.0.0.13", [PortBinding(host="ch1")])
    fab.publish(a0.model_copy(update={"security_groups": ("web",)}))
    core.vif_online(Vif("a0", 12, "tap12"))  # sorts first: o1 and w1 move up one zone
    assert ct_zones(core.topology) == {"a0": 7, "o1": 8, "w1": 9}
    assert_incremental_equals_full(fab)
    core.vif_offline("a0")
    assert ct_zones(core.topology) == {"o1": 7, "w1": 8}
    assert_incremental_equals_full(fab)


def assert_incremental_equals_full(fab: Fabric) -> None:
    for name, core in fab.cores.items():
        incremental = dict(core.desired())
        assert dict(fresh_copy(core).desired()) == incremental, name
        core.recompute_all()
        assert dict(core.desired()) == incremental, name


def test_incremental_equals_full_after_group_changes(fab: Fabric) -> None:
    assert_incremental_equals_full(fab)
    fab.publish(rule("db-icmp", "db", "ingress", protocol="icmp", remote_group_id="db"))
    fab.publish(port("o1", 2, security_groups=("db",)))
    fab.publish(rule("web-pg", "web", "egress", protocol="tcp", port_range_min=5432,
                     port_range_max=5432, remote_group_id="db"))
    assert_incremental_equals_full(fab)
    fab.delete(RULES[0])
    fab.delete(SecurityGroup(id="db", topic=P))
    assert_incremental_equals_full(fab)


def snapshot(core: ChassisCore) -> dict[Any, Any]:
    return dict(core.desired())


def test_apply_twice_and_revert_leave_identical_tables(fab: Fabric) -> None:
    before = {n: snapshot(c) for n, c in fab.cores.items()}
    fab.publish(*RULES, SecurityGroup(id="web", topic=P, version=1))  # the same again
    assert {n: snapshot(c) for n, c in fab.cores.items()} == before
    extra = rule("db-ssh", "db", "ingress", protocol="tcp", port_range_min=22,
                 port_range_max=22, remote_group_id="web")
    fab.publish(extra)
    assert snapshot(fab.cores["ch3"]) != before["ch3"]
    fab.delete(extra)
    assert {n: snapshot(c) for n, c in fab.cores.items()} == before
    fab.publish(port("w2", 2, fixed_ips=()))  # a member's address changes, and back
    assert snapshot(fab.cores["ch3"]) != before["ch3"]
    fab.publish(port("w2", 3))
    assert {n: snapshot(c) for n, c in fab.cores.items()} == before


def test_remote_group_flows_are_collapsed_prefixes(fab: Fabric) -> None:
    # Members 10.0.0.11 and 10.0.0.21 do not collapse; add .10 next to .11: one /31.
    fab.publish(port("o1", 2, security_groups=("web",),
                     fixed_ips=(FixedIP(subnet_id="s1", ip_address="10.0.0.10"),)))  # type: ignore[arg-type]
    topo = fab.cores["ch3"].topology
    assert [str(n) for n in security.member_prefixes(topo, "web", 4)] == [
        "10.0.0.10/31", "10.0.0.21/32"]



@pytest.mark.ovs
async def test_flows_read_back_from_ovs_exactly_as_written(fab: Fabric,
                                                           switch: Switch) -> None:  # noqa: F811
    """Flow sync compares what OVS reports with what the core wants: every security flow
    (ct actions and zones, masked ct_state and port ranges, IPv6, ICMP type/code) must come
    back unchanged, or sync would never converge."""
    fab.publish(rule("web-v6", "web", "ingress", ethertype="IPv6", protocol="tcp",
                     port_range_min=1000, port_range_max=1999, remote_ip_prefix="2001:db8::/64"),
                rule("web-icmp-type", "web", "ingress", protocol="icmp", port_range_min=8,
                     port_range_max=0, remote_group_id="db"))
    ours = {table(t) for t in ("sg_egress", "sg_egress_ct", "sg_ingress", "sg_ingress_ct")}
    flows = [fl for name in ("ch1", "ch3") for fl in fab.cores[name].desired().values()
             if fl.table in ours]
    assert any(fl.match.get("eth_type") == 0x86DD and "tcp_dst" in fl.match for fl in flows)
    await switch.apply(adds=flows)
    assert set(await switch.dump_flows()) == set(flows)
