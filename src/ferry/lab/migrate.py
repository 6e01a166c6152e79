"""A live migration in the lab, performed as Nova and libvirt do it, in their order.

1. Nova (pre-live-migration): creates the destination port binding (inactive) and sets
   ``binding:profile.migrating_to``; the destination's VIF is plugged with the VM not yet
   running there (its link down). The destination controller claims the port (step 1).
2. libvirt: the VM stops on the source (the stop-and-copy pause), and resumes on the
   destination ``pause_ms`` later, QEMU's RARP leaving just before the vCPUs start.
3. Nova (post-live-migration), ``unplug_delay_ms`` later: unplugs the source VIF (step 2 of
   the spec: note that the VM already runs on the destination by then), activates the
   destination binding (step 3), deletes the source binding and clears ``migrating_to``.
   When the destination binding is activated is :data:`BINDING_ACTIVATIONS`: after the
   unplug is the spec's order; Nova with port bindings (Rocky on) activates it before, and by
   default already when libvirt reports the source paused for the last copy.
Every API call goes through the Neutron API; every host action through the lab. The times of
each action are returned, on the wall clock and on CLOCK_MONOTONIC (which the probe uses).
"""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable
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

BINDING_ACTIVATIONS = ("after-unplug", "before-unplug", "at-pause")
"""When Nova activates the destination's port binding (the spec's step 3).
``after-unplug``: the spec's order, step 2 then step 3 (Nova before port bindings updated
``binding:host_id`` after unplugging). ``before-unplug``: Nova's post-live-migration with port
bindings (``migrate_instance_start``, then the source VIFs' unplug), as with
``[workarounds]handle_virt_lifecycle_events = False``. ``at-pause``: Nova's default since Rocky:
the source's libvirt event "migration completed" (the VM paused for the last copy) makes
``handle_lifecycle_event`` activate it, so that the network can follow before the VM resumes;
post-live-migration's own activation then finds it active (409, which Nova accepts). The lab
sends it the moment the VM stops: the earliest Nova could."""


def check_binding_activation(value: str) -> str:
    """``value`` if it is one of :data:`BINDING_ACTIVATIONS`, else a LabError naming it."""
    if value not in BINDING_ACTIVATIONS:
        raise LabError(f"{value!r}: want one of {', '.join(BINDING_ACTIVATIONS)}")
    return value


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
                  mode: str | None = None, links: str = "steady",
                  binding_activation: str = "after-unplug") -> MigrationRun:
    """The whole sequence: :func:`pre_migration`, :func:`stop_and_resume`, a delay,
    :func:`unplug_source` and :func:`post_migration`, with the destination binding activated
    where ``binding_activation`` (one of :data:`BINDING_ACTIVATIONS`) says; then wait for the
    controllers to mark the migration done."""
    check_binding_activation(binding_activation)
    run = await pre_migration(lab, api, vm, dest, pause_ms=pause_ms,
                              plug_timeout=plug_timeout, mode=mode, links=links)
    if binding_activation == "at-pause":
        await stop_and_resume(lab, run, on_paused=lambda: activate_destination(api, run))
    else:
        await stop_and_resume(lab, run)
    await asyncio.sleep(unplug_delay_ms / 1000)
    early = binding_activation != "after-unplug"
    if early:  # Nova's migrate_instance_start, before the unplug
        await activate_destination(api, run)
    await unplug_source(lab, run)
    await post_migration(api, run, activate=not early)
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


async def stop_and_resume(lab: Lab, run: MigrationRun, rarps: int = 1,
                          on_paused: Callable[[], Awaitable[None]] | None = None) -> None:
    """libvirt's part: the stop-and-copy pause, then the resume with QEMU's RARP (``rarps``
    of them; 0 for a VM that says nothing on resume, as with vhost-user), done inside the
    VM's namespace by one process so that the times are exact to the microsecond.
    ``on_paused``: run the moment the VM stops (what Nova does on libvirt's event), alongside
    the pause; this returns once both are over, and raises what it raised."""
    if on_paused is None:
        await stop_and_resume_times(lab, run, rarps)
    else:
        loop = asyncio.get_running_loop()
        stopped = asyncio.Event()

        def tell() -> None:  # from the thread that reads the hypervisor's output
            loop.call_soon_threadsafe(stopped.set)

        reaction = asyncio.ensure_future(_after(stopped, on_paused))
        try:
            await stop_and_resume_times(lab, run, rarps, tell)
            if not stopped.is_set():
                raise LabError(f"the hypervisor never said {run.vm} stopped")
            await reaction
        finally:
            reaction.cancel()
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


