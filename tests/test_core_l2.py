"""The core's L2 behaviour, by walking packets through three chassis' desired flows."""

from __future__ import annotations

from typing import Any

import pytest

from ferry.agent.flowsync import is_ferry_cookie
from ferry.core.chassis import (
    ChassisCore,
    PortBound,
    PortUnbound,
    app_index_of,
    cookie_of,
    diff_flows,
    port_key_of,
)
from ferry.core.migration import ClaimRefused
from ferry.core.topology import Local, Remote, Vif
from ferry.model.objects import (
    AddressPair,
    Chassis,
    FixedIP,
    LogicalPort,
    LogicalSwitch,
    PortBinding,
    Subnet,
)
from tests.fabric import Fabric

P = "projA"
BCAST = "ff:ff:ff:ff:ff:ff"


def mkport(id: str, net: str, sub: str, key: int, mac: str, ip: str, host: str | None,
           **kw: Any) -> LogicalPort:
    return LogicalPort(id=id, topic=P, network_id=net, mac=mac, tunnel_key=key, version=1,
                       fixed_ips=[FixedIP(subnet_id=sub, ip_address=ip)],
                       bindings=[PortBinding(host=host)] if host else [], **kw)


@pytest.fixture
def fab() -> Fabric:
    """net1: a1, a2 on ch1; b1 on ch2; c1 on ch3. net2 (same CIDR): x1 on ch1, y1 on ch2."""
    f = Fabric()
    for i in (1, 2, 3):
        f.add_chassis(f"ch{i}", f"192.168.254.{i}")
    f.publish(*(Chassis(id=f"ch{i}", tunnel_ip=f"192.168.254.{i}", version=1) for i in (1, 2, 3)))
    f.publish(LogicalSwitch(id="net1", topic=P, tunnel_key=5, version=1),
              LogicalSwitch(id="net2", topic=P, tunnel_key=6, version=1),
              Subnet(id="s1", topic=P, network_id="net1", cidr="10.0.0.0/24", version=1),
              Subnet(id="s2", topic=P, network_id="net2", cidr="10.0.0.0/24", version=1))
    f.publish(mkport("a1", "net1", "s1", 11, "fa:16:3e:00:00:a1", "10.0.0.11", "ch1"),
              mkport("a2", "net1", "s1", 12, "fa:16:3e:00:00:a2", "10.0.0.12", "ch1"),
              mkport("b1", "net1", "s1", 21, "fa:16:3e:00:00:b1", "10.0.0.21", "ch2"),
              mkport("c1", "net1", "s1", 31, "fa:16:3e:00:00:c1", "10.0.0.31", "ch3"),
              mkport("x1", "net2", "s2", 41, "fa:16:3e:00:00:f1", "10.0.0.11", "ch1"),
              mkport("y1", "net2", "s2", 51, "fa:16:3e:00:00:f2", "10.0.0.21", "ch2"))
    f.plug("ch1", "a1", 10)
    f.plug("ch1", "a2", 11)
    f.plug("ch1", "x1", 12)
    f.plug("ch2", "b1", 10)
    f.plug("ch2", "y1", 11)
    f.plug("ch3", "c1", 10)
    return f


def ip_from(src_mac: str, src_ip: str, dst_mac: str, dst_ip: str) -> dict[str, Any]:
    return {"eth_src": src_mac, "eth_dst": dst_mac, "eth_type": 0x0800, "ipv4_src": src_ip,
            "ipv4_dst": dst_ip, "ip_proto": 1}


def test_unicast_local_and_remote(fab: Fabric) -> None:
    a1 = ("fa:16:3e:00:00:a1", "10.0.0.11")
    assert fab.deliveries("ch1", 10, **ip_from(*a1, "fa:16:3e:00:00:a2", "10.0.0.12")) == [
        ("ch1", 11)]
    assert fab.deliveries("ch1", 10, **ip_from(*a1, "fa:16:3e:00:00:b1", "10.0.0.21")) == [
        ("ch2", 10)]
    assert fab.deliveries("ch2", 10, **ip_from("fa:16:3e:00:00:b1", "10.0.0.21",
                                                "fa:16:3e:00:00:c1", "10.0.0.31")) == [
        ("ch3", 10)]


def test_broadcast_reaches_exactly_the_network(fab: Fabric) -> None:
    pkt = ip_from("fa:16:3e:00:00:a1", "10.0.0.11", BCAST, "10.0.0.255")
    assert fab.deliveries("ch1", 10, **pkt) == [("ch1", 11), ("ch2", 10), ("ch3", 10)]
    pkt = ip_from("fa:16:3e:00:00:f2", "10.0.0.21", BCAST, "10.0.0.255")
    assert fab.deliveries("ch2", 11, **pkt) == [("ch1", 12)]


