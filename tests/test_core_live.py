"""Live mode: the port is bound to both chassis from step 1 and activated in the datapath by
the VM's first frame on its new chassis. Walks packets (and learn actions) through three
simulated chassis: b1 moves from ch2 to ch3; a1 on ch1, a2 on ch2, a3 on ch3 talk to it."""

from __future__ import annotations

from typing import Any

import pytest

from ferry.core.chassis import ChassisCore
from ferry.core.migration import Activated, Claim
from ferry.core.topology import Vif
from ferry.model.objects import (
    BindingStatus,
    LiveFallback,
    LogicalPort,
    Migration,
    MigrationMode,
    MigrationStatus,
    PortBinding,
)
from tests.fabric import P, fresh_copy, net1_port, three_chassis

VM_MAC, VM_IP = "fa:16:3e:00:00:b1", "10.0.0.21"
SRC, DST = ("ch2", 10), ("ch3", 20)
CLIENTS = {"a1": ("ch1", 10, "fa:16:3e:00:00:a1", "10.0.0.11"),
           "a2": ("ch2", 11, "fa:16:3e:00:00:a2", "10.0.0.12"),
           "a3": ("ch3", 11, "fa:16:3e:00:00:a3", "10.0.0.13")}


class Live:
    def __init__(self) -> None:
        f = self.fab = three_chassis()
        for i, (name, (ch, ofport, mac, ip)) in enumerate(CLIENTS.items()):
            f.publish(net1_port(name, 11 + i, mac, ip, [PortBinding(host=ch)]))
            f.plug(ch, name, ofport)
        self.v = 1
        self.b1([PortBinding(host="ch2")])
        f.plug("ch2", "b1", SRC[1])
        self.mv = 0

    def b1(self, bindings: list[PortBinding]) -> None:
        self.v += 1
        self.fab.publish(net1_port("b1", 21, VM_MAC, VM_IP, bindings, self.v))

    def record(self, status: MigrationStatus, *, activated: bool = False,
               fallback: LiveFallback = LiveFallback.SOURCE_UNPLUG) -> None:
        """Publish the port's Migration record as the agents would have written it."""
        self.mv += 1
        self.fallback = fallback if self.mv == 1 else self.fallback
        self.fab.publish(Migration(id="b1", topic=P, port_id="b1", source_chassis="ch2",
                                   dest_chassis="ch3", status=status, mode=MigrationMode.LIVE,
                                   fallback=self.fallback, activated=activated,
                                   version=self.mv))

    def step1(self, fallback: LiveFallback = LiveFallback.SOURCE_UNPLUG) -> None:
        self.b1([PortBinding(host="ch2", profile={"migrating_to": "ch3"}),
                 PortBinding(host="ch3", status=BindingStatus.INACTIVE)])
        self.fab.cores["ch3"].vif_online(Vif("b1", DST[1], "tap20"))
        self.record(MigrationStatus.PLUGGED, fallback=fallback)

    def resume_with_rarp(self) -> list[tuple[str, int]]:
        """The VM resumes on ch3 and sends QEMU's RARP from its new VIF."""
        return self.fab.deliveries("ch3", DST[1], eth_src=VM_MAC, eth_dst="ff:ff:ff:ff:ff:ff",
                                   eth_type=0x8035)

    def to_vm(self, client: str) -> list[tuple[str, int]]:
        ch, ofport, mac, ip = CLIENTS[client]
        return self.fab.deliveries(ch, ofport, eth_src=mac, eth_dst=VM_MAC, eth_type=0x0800,
                                   ipv4_src=ip, ipv4_dst=VM_IP, ip_proto=17)

    def everyone_to_vm(self) -> dict[str, list[tuple[str, int]]]:
        return {c: self.to_vm(c) for c in CLIENTS}

    def reconcile(self) -> None:
        """What the agent does when a migration ends: learned flows that the core does not
        want (same key and actions) are deleted."""
        for name, core in self.fab.cores.items():
            desired = core.desired()
            self.fab.learned[name] = {k: f for k, f in self.fab.learned[name].items()
                                      if desired.get(k) == f}

    def assert_converged(self) -> None:
        for name, core in self.fab.cores.items():
            assert core.desired() == fresh_copy(core).desired(), name
            # What the datapath learned is either gone or exactly a flow the core wants (in
            # OVS they are then one and the same entry).
            desired = core.desired()
            assert all(desired.get(k) == f for k, f in self.fab.learned[name].items()), name