async def _after(event: asyncio.Event, action: Callable[[], Awaitable[None]]) -> None:
    await event.wait()
    await action()


async def stop_and_resume_times(lab: Lab, run: MigrationRun, rarps: int,
                                on_paused: Callable[[], None] | None = None) -> None:
    """Run the hypervisor's move and record its times in ``run`` (pause, resume, RARP).
    ``on_paused`` is called (from another thread) the moment the VM stops."""
    times = await asyncio.to_thread(hypervisor_move, lab, run.vm, run.source, run.dest,
                                    run.pause_ms, rarps, freeze=run.links == "steady",
                                    on_paused=on_paused)
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


async def activate_destination(api: Neutron, run: MigrationRun) -> None:
    """Activate the destination's binding (the spec's step 3), as Nova does: one that is
    already active (Neutron's 409 ``PortBindingAlreadyActive``) is fine. The first call
    that finds it inactive marks ``binding_activated``."""
    try:
        await api.activate_binding(run.port_id, run.dest)
    except NeutronError as e:
        if e.status != 409 or "PortBindingAlreadyActive" not in str(e):
            raise
        return
    run.mark("binding_activated")


async def post_migration(api: Neutron, run: MigrationRun, activate: bool = True) -> None:
    """Nova's post-live-migration, in Neutron: activate the destination binding (spec step
    3) unless ``activate`` is False (done before), delete the source's, clear
    ``migrating_to``."""
    if activate:
        await activate_destination(api, run)
    await api.delete_binding(run.port_id, run.source)
    await api.update("port", run.port_id, **{"binding:profile": run.profile})
    run.mark("profile_cleared")


def hypervisor_move(lab: Lab, vm: str, source: str, dest: str, pause_ms: float,
                    rarps: int = 1, freeze: bool = True,
                    rt_prio: int = HYPERVISOR_RT_PRIORITY,
                    on_paused: Callable[[], None] | None = None,
                    timeout: float = 30.0) -> dict[str, Any]:
    """Stop the VM on ``source`` and resume it on ``dest`` after ``pause_ms``, with RARPs
    (``source`` == ``dest``: a pause in place, on the same VIF). ``freeze``: the VM stops
    using its source VIF but the link stays up (else it goes down). ``rt_prio``: the
    process' SCHED_FIFO priority (0: normal scheduling). ``on_paused``: called the moment
    the VM stops, while the pause goes on."""
    v = lab.vm(vm)
    down, up = v.vif(lab.chassis(source).name), v.vif(lab.chassis(dest).name)
    if down is None or up is None:
        raise LabError(f"VM {vm} must be plugged on both {source} and {dest}")
    if down is up and not freeze:
        raise LabError(f"pausing {vm} in place needs freeze (its link stays up)")
    argv = [sys.executable, "-m", "ferry.probe.agent", "move", "--down", down.guest_if,
            "--up", up.guest_if, "--pause-ms", str(pause_ms), "--mac", v.mac,
            "--rarp", str(rarps), "--rt-prio", str(rt_prio),
            *(["--stop", "freeze", "--address", v.ip_cidr] if freeze else ["--stop", "down"]),
            *(["--gateway", v.gateway] if freeze and v.gateway else []),
            *(["--tell-pause"] if on_paused is not None else [])]
    proc = lab.popen_in_vm(vm, argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)
    watchdog = threading.Timer(timeout, proc.kill)
    watchdog.start()
    try:
        assert proc.stdout is not None and proc.stderr is not None
        last = ""
        for line in proc.stdout:  # the pause as it happens, then the times at the end
            if on_paused is not None and line.startswith('{"paused_ns"'):
                on_paused()
            elif line.strip():
                last = line
        err = proc.stderr.read()
        rc = proc.wait()
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if rc != 0:
        raise LabError(f"moving {vm} from {source} to {dest} failed (exit {rc}): "
                       f"{err.strip()}")
    times: dict[str, Any] = json.loads(last)
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
