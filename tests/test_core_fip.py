"""Floating IPs in the core, by walking packets through three chassis' desired flows.

The routed fabric of test_core_l3 (router R on net1 and net2, VMs on ch1..ch3), plus an
external flat network ``ext`` (physnet1, 172.24.4.0/24, gateway = the outside host) that every
chassis reaches through its patch port (ofport 2), R's gateway on it, and floating IP
172.24.4.50 for b1 (10.0.1.21, on ch2). The outside host sits behind every patch port.
"""

from __future__ import annotations

from typing import Any

from ferry.core.apps.fip import MAC_BINDING_COOKIE
from ferry.core.chassis import ChassisCore
from ferry.core.pipeline import table
from ferry.model.objects import (
    BindingStatus,
    ExternalGateway,
    FloatingIP,
    LogicalSwitch,
    MigrationStatus,
    NetworkType,
    PortBinding,
    Subnet,
)
from ferry.switch.flow import Flow
from ferry.switch.openflow import Switch
from tests.fabric import fresh_copy
from tests.test_core_l3 import (
    GW,
    TTL,
    VMS,
    Migrating,
    RoutedFabric,
    build,
    ip_packet,
    router,
)
from tests.test_openflow import events, ovs, switch  # noqa: F401  (real OVS fixtures)

P = "projA"
PATCH = 2
EXT_VNI = 100
FIP, FIXED = "172.24.4.50", "10.0.1.21"
OUTSIDE_IP, OUTSIDE_MAC = "172.24.4.1", "02:fe:00:00:04:01"
B1_MAC = VMS["b1"][3]


def ext_network(version: int = 1) -> LogicalSwitch:
    return LogicalSwitch(id="ext", topic=P, tunnel_key=EXT_VNI, version=version, external=True,
                         network_type=NetworkType.FLAT, physical_network="physnet1")


def fip(version: int = 1, port_id: str | None = "b1") -> FloatingIP:
    return FloatingIP(id="fip1", topic=P, version=version, floating_network_id="ext",
                      floating_ip_address=FIP, port_id=port_id,  # type: ignore[arg-type]
                      fixed_ip_address=FIXED if port_id else None,
                      router_id="R" if port_id else None)


def with_fip() -> RoutedFabric:
    f = build()
    for core in f.cores.values():
        core.set_patch_ofports({"physnet1": PATCH})
    f.publish(ext_network(),
              Subnet(id="sext", topic=P, network_id="ext", cidr="172.24.4.0/24", version=1,
                     gateway_ip=OUTSIDE_IP),  # type: ignore[arg-type]
              router(2, gateway=ExternalGateway(network_id="ext")), fip())
    return f


def from_outside(f: RoutedFabric, chassis: str, **pkt: Any) -> list[tuple[str, int, dict[str,
                                                                                         Any]]]:
    return f.send(chassis, PATCH, eth_src=OUTSIDE_MAC, **pkt)


def arp_request(tpa: str, spa: str = OUTSIDE_IP) -> dict[str, Any]:
    return {"eth_dst": "ff:ff:ff:ff:ff:ff", "eth_type": 0x0806, "arp_op": 1, "arp_spa": spa,
            "arp_tpa": tpa, "arp_sha": OUTSIDE_MAC, "arp_tha": "00:00:00:00:00:00"}


def to_fip(**kw: Any) -> dict[str, Any]:
    return {"eth_dst": B1_MAC, "eth_type": 0x0800, "ipv4_src": OUTSIDE_IP, "ipv4_dst": FIP,
            "ip_proto": 17, "udp_src": 5000, "udp_dst": 4000, TTL: 64, **kw}


def fresh(core: ChassisCore) -> ChassisCore:
    new = fresh_copy(core)
    new.set_patch_ofports(core.patch_ofports)
    return new


