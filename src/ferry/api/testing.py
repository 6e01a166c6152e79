"""Helpers for tests and benchmarks: known tokens, a served API, an openstacksdk connection."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

from ferry.api.app import create_app
from ferry.api.config import ApiConfig, TokenConfig
from ferry.api.server import ThreadedServer
from ferry.store.base import Store

ADMIN_TOKEN = "admin-token-0001"
ALICE_TOKEN = "alice-token-0001"  # member of project-a
BOB_TOKEN = "bob-token-00001"  # member of project-b
PROJECT_ADMIN, PROJECT_A, PROJECT_B = "admin", "project-a", "project-b"

CONFIG = ApiConfig(tokens=(
    TokenConfig(token=ADMIN_TOKEN, project_id=PROJECT_ADMIN, user="admin", roles=("admin",)),
    TokenConfig(token=ALICE_TOKEN, project_id=PROJECT_A, user="alice", roles=("member",)),
    TokenConfig(token=BOB_TOKEN, project_id=PROJECT_B, user="bob", roles=("member",)),
))


def etcd_factory(endpoints: list[tuple[str, int]]) -> Callable[[], Store]:
    """A factory for a fresh etcd-backed store (own key prefix) opened on the server's loop."""
    prefix = f"/api-{uuid.uuid4().hex[:12]}"

    def make() -> Store:
        from ferry.store.etcd import EtcdStore

        return EtcdStore(endpoints, prefix=prefix)

    return make


def serve(store: Store | Callable[[], Store] | str, *, noauth: bool = False,
          config: ApiConfig = CONFIG) -> ThreadedServer:
    """The API on 127.0.0.1 and a free port, started (stop() it)."""
    return ThreadedServer(create_app(store, config, noauth=noauth)).start()


def connect(url: str, token: str) -> Any:
    """An unmodified openstacksdk connection without Keystone (keystoneauth's admin_token)."""
    import openstack

    return openstack.connect(auth_type="admin_token", auth={"endpoint": url, "token": token},
                             region_name="RegionOne")
