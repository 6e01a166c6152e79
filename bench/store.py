"""Store benchmark: put→watch-event latency and write throughput, memory vs a real etcd.

    .venv/bin/python bench/store.py [-n 2000] [--writers 16] [--backend memory --backend etcd]

For etcd, a private single-member server is started on loopback (own temporary data directory)
and stopped by PID at the end. Latency: N sequential updates of one record, each awaited until
a watcher (a one-topic watch, as a chassis has) has received its event; measured from the
moment the update is issued. Throughput: N sequential updates, then the same number spread
over W concurrent writers, each updating its own record.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

from ferry.store.base import Store, WatchFilter
from ferry.store.memory import MemoryStore


@dataclass
class Result:
    backend: str
    lat_p50_ms: float
    lat_p99_ms: float
    write_p50_ms: float
    seq_wps: float
    conc_wps: float


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def latency(store: Store, n: int) -> tuple[list[float], list[float]]:
    """Put→event and put→ack latencies (seconds) of ``n`` sequential updates."""
    rec = await store.create("bench", "lat", "topic-a", {"i": 0})
    start_revision = rec.version
    arrived: dict[int, float] = {}
    wake = asyncio.Event()

    async def watch() -> None:
        flt = WatchFilter.of(topics=["topic-a"])
        async for ev in store.watch(flt, from_revision=start_revision):
            arrived[ev.revision] = time.perf_counter()
            wake.set()

    watcher = asyncio.create_task(watch())
    to_event, to_ack = [], []
    try:
        for i in range(1, n + 1):
            start = time.perf_counter()
            rec = await store.update("bench", "lat", {"i": i}, version=rec.version)
            to_ack.append(time.perf_counter() - start)
            while rec.version not in arrived:
                wake.clear()
                await asyncio.wait_for(wake.wait(), 10)
            to_event.append(arrived[rec.version] - start)
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
    return to_event, to_ack


async def writer(store: Store, id: str, count: int) -> None:
    rec = await store.create("bench", id, "topic-b", {"i": 0})
    for i in range(1, count + 1):
        rec = await store.update("bench", id, {"i": i, "pad": "x" * 64}, version=rec.version)


async def throughput(store: Store, n: int, writers: int) -> tuple[float, float]:
    start = time.perf_counter()
    await writer(store, "seq", n)
    seq = n / (time.perf_counter() - start)
    each = n // writers
    start = time.perf_counter()
    await asyncio.gather(*(writer(store, f"w{k}", each) for k in range(writers)))
    conc = each * writers / (time.perf_counter() - start)
    return seq, conc


async def run(backend: str, open_store: Callable[[], Store], n: int, writers: int) -> Result:
    store = open_store()
    try:
        to_event, to_ack = await latency(store, n)
        seq, conc = await throughput(store, n, writers)
    finally:
        await store.close()
    ms = 1000.0
    return Result(backend, pct(to_event, 0.5) * ms, pct(to_event, 0.99) * ms,
                  statistics.median(to_ack) * ms, seq, conc)


@contextlib.asynccontextmanager
async def etcd_store_factory() -> AsyncIterator[Callable[[], Store]]:
    from ferry.lab.etcd_server import EtcdServer
    from ferry.store.etcd import EtcdStore

    with tempfile.TemporaryDirectory(prefix="ferry-bench-etcd-") as tmp:
        server = EtcdServer(Path(tmp), name="ferry-bench")
        server.start()
        try:
            yield lambda: EtcdStore(server.endpoints, prefix="/bench")
        finally:
            server.stop()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=2000, help="updates per measurement")
    parser.add_argument("--writers", type=int, default=16, help="concurrent writers")
    parser.add_argument("--backend", action="append", choices=["memory", "etcd"])
    args = parser.parse_args()
    results = []
    for backend in args.backend or ["memory", "etcd"]:
        if backend == "memory":
            results.append(await run("memory", MemoryStore, args.n, args.writers))
        else:
            async with etcd_store_factory() as factory:
                results.append(await run("etcd", factory, args.n, args.writers))
    print(f"N={args.n} updates, {args.writers} concurrent writers")
    print(f"{'backend':<8} {'put→event p50':>14} {'p99':>9} {'put→ack p50':>12} "
          f"{'writes/s seq':>13} {'writes/s x' + str(args.writers):>14}")
    for r in results:
        print(f"{r.backend:<8} {r.lat_p50_ms:>11.3f} ms {r.lat_p99_ms:>6.3f} ms "
              f"{r.write_p50_ms:>9.3f} ms {r.seq_wps:>13.0f} {r.conc_wps:>14.0f}")


if __name__ == "__main__":
    asyncio.run(main())