def test_arp_for_the_fip_is_answered_only_on_the_vms_chassis() -> None:
    f = with_fip()
    for ch in ("ch1", "ch3"):
        assert from_outside(f, ch, **arp_request(FIP)) == []
    out = from_outside(f, "ch2", **arp_request(FIP))
    assert [(c, p) for c, p, _ in out] == [("ch2", PATCH)]
    reply = out[0][2]
    assert (reply["arp_op"], reply["arp_sha"], reply["arp_spa"]) == (2, B1_MAC, FIP)
    assert (reply["eth_src"], reply["eth_dst"], reply["arp_tpa"]) == (B1_MAC, OUTSIDE_MAC,
                                                                      OUTSIDE_IP)
    # Another chassis announcing the FIP (a gratuitous ARP) is never answered.
    assert from_outside(f, "ch2", **arp_request(FIP, spa=FIP)) == []


def test_outside_to_fip_is_dnated_to_the_vm_and_nowhere_else() -> None:
    f = with_fip()
    out = from_outside(f, "ch2", **to_fip())
    assert [(c, p) for c, p, _ in out] == [("ch2", VMS["b1"][2])]
    pkt = out[0][2]
    assert (pkt["ipv4_src"], pkt["ipv4_dst"]) == (OUTSIDE_IP, FIXED)
    assert (pkt["eth_src"], pkt["eth_dst"]) == (GW["net2"][1], B1_MAC)
    # Frames for the FIP reaching a chassis that does not host it are dropped there.
    assert from_outside(f, "ch1", **to_fip()) == []
    assert from_outside(f, "ch2", **to_fip(ipv4_dst="172.24.4.51")) == []


def test_vm_to_outside_leaves_as_the_fip_once_the_next_hop_is_learned() -> None:
    f = with_fip()
    ch, port = VMS["b1"][1], VMS["b1"][2]
    assert f.send(ch, port, **ip_packet("b1", OUTSIDE_IP)) == []  # no MAC binding yet
    from_outside(f, ch, **arp_request("172.24.4.99"))  # any ARP from outside teaches it
    assert all(fl.cookie == MAC_BINDING_COOKIE for fl in f.learned[ch].values())
    for dst in (OUTSIDE_IP, "198.51.100.7"):  # on-link, and beyond the gateway
        out = f.send(ch, port, **ip_packet("b1", dst))
        assert [(c, p) for c, p, _ in out] == [(ch, PATCH)]
        pkt = out[0][2]
        assert (pkt["ipv4_src"], pkt["ipv4_dst"]) == (FIP, dst)
        assert (pkt["eth_src"], pkt["eth_dst"]) == (B1_MAC, OUTSIDE_MAC)
    # A VM without a floating IP does not get out; east-west routing is unchanged.
    assert f.send("ch1", VMS["a1"][2], **ip_packet("a1", OUTSIDE_IP)) == []
    out = f.send(ch, port, **ip_packet("b1", VMS["a1"][4]))
    assert [(c, p) for c, p, _ in out] == [("ch1", VMS["a1"][2])]


def test_the_fip_follows_a_live_migration() -> None:
    f = with_fip()
    m = Migrating(f)
    src, dst = m.SRC, m.DST
    m.step1()
    # Source still answers ARP; both do DNAT; from either, the VM (still on ch2) gets it once.
    assert [c for c, _, _ in from_outside(f, "ch2", **arp_request(FIP))] == ["ch2"]
    assert from_outside(f, "ch3", **arp_request(FIP)) == []
    for ch in ("ch2", "ch3"):
        assert [(c, p) for c, p, _ in from_outside(f, ch, **to_fip())] == [src]
    m.rarp()  # the VM runs on ch3 now: wherever the outside's frame arrives, ch3 gets it
    for ch in ("ch2", "ch3"):
        assert [(c, p) for c, p, _ in from_outside(f, ch, **to_fip())] == [dst]
    m.finish()
    assert [c for c, _, _ in from_outside(f, "ch3", **arp_request(FIP))] == ["ch3"]
    assert from_outside(f, "ch2", **arp_request(FIP)) == []
    assert [(c, p) for c, p, _ in from_outside(f, "ch3", **to_fip())] == [dst]
    assert from_outside(f, "ch2", **to_fip()) == []
    from_outside(f, "ch3", **arp_request("172.24.4.99"))
    out = f.send("ch3", dst[1], **ip_packet("b1", OUTSIDE_IP))
    assert [(c, p, s["ipv4_src"]) for c, p, s in out] == [("ch3", PATCH, FIP)]
    for core in f.cores.values():
        assert core.desired() == fresh(core).desired(), core.chassis


