"""``ferry api``: serve the Neutron-compatible API."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer
import uvicorn

from ferry.api.app import create_app
from ferry.api.config import ApiConfig, ConfigError, load_config
from ferry.api.server import parse_listen
from ferry.store import StoreURLError, parse_etcd_endpoints

log = logging.getLogger(__name__)


def api_command(
    store: Annotated[str, typer.Option(
        "--store", help="Northbound store: memory:// or etcd://host:port[,host:port...]")
    ] = "memory://",
    listen: Annotated[str, typer.Option(
        "--listen", help="HOST:PORT to serve on (port defaults to 9696)")] = "127.0.0.1:9696",
    config: Annotated[Path | None, typer.Option(
        "--config", help="TOML file with the accepted tokens ([[tokens]] token, project_id, "
        "user, roles)", exists=True, dir_okay=False)] = None,
    noauth: Annotated[bool, typer.Option(
        "--noauth", help="Accept every request as admin of the default project (testing "
        "only)")] = False,
    log_level: Annotated[str, typer.Option("--log-level")] = "info",
) -> None:
    """Serve the Neutron-compatible networking API (openstacksdk, the openstack CLI, Nova)."""
    logging.basicConfig(level=log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        host, port = parse_listen(listen)
        cfg = load_config(config) if config is not None else ApiConfig()
        if store not in ("memory://", "memory"):
            parse_etcd_endpoints(store)  # checks the URL now rather than at startup
    except (ValueError, ConfigError, StoreURLError) as e:
        raise typer.BadParameter(str(e)) from None
    if not noauth and not cfg.tokens:
        raise typer.BadParameter("give --config FILE with [[tokens]], or --noauth explicitly")
    app = create_app(store, cfg, noauth=noauth)
    uvicorn.run(app, host=host, port=port, log_level=log_level.lower())
