"""The northbound store: one contract (``base.Store``), backends chosen by URL."""

from __future__ import annotations

from urllib.parse import urlsplit

from ferry.store.base import Store


class StoreURLError(ValueError):
    """A store URL that names no backend or is malformed."""


def parse_etcd_endpoints(url: str) -> list[tuple[str, int]]:
    """``etcd://host:port[,host:port...]`` → [(host, port), ...]."""
    parts = urlsplit(url)
    if parts.scheme != "etcd" or not parts.netloc:
        raise StoreURLError(f"{url!r}: expected etcd://host:port[,host:port...]")
    endpoints = []
    for item in parts.netloc.split(","):
        host, sep, port = item.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise StoreURLError(f"{url!r}: endpoint {item!r} is not host:port")
        endpoints.append((host, int(port)))
    return endpoints


def open_store(url: str) -> Store:
    """The store a URL names: ``memory://`` or ``etcd://host:port[,host:port...]``."""
    if url in ("memory://", "memory"):
        from ferry.store.memory import MemoryStore

        return MemoryStore()
    if url.startswith("etcd://"):
        from ferry.store.etcd import EtcdStore

        etcd: Store = EtcdStore(parse_etcd_endpoints(url))
        return etcd
    raise StoreURLError(f"{url!r}: unknown store; use memory:// or etcd://host:port[,...]")
