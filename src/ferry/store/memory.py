"""The embedded store: in-process, for all-in-one runs and tests.

Every operation runs to completion without yielding to the event loop, so each is atomic.
Data is copied through JSON on the way in and out, as with etcd: callers never share
mutable state with the store, and anything that is not JSON is refused at once.
"""

from __future__ import annotations

import asyncio
import json
from collections import deque
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

from ferry.store.base import (
    EVERYTHING,
    AlreadyExists,
    ClaimTaken,
    Compacted,
    Conflict,
    Doc,
    EventKind,
    NotFound,
    Record,
    Snapshot,
    Store,
    StoreUnavailable,
    WatchEvent,
    WatchFilter,
    check_name,
    matches,
)

_CLOSED = object()


def _copy(data: Doc) -> Doc:
    out: Doc = json.loads(json.dumps(data))
    return out


class MemoryStore(Store):
    """``memory://``: a store that lives in this process.

    ``history`` bounds the event log that watches replay from; older revisions are compacted.
    """

    def __init__(self, history: int = 100_000) -> None:
        self._revision = 0
        self._records: dict[tuple[str, str], Record] = {}
        self._claims: dict[str, str] = {}
        self._pools: dict[str, int] = {}
        self._log: deque[WatchEvent] = deque()
        self._history = history
        self._compacted = 0
        self._watchers: set[asyncio.Queue[object]] = set()
        self._closed = False

    # -- reads -------------------------------------------------------------------------------

    async def get(self, table: str, id: str) -> Record | None:
        self._check_open()
        return self._records.get((table, id))

    async def list(
        self, table: str, *, topic: str | None = None, where: Mapping[str, Any] | None = None
    ) -> list[Record]:
        self._check_open()
        return [
            r
            for (t, _), r in sorted(self._records.items())
            if t == table and (topic is None or r.topic == topic) and matches(r, where)
        ]

    async def claim_holder(self, claim: str) -> str | None:
        self._check_open()
        return self._claims.get(claim)

    async def revision(self) -> int:
        self._check_open()
        return self._revision

    async def snapshot(self, flt: WatchFilter = EVERYTHING) -> Snapshot:
        self._check_open()
        recs = [r for _, r in sorted(self._records.items()) if flt.admits(r)]
        return Snapshot(self._revision, recs)

    # -- writes ------------------------------------------------------------------------------

    async def create(
        self, table: str, id: str, topic: str, data: Doc, *, claims: Sequence[str] = ()
    ) -> Record:
        self._check_open()
        for kind, value in (("table", table), ("id", id), ("topic", topic)):
            check_name(kind, value)
        if (table, id) in self._records:
            raise AlreadyExists(table, id)
        owner = f"{table}/{id}"
        self._check_claims(claims, owner)
        rev = self._revision + 1
        rec = Record(table, id, topic, rev, _copy(data), tuple(sorted(set(claims))))
        self._commit(rev, EventKind.CREATED, None, rec)
        return rec

    async def update(
        self, table: str, id: str, data: Doc, *, version: int, claims: Sequence[str] | None = None
    ) -> Record:
        self._check_open()
        old = self._records.get((table, id))
        if old is None or old.version != version:
            raise Conflict(table, id, version, None if old is None else old.version)
        new_claims = old.claims if claims is None else tuple(sorted(set(claims)))
        self._check_claims(new_claims, f"{table}/{id}")
        rev = self._revision + 1
        rec = Record(table, id, old.topic, rev, _copy(data), new_claims)
        self._commit(rev, EventKind.UPDATED, old, rec)
        return rec

    async def delete(self, table: str, id: str, *, version: int | None = None) -> Record:
        self._check_open()
        old = self._records.get((table, id))
        if old is None:
            if version is not None:
                raise Conflict(table, id, version, None)
            raise NotFound(table, id)
        if version is not None and old.version != version:
            raise Conflict(table, id, version, old.version)
        self._commit(self._revision + 1, EventKind.DELETED, old, None)
        return old

    async def next_key(self, pool: str) -> int:
        self._check_open()
        check_name("pool", pool)
        self._pools[pool] = self._pools.get(pool, 0) + 1
        return self._pools[pool]

    def _check_claims(self, claims: Sequence[str], owner: str) -> None:
        for claim in claims:
            holder = self._claims.get(claim)
            if holder is not None and holder != owner:
                raise ClaimTaken(claim, holder)

    def _commit(self, rev: int, kind: EventKind, old: Record | None, new: Record | None) -> None:
        self._revision = rev
        rec = new if new is not None else old
        assert rec is not None
        key = (rec.table, rec.id)
        owner = f"{rec.table}/{rec.id}"
        for claim in old.claims if old else ():
            del self._claims[claim]
        if new is None:
            del self._records[key]
        else:
            self._records[key] = new
            for claim in new.claims:
                self._claims[claim] = owner
        event = WatchEvent(rev, kind, old, new)
        self._log.append(event)
        while len(self._log) > self._history:
            self._compacted = self._log.popleft().revision
        for queue in self._watchers:
            queue.put_nowait(event)

    def compact(self, revision: int) -> None:
        """Forget history up to ``revision`` (what etcd's compaction does)."""
        while self._log and self._log[0].revision <= revision:
            self._log.popleft()
        self._compacted = max(self._compacted, min(revision, self._revision))

    # -- watch -------------------------------------------------------------------------------

    async def watch(
        self, flt: WatchFilter = EVERYTHING, *, from_revision: int
    ) -> AsyncIterator[WatchEvent]:
        self._check_open()
        if from_revision < self._compacted:
            raise Compacted(from_revision, self._compacted)
        queue: asyncio.Queue[object] = asyncio.Queue()
        # Registering and copying the backlog happen in one step: no event falls in between.
        backlog = [e for e in self._log if e.revision > from_revision]
        self._watchers.add(queue)
        try:
            for event in backlog:
                if flt.admits(event.record):
                    yield event
            while True:
                item = await queue.get()
                if item is _CLOSED:
                    raise StoreUnavailable("the memory store was closed")
                assert isinstance(item, WatchEvent)
                if item.revision > from_revision and flt.admits(item.record):
                    yield item
        finally:
            self._watchers.discard(queue)

    async def close(self) -> None:
        self._closed = True
        for queue in self._watchers:
            queue.put_nowait(_CLOSED)

    def _check_open(self) -> None:
        if self._closed:
            raise StoreUnavailable("the memory store was closed")
