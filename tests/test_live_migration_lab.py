"""Live mode on a real lab (embedded store), measured by the 1 kHz probe: activation in the
datapath by the VM's RARP, long before Nova's post-migration step; no packet delivered twice
to the VM; none delivered to the stopped copy once the VM runs on the destination."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from ferry.lab.lab import Lab
from ferry.lab.migrate import (
    HYPERVISOR_RT_PRIORITY,
    IN_PLACE,
    MigrationRun,
    activate_destination,
    migrate,
    pause_in_place,
    post_migration,
    pre_migration,
    stop_and_resume,
    unplug_source,
    wait_done,
    wait_record,
)
from ferry.lab.neutron import Neutron
from ferry.lab.nova import boot
from ferry.lab.session import lab_session
from ferry.probe.runner import Probe, now_ns

pytestmark = [pytest.mark.lab, pytest.mark.asyncio(loop_scope="module")]

UNPLUG_DELAY_MS = 300.0  # Nova's post-migration comes late: activation must not wait for it


class Rig:
    def __init__(self, lab: Lab, api: Neutron) -> None:
        self.lab, self.api = lab, api

    def flow_packets(self, chassis: str, reg7: int) -> int:
        """Packets that matched the port's own (controller-installed, priority 100) egress
        flows on a chassis: the ones that deliver to its local VIF on the source."""
        ovs = self.lab.ovs(chassis)
        # Datapath flows' counters reach the OpenFlow rules through the revalidators: let
        # them finish a round first, or the figures are stale.
        ovs.appctl("ovs-vswitchd", "revalidator/wait")
        out = ovs.ofctl("dump-flows", "br-int", "table=50")
        total = 0
        for line in out.splitlines():
            if f"reg7={reg7:#x}" in line and "priority=100" in line and "output:" in line:
                m = re.search(r"n_packets=(\d+)", line)
                total += int(m.group(1)) if m else 0
        return total


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def rig() -> AsyncIterator[Rig]:
    async with lab_session(3) as (lab, api):
        net = await api.create("network", name="live")
        await api.create("subnet", network_id=net["id"], cidr="10.40.0.0/24", ip_version=4)
        for name, ch in {"vm": "chassis-1", "c1": "chassis-1", "c2": "chassis-2",
                         "c3": "chassis-3"}.items():
            port = await api.create("port", network_id=net["id"], name=name)
            await boot(lab, api, name, port["id"], ch)
        yield Rig(lab, api)


async def test_activation_in_the_datapath_before_novas_post_migration(
        rig: Rig, tmp_path: Path) -> None:
    # Delivery resumes on the destination long before the source goes away: the datapath
    # activates the port on the VM's RARP, no controller round trip involved.
    run = await migrate_under_probe(rig, tmp_path, "chassis-2")
    assert run.mode == "live"


async def migrate_under_probe(rig: Rig, tmp_path: Path, dest: str,
                              **kwargs: Any) -> MigrationRun:
    """:func:`migrate` to ``dest`` under the probe (``kwargs`` go to it), 50 ms pause, Nova's
    post-migration late; delivery must resume long before it, nothing twice."""
    async with Probe(rig.lab, "vm", ["c1", "c2", "c3"], out_dir=tmp_path / "probe") as probe:
        await probe.await_delivered(100)
        run = await migrate(rig.lab, rig.api, "vm", dest, pause_ms=50,
                            unplug_delay_ms=UNPLUG_DELAY_MS, **kwargs)
        await probe.await_delivered(100, since_ns=now_ns())
    report = probe.report(pause=run.pause_window_ns, around_ms=UNPLUG_DELAY_MS + 200)
    print("\n" + report.to_text())
    for c in report.clients:
        assert c.duplicated == 0, c
        assert c.downtime is not None and c.downtime.recovered, c
        assert c.downtime_beyond_pause_ms is not None
        assert c.downtime_beyond_pause_ms < UNPLUG_DELAY_MS / 3, c
    return run


@pytest.mark.parametrize("mode", ["live", "spec"])
async def test_novas_binding_activation_at_the_pause(rig: Rig, tmp_path: Path,
                                                     mode: str) -> None:
    """Nova's default order: the destination binding is activated on libvirt's event that
    the source paused, before the unplug. In both modes delivery resumes on the destination
    long before Nova's unplug, nothing twice, and the migration ends done."""
    source = rig.lab.vm("vm").active_vif.chassis  # type: ignore[union-attr]
    dest = next(c for c in ALL_CHASSIS if c != source)
    run = await migrate_under_probe(rig, tmp_path, dest, mode=mode,
                                    binding_activation="at-pause")
    assert run.mode == mode
    assert run.events["binding_activated"] < run.events["unplugging"], run.events
    assert run.record is not None and run.record["status"] == "done", run.record
    # Every chassis acked its flows for the binding's move (the convergence it is timed by),
    # before Nova's unplug: the move happened then.
    m = await wait_record(rig.api, run.port_id, lambda m: all(
        f"acked.{ch}.done" in m["timestamps"] for ch in ALL_CHASSIS), 10)
    acks = {ch: m["timestamps"][f"acked.{ch}.done"] for ch in ALL_CHASSIS}
    assert max(acks.values()) < run.wall["unplugging"], (acks, run.wall)


