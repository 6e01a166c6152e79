"""The `ferry` command line. Subcommands are added by the modules that own them."""

from __future__ import annotations

import typer

app = typer.Typer(no_args_is_help=True, help="Ferry: an SDN controller for Open vSwitch.")


@app.command()
def version() -> None:
    """Print Ferry's version."""
    from ferry import __version__

    typer.echo(__version__)


def _register() -> None:
    from ferry.agent.cli import controller_command
    from ferry.api.cli import api_command
    from ferry.demo import demo_command
    from ferry.lab.cli import app as lab_app
    from ferry.migration_cli import app as migration_app

    app.command("controller")(controller_command)
    app.command("api")(api_command)
    app.command("demo")(demo_command)
    app.add_typer(lab_app, name="lab")
    app.add_typer(migration_app, name="migration")


_register()