def test_unknown_unicast_floods_within_the_network(fab: Fabric) -> None:
    pkt = ip_from("fa:16:3e:00:00:a1", "10.0.0.11", "fa:16:3e:99:99:99", "10.0.0.99")
    assert fab.deliveries("ch1", 10, **pkt) == [("ch1", 11), ("ch2", 10), ("ch3", 10)]


def test_networks_are_isolated_even_with_overlapping_ips(fab: Fabric) -> None:
    # x1 (net2, same IP as a1) sends to a2's and b1's MACs: net2 does not know them, so the
    # packet floods net2 only (to y1), never to net1's ports.
    for dst_mac in ("fa:16:3e:00:00:a2", "fa:16:3e:00:00:b1"):
        pkt = ip_from("fa:16:3e:00:00:f1", "10.0.0.11", dst_mac, "10.0.0.12")
        assert fab.deliveries("ch1", 12, **pkt) == [("ch2", 11)]


@pytest.mark.parametrize(("src_mac", "src_ip"), [
    ("fa:16:3e:00:00:99", "10.0.0.11"),   # spoofed MAC
    ("fa:16:3e:00:00:a1", "10.0.0.99"),   # spoofed IP
    ("fa:16:3e:00:00:a2", "10.0.0.12"),   # a neighbour's identity
])
def test_spoofed_sources_get_nothing_through(fab: Fabric, src_mac: str, src_ip: str) -> None:
    for dst in ("fa:16:3e:00:00:a2", "fa:16:3e:00:00:b1", BCAST):
        assert fab.send("ch1", 10, **ip_from(src_mac, src_ip, dst, "10.0.0.21")) == []
    arp = {"eth_src": src_mac, "eth_dst": BCAST, "eth_type": 0x0806, "arp_op": 1,
           "arp_sha": src_mac, "arp_spa": src_ip, "arp_tpa": "10.0.0.21"}
    assert fab.send("ch1", 10, **arp) == []


def test_allowed_address_pair_may_send(fab: Fabric) -> None:
    a1 = fab.cores["ch1"].topology.get(LogicalPort, "a1")
    assert a1 is not None
    fab.publish(a1.model_copy(update={"version": 2, "allowed_address_pairs": (
        AddressPair(ip_address="10.0.0.200/32"),)}))  # type: ignore[arg-type]
    pkt = ip_from("fa:16:3e:00:00:a1", "10.0.0.200", "fa:16:3e:00:00:b1", "10.0.0.21")
    assert fab.deliveries("ch1", 10, **pkt) == [("ch2", 10)]


def test_arp_for_a_known_port_is_answered_locally(fab: Fabric) -> None:
    arp = {"eth_src": "fa:16:3e:00:00:a1", "eth_dst": BCAST, "eth_type": 0x0806, "arp_op": 1,
           "arp_sha": "fa:16:3e:00:00:a1", "arp_spa": "10.0.0.11", "arp_tpa": "10.0.0.21"}
    out = fab.send("ch1", 10, **arp)
    assert [(c, p) for c, p, _ in out] == [("ch1", 10)]
    reply = out[0][2]
    assert reply["arp_op"] == 2
    assert reply["eth_src"] == reply["arp_sha"] == "fa:16:3e:00:00:b1"
    assert reply["arp_spa"] == "10.0.0.21"
    assert reply["eth_dst"] == reply["arp_tha"] == "fa:16:3e:00:00:a1"
    assert reply["arp_tpa"] == "10.0.0.11"


def test_gratuitous_arp_is_flooded_not_answered(fab: Fabric) -> None:
    garp = {"eth_src": "fa:16:3e:00:00:a1", "eth_dst": BCAST, "eth_type": 0x0806, "arp_op": 1,
            "arp_sha": "fa:16:3e:00:00:a1", "arp_spa": "10.0.0.11", "arp_tpa": "10.0.0.11"}
    assert fab.deliveries("ch1", 10, **garp) == [("ch1", 11), ("ch2", 10), ("ch3", 10)]


def test_remote_port_moving_between_chassis_updates_a_third(fab: Fabric) -> None:
    """b1 moves ch2 → ch3: ch1 must now tunnel b1's traffic to ch3 (Dragonflow missed this)."""
    to_b1 = ip_from("fa:16:3e:00:00:a1", "10.0.0.11", "fa:16:3e:00:00:b1", "10.0.0.21")
    assert fab.deliveries("ch1", 10, **to_b1) == [("ch2", 10)]
    events = []
    b1 = fab.cores["ch1"].topology.get(LogicalPort, "b1")
    assert b1 is not None
    fab.unplug("ch2", "b1")
    fab.plug("ch3", "b1", 20)
    moved = b1.model_copy(update={"version": 2, "bindings": (PortBinding(host="ch3"),)})
    events = fab.cores["ch1"].nb_updated(moved)
    for name in ("ch2", "ch3"):
        fab.cores[name].nb_updated(moved)
    assert events == [PortUnbound("b1", Remote("ch2", "192.168.254.2")),
                      PortBound("b1", Remote("ch3", "192.168.254.3"))]
    assert fab.deliveries("ch1", 10, **to_b1) == [("ch3", 20)]
    # Broadcast from ch1 no longer goes to ch2 for net1? ch2 has no net1 port left.
    bcast = ip_from("fa:16:3e:00:00:a1", "10.0.0.11", BCAST, "10.0.0.255")
    assert fab.deliveries("ch1", 10, **bcast) == [("ch1", 11), ("ch3", 10), ("ch3", 20)]


