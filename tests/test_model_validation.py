"""Every invariant of the northbound model: the error names the field and the reason, and a
rejected object leaves the store exactly as it was. Runs against both store backends."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from ferry.model.northbound import InUse, InvalidObject, Northbound, parse
from ferry.model.objects import (
    AddressPair,
    Chassis,
    FixedIP,
    FloatingIP,
    LogicalPort,
    LogicalRouter,
    LogicalSwitch,
    Migration,
    PortBinding,
    RouterPort,
    SecurityGroup,
    SecurityGroupRule,
    Subnet,
)
from ferry.store.base import Store

P = "projA"


@pytest.fixture
async def nb(store: Store) -> Northbound:
    return Northbound(store)


async def topo(nb: Northbound) -> dict[str, Any]:
    net = await nb.create(LogicalSwitch(id="net1", topic=P, name="net1"))
    sub = await nb.create(Subnet(id="sub1", topic=P, network_id="net1", cidr="10.0.0.0/24",
                                 gateway_ip="10.0.0.1"))
    await nb.create(LogicalSwitch(id="ext", topic=P, external=True, network_type="flat",
                                        physical_network="physnet1"))
    await nb.create(Subnet(id="extsub", topic=P, network_id="ext", cidr="172.24.4.0/24"))
    sg = await nb.create(SecurityGroup(id="sg1", topic=P))
    port = await nb.create(LogicalPort(id="p1", topic=P, network_id="net1",
                                       mac="fa:16:3e:00:00:01",
                                       fixed_ips=[FixedIP(subnet_id="sub1",
                                                          ip_address="10.0.0.5")]))
    await nb.create(Chassis(id="ch1", tunnel_ip="192.168.254.1"))
    await nb.create(Chassis(id="ch2", tunnel_ip="192.168.254.2"))
    return {"net": net, "sub": sub, "sg": sg, "port": port}


async def rejected(nb: Northbound, write: Callable[[], Awaitable[object]], field: str,
                   reason: str, exc: type[Exception] = InvalidObject) -> None:
    """``write`` fails naming ``field`` and ``reason``, and the store is unchanged."""
    before = await nb.store.snapshot()
    with pytest.raises(exc) as info:
        await write()
    assert isinstance(info.value, InvalidObject)
    assert info.value.field == field, str(info.value)
    assert reason in str(info.value), str(info.value)
    after = await nb.store.snapshot()
    assert after.records == before.records
    assert after.revision == before.revision


def port(**kw: Any) -> LogicalPort:
    base: dict[str, Any] = {"id": "p2", "topic": P, "network_id": "net1",
                            "mac": "fa:16:3e:00:00:02"}
    return parse(LogicalPort, {**base, **kw})


# -- formats checked by the object alone -----------------------------------------------------

@pytest.mark.parametrize(("mac", "reason"), [
    ("fa:16:3e:00:00", "is not a MAC address"),
    ("zz:16:3e:00:00:01", "is not a MAC address"),
    ("01:00:5e:00:00:01", "multicast"),
    ("00:00:00:00:00:00", "not a usable MAC"),
])
async def test_mac_format(nb: Northbound, mac: str, reason: str) -> None:
    await topo(nb)
    await rejected(nb, lambda: nb.create(port(mac=mac)), "mac", reason)


async def test_mac_is_normalized() -> None:
    assert port(mac="FA-16-3E-00-00-0A").mac == "fa:16:3e:00:00:0a"


@pytest.mark.parametrize(("kw", "field", "reason"), [
    ({"cidr": "10.0.0.0/33"}, "cidr", "not a valid CIDR"),
    ({"cidr": "10.0.0.1/24"}, "cidr", "host bits set"),
    ({"gateway_ip": "10.9.0.1"}, "gateway_ip", "gateway_ip 10.9.0.1 is outside 10.1.0.0/24"),
    ({"gateway_ip": "10.1.0.255"}, "gateway_ip", "network or broadcast address"),
    ({"allocation_pools": [{"start": "10.1.0.10", "end": "10.1.1.5"}]}, "allocation_pools",
     "is outside 10.1.0.0/24"),
    ({"allocation_pools": [{"start": "10.1.0.20", "end": "10.1.0.10"}]}, "allocation_pools.0.start",
     "start must be <= end"),
    ({"gateway_ip": "10.1.0.15", "allocation_pools": [{"start": "10.1.0.10",
                                                        "end": "10.1.0.20"}]},
     "allocation_pools", "contains gateway_ip"),
])
async def test_subnet_formats(nb: Northbound, kw: dict[str, Any], field: str, reason: str) -> None:
    await topo(nb)
    data = {"id": "sub2", "topic": P, "network_id": "net1", "cidr": "10.1.0.0/24", **kw}
    await rejected(nb, lambda: nb.create(parse(Subnet, data)), field, reason)


async def test_unknown_field_is_refused(nb: Northbound) -> None:
    await topo(nb)
    await rejected(nb, lambda: nb.create(port(colour="red")), "colour", "Extra inputs")


async def test_port_ip_listed_twice(nb: Northbound) -> None:
    await topo(nb)
    ips = [{"subnet_id": "sub1", "ip_address": "10.0.0.9"}] * 2
    await rejected(nb, lambda: nb.create(port(fixed_ips=ips)), "fixed_ips", "listed twice")


async def test_rule_port_range(nb: Northbound) -> None:
    await topo(nb)
    data = {"id": "r1", "topic": P, "security_group_id": "sg1", "direction": "ingress",
            "protocol": "tcp", "port_range_min": 90, "port_range_max": 80}
    await rejected(nb, lambda: nb.create(parse(SecurityGroupRule, data)), "port_range_min",
                   "port_range_min 90 is greater than port_range_max 80")


async def test_rule_family(nb: Northbound) -> None:
    await topo(nb)
    data = {"id": "r1", "topic": P, "security_group_id": "sg1", "direction": "ingress",
            "ethertype": "IPv6", "remote_ip_prefix": "10.0.0.0/8"}
    await rejected(nb, lambda: nb.create(parse(SecurityGroupRule, data)), "remote_ip_prefix",
                   "is not IPv6")


async def test_address_pair_mac_checked() -> None:
    with pytest.raises(InvalidObject, match=r"allowed_address_pairs\.0\.mac_address"):
        port(allowed_address_pairs=[{"ip_address": "10.0.0.100", "mac_address": "nope"}])
    assert AddressPair(ip_address="10.0.0.100").ip_address.prefixlen == 32  # type: ignore[arg-type]


async def test_one_active_binding(nb: Northbound) -> None:
    await topo(nb)
    b = [{"host": "ch1"}, {"host": "ch2"}]
    await rejected(nb, lambda: nb.create(port(bindings=b)), "bindings", "at most one binding")
    b = [{"host": "ch1"}, {"host": "ch1", "status": "INACTIVE"}]
    await rejected(nb, lambda: nb.create(port(bindings=b)), "bindings", "one binding per host")


# -- invariants between objects ----------------------------------------------------------------

async def test_ip_inside_its_subnet(nb: Northbound) -> None:
    await topo(nb)
    ips = [{"subnet_id": "sub1", "ip_address": "10.0.1.5"}]
    await rejected(nb, lambda: nb.create(port(fixed_ips=ips)), "fixed_ips.0.ip_address",
                   "10.0.1.5 is outside subnet sub1 (10.0.0.0/24)")
    ips = [{"subnet_id": "sub1", "ip_address": "10.0.0.255"}]
    await rejected(nb, lambda: nb.create(port(fixed_ips=ips)), "fixed_ips.0.ip_address",
                   "broadcast")


async def test_no_duplicate_ip_in_a_network(nb: Northbound) -> None:
    await topo(nb)
    ips = [{"subnet_id": "sub1", "ip_address": "10.0.0.5"}]
    await rejected(nb, lambda: nb.create(port(fixed_ips=ips)), "fixed_ips",
                   "10.0.0.5 is already in use by port/p1", InUse)


async def test_same_ip_in_another_network_is_fine(nb: Northbound) -> None:
    await topo(nb)
    await nb.create(LogicalSwitch(id="net2", topic=P))
    await nb.create(Subnet(id="sub2", topic=P, network_id="net2", cidr="10.0.0.0/24"))
    p = await nb.create(port(network_id="net2", mac="fa:16:3e:00:00:01",
                             fixed_ips=[{"subnet_id": "sub2", "ip_address": "10.0.0.5"}]))
    assert p.version > 0


async def test_no_duplicate_mac_in_a_network(nb: Northbound) -> None:
    await topo(nb)
    await rejected(nb, lambda: nb.create(port(mac="fa:16:3e:00:00:01")), "mac",
                   "fa:16:3e:00:00:01 is already in use by port/p1", InUse)


async def test_update_cannot_take_a_used_ip(nb: Northbound) -> None:
    t = await topo(nb)
    p2 = await nb.create(port(fixed_ips=[{"subnet_id": "sub1", "ip_address": "10.0.0.6"}]))
    taken = p2.model_copy(update={"fixed_ips": (t["port"].fixed_ips[0],)})
    await rejected(nb, lambda: nb.update(taken), "fixed_ips", "10.0.0.5 is already in use", InUse)


async def test_keys_are_allocated_unique_and_read_only(nb: Northbound) -> None:
    t = await topo(nb)
    net2 = await nb.create(LogicalSwitch(id="net2", topic=P))
    assert t["net"].tunnel_key > 0 and net2.tunnel_key > 0
    assert t["net"].tunnel_key != net2.tunnel_key
    assert t["port"].tunnel_key > 0
    await rejected(nb, lambda: nb.create(LogicalSwitch(id="net3", topic=P,
                                                       tunnel_key=net2.tunnel_key)),
                   "tunnel_key", "is already in use by network/net2", InUse)
    moved = net2.model_copy(update={"tunnel_key": 4000})
    await rejected(nb, lambda: nb.update(moved), "tunnel_key", "read-only")


@pytest.mark.parametrize(("make", "field", "reason"), [
    (lambda: port(network_id="nope"), "network_id", "network nope does not exist"),
    (lambda: port(fixed_ips=[{"subnet_id": "nope", "ip_address": "10.0.0.9"}]),
     "fixed_ips.0.subnet_id", "subnet nope does not exist"),
    (lambda: port(fixed_ips=[{"subnet_id": "extsub", "ip_address": "172.24.4.9"}]),
     "fixed_ips.0.subnet_id", "subnet extsub is not on network net1"),
    (lambda: port(security_groups=["nope"]), "security_groups.0", "secgroup nope does not exist"),
    (lambda: Subnet(id="s9", topic=P, network_id="nope", cidr="10.9.0.0/24"), "network_id",
     "network nope does not exist"),
    (lambda: Subnet(id="s9", topic=P, network_id="net1", cidr="10.0.0.128/25"), "cidr",
     "overlaps subnet sub1"),
    (lambda: SecurityGroupRule(id="r", topic=P, security_group_id="nope", direction="ingress"),
     "security_group_id", "secgroup nope does not exist"),
    (lambda: SecurityGroupRule(id="r", topic=P, security_group_id="sg1", direction="ingress",
                               remote_group_id="nope"), "remote_group_id", "does not exist"),
    (lambda: LogicalRouter(id="r", topic=P, ports=[RouterPort(port_id="nope", subnet_id="sub1")]),
     "ports.0.port_id", "port nope does not exist"),
    (lambda: LogicalRouter(id="r", topic=P, ports=[RouterPort(port_id="p1", subnet_id="extsub")]),
     "ports.0.subnet_id", "port p1 has no address on subnet extsub"),
    (lambda: LogicalRouter(id="r", topic=P, gateway={"network_id": "net1"}),
     "gateway.network_id", "network net1 is not external"),
    (lambda: FloatingIP(id="f", topic=P, floating_network_id="net1",
                        floating_ip_address="10.0.0.50"),
     "floating_network_id", "is not external"),
    (lambda: FloatingIP(id="f", topic=P, floating_network_id="ext",
                        floating_ip_address="172.25.0.9"),
     "floating_ip_address", "172.25.0.9 is in no subnet of network ext"),
    (lambda: FloatingIP(id="f", topic=P, floating_network_id="ext",
                        floating_ip_address="172.24.4.9", port_id="p1",
                        fixed_ip_address="10.0.0.77"),
     "fixed_ip_address", "10.0.0.77 is not an address of port p1"),
    (lambda: Migration(id="nope", topic=P, port_id="nope", source_chassis="ch1",
                       dest_chassis="ch2"), "port_id", "port nope does not exist"),
    (lambda: Migration(id="p1", topic=P, port_id="p1", source_chassis="ch1",
                       dest_chassis="ch9"), "dest_chassis", "chassis ch9 does not exist"),
    (lambda: Chassis(id="ch3", tunnel_ip="192.168.254.1"), "tunnel_ip",
     "192.168.254.1 is already in use by chassis/ch1"),
])
async def test_references(nb: Northbound, make: Callable[[], Any], field: str,
                          reason: str) -> None:
    await topo(nb)
    await rejected(nb, lambda: nb.create(make()), field, reason)


@pytest.mark.parametrize(("cls", "id", "reason"), [
    (LogicalSwitch, "net1", "network net1 is in use by"),
    (Subnet, "sub1", "subnet sub1 is in use by port p1"),
])
async def test_delete_refused_while_referenced(nb: Northbound, cls: Any, id: str,
                                               reason: str) -> None:
    await topo(nb)
    await rejected(nb, lambda: nb.delete(cls, id), "id", reason, InUse)


async def test_migration_needs_two_chassis() -> None:
    with pytest.raises(InvalidObject, match="dest_chassis: source_chassis and dest_chassis"):
        parse(Migration, {"id": "p1", "topic": P, "port_id": "p1", "source_chassis": "ch1",
                          "dest_chassis": "ch1"})


async def test_valid_objects_round_trip(nb: Northbound) -> None:
    t = await topo(nb)
    got = await nb.get(LogicalPort, "p1")
    assert got == t["port"]
    fip = await nb.create(FloatingIP(id="f", topic=P, floating_network_id="ext",
                                     floating_ip_address="172.24.4.9", port_id="p1",
                                     fixed_ip_address="10.0.0.5"))
    assert await nb.get(FloatingIP, "f") == fip


@pytest.mark.parametrize("bad", ["0\x1f", " x", "x ", "a/b", "tab\there", ""])
async def test_ids_and_topics_the_store_would_refuse_are_invalid(nb: Northbound,
                                                                 bad: str) -> None:
    await topo(nb)
    await rejected(nb, lambda: nb.create(parse(SecurityGroup, {"id": "sg9", "topic": bad})),
                   "topic", "printable")


async def test_ports_on_a_chassis(nb: Northbound) -> None:
    await topo(nb)
    p1 = await nb.get(LogicalPort, "p1")
    assert p1 is not None
    await nb.update(p1.model_copy(update={"bindings": (PortBinding(host="ch2"),)}))
    bound = await nb.ports_on("ch2")
    assert [p.id for p in bound] == ["p1"] and await nb.ports_on("ch1") == []
