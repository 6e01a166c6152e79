"""The migration record a chassis publishes: what it says when intents arrive late."""

from __future__ import annotations

import pytest

from ferry.agent.migrations import MigrationPublisher
from ferry.core.migration import Activated
from ferry.model.northbound import Northbound
from ferry.model.objects import (
    Chassis,
    LogicalSwitch,
    Migration,
    MigrationMode,
    MigrationStatus,
    Subnet,
)
from ferry.store.memory import MemoryStore
from tests.labkit import P, make_port

PLUGGED_AT, ACTIVATED_AT, BOUND_AT = 100.0, 100.5, 100.52


async def _record(status: MigrationStatus, **stamps: float) -> tuple[Northbound, str]:
    nb = Northbound(MemoryStore())
    for i, ch in enumerate(("ch1", "ch2", "ch3")):
        await nb.create(Chassis(id=ch, name=ch, tunnel_ip=f"192.168.254.{i + 1}"))  # type: ignore[arg-type]
    await nb.create(LogicalSwitch(id="net1", topic=P))
    await nb.create(Subnet(id="s1", topic=P, network_id="net1", cidr="10.0.0.0/24"))  # type: ignore[arg-type]
    await make_port(nb, "p1", "net1", "s1", "fa:16:3e:00:00:01", "10.0.0.5", "ch1")
    await nb.create(Migration(id="p1", topic=P, port_id="p1", source_chassis="ch1",
                              dest_chassis="ch2", mode=MigrationMode.LIVE, status=status,
                              timestamps={"plugged": PLUGGED_AT, **stamps}))
    return nb, "p1"


@pytest.mark.asyncio
async def test_an_activation_reported_after_nova_moved_the_binding_is_recorded() -> None:
    """The datapath activated the port; Nova's binding came before the held report."""
    nb, port = await _record(MigrationStatus.DONE, bound=BOUND_AT)
    await MigrationPublisher("ch2", nb, lambda: BOUND_AT + 0.01).publish(
        Activated(port, "ch2", at=ACTIVATED_AT))
    m = await nb.get(Migration, port)
    assert m is not None and m.activated and m.status is MigrationStatus.DONE
    assert m.timestamps["activated"] == ACTIVATED_AT


@pytest.mark.asyncio
@pytest.mark.parametrize("status, chassis, at", [
    (MigrationStatus.ROLLED_BACK, "ch2", ACTIVATED_AT),  # abandoned: nothing activated
    (MigrationStatus.DONE, "ch3", ACTIVATED_AT),  # not the destination
    (MigrationStatus.PLUGGED, "ch2", PLUGGED_AT - 1),  # before this migration was claimed
])
async def test_an_activation_that_is_not_this_migrations_is_not_recorded(
        status: MigrationStatus, chassis: str, at: float) -> None:
    nb, port = await _record(status)
    await MigrationPublisher(chassis, nb, lambda: BOUND_AT).publish(Activated(port, chassis,
                                                                              at=at))
    m = await nb.get(Migration, port)
    assert m is not None and not m.activated and "activated" not in m.timestamps
