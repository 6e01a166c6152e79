"""The FastAPI application: Neutron's v2.0 API over the northbound store."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI

from ferry.api import errors
from ferry.api.auth import Authenticator
from ferry.api.config import ApiConfig
from ferry.api.resources import (
    bindings,
    extensions,
    floatingips,
    migrations,
    networks,
    ports,
    routers,
    secgroups,
    subnets,
)
from ferry.model.northbound import Northbound
from ferry.store import open_store
from ferry.store.base import Store

log = logging.getLogger(__name__)


def create_app(
    store: str | Store | Callable[[], Store],
    config: ApiConfig | None = None,
    *,
    noauth: bool = False,
) -> FastAPI:
    """The API app. ``store``: a URL or a factory (opened and closed with the app), or a
    ``Store`` the caller owns. Without ``noauth`` only ``config``'s tokens are accepted."""
    config = config or ApiConfig()
    if not noauth and not config.tokens:
        log.warning("no tokens configured and --noauth not given: every request will be 401")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        owned = not isinstance(store, Store)
        if isinstance(store, str):
            opened = open_store(store)
        elif isinstance(store, Store):
            opened = store
        else:
            opened = store()
        app.state.nb = Northbound(opened)
        log.info("ferry api ready (store %s, %s)", type(opened).__name__,
                 "noauth" if noauth else f"{len(config.tokens)} tokens")
        try:
            yield
        finally:
            if owned:
                await opened.close()

    app = FastAPI(title="Ferry Networking API", version="2.0",
                  description="A Neutron-compatible API for Ferry's northbound database.",
                  lifespan=lifespan)
    app.state.auth = Authenticator(config, noauth)
    errors.install(app)
    for module in (extensions, networks, subnets, ports, bindings, routers, floatingips,
                   secgroups, migrations):
        app.include_router(module.router)
    return app
