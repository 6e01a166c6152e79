"""The spec's three migration steps in the core, across three simulated chassis, with the
faults that break naive implementations: a lost, duplicated or late step 2, an abandoned
migration, and claims from chassis that were not given the port."""

from __future__ import annotations

from typing import Any

import pytest

from ferry.core.migration import (
    Abandon,
    Claim,
    ClaimRefused,
    Complete,
    Intent,
    SourceGone,
    ack_phase,
)
from ferry.model.objects import (
    BindingStatus,
    LogicalPort,
    Migration,
    MigrationStatus,
    PortBinding,
)
from tests.fabric import P, fresh_copy, net1_port, three_chassis

VM_MAC, VM_IP = "fa:16:3e:00:00:b1", "10.0.0.21"


class Run:
    """b1 migrates chassis-2 → chassis-3; a1 on ch1 and a2 on ch2 talk to it."""

    def __init__(self) -> None:
        f = self.fab = three_chassis()
        f.publish(net1_port("a1", 11, "fa:16:3e:00:00:a1", "10.0.0.11", [PortBinding(host="ch1")]),
                  net1_port("a2", 12, "fa:16:3e:00:00:a2", "10.0.0.12", [PortBinding(host="ch2")]))
        self.version = 1
        self.publish_b1([PortBinding(host="ch2")])
        f.plug("ch1", "a1", 10)
        f.plug("ch2", "a2", 11)
        f.plug("ch2", "b1", 10)
        self.mversion = 0

    def publish_b1(self, bindings: list[PortBinding]) -> None:
        self.version += 1
        self.fab.publish(net1_port("b1", 21, VM_MAC, VM_IP, bindings, self.version))

    def authorize(self) -> None:
        """What Nova does before plugging: an inactive binding for ch3, migrating_to=ch3."""
        self.publish_b1([PortBinding(host="ch2", profile={"migrating_to": "ch3"}),
                         PortBinding(host="ch3", status=BindingStatus.INACTIVE)])

    def activate(self) -> None:
        """Step 3: the binding on ch3 becomes the active one (source binding deleted)."""
        self.publish_b1([PortBinding(host="ch3")])

    def record(self, status: MigrationStatus, dest: str = "ch3") -> None:
        """What the agent writes for an intent: the port's Migration record."""
        self.mversion += 1
        self.fab.publish(Migration(id="b1", topic=P, port_id="b1", source_chassis="ch2",
                                   dest_chassis=dest, status=status, version=self.mversion))

    def where_is_b1(self) -> dict[str, list[tuple[str, int]]]:
        """Where traffic to b1 from each other VM is delivered."""
        out = {}
        for vm, (ch, ofport, mac, ip) in {"a1": ("ch1", 10, "fa:16:3e:00:00:a1", "10.0.0.11"),
                                          "a2": ("ch2", 11, "fa:16:3e:00:00:a2", "10.0.0.12")
                                          }.items():
            out[vm] = self.fab.deliveries(ch, ofport, eth_src=mac, eth_dst=VM_MAC,
                                          eth_type=0x0800, ipv4_src=ip, ipv4_dst=VM_IP)
        return out

    def assert_at(self, ch: str, ofport: int) -> None:
        assert self.where_is_b1() == {"a1": [(ch, ofport)], "a2": [(ch, ofport)]}

    def assert_converged(self) -> None:
        """Every chassis' tables equal those of a controller started on the final state."""
        for name, core in self.fab.cores.items():
            assert core.desired() == fresh_copy(core).desired(), name


def intents(out: list[Any]) -> list[Intent]:
    return [o for o in out if isinstance(o, Claim | ClaimRefused | SourceGone | Complete |
                                         Abandon)]


def test_the_three_steps() -> None:
    r = Run()
    r.authorize()
    # Step 1: the destination's VIF appears; it claims the port. Traffic stays on the source.
    assert intents(r.fab.cores["ch3"].vif_online(_vif(20))) == [Claim("b1", "ch2", "ch3")]
    r.record(MigrationStatus.PLUGGED)
    r.assert_at("ch2", 10)
    # Step 2: the source's VIF goes away; everyone now forwards to the destination.
    assert intents(r.fab.cores["ch2"].vif_offline("b1")) == [SourceGone("b1", "ch2", "ch3")]
    r.record(MigrationStatus.SOURCE_UNPLUGGED)
    r.assert_at("ch3", 20)
    # Step 3: the binding moves; the destination completes the migration.
    r.activate()
    assert intents(r.fab.cores["ch3"].nb_updated(r.fab.cores["ch3"].topology.get(
        LogicalPort, "b1"))) == [Complete("b1", "ch3")]  # type: ignore[arg-type]
    r.record(MigrationStatus.DONE)
    r.assert_at("ch3", 20)
    r.assert_converged()


def _vif(ofport: int) -> Any:
    from ferry.core.topology import Vif

    return Vif("b1", ofport, f"tap{ofport}")


