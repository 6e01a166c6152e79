"""``ferry controller``: run one chassis agent as a daemon."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import signal
from pathlib import Path
from typing import Annotated

import typer

from ferry.agent.agent import AgentConfig, ChassisAgent
from ferry.model.objects import LiveFallback, MigrationMode
from ferry.store import StoreURLError, open_store
from ferry.switch.ovsdb import parse_bridge_mappings


def setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def controller_command(
    chassis: Annotated[str, typer.Option(help="This chassis' name (Nova's host name).")],
    store: Annotated[str, typer.Option(help="Store URL: memory:// or etcd://host:port[,...]")],
    ovsdb: Annotated[str, typer.Option(help="OVSDB of this chassis, e.g. unix:/run/db.sock")],
    tunnel_ip: Annotated[str, typer.Option(help="This chassis' Geneve underlay address.")],
    rundir: Annotated[Path, typer.Option(help="Where the OpenFlow socket is made.")] = Path(
        "/run/ferry"),
    bridge: Annotated[str, typer.Option(help="The integration bridge.")] = "br-int",
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error")] = "info",
    bridge_mappings: Annotated[str, typer.Option(
        help="physnet:bridge[,...]: the physical networks this chassis reaches, each through "
        "an existing OVS bridge (e.g. physnet1:br-ex); patch ports to br-int are made at "
        "start.")] = "",
    migration_mode: Annotated[MigrationMode, typer.Option(
        help="live: bound to both chassis from the plug, activated in the datapath by the "
        "VM's first frame; spec: the spec's three steps only. A port's binding:profile "
        "ferry_migration_mode overrides it.")] = MigrationMode.LIVE,
    live_fallback: Annotated[LiveFallback, typer.Option(
        help="live mode, when the VM sends nothing on its new chassis (no RARP, as with "
        "vhost-user): source-unplug switches the port when Nova unplugs the source VIF; "
        "binding waits for the destination binding to become active. A port's "
        "binding:profile ferry_live_fallback overrides it.")] = LiveFallback.SOURCE_UNPLUG,
    pin_tunnel_routes: Annotated[bool, typer.Option(
        "--pin-tunnel-routes/--no-pin-tunnel-routes",
        help="Pin a copy of the kernel's route to each other chassis' tunnel IP in "
        "ovs-vswitchd's own table (ovs/route/add), kept in step with the kernel's route "
        "notifications, so that OVS's re-reading of the "
        "kernel's routes at every link change (VIFs plugged and unplugged) drops no "
        "tunnelled packet.")] = True,
) -> None:
    """Run the Ferry controller of one chassis."""
    try:
        ipaddress.ip_address(tunnel_ip)
    except ValueError:
        raise typer.BadParameter(f"{tunnel_ip!r} is not an IP address",
                                 param_hint="--tunnel-ip") from None
    if not ovsdb.startswith(("unix:", "tcp:")):
        raise typer.BadParameter(f"{ovsdb!r}: expected unix:PATH or tcp:HOST:PORT",
                                 param_hint="--ovsdb")
    try:
        mappings = parse_bridge_mappings(bridge_mappings)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--bridge-mappings") from None
    try:
        backend = open_store(store)
    except StoreURLError as e:
        raise typer.BadParameter(str(e), param_hint="--store") from None
    setup_logging(log_level)
    cfg = AgentConfig(chassis=chassis, tunnel_ip=tunnel_ip, ovsdb_url=ovsdb, rundir=rundir,
                      bridge=bridge, bridge_mappings=mappings, migration_mode=migration_mode,
                      live_fallback=live_fallback, pin_tunnel_routes=pin_tunnel_routes)
    asyncio.run(_run(ChassisAgent(cfg, backend)))


async def _run(agent: ChassisAgent) -> None:
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, task.cancel)
    try:
        await agent.run_forever()
    except asyncio.CancelledError:
        logging.getLogger(__name__).info("chassis %s: stopping", agent.name)
    finally:
        await agent.store.close()
