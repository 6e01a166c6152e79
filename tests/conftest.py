"""Shared fixtures: the store under both backends.

The etcd backend runs against a real etcd server (Debian's etcd-server) that the fixture starts
with its own data directory and ports, and stops by PID.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from ferry.store.base import Store
from ferry.store.memory import MemoryStore


@pytest.fixture(scope="session")
def etcd_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    from ferry.lab.etcd_server import EtcdServer

    server = EtcdServer(Path(tmp_path_factory.mktemp("etcd")))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(params=["memory", pytest.param("etcd", marks=pytest.mark.etcd)])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[Store]:
    """A fresh, empty store of each backend."""
    if request.param == "memory":
        s: Store = MemoryStore()
    else:
        from ferry.store.etcd import EtcdStore

        server = request.getfixturevalue("etcd_server")
        # A fresh key prefix per test keeps tests independent on one server.
        s = EtcdStore(server.endpoints, prefix=f"/t-{uuid.uuid4().hex[:12]}")
    try:
        yield s
    finally:
        await s.close()
