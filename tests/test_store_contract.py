"""The store contract, run against every backend (the ``store`` fixture: memory and etcd)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from ferry.store.base import (
    GLOBAL,
    AlreadyExists,
    ClaimTaken,
    Conflict,
    EventKind,
    NotFound,
    Store,
    WatchEvent,
    WatchFilter,
)

TIMEOUT = 10.0


async def take(events: AsyncIterator[WatchEvent], n: int) -> list[WatchEvent]:
    out = []
    async with asyncio.timeout(TIMEOUT):
        while len(out) < n:
            out.append(await anext(events))
    return out


async def test_create_get_list(store: Store) -> None:
    rec = await store.create("port", "p1", "projA", {"mac": "fa:16:3e:00:00:01", "n": 1})
    assert rec.version > 0
    got = await store.get("port", "p1")
    assert got == rec
    assert got is not None and got.data == {"mac": "fa:16:3e:00:00:01", "n": 1}
    assert await store.get("port", "nope") is None
    await store.create("port", "p2", "projB", {"binding": {"chassis": "ch1"}})
    await store.create("network", "n1", "projA", {})
    assert [r.id for r in await store.list("port")] == ["p1", "p2"]
    assert [r.id for r in await store.list("port", topic="projB")] == ["p2"]
    assert [r.id for r in await store.list("port", where={"binding.chassis": "ch1"})] == ["p2"]
    assert await store.list("port", where={"binding.chassis": "ch2"}) == []


async def test_create_twice_is_refused(store: Store) -> None:
    await store.create("port", "p1", "projA", {"v": 1})
    with pytest.raises(AlreadyExists, match="port p1 already exists"):
        await store.create("port", "p1", "projA", {"v": 2})
    got = await store.get("port", "p1")
    assert got is not None and got.data == {"v": 1}


async def test_update_is_compare_and_swap(store: Store) -> None:
    rec = await store.create("port", "p1", "projA", {"v": 1})
    new = await store.update("port", "p1", {"v": 2}, version=rec.version)
    assert new.version > rec.version and new.topic == "projA"
    with pytest.raises(Conflict, match=f"expected version {rec.version}\\b"):
        await store.update("port", "p1", {"v": 3}, version=rec.version)
    got = await store.get("port", "p1")
    assert got is not None and got.data == {"v": 2} and got.version == new.version
    with pytest.raises(Conflict):
        await store.update("port", "nope", {"v": 1}, version=1)


async def test_delete(store: Store) -> None:
    rec = await store.create("port", "p1", "projA", {"v": 1})
    with pytest.raises(Conflict):
        await store.delete("port", "p1", version=rec.version + 100)
    assert await store.get("port", "p1") is not None
    old = await store.delete("port", "p1", version=rec.version)
    assert old.data == {"v": 1}
    assert await store.get("port", "p1") is None
    with pytest.raises(NotFound, match="port p1 does not exist"):
        await store.delete("port", "p1")


async def test_claims_are_unique_and_released(store: Store) -> None:
    await store.create("port", "p1", "projA", {}, claims=["ip/n1/10.0.0.5"])
    with pytest.raises(ClaimTaken, match=r"ip/n1/10\.0\.0\.5 is already in use by port/p1"):
        await store.create("port", "p2", "projA", {}, claims=["ip/n1/10.0.0.6", "ip/n1/10.0.0.5"])
    # The failed create wrote nothing: neither the record nor its other claim.
    assert await store.get("port", "p2") is None
    assert await store.claim_holder("ip/n1/10.0.0.6") is None
    p1 = await store.get("port", "p1")
    assert p1 is not None
    p1 = await store.update("port", "p1", {}, version=p1.version, claims=["ip/n1/10.0.0.7"])
    assert await store.claim_holder("ip/n1/10.0.0.5") is None
    assert await store.claim_holder("ip/n1/10.0.0.7") == "port/p1"
    # claims=None keeps the record's claims.
    p1 = await store.update("port", "p1", {"x": 1}, version=p1.version)
    assert p1.claims == ("ip/n1/10.0.0.7",)
    await store.delete("port", "p1")
    assert await store.claim_holder("ip/n1/10.0.0.7") is None
    await store.create("port", "p2", "projA", {}, claims=["ip/n1/10.0.0.7"])


async def test_next_key_is_unique(store: Store) -> None:
    keys = await asyncio.gather(*(store.next_key("network") for _ in range(20)))
    assert sorted(keys) == list(range(1, 21))
    assert await store.next_key("port") == 1


async def test_bad_names_are_refused(store: Store) -> None:
    for table, id, topic in (("port", "a/b", "t"), ("port", "", "t"), ("port", "p", "x/y")):
        with pytest.raises(ValueError, match="invalid"):
            await store.create(table, id, topic, {})
    assert await store.list("port") == []


async def test_concurrent_updates_lose_nothing(store: Store) -> None:
    """Several tasks increment one counter with read-CAS-retry: every increment survives."""
    await store.create("counter", "c", GLOBAL, {"n": 0})
    tasks, per_task = 8, 15
    conflicts = 0

    async def incrementer() -> None:
        nonlocal conflicts
        for _ in range(per_task):
            while True:
                rec = await store.get("counter", "c")
                assert rec is not None
                # Let the others run between our read and our write: the lost-update window.
                await asyncio.sleep(0)
                try:
                    await store.update("counter", "c", {"n": rec.data["n"] + 1},
                                       version=rec.version)
                    break
                except Conflict:
                    conflicts += 1

    await asyncio.gather(*(incrementer() for _ in range(tasks)))
    rec = await store.get("counter", "c")
    assert rec is not None and rec.data["n"] == tasks * per_task
    assert conflicts > 0, "the tasks never raced; the test proved nothing"


async def test_watch_delivers_ordered_events_with_old_and_new(store: Store) -> None:
    start = await store.revision()
    events = aiter(store.watch(from_revision=start))
    r1 = await store.create("port", "p1", "projA", {"v": 1})
    r2 = await store.update("port", "p1", {"v": 2}, version=r1.version)
    await store.delete("port", "p1")
    got = await take(events, 3)
    assert [e.kind for e in got] == [EventKind.CREATED, EventKind.UPDATED, EventKind.DELETED]
    assert [e.revision for e in got] == sorted(e.revision for e in got)
    assert got[0].old is None and got[0].new == r1
    assert got[1].old == r1 and got[1].new == r2
    assert got[2].old == r2 and got[2].new is None
    await events.aclose()  # type: ignore[attr-defined]


async def test_watch_replays_from_a_revision(store: Store) -> None:
    r1 = await store.create("port", "p1", "projA", {"v": 1})
    await store.update("port", "p1", {"v": 2}, version=r1.version)
    await store.create("port", "p2", "projA", {"v": 1})
    # From r1's revision: everything after the create, not the create itself.
    events = aiter(store.watch(from_revision=r1.version))
    got = await take(events, 2)
    assert [(e.kind, e.record.id) for e in got] == [(EventKind.UPDATED, "p1"),
                                                     (EventKind.CREATED, "p2")]
    await events.aclose()  # type: ignore[attr-defined]


async def test_watch_by_topic_and_table(store: Store) -> None:
    start = await store.revision()
    flt = WatchFilter.of(topics=["projA", GLOBAL], tables=["port", "chassis"])
    events = aiter(store.watch(flt, from_revision=start))
    await store.create("port", "pb", "projB", {})
    await store.create("network", "na", "projA", {})
    await store.create("port", "pa", "projA", {})
    await store.create("chassis", "ch1", GLOBAL, {})
    await store.create("port", "pb2", "projB", {})
    await store.create("port", "pa2", "projA", {})
    got = await take(events, 3)
    assert [e.record.id for e in got] == ["pa", "ch1", "pa2"]
    await events.aclose()  # type: ignore[attr-defined]


async def test_snapshot_is_consistent_and_resumable(store: Store) -> None:
    await store.create("port", "p1", "projA", {})
    await store.create("port", "p2", "projB", {})
    snap = await store.snapshot(WatchFilter.of(topics=["projA"]))
    assert [r.id for r in snap.records] == ["p1"]
    assert snap.revision == await store.revision()
    events = aiter(store.watch(WatchFilter.of(topics=["projA"]), from_revision=snap.revision))
    await store.create("port", "p3", "projA", {})
    (ev,) = await take(events, 1)
    assert ev.record.id == "p3" and ev.kind is EventKind.CREATED
    await events.aclose()  # type: ignore[attr-defined]


async def test_non_json_data_is_refused(store: Store) -> None:
    with pytest.raises(TypeError):
        await store.create("port", "p1", "projA", {"x": object()})
    assert await store.get("port", "p1") is None


async def test_list_where_indexes_into_lists(store: Store) -> None:
    await store.create("port", "p1", "projA", {"bindings": [{"host": "ch1"}]})
    await store.create("port", "p2", "projA", {"bindings": [{"host": "ch2"}]})
    await store.create("port", "p3", "projA", {"bindings": []})
    assert [r.id for r in await store.list("port", where={"bindings.0.host": "ch2"})] == ["p2"]