def test_a_vif_for_a_port_bound_elsewhere_is_not_taken(fab: Fabric) -> None:
    core = fab.cores["ch3"]
    assert core.vif_online(Vif("b1", 30, "tap30")) == [ClaimRefused("b1", "ch3", "ch2")]
    assert core.location("b1") == Remote("ch2", "192.168.254.2")
    to_b1 = ip_from("fa:16:3e:00:00:c1", "10.0.0.31", "fa:16:3e:00:00:b1", "10.0.0.21")
    assert fab.deliveries("ch3", 10, **to_b1) == [("ch2", 10)]
    # And traffic from the rogue VIF goes nowhere.
    assert fab.send("ch3", 30, **ip_from("fa:16:3e:00:00:b1", "10.0.0.21", BCAST, "1.1.1.1")) == []


def snapshot(core: ChassisCore) -> dict[Any, Any]:
    return dict(core.desired())


def test_same_events_twice_and_revert_leave_identical_tables(fab: Fabric) -> None:
    core = fab.cores["ch1"]
    before = snapshot(core)
    a2 = core.topology.get(LogicalPort, "a2")
    assert a2 is not None
    fab.publish(a2)  # the same event again
    core.vif_online(Vif("a2", 11, "tap11"))
    assert snapshot(core) == before
    # An event and its revert.
    fab.publish(a2.model_copy(update={"version": 2, "admin_state_up": False}))
    assert snapshot(core) != before
    fab.publish(a2.model_copy(update={"version": 3}))
    assert snapshot(core) == before
    core.vif_offline("a2")
    assert snapshot(core) != before
    core.vif_online(Vif("a2", 11, "tap11"))
    assert snapshot(core) == before
    fab.delete(a2)
    fab.publish(a2.model_copy(update={"version": 4}))
    assert snapshot(core) == before


def test_incremental_equals_full_recompute(fab: Fabric) -> None:
    for core in fab.cores.values():
        incremental = snapshot(core)
        core.recompute_all()
        assert snapshot(core) == incremental
    # And after a series of changes.
    b1 = fab.cores["ch1"].topology.get(LogicalPort, "b1")
    assert b1 is not None
    fab.publish(b1.model_copy(update={"version": 5, "bindings": (PortBinding(host="ch3"),)}))
    fab.delete(LogicalPort(id="a2", topic=P, network_id="net1", mac="fa:16:3e:00:00:a2"))
    fab.unplug("ch2", "y1")
    for core in fab.cores.values():
        incremental = snapshot(core)
        core.recompute_all()
        assert snapshot(core) == incremental


def test_stale_versions_are_ignored(fab: Fabric) -> None:
    core = fab.cores["ch1"]
    b1 = core.topology.get(LogicalPort, "b1")
    assert b1 is not None
    fab.publish(b1.model_copy(update={"version": 7, "bindings": (PortBinding(host="ch3"),)}))
    core.nb_updated(b1.model_copy(update={"version": 6}))
    assert core.location("b1") == Remote("ch3", "192.168.254.3")


def test_local_port_lifecycle_events(fab: Fabric) -> None:
    core = fab.cores["ch1"]
    assert core.vif_offline("a1") == [PortUnbound("a1", Local(10))]
    assert core.vif_online(Vif("a1", 13, "tap13")) == [PortBound("a1", Local(13))]


def test_diff_sends_only_the_difference(fab: Fabric) -> None:
    core = fab.cores["ch1"]
    installed = dict(core.desired())
    assert not diff_flows(core.desired(), installed)
    core.vif_offline("a2")
    d = diff_flows(core.desired(), installed)
    assert d.deletes and not d.adds
    assert all(f.cookie & 0xFFFFFFFF == 12 for f in d.deletes
               if (f.cookie >> 48) & 0xFF == 2)  # the port's own flows carry its key
    assert len(d) < len(installed)


def test_a_cookie_gives_back_its_app_and_port_and_only_ours_are_managed() -> None:
    c = cookie_of(3, "port", 0x1234)
    assert (app_index_of(c), port_key_of(c)) == (3, 0x1234)
    assert port_key_of(cookie_of(3, "network", 0x65)) is None
    assert is_ferry_cookie(cookie_of(0, "port", 1), n_apps=4)
    assert is_ferry_cookie(cookie_of(3, "network", 1), n_apps=4)
    assert not is_ferry_cookie(cookie_of(4, "port", 1), n_apps=4)  # an app we do not have
    assert not is_ferry_cookie(0, n_apps=4)  # flows others (or ovs-ofctl) added