def at(where: tuple[str, int]) -> dict[str, list[tuple[str, int]]]:
    return {c: [where] for c in CLIENTS}


def test_before_the_pause_traffic_reaches_the_source_only() -> None:
    r = Live()
    r.step1()
    # Everyone (also ch3's own a3) reaches the VM exactly once, on the source.
    assert r.everyone_to_vm() == at(SRC)


def test_first_frame_activates_the_destination_everywhere() -> None:
    r = Live()
    r.step1()
    flood = r.resume_with_rarp()
    # The RARP reaches the source, which learns from it (and, having learned, no longer
    # delivers even this broadcast to the stopped copy).
    assert ("ch2", SRC[1]) not in flood and r.fab.learned["ch2"]
    # From now on every packet to the VM is delivered exactly once, on the destination,
    # without any controller having done anything: the datapath learned it.
    assert r.everyone_to_vm() == at(DST)


def test_no_packet_to_the_stopped_copy_after_activation() -> None:
    r = Live()
    r.step1()
    r.resume_with_rarp()
    for client in CLIENTS:
        out = r.to_vm(client)
        assert ("ch2", SRC[1]) not in out and out.count(("ch3", DST[1])) == 1


def test_steps_two_and_three_then_converge_with_no_disturbance() -> None:
    r = Live()
    r.step1()
    r.resume_with_rarp()
    r.fab.unplug("ch2", "b1")
    r.record(MigrationStatus.SOURCE_UNPLUGGED)
    assert r.everyone_to_vm() == at(DST)
    r.b1([PortBinding(host="ch3")])
    assert r.everyone_to_vm() == at(DST)
    r.record(MigrationStatus.DONE)
    assert r.everyone_to_vm() == at(DST)
    r.reconcile()
    assert r.everyone_to_vm() == at(DST)
    r.assert_converged()


def test_no_rarp_falls_back_to_the_source_unplug() -> None:
    """A VM that says nothing on resume (vhost-user): the source unplug activates it."""
    r = Live()
    r.step1()
    assert r.everyone_to_vm() == at(SRC)
    r.fab.unplug("ch2", "b1")
    r.record(MigrationStatus.SOURCE_UNPLUGGED)
    assert r.everyone_to_vm() == at(DST)


def test_abandoned_after_step_one_leaves_no_dual_binding() -> None:
    r = Live()
    r.step1()
    r.fab.unplug("ch3", "b1")
    r.record(MigrationStatus.ROLLED_BACK)
    r.b1([PortBinding(host="ch2")])
    assert r.everyone_to_vm() == at(SRC)
    r.reconcile()
    r.assert_converged()


def test_spec_mode_per_port_waits_for_step_two() -> None:
    r = Live()
    r.b1([PortBinding(host="ch2", profile={"migrating_to": "ch3"}),
          PortBinding(host="ch3", status=BindingStatus.INACTIVE,
                      profile={"ferry_migration_mode": "spec"})])
    out = r.fab.cores["ch3"].vif_online(Vif("b1", DST[1], "tap20"))
    claims: list[Any] = [o for o in out if type(o).__name__ == "Claim"]
    assert claims and claims[0].mode is MigrationMode.SPEC


def test_live_is_the_default_claim() -> None:
    core = ChassisCore("x")
    assert core.topology.migration_mode is MigrationMode.LIVE


def test_the_destination_reports_the_activation_once() -> None:
    """The datapath activates the port by itself and then tells its controller: one
    packet-in for the first frame, none for the frames after it."""
    r = Live()
    r.step1()
    assert r.fab.reported["ch3"] == []
    r.resume_with_rarp()
    assert r.fab.reported["ch3"] == [Activated("b1", "ch3")]
    r.resume_with_rarp()
    r.fab.deliveries("ch3", DST[1], eth_src=VM_MAC, eth_dst=CLIENTS["a1"][2], eth_type=0x0800,
                     ipv4_src=VM_IP, ipv4_dst=CLIENTS["a1"][3], ip_proto=17)
    assert r.fab.reported["ch3"] == [Activated("b1", "ch3")]
    assert all(not reports for ch, reports in r.fab.reported.items() if ch != "ch3")


