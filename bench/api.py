"""Benchmark: Neutron API port creates and updates per second, memory and etcd stores.

The API runs under uvicorn on a background thread (as ``ferry api`` would serve it); the load
comes from ``--concurrency`` concurrent HTTP clients. For etcd, a private etcd server is
started in a temporary directory and stopped by PID afterwards.

    .venv/bin/python bench/api.py [--ports 500] [--concurrency 16] [--store memory,etcd]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx

from ferry.api.testing import ADMIN_TOKEN, etcd_factory, serve
from ferry.store.memory import MemoryStore


async def _timed(n: int, concurrency: int,
                 op: Callable[[int], Awaitable[None]]) -> tuple[float, list[float]]:
    sem = asyncio.Semaphore(concurrency)
    latencies: list[float] = []

    async def one(i: int) -> None:
        async with sem:
            t0 = time.perf_counter()
            await op(i)
            latencies.append(time.perf_counter() - t0)

    start = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(n)))
    return time.perf_counter() - start, latencies


async def _run(url: str, ports: int, concurrency: int) -> dict[str, Any]:
    headers = {"X-Auth-Token": ADMIN_TOKEN}
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url + "/v2.0", headers=headers, limits=limits,
                                 timeout=60) as c:
        net = (await c.post("/networks", json={"network": {"name": "bench"}})).json()
        net_id = net["network"]["id"]
        resp = await c.post("/subnets", json={"subnet": {"network_id": net_id,
                                                         "cidr": "10.0.0.0/16"}})
        resp.raise_for_status()
        ids: list[str] = [""] * ports

        async def create(i: int) -> None:
            r = await c.post("/ports", json={"port": {
                "network_id": net_id, "name": f"p{i}", "device_owner": "compute:nova"}})
            if r.status_code != 201:
                raise RuntimeError(f"create port {i}: {r.status_code} {r.text}")
            ids[i] = r.json()["port"]["id"]

        async def update(i: int) -> None:
            r = await c.put(f"/ports/{ids[i]}", json={"port": {
                "name": f"p{i}-moved", "binding:host_id": f"host{i % 8}"}})
            r.raise_for_status()

        results: dict[str, Any] = {}
        for name, op in (("create", create), ("update", update)):
            elapsed, lat = await _timed(ports, concurrency, op)
            lat.sort()
            results[name] = {"per_s": ports / elapsed,
                             "p50_ms": statistics.median(lat) * 1000,
                             "p99_ms": lat[int(len(lat) * 0.99) - 1] * 1000}
        return results


def bench(store: str, ports: int, concurrency: int) -> dict[str, Any]:
    if store == "memory":
        with serve(MemoryStore()) as server:
            return asyncio.run(_run(server.url, ports, concurrency))
    from ferry.lab.etcd_server import EtcdServer

    with tempfile.TemporaryDirectory(prefix="ferry-bench-etcd-") as tmp:
        etcd = EtcdServer(Path(tmp))
        etcd.start()
        try:
            with serve(etcd_factory(etcd.endpoints)) as server:
                return asyncio.run(_run(server.url, ports, concurrency))
        finally:
            etcd.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ports", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--store", default="memory,etcd")
    args = parser.parse_args()
    print(f"{args.ports} ports, {args.concurrency} concurrent clients")
    print(f"{'store':8} {'op':7} {'ops/s':>8} {'p50 ms':>8} {'p99 ms':>8}")
    for store in args.store.split(","):
        results = bench(store, args.ports, args.concurrency)
        for op, r in results.items():
            print(f"{store:8} {op:7} {r['per_s']:8.1f} {r['p50_ms']:8.1f} {r['p99_ms']:8.1f}")


if __name__ == "__main__":
    main()