async def test_nothing_for_the_stopped_copy_after_activation(rig: Rig, tmp_path: Path) -> None:
    source = rig.lab.vm("vm").active_vif.chassis  # type: ignore[union-attr]
    dest = next(c for c in ("chassis-1", "chassis-2", "chassis-3") if c != source)
    port = await rig.api.get("port", rig.lab.vm("vm").port_id)
    nb_key = await port_key(rig, port["id"])
    async with Probe(rig.lab, "vm", ["c1", "c2", "c3"], out_dir=tmp_path / "probe") as probe:
        await probe.await_delivered(100)
        run = await pre_migration(rig.lab, rig.api, "vm", dest)
        await stop_and_resume(rig.lab, run)
        await probe.await_delivered(50, since_ns=run.events["announced"])
        # The VM runs on the destination; the source VIF is still plugged (Nova has not run
        # its post-migration yet) and the probe keeps sending to the VM from everywhere.
        before, after = await counted_then_finished(
            rig, probe, run, lambda: rig.flow_packets(run.source, nb_key))
    assert after == before, f"{after - before} packets went to the stopped copy"
    assert all(c.duplicated == 0 for c in probe.report(pause=run.pause_window_ns).clients)


async def test_nothing_for_the_stopped_copy_when_the_vm_comes_back(rig: Rig,
                                                                    tmp_path: Path) -> None:
    """The VM goes back to a chassis it left a moment ago. Every chassis still caches, in its
    datapath, the flow its RARP from there took then; the new RARP matches it and takes no
    slow path. It must still switch them all: from the moment the VM runs on the destination,
    no client's packet reaches the stopped copy (counted on its interface in the VM)."""
    first = rig.lab.vm("vm").active_vif.chassis  # type: ignore[union-attr]
    second = next(c for c in ("chassis-1", "chassis-2", "chassis-3") if c != first)
    async with Probe(rig.lab, "vm", ["c1", "c2", "c3"], out_dir=tmp_path / "probe") as probe:
        await probe.await_delivered(100)
        for dest in (second, first):
            await migrate(rig.lab, rig.api, "vm", dest, pause_ms=20, mode="live")
        run = await pre_migration(rig.lab, rig.api, "vm", second)
        vif = rig.lab.vm("vm").vif(run.source)
        assert vif is not None
        await stop_and_resume(rig.lab, run)
        at_resume, later = await counted_then_finished(
            rig, probe, run, lambda: rx_packets(rig.lab, vif.guest_if))
    assert later == at_resume, f"{later - at_resume} packets reached the stopped copy"
    assert all(c.duplicated == 0 for c in probe.report(pause=run.pause_window_ns).clients)


def rx_packets(lab: Lab, iface: str) -> int:
    out = lab.exec_in_vm("vm", ["cat", f"/sys/class/net/{iface}/statistics/rx_packets"])
    return int(out.stdout)


