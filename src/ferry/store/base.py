"""The northbound store's contract: one async interface, several backends.

The store is a transactional document store with a global, monotonically increasing revision
(etcd's model). Every record lives in a table, under a topic (its project; ``GLOBAL`` for tables
every chassis needs, such as chassis), and carries ``version``: the revision of its last write.

- Writes are compare-and-swap on ``version``: an update based on a stale read fails with
  ``Conflict``; a lost update is impossible.
- ``claims`` are unique strings a record holds (an IP in a network, a MAC, a tunnel key).
  They are taken and released atomically with the record's write; a claim held by another
  record makes the write fail with ``ClaimTaken`` and nothing is written.
- ``watch`` streams ordered events from a revision on; after a disconnect it resumes from the
  last revision it delivered. If that revision was compacted it raises ``Compacted`` and the
  caller resyncs from ``snapshot``.
"""

from __future__ import annotations

import abc
import enum
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

GLOBAL = "_global"
"""The topic of records every chassis needs (chassis, migrations' global index...)."""

Doc = dict[str, Any]


class StoreError(Exception):
    """Base of every error the store raises."""


class NotFound(StoreError):
    def __init__(self, table: str, id: str) -> None:
        super().__init__(f"{table} {id} does not exist")
        self.table, self.id = table, id


class AlreadyExists(StoreError):
    def __init__(self, table: str, id: str) -> None:
        super().__init__(f"{table} {id} already exists")
        self.table, self.id = table, id


class Conflict(StoreError):
    """Compare-and-swap failed: the record changed since the caller read it."""

    def __init__(self, table: str, id: str, expected: int, actual: int | None) -> None:
        now = "it was deleted" if actual is None else f"it is now at version {actual}"
        super().__init__(f"{table} {id}: expected version {expected}, but {now}")
        self.table, self.id, self.expected, self.actual = table, id, expected, actual


class ClaimTaken(StoreError):
    """A unique value (IP, MAC, key...) is already held by another record."""

    def __init__(self, claim: str, holder: str) -> None:
        super().__init__(f"{claim} is already in use by {holder}")
        self.claim, self.holder = claim, holder


class Compacted(StoreError):
    """The requested watch revision is older than the store's history."""

    def __init__(self, requested: int, compact_revision: int) -> None:
        super().__init__(
            f"revision {requested} was compacted (history starts after {compact_revision}); "
            "resync from a snapshot"
        )
        self.requested, self.compact_revision = requested, compact_revision


class StoreUnavailable(StoreError):
    """The backend cannot be reached (after its own retries)."""


def check_name(kind: str, value: str) -> str:
    """Tables, ids and topics become key path segments: keep them plain."""
    if (not value or "/" in value or value.strip() != value or len(value) > 255
            or not value.isprintable()):
        raise ValueError(f"invalid {kind} {value!r}: must be 1-255 printable characters "
                         "without '/' or surrounding space")
    return value


@dataclass(frozen=True, slots=True)
class Record:
    table: str
    id: str
    topic: str
    version: int
    data: Doc
    claims: tuple[str, ...] = ()

    def get(self, dotted: str) -> Any:
        """A field by dotted path (``binding.chassis``, ``bindings.0.host``), None where
        absent."""
        value: Any = self.data
        for part in dotted.split("."):
            if isinstance(value, Mapping):
                value = value.get(part)
            elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
                value = value[int(part)]
            else:
                return None
        return value


class EventKind(enum.StrEnum):
    CREATED = "created"
    UPDATED = "updated"
    DELETED = "deleted"


@dataclass(frozen=True, slots=True)
class WatchEvent:
    revision: int
    kind: EventKind
    old: Record | None
    new: Record | None

    @property
    def record(self) -> Record:
        """The record as it is after the event (as it was, for a deletion)."""
        rec = self.new if self.new is not None else self.old
        assert rec is not None
        return rec


@dataclass(frozen=True, slots=True)
class Snapshot:
    revision: int
    records: list[Record] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class WatchFilter:
    """Which events a watch delivers: by topic (None = all) and by table (None = all)."""

    topics: frozenset[str] | None = None
    tables: frozenset[str] | None = None

    @classmethod
    def of(
        cls, topics: Iterable[str] | None = None, tables: Iterable[str] | None = None
    ) -> WatchFilter:
        return cls(
            None if topics is None else frozenset(topics),
            None if tables is None else frozenset(tables),
        )

    def admits(self, rec: Record) -> bool:
        return (self.topics is None or rec.topic in self.topics) and (
            self.tables is None or rec.table in self.tables
        )


EVERYTHING = WatchFilter()
"""The filter that admits every record."""


def matches(rec: Record, where: Mapping[str, Any] | None) -> bool:
    return where is None or all(rec.get(k) == v for k, v in where.items())


class Store(abc.ABC):
    """The async store contract. See the module docstring for the guarantees."""

    @abc.abstractmethod
    async def get(self, table: str, id: str) -> Record | None: ...

    @abc.abstractmethod
    async def list(
        self, table: str, *, topic: str | None = None, where: Mapping[str, Any] | None = None
    ) -> list[Record]:
        """Records of a table, optionally of one topic and whose dotted fields equal ``where``."""

    @abc.abstractmethod
    async def create(
        self, table: str, id: str, topic: str, data: Doc, *, claims: Sequence[str] = ()
    ) -> Record: ...

    @abc.abstractmethod
    async def update(
        self, table: str, id: str, data: Doc, *, version: int, claims: Sequence[str] | None = None
    ) -> Record:
        """Replace ``data`` if the record is still at ``version``. ``claims=None`` keeps them."""

    @abc.abstractmethod
    async def delete(self, table: str, id: str, *, version: int | None = None) -> Record:
        """Delete (CAS on ``version`` when given); releases the record's claims."""

    @abc.abstractmethod
    async def next_key(self, pool: str) -> int:
        """A unique integer from a named pool (1, 2, 3...), never handed out twice."""

    @abc.abstractmethod
    async def claim_holder(self, claim: str) -> str | None:
        """``table/id`` of the record holding a claim, or None."""

    @abc.abstractmethod
    async def revision(self) -> int:
        """The store's current revision."""

    @abc.abstractmethod
    async def snapshot(self, flt: WatchFilter = EVERYTHING) -> Snapshot:
        """Every record the filter admits, consistent at one revision."""

    @abc.abstractmethod
    def watch(self, flt: WatchFilter = EVERYTHING, *, from_revision: int) -> AsyncIterator[
        WatchEvent
    ]:
        """Events with revision > ``from_revision`` that the filter admits, in order."""

    @abc.abstractmethod
    async def close(self) -> None: ...

    async def __aenter__(self) -> Store:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
