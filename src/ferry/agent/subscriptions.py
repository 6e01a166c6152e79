"""Keeps a chassis subscribed to the topics it needs, and feeds their changes in order.

A topic is subscribed by a consistent snapshot followed by a watch from the snapshot's
revision, so nothing between the two is lost. If the watch's history was compacted, the topic
is resynced from a fresh snapshot. Records that fail validation are logged with their table
and id and skipped: one bad record from elsewhere never stops a chassis.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

from ferry.model.northbound import InvalidObject, from_record
from ferry.model.objects import NbObject
from ferry.store.base import (
    Compacted,
    EventKind,
    Record,
    Store,
    StoreError,
    WatchEvent,
    WatchFilter,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Updated:
    obj: NbObject
    revision: int


@dataclass(frozen=True)
class Deleted:
    table: str
    id: str
    revision: int


@dataclass(frozen=True)
class Resynced:
    topic: str
    objects: list[NbObject]
    revision: int


Change = Updated | Deleted | Resynced


def parse_record(chassis: str, rec: Record) -> NbObject | None:
    try:
        return from_record(rec)
    except InvalidObject as e:
        log.error("chassis %s: ignoring invalid %s %s (topic %s) at revision %d: %s",
                  chassis, rec.table, rec.id, rec.topic, rec.version, e)
        return None


class Subscriptions:
    """One watch task per topic; every change goes to ``sink`` in each topic's order."""

    def __init__(self, chassis: str, store: Store, sink: Callable[[Change], None]) -> None:
        self.chassis = chassis
        self.store = store
        self.sink = sink
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._ready: dict[str, asyncio.Event] = {}

    @property
    def topics(self) -> set[str]:
        return set(self._tasks)

    async def subscribe(self, topic: str) -> None:
        """Subscribe (idempotent); returns once the topic's snapshot was delivered."""
        if topic not in self._tasks:
            self._ready[topic] = asyncio.Event()
            self._tasks[topic] = asyncio.create_task(self._follow(topic),
                                                     name=f"watch-{self.chassis}-{topic}")
        await self._ready[topic].wait()

    async def _snapshot(self, topic: str) -> int:
        snap = await self.store.snapshot(WatchFilter.of(topics=[topic]))
        objs = [o for o in (parse_record(self.chassis, r) for r in snap.records) if o is not None]
        self.sink(Resynced(topic, objs, snap.revision))
        log.info("chassis %s: topic %s at revision %d (%d objects)", self.chassis, topic,
                 snap.revision, len(objs))
        return snap.revision

    async def _follow(self, topic: str) -> None:
        revision = await self._snapshot(topic)
        self._ready[topic].set()
        backoff = 0.1
        while True:
            try:
                async for event in self.store.watch(WatchFilter.of(topics=[topic]),
                                                    from_revision=revision):
                    self._deliver(event)
                    revision = event.revision
                    backoff = 0.1
            except Compacted as e:
                log.warning("chassis %s: topic %s: %s", self.chassis, topic, e)
                revision = await self._snapshot(topic)
            except StoreError as e:
                # The backend retries by itself; this is the last line: resume where we were.
                log.error("chassis %s: topic %s: watch failed at revision %d: %s; retrying",
                          self.chassis, topic, revision, e)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)

    def _deliver(self, event: WatchEvent) -> None:
        if event.kind is EventKind.DELETED:
            rec = event.record
            self.sink(Deleted(rec.table, rec.id, event.revision))
            return
        assert event.new is not None
        obj = parse_record(self.chassis, event.new)
        if obj is not None:
            self.sink(Updated(obj, event.revision))

    async def close(self) -> None:
        for task in self._tasks.values():
            task.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)
        self._tasks.clear()