async def counted_then_finished(rig: Rig, probe: Probe, run: MigrationRun,
                                count: Callable[[], int]) -> tuple[int, int]:
    """With the VM running on the destination and the source VIF still plugged (Nova's
    post-migration not yet run): ``count`` now and after 200 more packets of every client;
    then Nova's post-migration, until the migration is done."""
    first = await asyncio.to_thread(count)
    await probe.await_delivered(200, since_ns=now_ns())
    second = await asyncio.to_thread(count)
    await unplug_source(rig.lab, run)
    await post_migration(rig.api, run)
    assert await wait_done(rig.api, run.port_id, 10) is not None
    return first, second


async def test_the_controllers_hear_of_the_activation_before_novas_post_migration(
        rig: Rig, tmp_path: Path) -> None:
    """The destination's datapath reports the activation (a packet-in); every chassis then
    has flows for the port on its new chassis, acked, while Nova has not run its post-migration
    yet, and the packets keep flowing."""
    source = rig.lab.vm("vm").active_vif.chassis  # type: ignore[union-attr]
    dest = next(c for c in ("chassis-1", "chassis-2", "chassis-3") if c != source)
    async with Probe(rig.lab, "vm", ["c1", "c2", "c3"], out_dir=tmp_path / "probe") as probe:
        await probe.await_delivered(100)
        run = await pre_migration(rig.lab, rig.api, "vm", dest)
        await stop_and_resume(rig.lab, run)
        record = await wait_record(rig.api, run.port_id, lambda m: m["activated"] and all(
            f"acked.{ch}.activated" in m["timestamps"] for ch in ALL_CHASSIS), 10)
        assert record["status"] == "plugged" and "source_unplugged" not in record["timestamps"]
        await probe.await_delivered(100, since_ns=now_ns())
        await unplug_source(rig.lab, run)
        await post_migration(rig.api, run)
        assert await wait_done(rig.api, run.port_id, 10) is not None
    report = probe.report(pause=run.pause_window_ns)
    print("\n" + report.to_text())
    for c in report.clients:
        assert c.duplicated == 0, c
        assert c.downtime_beyond_pause_ms is not None
        assert c.downtime_beyond_pause_ms < UNPLUG_DELAY_MS / 3, c


@pytest.mark.parametrize("fallback", ["source-unplug", "binding"])
async def test_a_silent_vm_is_switched_by_the_fallback(rig: Rig, tmp_path: Path,
                                                       fallback: str) -> None:
    """A VM that sends nothing on resume (no RARP, as with vhost-user): the datapath never
    activates it. ``source-unplug`` switches it when Nova unplugs the source VIF; ``binding``
    only when Nova activates the destination binding."""
    source = rig.lab.vm("vm").active_vif.chassis  # type: ignore[union-attr]
    dest = next(c for c in ("chassis-1", "chassis-2", "chassis-3") if c != source)
    async with Probe(rig.lab, "vm", ["c1", "c2", "c3"], out_dir=tmp_path / "probe") as probe:
        await probe.await_delivered(100)
        run = await pre_migration(rig.lab, rig.api, "vm", dest, fallback=fallback)
        await stop_and_resume(rig.lab, run, rarps=0)
        await unplug_source(rig.lab, run)
        await wait_record(rig.api, run.port_id, lambda m: m["status"] == "source_unplugged"
                          and all(f"acked.{ch}.plugged" in m["timestamps"]
                                  for ch in ALL_CHASSIS), 10)
        unplugged = now_ns()
        if fallback == "source-unplug":
            await probe.await_delivered(100, since_ns=unplugged)
        else:
            # Nothing reaches the VM until the binding moves: watch for a while (an absence
            # has no event to await), then let Nova finish and see delivery come back.
            await asyncio.sleep(0.3)
            assert sum(probe.delivered_counts(since_ns=run.events["resumed"]).values()) == 0
        await post_migration(rig.api, run)
        await probe.await_delivered(100, since_ns=now_ns())
        done = await wait_done(rig.api, run.port_id, 10)
    assert done is not None and done["fallback"] == fallback and not done["activated"]
    report = probe.report(pause=run.pause_window_ns)
    assert all(c.duplicated == 0 for c in report.clients)