def test_the_rarp_goes_out_when_nova_moved_the_binding_during_the_pause() -> None:
    """Nova activates the destination's binding on libvirt's event that the source paused:
    the port can be Local on the destination before the VM runs there, with no activation
    left to do. The VM's RARP on resume must still reach the external network at once (the
    agent's gratuitous ARP waits for the controller, which may be after the resume)."""
    f = with_fip()
    m = Migrating(f)
    m.step1()
    m.port([PortBinding(host="ch2", status=BindingStatus.INACTIVE,
                        profile={"migrating_to": "ch3"}), PortBinding(host="ch3")])
    m.record(MigrationStatus.DONE)
    out = f.send("ch3", m.DST[1], eth_src=B1_MAC, eth_dst="ff:ff:ff:ff:ff:ff",
                 eth_type=0x8035)
    assert ("ch3", PATCH) in [(c, p) for c, p, _ in out]
    assert [(c, p) for c, p, _ in from_outside(f, "ch3", **to_fip())] == [m.DST]


def test_only_the_chassis_where_the_vm_runs_announces_the_fip() -> None:
    """A gratuitous ARP from a live migration's destination before the VM runs there would
    teach the source's br-ex that the VM's MAC is on its uplink (a black hole for the
    outside's frames that reach the source): the destination announces once activated."""
    f = with_fip()
    m = Migrating(f)
    announcing = {ch: set(core.hosted_fips()) for ch, core in f.cores.items()}
    assert announcing == {"ch1": set(), "ch2": {("fip1", "Local")}, "ch3": set()}
    m.step1()
    assert [ch for ch, core in f.cores.items() if core.hosted_fips()] == []
    m.rarp()
    m.record(MigrationStatus.PLUGGED, activated=True)  # the destination's report
    assert {ch: set(core.hosted_fips()) for ch, core in f.cores.items()} == {
        "ch1": set(), "ch2": set(), "ch3": {("fip1", "Local")}}


def test_incremental_equals_full_recompute_and_disassociation_removes_everything() -> None:
    f = with_fip()
    base = build()
    for core in base.cores.values():
        core.set_patch_ofports({"physnet1": PATCH})

    def check() -> None:
        for core in f.cores.values():
            incremental = dict(core.desired())
            core.recompute_all()
            assert core.desired() == incremental, core.chassis
            assert fresh(core).desired() == incremental, core.chassis

    check()
    fip_tables = {table("ext_ingress"), table("fip_snat")}
    assert any(fl.table in fip_tables for fl in f.cores["ch2"].desired().values())
    f.publish(fip(2, port_id=None))   # disassociated
    check()
    assert not any(fl.table in fip_tables and fl.priority >= 200
                   for core in f.cores.values() for fl in core.desired().values())
    f.publish(fip(3))                 # associated again
    check()
    assert [(c, p) for c, p, _ in from_outside(f, "ch2", **to_fip())] == [("ch2", 10)]
    f.publish(Subnet(id="sext", topic=P, network_id="ext", cidr="172.24.4.0/24", version=2,
                     gateway_ip="172.24.4.254"))  # type: ignore[arg-type]
    check()
    f.publish(router(3))              # the gateway goes away
    check()
    assert from_outside(f, "ch2", **to_fip()) == []


async def test_flows_read_back_from_ovs_exactly_as_written(switch: Switch) -> None:  # noqa: F811
    """Flow sync compares what OVS reports with what the core wants: every floating IP flow
    (learn, ARP rewrite, DNAT, SNAT, next hop) must come back unchanged."""
    f = with_fip()
    mine = {table(n) for n in ("ext_ingress", "fip_snat", "ext_nexthop")}
    flows: list[Flow] = [fl for fl in f.cores["ch2"].desired().values()
                         if fl.table in mine or (fl.table == 0 and fl.match.get("in_port")
                                                 == PATCH)]
    assert len(flows) >= 7
    await switch.apply(adds=flows)
    assert set(await switch.dump_flows()) == set(flows)
