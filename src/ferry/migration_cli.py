"""``ferry migration list/show``: the live migrations the controllers recorded."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from ferry.lab.neutron import Neutron, NeutronError

app = typer.Typer(no_args_is_help=True, help="Live migrations and their timelines.")
console = Console()

ApiOpt = Annotated[str | None, typer.Option(
    "--api", help="The API's URL (default: the lab's, if exactly one lab runs here).")]
TokenOpt = Annotated[str | None, typer.Option("--token", envvar="OS_TOKEN")]


def _api_url(api: str | None) -> str:
    if api is not None:
        return api
    from ferry.lab.cli import api_of, pick_lab

    return api_of(pick_lab(None)).url


def _get(api: str | None, token: str | None, path: str) -> Any:
    async def call() -> Any:
        async with Neutron(_api_url(api), token) as n:
            return await n.call("GET", path)

    try:
        return asyncio.run(call())
    except NeutronError as e:
        console.print(f"[red]error:[/red] {e}", highlight=False)
        raise typer.Exit(2) from None


def print_timeline(m: dict[str, Any], out: Console) -> None:
    """Each step and each chassis' flow ack, in ms from the destination's claim."""
    stamps: dict[str, float] = m["timestamps"]
    t0 = stamps.get("plugged", min(stamps.values(), default=0.0))
    how = f"{m['status']}, {m.get('mode', '?')} mode"
    if m.get("mode") == "live":
        how += f", fallback {m.get('fallback', '?')}" + (
            ", activated by the VM's first frame" if m.get("activated") else "")
    t = Table(title=f"migration of port {m['port_id']}: {m['source_chassis']} → "
                    f"{m['dest_chassis']} ({how})")
    t.add_column("event")
    t.add_column("ms", justify="right")
    for name, at in sorted(stamps.items(), key=lambda kv: kv[1]):
        t.add_row(name, f"{(at - t0) * 1000:.1f}")
    out.print(t)


@app.command("list")
def list_cmd(api: ApiOpt = None, token: TokenOpt = None) -> None:
    """Every migration: port, source, destination, status, mode, whether activated."""
    t = Table()
    for col in ("port", "source", "destination", "status", "mode", "activated", "steps"):
        t.add_column(col)
    for m in _get(api, token, "/ferry/migrations")["migrations"]:
        t.add_row(m["port_id"], m["source_chassis"], m["dest_chassis"], m["status"],
                  m.get("mode", "?"), "yes" if m.get("activated") else "no",
                  str(len(m["timestamps"])))
    console.print(t)


@app.command("show")
def show_cmd(port_id: str, api: ApiOpt = None, token: TokenOpt = None) -> None:
    """One migration's timeline."""
    print_timeline(_get(api, token, f"/ferry/migrations/{port_id}")["migration"], console)