def test_the_reported_activation_converges_every_chassis_with_no_disturbance() -> None:
    r = Live()
    r.step1()
    r.resume_with_rarp()
    r.record(MigrationStatus.PLUGGED, activated=True)  # the destination's report, published
    assert r.everyone_to_vm() == at(DST)
    # The controllers now want what the datapaths learned: the port is simply on ch3.
    for name, core in r.fab.cores.items():
        desired = core.desired()
        assert all(desired.get(k) in (None, f) for k, f in r.fab.learned[name].items()), name
    # The stopped copy on ch2 (its VIF still plugged: Nova has not run its post-migration)
    # can no longer send anything.
    assert r.fab.send("ch2", SRC[1], eth_src=VM_MAC, eth_dst=CLIENTS["a1"][2],
                      eth_type=0x0800, ipv4_src=VM_IP, ipv4_dst=CLIENTS["a1"][3],
                      ip_proto=17) == []
    r.fab.unplug("ch2", "b1")
    r.record(MigrationStatus.SOURCE_UNPLUGGED, activated=True)
    assert r.everyone_to_vm() == at(DST)
    r.b1([PortBinding(host="ch3")])
    r.record(MigrationStatus.DONE, activated=True)
    r.reconcile()
    assert r.everyone_to_vm() == at(DST)
    r.assert_converged()


def test_the_binding_fallback_waits_for_step_three_when_the_vm_is_silent() -> None:
    """fallback=binding: the source unplug does not switch a port the VM never activated;
    nothing reaches either copy until step 3 (or the VM's first frame)."""
    r = Live()
    r.step1(LiveFallback.BINDING)
    r.fab.unplug("ch2", "b1")
    r.record(MigrationStatus.SOURCE_UNPLUGGED)
    assert r.everyone_to_vm() == {c: [] for c in CLIENTS}
    r.b1([PortBinding(host="ch3")])
    assert r.everyone_to_vm() == at(DST)
    r.record(MigrationStatus.DONE)
    r.reconcile()
    r.assert_converged()


def test_the_binding_fallback_still_activates_on_a_late_first_frame() -> None:
    r = Live()
    r.step1(LiveFallback.BINDING)
    r.fab.unplug("ch2", "b1")
    r.record(MigrationStatus.SOURCE_UNPLUGGED)
    r.resume_with_rarp()
    assert r.fab.reported["ch3"] == [Activated("b1", "ch3")]
    assert r.everyone_to_vm() == at(DST)
    r.record(MigrationStatus.SOURCE_UNPLUGGED, activated=True)
    assert r.everyone_to_vm() == at(DST)


def test_the_fallback_is_the_deployments_unless_the_port_says_otherwise() -> None:
    def claim(core: ChassisCore, profile: dict[str, str]) -> Claim:
        for objs in three_chassis().cores["ch1"].topology.objects.values():
            for obj in objs.values():
                core.nb_updated(obj)
        core.nb_updated(net1_port("b1", 21, VM_MAC, VM_IP, [
            PortBinding(host="ch2", profile={"migrating_to": "ch3"}),
            PortBinding(host="ch3", status=BindingStatus.INACTIVE, profile=profile)]))
        claims = [o for o in core.vif_online(Vif("b1", DST[1], "tap20"))
                  if isinstance(o, Claim)]
        assert len(claims) == 1
        return claims[0]

    assert claim(ChassisCore("ch3"), {}).fallback is LiveFallback.SOURCE_UNPLUG
    binding = ChassisCore("ch3", live_fallback=LiveFallback.BINDING)
    assert claim(binding, {}).fallback is LiveFallback.BINDING
    assert claim(ChassisCore("ch3"), {"ferry_live_fallback": "binding"}).fallback is (
        LiveFallback.BINDING)
    assert claim(binding, {"ferry_live_fallback": "source-unplug"}).fallback is (
        LiveFallback.SOURCE_UNPLUG)


def test_a_bad_ferry_profile_value_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="ferry_live_fallback must be one of source-unplug, "
                       "binding, not 'never'"):
        PortBinding(host="ch3", profile={"ferry_live_fallback": "never"})
    with pytest.raises(ValueError, match="ferry_migration_mode must be one of spec, live, "
                       "not 'fast'"):
        LogicalPort(id="b1", topic=P, network_id="net1", mac=VM_MAC,
                    binding_profile={"ferry_migration_mode": "fast"})