async def test_a_silent_vm_follows_novas_binding_activation_at_the_pause(
        rig: Rig, tmp_path: Path) -> None:
    """A VM that sends nothing on resume, with the ``binding`` fallback, under Nova's default
    order: the binding moves on libvirt's event that the source paused, so delivery resumes on
    the destination with no RARP and long before Nova's unplug."""
    source = rig.lab.vm("vm").active_vif.chassis  # type: ignore[union-attr]
    dest = next(c for c in ALL_CHASSIS if c != source)
    async with Probe(rig.lab, "vm", ["c1", "c2", "c3"], out_dir=tmp_path / "probe") as probe:
        await probe.await_delivered(100)
        run = await pre_migration(rig.lab, rig.api, "vm", dest, fallback="binding")
        await stop_and_resume(rig.lab, run, rarps=0,
                              on_paused=lambda: activate_destination(rig.api, run))
        # Delivery on the destination before Nova's post-migration even starts: no unplug
        # and no RARP switched it (the source-unplug fallback would wait for the unplug).
        await probe.await_delivered(100, since_ns=run.events["resumed"], within_s=5)
        await unplug_source(rig.lab, run)
        await post_migration(rig.api, run, activate=False)
        done = await wait_done(rig.api, run.port_id, 10)
    assert done is not None and done["status"] == "done" and not done["activated"], done
    report = probe.report(pause=run.pause_window_ns, around_ms=200)
    for c in report.clients:
        assert c.duplicated == 0, c
        assert c.downtime_beyond_pause_ms is not None and c.downtime_beyond_pause_ms < 100, c


async def test_a_pause_in_place_stops_delivery_for_the_pause_only(
        rig: Rig, tmp_path: Path) -> None:
    """The benchmark's floor: the VM frozen and resumed on its own VIF. Delivery stops for
    the whole pause (the freeze works) and comes back on the same chassis, nothing twice."""
    where = rig.lab.vm("vm").active_vif.chassis  # type: ignore[union-attr]
    async with Probe(rig.lab, "vm", ["c1", "c2", "c3"], out_dir=tmp_path / "probe") as probe:
        await probe.await_delivered(100)
        run = await pause_in_place(rig.lab, "vm", 50)
        await probe.await_delivered(100, since_ns=now_ns())
    assert run.mode == IN_PLACE and run.source == run.dest == where
    # QEMU's order (the RARP, then the vCPUs), by a hypervisor that OVS cannot preempt
    assert run.events["announced"] <= run.events["resumed"], run.events
    assert run.hypervisor_sched == f"fifo:{HYPERVISOR_RT_PRIORITY}", run.hypervisor_sched
    assert rig.lab.vm("vm").active_vif.chassis == where  # type: ignore[union-attr]
    report = probe.report(pause=run.pause_window_ns)
    for c in report.clients:
        assert c.duplicated == 0 and c.downtime is not None and c.downtime.recovered, c
        assert c.downtime_ms is not None and c.downtime_ms >= 50, c
        assert c.downtime_beyond_pause_ms is not None and c.downtime_beyond_pause_ms < 20, c


ALL_CHASSIS = ("chassis-1", "chassis-2", "chassis-3")


async def port_key(rig: Rig, port_id: str) -> int:
    """The port's tunnel key (as the controllers use it in reg7), read from the flows."""
    vm = rig.lab.vm("vm")
    ch = vm.active_vif.chassis  # type: ignore[union-attr]
    out = await asyncio.to_thread(rig.lab.ovs(ch).ofctl, "dump-flows", "br-int", "table=0")
    ofport = await asyncio.to_thread(rig.lab.ofport, ch, vm.active_vif.host_if)  # type: ignore[union-attr]
    for line in out.splitlines():
        if f"in_port={ofport} " in line or f"in_port={ofport}," in line:
            m = re.search(r"set_field:(0x[0-9a-f]+)->reg6", line)
            if m:
                return int(m.group(1), 16)
    raise AssertionError(f"no classification flow for {port_id} on {ch}")
