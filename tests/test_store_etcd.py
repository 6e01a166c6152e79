"""etcd-specific behaviour of the store: faults, compaction, topic isolation, endpoints, layout.

The backend-independent contract is in test_store_contract.py. Tests that kill or compact etcd
run their own server (function scope), stopped by PID even when the test fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from ferry.lab.etcd_server import EtcdServer, free_port
from ferry.store import open_store, parse_etcd_endpoints
from ferry.store.base import (
    GLOBAL,
    Compacted,
    EventKind,
    Record,
    Store,
    StoreUnavailable,
    WatchEvent,
    WatchFilter,
)
from ferry.store.etcd import EtcdStore

pytestmark = pytest.mark.etcd
log = logging.getLogger(__name__)


# -- helpers -----------------------------------------------------------------------------------


@pytest.fixture
def own_etcd(tmp_path: Path) -> Iterator[EtcdServer]:
    """A private etcd for tests that kill, restart or compact it."""
    server = EtcdServer(tmp_path / "etcd", name=f"t-{uuid.uuid4().hex[:8]}")
    server.start()
    try:
        yield server
    finally:
        server.stop()


def prefix() -> str:
    return f"/t-{uuid.uuid4().hex[:12]}"


async def until(cond: Callable[[], bool], within: float, what: str) -> None:
    """Wait until ``cond()`` holds, checking every 2 ms, at most ``within`` seconds."""
    deadline = time.monotonic() + within
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(0.002)


@dataclass
class Collector:
    """Runs a watch in a task and keeps what it delivers (events, then maybe an error)."""

    events: list[WatchEvent] = field(default_factory=list)
    error: BaseException | None = None
    task: asyncio.Task[None] | None = None

    def start(self, it: AsyncIterator[WatchEvent]) -> Collector:
        async def run() -> None:
            try:
                async for ev in it:
                    self.events.append(ev)
            except Exception as exc:
                self.error = exc

        self.task = asyncio.create_task(run())
        return self

    def seen(self, revision: int) -> bool:
        return any(e.revision >= revision for e in self.events)

    async def stop(self) -> None:
        assert self.task is not None
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


class TcpProxy:
    """A loopback TCP relay that can cut every connection and refuse new ones, then resume.

    Cuts one client's connection to etcd while etcd itself keeps running.
    """

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = free_port()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        self._writers |= {writer, up_writer}
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer),
                             return_exceptions=True)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        finally:
            writer.close()

    async def cut(self) -> None:
        assert self._server is not None
        self._server.close()
        for w in self._writers:
            w.close()
        self._writers.clear()
        await self._server.wait_closed()

    async def resume(self) -> None:
        await self.start()


# -- (a) the fault test: SIGKILL etcd mid-stream ----------------------------------------------


@dataclass(frozen=True)
class Change:
    """A committed write, as the watcher must report it."""

    revision: int
    kind: EventKind
    topic: str
    id: str
    old: tuple[int, dict[str, Any]] | None
    new: tuple[int, dict[str, Any]]


def as_change(ev: WatchEvent) -> Change:
    assert ev.new is not None, ev
    old = None if ev.old is None else (ev.old.version, ev.old.data)
    return Change(ev.revision, ev.kind, ev.new.topic, ev.new.id, old, (ev.new.version, ev.new.data))


class Writer:
    """Creates and updates records in two topics without pause; keeps the committed changes.

    A write that fails (etcd down longer than the store's op_timeout) has an unknown outcome:
    the writer reads the record back once etcd answers again and counts the write as committed
    only if the record holds exactly what it wrote (every write's data is unique).
    """

    def __init__(self, store: EtcdStore) -> None:
        self.store = store
        self.committed: list[Change] = []
        self.failures = 0
        self.unknown_committed = 0
        self.stop = asyncio.Event()
        self._recs: dict[str, Record] = {}
        self._seq = 0

    async def run(self) -> None:
        ids = [f"{topic}-{n}" for topic in ("A", "B") for n in range(4)]
        rng = random.Random(7)
        while not self.stop.is_set():
            await self._write_one(rng.choice(ids))

    async def _write_one(self, id: str) -> None:
        self._seq += 1
        topic, data = id.split("-")[0], {"seq": self._seq, "id": id}
        old = self._recs.get(id)
        try:
            if old is None:
                rec = await self.store.create("vm", id, topic, data)
            else:
                rec = await self.store.update("vm", id, data, version=old.version)
        except StoreUnavailable:
            self.failures += 1
            rec = await self._read_back(id)
            if rec is None or rec.data != data:
                return  # not committed
            self.unknown_committed += 1
        self._commit(old, rec)

    def _commit(self, old: Record | None, rec: Record) -> None:
        kind = EventKind.CREATED if old is None else EventKind.UPDATED
        prev = None if old is None else (old.version, old.data)
        self.committed.append(
            Change(rec.version, kind, rec.topic, rec.id, prev, (rec.version, rec.data))
        )
        self._recs[rec.id] = rec

    async def _read_back(self, id: str) -> Record | None:
        deadline = time.monotonic() + 30
        while True:
            try:
                return await self.store.get("vm", id)
            except StoreUnavailable:
                if time.monotonic() > deadline:
                    raise


async def test_watch_survives_sigkill_and_restart_exactly_once(own_etcd: EtcdServer) -> None:
    pfx = prefix()
    writer_store = EtcdStore(own_etcd.endpoints, pfx, op_timeout=0.5)
    reader = EtcdStore(own_etcd.endpoints, pfx)
    start = await reader.revision()
    everything = Collector().start(reader.watch(from_revision=start))
    both = Collector().start(reader.watch(WatchFilter.of(topics=["A", "B"]), from_revision=start))
    only_a = Collector().start(reader.watch(WatchFilter.of(topics=["A"]), from_revision=start))
    writer = Writer(writer_store)
    writing = asyncio.create_task(writer.run())
    try:
        await until(lambda: len(writer.committed) >= 200, 20, "200 writes before the kill")
        own_etcd.kill()
        before_kill = writer.committed[-1].revision
        await until(lambda: writer.failures >= 1, 10, "a write failing while etcd is dead")
        await asyncio.to_thread(own_etcd.restart)
        ready = time.monotonic()
        await until(lambda: everything.seen(before_kill + 1), 10, "an event after the restart")
        recovered = time.monotonic() - ready
        after = len(writer.committed)
        await until(lambda: len(writer.committed) >= after + 200, 20, "200 writes after restart")
    finally:
        writer.stop.set()
        await writing
    last = writer.committed[-1].revision
    last_a = max(c.revision for c in writer.committed if c.topic == "A")
    for c, rev in ((everything, last), (both, last), (only_a, last_a)):
        await until(lambda c=c, rev=rev: c.seen(rev) or c.error is not None, 10, "the last event")
        await c.stop()
        assert c.error is None, c.error
    # Committed = what the store holds: the final state matches the last committed write.
    final = {r.id: (r.version, r.data) for r in (await reader.snapshot()).records}
    latest = {c.id: c.new for c in writer.committed}
    assert final == latest

    expected = writer.committed
    # Every committed change exactly once, in revision order, with the right old and new.
    assert [as_change(e) for e in everything.events] == expected
    assert [as_change(e) for e in both.events] == expected
    assert [as_change(e) for e in only_a.events] == [c for c in expected if c.topic == "A"]
    log.warning(
        "fault test: %d committed, %d failed writes (%d of them committed after all), "
        "first event %.3fs after etcd was ready",
        len(expected), writer.failures, writer.unknown_committed, recovered,
    )
    assert recovered < 1.0, f"watch took {recovered:.3f}s to recover after etcd came back"
    await writer_store.close()
    await reader.close()


async def test_write_waits_for_etcd_to_come_back(own_etcd: EtcdServer) -> None:
    store = EtcdStore(own_etcd.endpoints, prefix(), op_timeout=15)
    try:
        rec = await store.create("vm", "v1", "A", {"n": 1})
        own_etcd.kill()
        pending = asyncio.create_task(store.update("vm", "v1", {"n": 2}, version=rec.version))
        await asyncio.to_thread(own_etcd.restart)
        updated = await asyncio.wait_for(pending, 5)
        assert updated.data == {"n": 2}
        assert (await store.get("vm", "v1")) == updated
    finally:
        await store.close()


async def test_unavailable_after_op_timeout() -> None:
    store = EtcdStore([("127.0.0.1", free_port())], prefix(), op_timeout=0.3)
    try:
        t0 = time.monotonic()
        with pytest.raises(StoreUnavailable, match=r"unavailable for 0\.3s"):
            await store.get("vm", "v1")
        assert time.monotonic() - t0 < 2
    finally:
        await store.close()


async def test_watch_gives_up_after_watch_timeout(own_etcd: EtcdServer) -> None:
    store = EtcdStore(own_etcd.endpoints, prefix(), watch_timeout=0.5)
    try:
        watch = Collector().start(store.watch(from_revision=await store.revision()))
        await store.create("vm", "v1", "A", {})
        await until(lambda: len(watch.events) == 1, 5, "the first event")
        own_etcd.kill()
        await until(lambda: watch.error is not None, 10, "the watch to give up")
        assert isinstance(watch.error, StoreUnavailable)
    finally:
        await store.close()


# -- lost replies: a write applied whose reply never came is not applied twice ---------------


class LoseReplies:
    """The next ``n`` Txn calls are applied by etcd, then fail as if the reply was lost."""

    def __init__(self, kv: Any, n: int) -> None:
        self._kv, self.n = kv, n

    def __getattr__(self, name: str) -> Any:
        return getattr(self._kv, name)

    async def Txn(self, request: Any, **kw: Any) -> Any:
        response = await self._kv.Txn(request, **kw)
        if self.n > 0:
            self.n -= 1
            raise grpc.aio.AioRpcError(
                grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(),
                "test: connection lost before the reply",
            )
        return response


def lose_next_replies(store: EtcdStore, n: int = 1) -> None:
    store._stubs()
    store._kv = LoseReplies(store._kv, n)


async def test_lost_reply_is_not_applied_twice(etcd_server: EtcdServer) -> None:
    store = EtcdStore(etcd_server.endpoints, prefix())
    try:
        lose_next_replies(store)
        rec = await store.create("vm", "v1", "A", {"n": 1}, claims=["ip/1"])
        assert rec == await store.get("vm", "v1")
        lose_next_replies(store)
        upd = await store.update("vm", "v1", {"n": 2}, version=rec.version, claims=["ip/2"])
        assert upd == await store.get("vm", "v1")
        assert await store.claim_holder("ip/1") is None
        assert await store.claim_holder("ip/2") == "vm/v1"
        lose_next_replies(store)
        gone = await store.delete("vm", "v1", version=upd.version)
        assert gone == upd
        assert await store.get("vm", "v1") is None
        assert await store.claim_holder("ip/2") is None
        lose_next_replies(store)
        keys = [await store.next_key("vni") for _ in range(3)]
        assert keys[0] == 2 and keys == sorted(set(keys))  # a gap, never a duplicate
    finally:
        await store.close()


# -- (b) compaction ----------------------------------------------------------------------------


async def test_resume_after_compaction_raises_then_resyncs(own_etcd: EtcdServer) -> None:
    pfx = prefix()
    proxy = TcpProxy(own_etcd.endpoints[0])
    await proxy.start()
    direct = EtcdStore(own_etcd.endpoints, pfx)
    cut_off = EtcdStore([("127.0.0.1", proxy.port)], pfx)
    try:
        rec = await direct.create("vm", "v1", "A", {"n": 0})
        watch = Collector().start(cut_off.watch(from_revision=rec.version - 1))
        await until(lambda: watch.seen(rec.version), 5, "the create event")
        await proxy.cut()
        for n in range(1, 4):
            rec = await direct.update("vm", "v1", {"n": n}, version=rec.version)
        own_etcd.compact(rec.version)
        await proxy.resume()
        await until(lambda: watch.error is not None, 10, "the resumed watch to fail")
        assert isinstance(watch.error, Compacted)
        assert (watch.error.requested, watch.error.compact_revision) == (
            watch.events[-1].revision, rec.version,
        )
        # Resync: a snapshot, then a watch from its revision.
        snap = await cut_off.snapshot()
        assert [r.data for r in snap.records] == [{"n": 3}]
        again = Collector().start(cut_off.watch(from_revision=snap.revision))
        rec = await direct.update("vm", "v1", {"n": 4}, version=rec.version)
        await until(lambda: again.seen(rec.version), 5, "the event after the resync")
        assert [(e.kind, e.new and e.new.data) for e in again.events] == [
            (EventKind.UPDATED, {"n": 4})
        ]
        await again.stop()
    finally:
        await cut_off.close()
        await direct.close()
        await proxy.cut()


async def test_watch_from_compacted_revision_raises(own_etcd: EtcdServer) -> None:
    store = EtcdStore(own_etcd.endpoints, prefix())
    try:
        rec = await store.create("vm", "v1", "A", {})
        rec = await store.update("vm", "v1", {"n": 1}, version=rec.version)
        own_etcd.compact(rec.version)
        with pytest.raises(Compacted) as err:
            async for _ in store.watch(from_revision=1):
                pass
        assert err.value.compact_revision == rec.version
    finally:
        await store.close()


# -- (c) topics are filtered by etcd ----------------------------------------------------------


async def test_topic_watch_sees_only_its_topic(etcd_server: EtcdServer) -> None:
    store = EtcdStore(etcd_server.endpoints, prefix())
    try:
        flt = WatchFilter.of(topics=["A"])
        # The key range etcd filters on: only topic A's objects (topic and table when both).
        assert store._watch_prefix(flt) == f"{store.prefix}/o/A/".encode()
        assert store._watch_prefix(WatchFilter.of(topics=["A"], tables=["vm"])) == (
            f"{store.prefix}/o/A/vm/".encode()
        )
        watch = Collector().start(store.watch(flt, from_revision=await store.revision()))
        for n in range(20):
            await store.create("vm", f"b{n}", "B", {"n": n})
        await store.create("vm", "g", GLOBAL, {})
        last = await store.create("vm", "a", "A", {})
        await until(lambda: watch.seen(last.version), 5, "topic A's event")
        await watch.stop()
        assert [(e.kind, e.record.id) for e in watch.events] == [(EventKind.CREATED, "a")]
        snap = await store.snapshot(flt)
        assert [r.id for r in snap.records] == ["a"]
    finally:
        await store.close()


async def test_deleted_and_table_filtered_events(etcd_server: EtcdServer) -> None:
    store = EtcdStore(etcd_server.endpoints, prefix())
    try:
        flt = WatchFilter.of(topics=["A"], tables=["port"])
        watch = Collector().start(store.watch(flt, from_revision=await store.revision()))
        await store.create("vm", "v", "A", {})
        port = await store.create("port", "p", "A", {"x": 1}, claims=["mac/1"])
        gone = await store.delete("port", "p")
        await until(lambda: watch.seen(gone.version + 1), 5, "the delete event")
        await watch.stop()
        kinds = [(e.kind, e.record.table, e.old, e.new) for e in watch.events]
        assert kinds == [
            (EventKind.CREATED, "port", None, port),
            (EventKind.DELETED, "port", port, None),
        ]
    finally:
        await store.close()


# -- (d) endpoints -----------------------------------------------------------------------------


@pytest.mark.parametrize("dead_first", [True, False])
async def test_multi_endpoint_url_with_a_dead_member(
    etcd_server: EtcdServer, dead_first: bool
) -> None:
    live = etcd_server.endpoints[0]
    dead = ("127.0.0.1", free_port())
    eps = [dead, live] if dead_first else [live, dead]
    url = "etcd://" + ",".join(f"{h}:{p}" for h, p in eps)
    assert parse_etcd_endpoints(url) == eps
    opened = open_store(url)
    assert isinstance(opened, EtcdStore) and opened.endpoints == eps
    await opened.close()
    store = EtcdStore(parse_etcd_endpoints(url), prefix(), op_timeout=3)
    try:
        t0 = time.monotonic()
        watch = Collector().start(store.watch(from_revision=await store.revision()))
        rec = await store.create("vm", "v1", "A", {})
        await until(lambda: watch.seen(rec.version), 5, "the event")
        assert await store.get("vm", "v1") == rec
        assert time.monotonic() - t0 < 2
        await watch.stop()
    finally:
        await store.close()


async def test_hostname_endpoints(etcd_server: EtcdServer) -> None:
    port = etcd_server.endpoints[0][1]
    for eps in ([("localhost", port)], [("localhost", port), ("127.0.0.1", free_port())]):
        store = EtcdStore(eps, prefix(), op_timeout=3)
        try:
            assert await store.revision() > 0
        finally:
            await store.close()


# -- key layout and lifecycle ------------------------------------------------------------------


async def test_key_layout(etcd_server: EtcdServer) -> None:
    store = EtcdStore(etcd_server.endpoints, prefix())
    try:
        rec = await store.create("port", "p1", "proj", {"mac": "aa"}, claims=["mac/aa", "ip/1"])
        assert await store.next_key("vni") == 1
        rev = await store.revision()
        kvs = await store._range_prefix(store.prefix.encode() + b"/", rev)
        layout = {kv.key.decode()[len(store.prefix):]: kv.value for kv in kvs}
        assert set(layout) == {"/o/proj/port/p1", "/i/port/p1", "/c/mac/aa", "/c/ip/1", "/k/vni"}
        body = json.loads(layout["/o/proj/port/p1"])
        assert (body["data"], body["claims"]) == ({"mac": "aa"}, ["ip/1", "mac/aa"])
        assert layout["/i/port/p1"] == b"proj"
        assert layout["/c/ip/1"] == b"port/p1"
        assert layout["/k/vni"] == b"1"
        kv = next(kv for kv in kvs if kv.key.endswith(b"/o/proj/port/p1"))
        assert rec.version == kv.mod_revision
    finally:
        await store.close()


async def test_close_ends_watches(etcd_server: EtcdServer) -> None:
    store = EtcdStore(etcd_server.endpoints, prefix())
    watch = Collector().start(store.watch(from_revision=await store.revision()))
    await store.create("vm", "v1", "A", {})
    await until(lambda: len(watch.events) == 1, 5, "the event")
    await store.close()
    await until(lambda: watch.error is not None, 5, "the watch to end")
    assert isinstance(watch.error, StoreUnavailable)
    with pytest.raises(StoreUnavailable):
        await store.get("vm", "v1")


async def test_store_fixture_is_usable(store: Store) -> None:
    """Both backends answer the same basic calls (the full contract is elsewhere)."""
    rec = await store.create("vm", "v1", "A", {"n": 1})
    assert await store.get("vm", "v1") == rec
    assert [r.id for r in await store.list("vm")] == ["v1"]
