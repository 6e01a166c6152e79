"""A live migration in the lab, performed as Nova and libvirt do it, in their order.

1. Nova (pre-live-migration): creates the destination port binding (inactive) and sets
   ``binding:profile.migrating_to``; the destination's VIF is plugged with the VM not yet
   running there (its link down). The destination controller claims the port (step 1).
2. libvirt: the VM stops on the source (the stop-and-copy pause), and resumes on the
   destination ``pause_ms`` later, QEMU's RARP leaving just before the vCPUs start.
3. Nova (post-live-migration), ``unplug_delay_ms`` later: unplugs the source VIF (step 2 of
   the spec: note that the VM already runs on the destination by then), activates the
   destination binding (step 3), deletes the source binding and clears ``migrating_to``.
Every API call goes through the Neutron API; every host action through the lab. The times of
each action are returned, on the wall clock and on CLOCK_MONOTONIC (which the probe uses).
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ferry.lab.lab import Lab, LabError
from ferry.lab.neutron import Neutron, NeutronError
from ferry.model.objects import LIVE_FALLBACK_KEY, MIGRATION_MODE_KEY

log = logging.getLogger(__name__)

LINKS = ("steady", "flap")
"""How the lab's hypervisor pauses and resumes a VM. ``steady``, as QEMU with taps: the
destination's link is up from the plug, the pause freezes the VM on the source without touching
its link, the RARP leaves just before the resume (QEMU's order); the source link goes with
Nova's unplug. ``flap``: the source link goes down at the pause and the destination's comes up
at the resume (then the RARP), so each chassis' OVS reconfigures its port inside the measured
downtime."""

HYPERVISOR_RT_PRIORITY = 50
"""SCHED_FIFO priority of the lab's hypervisor process (the pause and the resume): above every
other real-time thread of the lab (probe clients, OVS), so that the pause lasts what it is
told. On two cores the RARP's processing otherwise preempted it for up to 1.8 ms, which
lengthened the measured pause by as much and hid that much of the network's own time in it."""


@dataclass
class MigrationRun:
    vm: str
    port_id: str
    source: str
    dest: str
    pause_ms: float
    events: dict[str, float] = field(default_factory=dict)  # name → CLOCK_MONOTONIC ns
    wall: dict[str, float] = field(default_factory=dict)  # name → wall-clock seconds
    profile: dict[str, Any] = field(default_factory=dict)  # binding:profile before the move
    links: str = "steady"  # how the hypervisor's pause and resume show on the VIFs: LINKS
    hypervisor_sched: str = ""  # the scheduling the hypervisor process got, as it reported
    mode: str = "?"  # the migration mode the destination decided at its claim
    record: dict[str, Any] | None = None  # the Migration record at the end, if readable

    def mark(self, name: str) -> None:
        self.events[name] = time.monotonic_ns()
        self.wall[name] = time.time()

    @property
    def pause_window_ns(self) -> tuple[int, int]:
        return int(self.events["paused"]), int(self.events["resumed"])


async def migrate(lab: Lab, api: Neutron, vm: str, dest: str, *, pause_ms: float = 50.0,
                  unplug_delay_ms: float = 100.0, plug_timeout: float = 10.0,
                  mode: str | None = None, links: str = "steady") -> MigrationRun:
    """The whole sequence: :func:`pre_migration`, :func:`stop_and_resume`, a delay,
    :func:`post_migration`, then wait for the controllers to mark the migration done."""
    run = await pre_migration(lab, api, vm, dest, pause_ms=pause_ms,
                              plug_timeout=plug_timeout, mode=mode, links=links)
    await stop_and_resume(lab, run)
    await asyncio.sleep(unplug_delay_ms / 1000)
    await unplug_source(lab, run)
    await post_migration(api, run)
    run.record = await wait_done(api, run.port_id, plug_timeout)
    run.mark("done")
    return run


async def pre_migration(lab: Lab, api: Neutron, vm: str, dest: str, *, pause_ms: float = 50.0,
                        plug_timeout: float | None = 10.0,
                        mode: str | None = None, links: str = "steady",
                        fallback: str | None = None) -> MigrationRun:
    """Nova's pre-live-migration: an inactive binding for ``dest``, ``migrating_to``, and the
    destination VIF plugged with the VM not running there yet. Waits for the destination's
    claim unless ``plug_timeout`` is None; in live mode also until every chassis with a VM
    has acknowledged its flows for the port (the destination ready before the VM resumes).
    ``mode`` (spec or live) and ``fallback`` (live mode: source-unplug or binding) override
    the deployment's, through the binding's profile. ``links``: one of :data:`LINKS`."""
    if links not in LINKS:
        raise LabError(f"links {links!r}: want one of {', '.join(LINKS)}")
    v = lab.vm(vm)
    active = v.active_vif
    if active is None:
        raise LabError(f"VM {vm} runs nowhere")
    source = active.chassis
    dest = lab.chassis(dest).name
    if dest == source:
        raise LabError(f"VM {vm} already runs on {dest}")
    port = await api.get("port", v.port_id)
    run = MigrationRun(vm, v.port_id, source, dest, pause_ms, links=links,
                       profile=dict(port.get("binding:profile") or {}))
    profile = {k: v for k, v in ((MIGRATION_MODE_KEY, mode), (LIVE_FALLBACK_KEY, fallback))
               if v is not None}
    await api.create_binding(v.port_id, dest,
                             vnic_type=port.get("binding:vnic_type", "normal"),
                             **({"profile": profile} if profile else {}))
    await api.update("port", v.port_id, **{"binding:profile": {**run.profile,
                                                                "migrating_to": dest}})
    run.mark("binding_created")
    await asyncio.to_thread(lab.plug_vif, vm, dest, False, links == "steady")
    run.mark("dest_plugged")
    if plug_timeout is not None:
        m = await wait_claimed(api, v.port_id, dest, plug_timeout)
        run.mode = m["mode"]
        run.mark("dest_claimed")
        if run.mode == "live":
            hosts = {vif.chassis for other in lab.state.vms for vif in other.vifs}
            await wait_acked(api, v.port_id, hosts, plug_timeout)
            run.mark("dest_ready")
    return run


async def stop_and_resume(lab: Lab, run: MigrationRun, rarps: int = 1) -> None:
    """libvirt's part: the stop-and-copy pause, then the resume with QEMU's RARP (``rarps``
    of them; 0 for a VM that says nothing on resume, as with vhost-user), done inside the
    VM's namespace by one process so that the times are exact to the microsecond."""
    await stop_and_resume_times(lab, run, rarps)
    # the lab's records (no link changes with steady links)
    await asyncio.to_thread(lab.stop_on, run.vm, run.source, run.links == "steady")
    await asyncio.to_thread(lab.set_link, run.vm, run.dest, True)


IN_PLACE = "in-place"
"""Not a migration: the VM paused and resumed on its own VIF, as :func:`pause_in_place` does.
Under the same probe, it measures the floor that any migration's downtime is compared with."""


async def pause_in_place(lab: Lab, vm: str, pause_ms: float, rarps: int = 1) -> MigrationRun:
    """The hypervisor's pause and resume with the VM staying where it runs: frozen on its VIF
    (steady link), resumed on the same VIF ``pause_ms`` later, with its RARP. No API call, no
    flow changes: the downtime it shows is the probe's and the pause mechanics' own."""
    v = lab.vm(vm)
    active = v.active_vif
    if active is None:
        raise LabError(f"VM {vm} runs nowhere")
    where = active.chassis
    run = MigrationRun(vm, v.port_id, where, where, pause_ms, mode=IN_PLACE)
    await stop_and_resume_times(lab, run, rarps)
    run.mark("done")
    return run


async def stop_and_resume_times(lab: Lab, run: MigrationRun, rarps: int) -> None:
    """Run the hypervisor's move and record its times in ``run`` (pause, resume, RARP)."""
    times = await asyncio.to_thread(hypervisor_move, lab, run.vm, run.source, run.dest,
                                    run.pause_ms, rarps, freeze=run.links == "steady")
    run.hypervisor_sched = str(times.get("sched", ""))
    if not run.hypervisor_sched.startswith("fifo"):
        log.warning("the hypervisor ran without real-time priority (%s): OVS can stretch "
                    "the pause it measures", run.hypervisor_sched)
    for name, key in (("paused", "down_ns"), ("resumed", "up_ns"), ("announced", "rarp_ns")):
        run.events[name] = times[key]
        run.wall[name] = time.time() - (time.monotonic_ns() - times[key]) / 1e9


async def unplug_source(lab: Lab, run: MigrationRun) -> None:
    """Nova's post-live-migration, on the source host: the VIF goes away (spec step 2)."""
    run.mark("unplugging")
    await asyncio.to_thread(lab.unplug_vif, run.vm, run.source)
    run.mark("source_unplugged")


async def post_migration(api: Neutron, run: MigrationRun) -> None:
    """Nova's post-live-migration, in Neutron: activate the destination binding (spec step
    3), delete the source's, clear ``migrating_to``."""
    await api.activate_binding(run.port_id, run.dest)
    run.mark("binding_activated")
    await api.delete_binding(run.port_id, run.source)
    await api.update("port", run.port_id, **{"binding:profile": run.profile})
    run.mark("profile_cleared")


def hypervisor_move(lab: Lab, vm: str, source: str, dest: str, pause_ms: float,
                    rarps: int = 1, freeze: bool = True,
                    rt_prio: int = HYPERVISOR_RT_PRIORITY) -> dict[str, Any]:
    """Stop the VM on ``source`` and resume it on ``dest`` after ``pause_ms``, with RARPs
    (``source`` == ``dest``: a pause in place, on the same VIF). ``freeze``: the VM stops
    using its source VIF but the link stays up (else it goes down). ``rt_prio``: the
    process' SCHED_FIFO priority (0: normal scheduling)."""
    v = lab.vm(vm)
    down, up = v.vif(lab.chassis(source).name), v.vif(lab.chassis(dest).name)
    if down is None or up is None:
        raise LabError(f"VM {vm} must be plugged on both {source} and {dest}")
    if down is up and not freeze:
        raise LabError(f"pausing {vm} in place needs freeze (its link stays up)")
    r = lab.exec_in_vm(vm, [sys.executable, "-m", "ferry.probe.agent", "move", "--down",
                            down.guest_if, "--up", up.guest_if, "--pause-ms", str(pause_ms),
                            "--mac", v.mac, "--rarp", str(rarps), "--rt-prio", str(rt_prio),
                            *(["--stop", "freeze", "--address", v.ip_cidr] if freeze
                              else ["--stop", "down"]),
                            *(["--gateway", v.gateway] if freeze and v.gateway else [])])
    if r.returncode != 0:
        raise LabError(f"moving {vm} from {source} to {dest} failed: {r.stderr.strip()}")
    times: dict[str, Any] = json.loads(r.stdout)
    return times


async def migration_record(api: Neutron, port_id: str) -> dict[str, Any] | None:
    try:
        out: dict[str, Any] = (await api.call("GET", f"/ferry/migrations/{port_id}"))[
            "migration"]
        return out
    except NeutronError as e:
        if e.status == 404:
            return None
        raise


async def wait_record(api: Neutron, port_id: str, ready: Callable[[dict[str, Any]], bool],
                      within: float, interval: float = 0.005) -> dict[str, Any]:
    """The port's Migration record once ``ready`` holds for it. The API has no push channel:
    poll it, as Nova would wait for an event."""
    async with asyncio.timeout(within):
        while True:
            m = await migration_record(api, port_id)
            if m and ready(m):
                return m
            await asyncio.sleep(interval)


async def wait_claimed(api: Neutron, port_id: str, dest: str, within: float
                       ) -> dict[str, Any]:
    """The destination controller has claimed the port (step 1 recorded)."""
    return await wait_record(api, port_id, lambda m: m["dest_chassis"] == dest and m[
        "status"] in ("plugged", "source_unplugged"), within)


async def wait_acked(api: Neutron, port_id: str, chassis: set[str], within: float) -> None:
    """Every one of ``chassis`` has acknowledged its flows for the claimed migration."""
    await wait_record(api, port_id, lambda m: all(
        f"acked.{ch}.plugged" in m.get("timestamps", {}) for ch in chassis), within)


async def wait_done(api: Neutron, port_id: str, within: float) -> dict[str, Any] | None:
    """The record once done or rolled back; as it is if that takes longer than ``within``."""
    try:
        return await wait_record(api, port_id,
                                 lambda m: m["status"] in ("done", "rolled_back"), within, 0.01)
    except TimeoutError:
        return await migration_record(api, port_id)