@pytest.mark.parametrize("fault", ["step2_lost", "step2_twice", "step2_after_step3"])
def test_step_three_converges_whatever_happened_to_step_two(fault: str) -> None:
    r = Run()
    r.authorize()
    r.fab.cores["ch3"].vif_online(_vif(20))
    r.record(MigrationStatus.PLUGGED)
    r.fab.unplug("ch2", "b1")  # the source unplugs; its controller may or may not tell anyone
    if fault == "step2_twice":
        r.record(MigrationStatus.SOURCE_UNPLUGGED)
        r.record(MigrationStatus.SOURCE_UNPLUGGED)
    r.activate()
    if fault == "step2_after_step3":
        r.record(MigrationStatus.SOURCE_UNPLUGGED)
    r.assert_at("ch3", 20)
    r.record(MigrationStatus.DONE)
    r.assert_at("ch3", 20)
    r.assert_converged()


def test_destination_vif_gone_before_the_source_abandons() -> None:
    r = Run()
    r.authorize()
    r.fab.cores["ch3"].vif_online(_vif(20))
    r.record(MigrationStatus.PLUGGED)
    r.assert_at("ch2", 10)
    out = intents(r.fab.cores["ch3"].vif_offline("b1"))
    assert out == [Abandon("b1", "ch3", "the destination VIF went away before the source's")]
    r.record(MigrationStatus.ROLLED_BACK)
    r.assert_at("ch2", 10)
    r.assert_converged()


def test_destination_binding_deleted_abandons() -> None:
    r = Run()
    r.authorize()
    r.fab.cores["ch3"].vif_online(_vif(20))
    r.record(MigrationStatus.PLUGGED)
    r.publish_b1([PortBinding(host="ch2")])  # Nova deletes the destination binding
    core = r.fab.cores["ch3"]
    out = intents(core.nb_updated(core.topology.get(LogicalPort, "b1")))  # type: ignore[arg-type]
    assert out == [Abandon("b1", "ch3", "the port's binding for this chassis was removed")]
    r.assert_at("ch2", 10)


def test_claim_without_a_binding_is_refused_and_changes_nothing() -> None:
    r = Run()
    before = {n: c.desired() for n, c in r.fab.cores.items()}
    assert intents(r.fab.cores["ch1"].vif_online(_vif(30))) == [
        ClaimRefused("b1", "ch1", "ch2")]
    # A forged record (written by a rogue chassis straight into the store) is ignored too.
    r.record(MigrationStatus.SOURCE_UNPLUGGED, dest="ch1")
    r.assert_at("ch2", 10)
    for name, core in r.fab.cores.items():
        if name != "ch1":
            assert core.desired() == before[name], name


def test_unauthorized_step_two_is_ignored_even_for_the_named_destination() -> None:
    r = Run()  # no binding for ch3 and no migrating_to
    r.fab.cores["ch3"].vif_online(_vif(20))
    r.record(MigrationStatus.SOURCE_UNPLUGGED)
    r.assert_at("ch2", 10)


def test_step_three_before_the_source_unplugs_claims_nothing_back() -> None:
    """Nova activates the destination binding before unplugging the source VIF: the source
    keeps a VIF for a port now bound elsewhere, and must neither claim it back nor deliver to
    it; when it finally unplugs, everything equals a fresh start."""
    r = Run()
    r.authorize()
    r.fab.cores["ch3"].vif_online(_vif(20))
    r.record(MigrationStatus.PLUGGED)
    r.publish_b1([PortBinding(host="ch3"),
                  PortBinding(host="ch2", status=BindingStatus.INACTIVE)])
    src = r.fab.cores["ch2"]
    assert intents(src.nb_updated(src.topology.get(LogicalPort, "b1"))) == []  # type: ignore[arg-type]
    r.assert_at("ch3", 20)
    # Every chassis moved the port for step 3, while the record still says plugged: their
    # flow acks are for the binding's move, not for the claim (acked long before).
    assert {ch: ack_phase(core.topology, "b1") for ch, core in r.fab.cores.items()} == {
        "ch1": "done", "ch2": "done", "ch3": "done"}
    assert intents(src.vif_offline("b1")) == []
    r.publish_b1([PortBinding(host="ch3")])
    r.record(MigrationStatus.DONE)
    r.assert_at("ch3", 20)
    r.assert_converged()


def test_migrating_back_later_is_claimed() -> None:
    r = Run()
    r.authorize()
    r.fab.cores["ch3"].vif_online(_vif(20))
    r.record(MigrationStatus.PLUGGED)
    r.fab.unplug("ch2", "b1")
    r.activate()
    r.record(MigrationStatus.DONE)
    # Back to ch2: a new binding for ch2, a newly plugged VIF there.
    r.publish_b1([PortBinding(host="ch3", profile={"migrating_to": "ch2"}),
                  PortBinding(host="ch2", status=BindingStatus.INACTIVE)])
    assert intents(r.fab.cores["ch2"].vif_online(_vif(30))) == [Claim("b1", "ch3", "ch2")]
