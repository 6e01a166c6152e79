"""Live migration on a real lab: etcd store, one controller process per chassis, Nova's
sequence through the API, real packets. After every scenario, traffic from every chassis
reaches the VM and every chassis' flow table equals that of a freshly started controller."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio

from ferry.lab.lab import Lab
from ferry.lab.migrate import (
    migrate,
    migration_record,
    post_migration,
    pre_migration,
    stop_and_resume,
    unplug_source,
    wait_record,
)
from ferry.lab.neutron import Neutron
from ferry.lab.nova import boot
from ferry.lab.services import (
    spawn_controller,
    stop_controller,
    wait_controllers,
)
from ferry.lab.session import lab_session
from tests.labkit import bridge_flows, eventually

pytestmark = [pytest.mark.lab, pytest.mark.etcd, pytest.mark.asyncio(loop_scope="module")]

CLIENTS = {"c1": "chassis-1", "c2": "chassis-2", "c3": "chassis-3"}


class Rig:
    def __init__(self, lab: Lab, api: Neutron) -> None:
        self.lab, self.api = lab, api
        self.ips: dict[str, str] = {}

    def ping(self, src: str, dst: str, count: int = 1) -> bool:
        r = self.lab.exec_in_vm(src, ["ping", "-n", "-q", "-c", str(count), "-i", "0.1",
                                      "-W", "1", self.ips[dst]])
        return r.returncode == 0

    async def reachable_from_everywhere(self, vm: str) -> None:
        for c in CLIENTS:
            await eventually(lambda c=c: self.ping(c, vm), within=10,  # type: ignore[misc]
                             what=f"{c} → {vm}")

    def flows(self, chassis: str) -> list[str]:
        return bridge_flows(self.lab, chassis)

    async def assert_flows_equal_fresh_controllers(self) -> None:
        """Kill each controller, wipe its flows, start a new one: same flows come back."""
        await asyncio.to_thread(wait_controllers, self.lab)
        for ch in CLIENTS.values():
            before = await asyncio.to_thread(self.flows, ch)
            await asyncio.to_thread(stop_controller, self.lab, ch)
            await asyncio.to_thread(self.lab.ovs(ch).ofctl, "del-flows", "br-int")
            await asyncio.to_thread(spawn_controller, self.lab, ch)
            try:
                await eventually(lambda ch=ch, b=before: self.flows(ch) == b,  # type: ignore[misc]
                                 within=15, what=f"fresh flows on {ch}")
            except AssertionError:
                after = await asyncio.to_thread(self.flows, ch)
                pytest.fail(f"{ch}: only before: {sorted(set(before) - set(after))}\n"
                            f"only fresh: {sorted(set(after) - set(before))}")

    async def where(self, vm: str) -> str:
        return self.lab.vm(vm).active_vif.chassis  # type: ignore[union-attr]


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def rig() -> AsyncIterator[Rig]:
    # FERRY_TEST_LOGS: the controllers' logs outlive the lab, for a post-mortem.
    async with lab_session(3, "etcd", keep_logs_in=os.environ.get("FERRY_TEST_LOGS")) as (
            lab, api):
        r = Rig(lab, api)
        net = await api.create("network", name="mig")
        await api.create("subnet", network_id=net["id"], cidr="10.30.0.0/24", ip_version=4)
        placement = {"vm": "chassis-1", "vm2": "chassis-2", **CLIENTS}
        for name, ch in placement.items():
            port = await api.create("port", network_id=net["id"], name=name)
            r.ips[name] = port["fixed_ips"][0]["ip_address"]
            await boot(lab, api, name, port["id"], ch)
        yield r


@pytest.mark.parametrize("mode", ["live", "spec"])
async def test_a_b_a_then_a_b_c(rig: Rig, mode: str) -> None:
    await rig.reachable_from_everywhere("vm")
    start = await rig.where("vm")
    others = [c for c in ("chassis-1", "chassis-2", "chassis-3") if c != start]
    for dest in (others[0], start, others[0], others[1]):
        run = await migrate(rig.lab, rig.api, "vm", dest, pause_ms=30, unplug_delay_ms=50,
                            mode=mode)
        assert run.record is not None and run.record["status"] == "done", run.record
        assert run.record["mode"] == mode
        assert await rig.where("vm") == dest
        await rig.reachable_from_everywhere("vm")
    await rig.assert_flows_equal_fresh_controllers()


async def test_two_vms_migrating_at_once(rig: Rig) -> None:
    targets = {"vm": "chassis-1" if await rig.where("vm") != "chassis-1" else "chassis-2",
               "vm2": "chassis-3" if await rig.where("vm2") != "chassis-3" else "chassis-1"}
    runs = await asyncio.gather(*(migrate(rig.lab, rig.api, vm, dest, pause_ms=30,
                                          unplug_delay_ms=50) for vm, dest in targets.items()))
    for run in runs:
        assert run.record is not None and run.record["status"] == "done", run.record
    for vm in targets:
        await rig.reachable_from_everywhere(vm)
    await rig.assert_flows_equal_fresh_controllers()


async def other_chassis(rig: Rig, vm: str) -> str:
    here = await rig.where(vm)
    return next(c for c in ("chassis-1", "chassis-2", "chassis-3") if c != here)


async def test_step_two_lost_source_controller_stopped(rig: Rig) -> None:
    """The source controller is frozen (SIGSTOP) before the unplug: nobody hears step 2.
    Step 3 alone must bring every other chassis to the destination."""
    dest = await other_chassis(rig, "vm")
    run = await pre_migration(rig.lab, rig.api, "vm", dest)
    source_pid = rig.lab.chassis(run.source).controller.pid  # type: ignore[union-attr]
    os.kill(source_pid, signal.SIGSTOP)
    try:
        await stop_and_resume(rig.lab, run)
        await unplug_source(rig.lab, run)
        await post_migration(rig.api, run)
        third = next(c for c, ch in CLIENTS.items() if ch not in (run.source, run.dest))
        dest_client = next(c for c, ch in CLIENTS.items() if ch == run.dest)
        for c in (third, dest_client):
            await eventually(lambda c=c: rig.ping(c, "vm"), within=10,  # type: ignore[misc]
                             what=f"{c} → vm while the source controller is frozen")
    finally:
        os.kill(source_pid, signal.SIGCONT)
    await rig.reachable_from_everywhere("vm")
    await rig.assert_flows_equal_fresh_controllers()


async def test_step_three_before_step_two(rig: Rig) -> None:
    dest = await other_chassis(rig, "vm")
    run = await pre_migration(rig.lab, rig.api, "vm", dest)
    await stop_and_resume(rig.lab, run)
    await post_migration(rig.api, run)  # the binding moves before the source unplugs
    dest_client = next(c for c, ch in CLIENTS.items() if ch == run.dest)
    await eventually(lambda: rig.ping(dest_client, "vm"), within=10, what="dest → vm")
    await unplug_source(rig.lab, run)
    await rig.reachable_from_everywhere("vm")
    m = await migration_record(rig.api, run.port_id)
    assert m is not None and m["status"] == "done" and m["dest_chassis"] == run.dest, m
    await rig.assert_flows_equal_fresh_controllers()


@pytest.mark.parametrize("pause_ms", [0, 50])
async def test_novas_default_order_leaves_fresh_flows(rig: Rig, pause_ms: float) -> None:
    """Nova's default order (the binding activated on libvirt's event that the source
    paused), in live mode: with a pause, every chassis follows the binding before the RARP;
    with none, the RARP's activation in the datapath comes first and the binding right after.
    Either way the migration ends done, and with the flows freshly started controllers make
    (nothing learned is left behind)."""
    dest = await other_chassis(rig, "vm")
    run = await migrate(rig.lab, rig.api, "vm", dest, pause_ms=pause_ms, mode="live",
                        binding_activation="at-pause")
    assert run.record is not None and run.record["status"] == "done", run.record
    if pause_ms == 0:  # the RARP (and the datapath's learning) came before the binding moved
        assert run.events["announced"] < run.events["binding_activated"], run.events
        # and the record says when the datapath switched, though its report (held by the
        # agent) comes after the binding moved
        m = await wait_record(rig.api, run.port_id, lambda r: r["activated"], 5.0)
        assert m["status"] == "done" and m["timestamps"]["activated"] <= m["timestamps"]["bound"]
    await rig.reachable_from_everywhere("vm")
    await rig.assert_flows_equal_fresh_controllers()


async def test_controllers_restarted_mid_migration(rig: Rig) -> None:
    dest = await other_chassis(rig, "vm")
    run = await pre_migration(rig.lab, rig.api, "vm", dest)
    for ch in (run.dest, run.source):  # a crash and a restart of both ends, mid-way
        await asyncio.to_thread(stop_controller, rig.lab, ch)
        await asyncio.to_thread(spawn_controller, rig.lab, ch)
    await stop_and_resume(rig.lab, run)
    await unplug_source(rig.lab, run)
    await post_migration(rig.api, run)
    await rig.reachable_from_everywhere("vm")
    await rig.assert_flows_equal_fresh_controllers()


@pytest.mark.parametrize("how", ["dest_unplugged", "dest_binding_deleted"])
async def test_abandoned_migration_keeps_the_source(rig: Rig, how: str) -> None:
    dest = await other_chassis(rig, "vm")
    source = await rig.where("vm")
    run = await pre_migration(rig.lab, rig.api, "vm", dest)
    loop = asyncio.get_running_loop()
    await rig.reachable_from_everywhere("vm")
    if how == "dest_unplugged":
        await asyncio.to_thread(rig.lab.unplug_vif, "vm", dest)
    else:
        await rig.api.delete_binding(run.port_id, dest)
        await rig.api.update("port", run.port_id, **{"binding:profile": run.profile})

    async def rolled_back() -> Any:
        m = await migration_record(rig.api, run.port_id)
        return m if m and m["status"] == "rolled_back" else None

    await eventually(lambda: asyncio.run_coroutine_threadsafe(rolled_back(), loop).result(),
                     within=10, what="the migration rolled back")
    # Nova's rollback cleans up what is left: the destination's binding or its VIF.
    if how == "dest_unplugged":
        await rig.api.delete_binding(run.port_id, dest)
        await rig.api.update("port", run.port_id, **{"binding:profile": run.profile})
    else:
        await asyncio.to_thread(rig.lab.unplug_vif, "vm", dest)
    assert await rig.where("vm") == source
    await rig.reachable_from_everywhere("vm")
    port = await rig.api.get("port", run.port_id)
    assert port["binding:host_id"] == source
    await rig.assert_flows_equal_fresh_controllers()


async def test_a_chassis_without_a_binding_cannot_claim(rig: Rig) -> None:
    source = await rig.where("vm")
    rogue = await other_chassis(rig, "vm")
    before = await migration_record(rig.api, rig.lab.vm("vm").port_id)
    await asyncio.to_thread(rig.lab.plug_vif, "vm", rogue, True)
    try:
        await rig.reachable_from_everywhere("vm")
        assert await migration_record(rig.api, rig.lab.vm("vm").port_id) == before
        port = await rig.api.get("port", rig.lab.vm("vm").port_id)
        assert port["binding:host_id"] == source
    finally:
        await asyncio.to_thread(rig.lab.unplug_vif, "vm", rogue)
    await rig.assert_flows_equal_fresh_controllers()
