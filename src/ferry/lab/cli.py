"""``ferry lab``: real chassis on one machine, driven from the command line."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import sys
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from ferry.lab.host import RCU_EXPEDITED, restore_rcu
from ferry.lab.lab import Lab, LabError, destroy_leftovers, list_labs
from ferry.lab.neutron import Neutron, NeutronError
from ferry.lab.services import serve, start_control_plane
from ferry.lab.state import VmState

app = typer.Typer(no_args_is_help=True, help="A lab of real OVS chassis on this machine.")
vm_app = typer.Typer(no_args_is_help=True, help="VMs (network namespaces) of a lab.")
app.add_typer(vm_app, name="vm")
console = Console()

LabOpt = Annotated[str | None, typer.Option("--lab", help="The lab's prefix (default: the "
                                            "only lab on this machine).")]


def _binding_activation(value: str) -> str:
    from ferry.lab.migrate import check_binding_activation

    try:
        return check_binding_activation(value)
    except LabError as e:
        raise typer.BadParameter(str(e)) from None


BindingActivationOpt = Annotated[str, typer.Option(
    "--binding-activation", callback=_binding_activation,
    help="When Nova activates the destination's port binding: after-unplug (the spec's "
         "order), before-unplug (Nova's post-live-migration with port bindings) or at-pause "
         "(Nova's default: on libvirt's event that the source paused for the last copy).")]


def fail(message: str) -> typer.Exit:
    console.print(f"[red]error:[/red] {message}", highlight=False)
    return typer.Exit(2)


def pick_lab(prefix: str | None) -> Lab:
    if prefix is None:
        labs = list_labs()
        if len(labs) != 1:
            raise fail(f"{len(labs)} labs exist ({', '.join(labs) or 'none'}); name one "
                       "with --lab")
        prefix = labs[0]
    try:
        return Lab.load(prefix)
    except (LabError, FileNotFoundError) as e:
        raise fail(f"no lab {prefix!r}: {e}") from None


def api_of(lab: Lab) -> Neutron:
    api = lab.service("api")
    if api is None or not api.url:
        raise fail(f"lab {lab.prefix} has no API running (was it started with ferry lab up?)")
    return Neutron(api.url)


@app.command()
def up(
    chassis: Annotated[int, typer.Option("--chassis", min=1, max=16)] = 3,
    store: Annotated[str, typer.Option(
        "--store", help="memory (one process), etcd (a new etcd for the lab), or "
        "etcd://host:port[,...]")] = "memory",
) -> None:
    """Create a lab: chassis with OVS, an underlay, the store, the API and the controllers."""
    try:
        lab = Lab.create(chassis)
    except LabError as e:
        raise fail(str(e)) from None
    try:
        start_control_plane(lab, store)
    except (LabError, OSError) as e:
        lab.destroy()
        raise fail(str(e)) from None
    api = lab.service("api")
    console.print(f"lab [bold]{lab.prefix}[/bold] is up: {chassis} chassis, store {store}, "
                  f"API {api.url if api else '?'}", highlight=False)


@app.command()
def down(
    lab: LabOpt = None,
    all_labs: Annotated[bool, typer.Option("--all", help="Every lab on this machine.")] = False,
) -> None:
    """Stop every process of a lab (by PID) and remove its namespaces and links."""
    prefixes = list_labs() if all_labs else [pick_lab(lab).prefix]
    ok = True
    for prefix in prefixes:
        report = Lab.load(prefix).destroy()
        report.merge(destroy_leftovers(prefix))
        ok &= report.ok
        console.print(f"lab {prefix}: removed {len(report.removed)} things in "
                      f"{report.seconds:.2f}s" + ("" if report.ok else
                                                  f"; errors: {report.errors}"))
    if all_labs:
        back = restore_rcu()
        if back is not None:
            console.print(f"{RCU_EXPEDITED} put back to {back} (set by a run that died)",
                          highlight=False)
    if not ok:
        raise typer.Exit(1)


@app.command()
def status(lab: LabOpt = None,
           as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """What a lab is made of: chassis, VMs, services and their processes."""
    st = pick_lab(lab).status()
    if as_json:
        sys.stdout.write(json.dumps(st, indent=2) + "\n")
        return
    t = Table(title=f"lab {st['prefix']}")
    for col in ("chassis", "netns", "tunnel IP", "OVSDB", "controller PID"):
        t.add_column(col)
    for ch in st["chassis"]:
        t.add_row(ch["name"], ch["netns"], ch["tunnel_ip"], ch["ovsdb_socket"],
                  f"{ch['controller_pid']} ({'up' if ch['controller_alive'] else 'down'})"
                  if ch["controller_pid"] else "-")
    console.print(t)
    v = Table(title="VMs")
    for col in ("VM", "netns", "port", "chassis", "MAC", "IP"):
        v.add_column(col)
    for vm in st["vms"]:
        v.add_row(vm["name"], vm["netns"], vm["port_id"], vm["chassis"], vm["mac"], vm["ip"])
    console.print(v)
    for name, svc in st["services"].items():
        console.print(f"{name}: {svc['url'] or ''} pid {svc['pid']} "
                      f"({'up' if svc['alive'] else 'down'})", highlight=False)


@app.command("serve", hidden=True)
def serve_cmd(lab: LabOpt = None, log_level: str = "info") -> None:
    """Run the embedded store, the API and every controller of a lab (started by up)."""
    logging.basicConfig(level=log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    the_lab = pick_lab(lab)

    async def main() -> None:
        task = asyncio.current_task()
        assert task is not None
        for sig in (signal.SIGTERM, signal.SIGINT):
            asyncio.get_running_loop().add_signal_handler(sig, task.cancel)
        with contextlib.suppress(asyncio.CancelledError):
            await serve(the_lab)

    asyncio.run(main())


@vm_app.command("create")
def vm_create(
    name: str,
    port: Annotated[str, typer.Option("--port", help="The logical port (its id).")],
    chassis: Annotated[str, typer.Option("--chassis", help="e.g. chassis-1")],
    lab: LabOpt = None,
    wait_s: Annotated[float, typer.Option(
        "--wait", help="Seconds to wait for the port to become ACTIVE (0: don't)")] = 10.0,
) -> None:
    """A VM on a chassis for a port: MAC and IP come from the port (as Nova's VIF plug),
    then wait until the controller reports the port ACTIVE (as Nova waits for vif-plugged)."""
    from ferry.lab.nova import boot

    the_lab = pick_lab(lab)

    async def main() -> VmState:
        async with api_of(the_lab) as api:
            return await boot(the_lab, api, name, port, chassis, wait_s)

    try:
        vm = asyncio.run(main())
    except (NeutronError, LabError) as e:
        raise fail(str(e)) from None
    console.print(f"VM {vm.name} ({vm.mac}, {vm.ip_cidr}) on {chassis}, namespace {vm.netns}",
                  highlight=False)


@vm_app.command("exec", context_settings={"allow_extra_args": True,
                                          "ignore_unknown_options": True})
def vm_exec(ctx: typer.Context, name: str, lab: LabOpt = None) -> None:
    """Run a command inside a VM: ferry lab vm exec NAME -- ping -c1 10.0.0.5"""
    argv = list(ctx.args)
    if not argv:
        raise fail("no command given (ferry lab vm exec NAME -- COMMAND...)")
    try:
        r = pick_lab(lab).exec_in_vm(name, argv, timeout=3600)
    except LabError as e:
        raise fail(str(e)) from None
    sys.stdout.write(r.stdout)
    sys.stderr.write(r.stderr)
    raise typer.Exit(r.returncode)


@vm_app.command("delete")
def vm_delete(name: str, lab: LabOpt = None) -> None:
    """Unplug and remove a VM."""
    try:
        pick_lab(lab).delete_vm(name)
    except LabError as e:
        raise fail(str(e)) from None


@app.command()
def migrate(
    vm: str,
    to: Annotated[str, typer.Option("--to", help="The destination chassis.")],
    pause_ms: Annotated[float, typer.Option("--pause-ms", min=0,
                                            help="The VM's stop-and-copy pause.")] = 50.0,
    unplug_delay_ms: Annotated[float, typer.Option(
        "--unplug-delay-ms", min=0, help="From resume to Nova's post-migration step "
        "(source unplug, binding activation).")] = 100.0,
    binding_activation: BindingActivationOpt = "after-unplug",
    lab: LabOpt = None,
) -> None:
    """Live-migrate a VM as Nova and libvirt do, through the API, and print the timeline."""
    from ferry.lab.migrate import migrate as do_migrate
    from ferry.migration_cli import print_timeline

    the_lab = pick_lab(lab)

    async def main() -> None:
        async with api_of(the_lab) as api:
            run = await do_migrate(the_lab, api, vm, to, pause_ms=pause_ms,
                                   unplug_delay_ms=unplug_delay_ms,
                                   binding_activation=binding_activation)
        console.print(f"{vm}: {run.source} → {run.dest}, pause {pause_ms:.0f} ms",
                      highlight=False)
        if run.record:
            print_timeline(run.record, console)

    try:
        asyncio.run(main())
    except (NeutronError, LabError) as e:
        raise fail(str(e)) from None
