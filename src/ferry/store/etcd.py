"""The etcd v3 backend (``etcd://host:port[,host:port...]``).

Key layout under the prefix (default ``/ferry``)::

    PREFIX/o/<topic>/<table>/<id>   the record: JSON {"data": ..., "claims": [...], "w": token}
    PREFIX/i/<table>/<id>           id index: the record's topic (get() without the topic)
    PREFIX/c/<claim>                a claim: "<table>/<id>" of its holder
    PREFIX/k/<pool>                 a key pool's counter (decimal)

A record's ``version`` is its object key's ``mod_revision``. Every write is ONE etcd transaction
that compares (object absent / at ``version``; each newly taken claim absent) and then writes the
object, the id index and the claims together. ``w`` is a random token unique to each write: it
lets a retried write recognise that its earlier attempt was applied (see below).

The gRPC layer is aetcd's (its generated etcd v3 stubs, ``aetcd.rpc``) on a channel of our own,
not ``aetcd.Client``: the client cannot range at a revision (needed by ``snapshot``), connects to
one endpoint only, and its shared watch stream reports a broken connection to every watch as an
error instead of resuming it.

Failures and retries
--------------------
- Transient gRPC failures (UNAVAILABLE: connection refused or lost, no leader; DEADLINE_EXCEEDED)
  are retried with a short backoff until ``op_timeout`` (default 10 s) has passed, then
  ``StoreUnavailable`` is raised. Calls wait for the channel to be ready (``wait_for_ready``), so
  an operation issued while etcd restarts simply completes once it is back.
- Reads are idempotent and retried freely.
- A write whose outcome is unknown (the connection broke after it was sent) is retried as the
  same compare-and-swap. If the first attempt was applied, the retry's compare fails, and the
  store then finds its own write token in the record: the write is reported as done, exactly
  once. ``delete`` cannot carry a token: if, after an unknown outcome, the record is found gone,
  the delete is reported as done (the record the caller asked to delete no longer exists; if
  a concurrent writer deleted that same version, both callers see success). If another writer
  changed the record between the lost reply and the retry, the retry reports ``Conflict``
  although the first attempt was applied; a caller re-reads on ``Conflict`` anyway.
- ``next_key`` never hands out a number twice; an increment whose reply was lost leaves a gap.
- ``StoreUnavailable`` raised by a write means its outcome is unknown: it may have been applied.

Watches
-------
A watch is ONE etcd watch stream, so its events come in global revision order (the contract).
Its key range is chosen server-side as narrowly as one range allows: ``PREFIX/o/<topic>/<table>/``
for one topic and one table, ``PREFIX/o/<topic>/`` for one topic, so a chassis watching one
project receives only that project's records from etcd; with several topics (or none) it is all
of ``PREFIX/o/`` and the filter is applied here. (Per-topic streams merged client-side cannot
be put back in global order on etcd 3.4.23: progress requests, the only fence, race the events
there, etcd#15220.) The stream remembers the last revision it delivered; after any disconnect it
reconnects by itself and resumes at that revision + 1, so nothing is lost or duplicated. If that
revision was compacted meanwhile, the iterator raises ``Compacted``: resync from
``snapshot()``. By default a watch never gives up while etcd is down (a controller should ride
out an etcd restart); ``watch_timeout`` makes it raise ``StoreUnavailable`` after that many
seconds without a working stream.

Multiple endpoints are handed to gRPC's ``pick_first`` balancer: it uses the first endpoint that
accepts a connection and moves on to the next one when that connection fails. Host names are
resolved once, when the channel is created.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from aetcd import rpc

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
    StoreError,
    StoreUnavailable,
    WatchEvent,
    WatchFilter,
    check_name,
    matches,
)

log = logging.getLogger(__name__)

T = TypeVar("T")
_KVs = list[Any]  # etcd KeyValue messages (``list`` is shadowed inside the store class)
_Prefixes = list[bytes]

_TRANSIENT = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
_PAGE = 1000  # keys per range request; big ranges are paged at one revision
_CACHE_SIZE = 4096  # records remembered for update/delete without a read, and topics for get
_MAX_TOPIC_RANGES = 64  # list() without topic: above this many topics, scan all objects
_WATCH_QUEUE = 1024  # events buffered per watch; a slow consumer slows its streams down
_CREATE_RETRIES = 5  # a create/update compare failing for a reason gone when we look: re-run


def _channel_options(backoff: tuple[float, float], keepalive: float) -> list[tuple[str, int]]:
    low_ms, high_ms = int(backoff[0] * 1000), int(backoff[1] * 1000)
    return [
        # gRPC's default reconnect backoff starts at 1 s and grows to 120 s: after an etcd
        # restart a client would wait seconds. Keep it short: etcd is local or on the LAN.
        ("grpc.initial_reconnect_backoff_ms", low_ms),
        ("grpc.min_reconnect_backoff_ms", low_ms),
        ("grpc.max_reconnect_backoff_ms", high_ms),
        # Detect a silently dead peer (no RST: host down, partition) on open streams. etcd
        # refuses pings more often than every 5 s, and pings without a stream.
        ("grpc.keepalive_time_ms", int(keepalive * 1000)),
        ("grpc.keepalive_timeout_ms", 5000),
        ("grpc.keepalive_permit_without_calls", 0),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.max_receive_message_length", 64 * 1024 * 1024),
        ("grpc.max_send_message_length", 16 * 1024 * 1024),
    ]


def _grpc_target(endpoints: Sequence[tuple[str, int]]) -> str:
    """One endpoint: ``host:port`` (gRPC resolves it). Several: an ``ipv4:``/``ipv6:`` list."""
    if not endpoints:
        raise ValueError("etcd store: no endpoints given")
    if len(endpoints) == 1:
        host, port = endpoints[0]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    addrs = [(_resolve(host, port), port) for host, port in endpoints]
    families = {ipaddress.ip_address(a).version for a, _ in addrs}
    if len(families) != 1:
        raise ValueError(f"etcd endpoints {endpoints}: mix IPv4 and IPv6; use one family")
    if families == {6}:
        return "ipv6:" + ",".join(f"[{a}]:{p}" for a, p in addrs)
    return "ipv4:" + ",".join(f"{a}:{p}" for a, p in addrs)


def _resolve(host: str, port: int) -> str:
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    try:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise StoreUnavailable(f"etcd endpoint {host}:{port}: cannot resolve: {exc}") from exc
    return str(info[0][4][0])


def _range_end(prefix: bytes) -> bytes:
    """The end of the key range holding every key that starts with ``prefix``."""
    end = bytearray(prefix)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return b"\0"


# -- transaction building blocks (etcd v3 protobuf messages) ---------------------------------


def _absent(key: bytes) -> Any:
    return rpc.Compare(
        key=key, target=rpc.Compare.CREATE, result=rpc.Compare.EQUAL, create_revision=0
    )


def _at(key: bytes, mod_revision: int) -> Any:
    return rpc.Compare(
        key=key, target=rpc.Compare.MOD, result=rpc.Compare.EQUAL, mod_revision=mod_revision
    )


def _put(key: bytes, value: bytes) -> Any:
    return rpc.RequestOp(request_put=rpc.PutRequest(key=key, value=value))


def _delete(key: bytes) -> Any:
    return rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=key))


def _get(key: bytes) -> Any:
    return rpc.RequestOp(request_range=rpc.RangeRequest(key=key))


def _kv_of(txn_response: Any, index: int) -> Any | None:
    """The key-value read by the ``index``-th range op of a transaction, None if absent."""
    kvs = txn_response.responses[index].response_range.kvs
    return kvs[0] if kvs else None


@dataclass(frozen=True, slots=True)
class _Stored:
    """An object key's value, decoded."""

    data: Doc
    claims: tuple[str, ...]
    token: str


def _encode(data: Doc, claims: tuple[str, ...], token: str) -> bytes:
    body = {"data": data, "claims": list(claims), "w": token}
    return json.dumps(body, separators=(",", ":"), allow_nan=False).encode()


def _decode(key: bytes, value: bytes) -> _Stored:
    try:
        body = json.loads(value)
        return _Stored(body["data"], tuple(body["claims"]), str(body.get("w", "")))
    except (ValueError, KeyError, TypeError) as exc:
        raise StoreError(f"etcd key {key.decode(errors='replace')}: malformed record") from exc


class EtcdStore(Store):
    """``etcd://``: the store in an etcd v3 cluster. See the module docstring for semantics.

    ``op_timeout``: how long a read or write keeps retrying transient failures before
    ``StoreUnavailable``. ``watch_timeout``: how long a watch may stay disconnected before it
    raises ``StoreUnavailable`` (None: never). ``reconnect_backoff``: gRPC's (min, max)
    reconnect delay in seconds. ``keepalive``: seconds between HTTP/2 pings on open streams.
    """

    def __init__(
        self,
        endpoints: Sequence[tuple[str, int]],
        prefix: str = "/ferry",
        *,
        op_timeout: float = 10.0,
        watch_timeout: float | None = None,
        reconnect_backoff: tuple[float, float] = (0.05, 0.25),
        keepalive: float = 10.0,
    ) -> None:
        if not endpoints:
            raise ValueError("etcd store: no endpoints given")
        self.endpoints = list(endpoints)
        self.prefix = prefix.rstrip("/")
        self.op_timeout = op_timeout
        self.watch_timeout = watch_timeout
        self._backoff = reconnect_backoff
        self._options = _channel_options(reconnect_backoff, keepalive)
        self._channel: Any = None
        self._kv: Any = None
        self._watch_stub: Any = None
        self._known: dict[tuple[str, str], Record] = {}
        self._watches: set[_MergedWatch] = set()
        self._closed = False

    def __repr__(self) -> str:
        eps = ",".join(f"{h}:{p}" for h, p in self.endpoints)
        return f"EtcdStore(etcd://{eps}, prefix={self.prefix!r})"

    # -- keys --------------------------------------------------------------------------------

    def _key(self, *parts: str) -> bytes:
        return "/".join((self.prefix, *parts)).encode()

    def _obj_key(self, topic: str, table: str, id: str) -> bytes:
        return self._key("o", topic, table, id)

    def _idx_key(self, table: str, id: str) -> bytes:
        return self._key("i", table, id)

    def _claim_key(self, claim: str) -> bytes:
        return self._key("c", claim)

    def _record(self, kv: Any) -> Record:
        """The Record an object key-value holds (its key names topic, table and id)."""
        key: bytes = kv.key
        topic, table, id = key[len(self._key("o")) + 1 :].decode().split("/")
        stored = _decode(key, kv.value)
        rec = Record(table, id, topic, int(kv.mod_revision), stored.data, stored.claims)
        self._remember(rec)
        return rec

    def _remember(self, rec: Record) -> None:
        self._known.pop((rec.table, rec.id), None)
        self._known[rec.table, rec.id] = rec
        if len(self._known) > _CACHE_SIZE:
            del self._known[next(iter(self._known))]

    # -- gRPC plumbing -----------------------------------------------------------------------

    def _stubs(self) -> tuple[Any, Any]:
        """The KV and Watch stubs; the channel is created on first use, in the running loop."""
        self._check_open()
        if self._channel is None:
            target = _grpc_target(self.endpoints)
            self._channel = grpc.aio.insecure_channel(target, options=self._options)
            self._kv = rpc.KVStub(self._channel)
            self._watch_stub = rpc.WatchStub(self._channel)
            log.debug("etcd store: channel to %s", target)
        return self._kv, self._watch_stub

    async def _call(self, what: str, fn: Callable[[Any, float], Awaitable[T]]) -> tuple[T, bool]:
        """Run ``fn(kv_stub, timeout)``, retrying transient failures until ``op_timeout``.

        Returns the result and whether an earlier attempt failed in a way that leaves its
        outcome unknown (it may have been applied).
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.op_timeout
        delay, uncertain = self._backoff[0], False
        while True:
            kv, _ = self._stubs()
            remaining = deadline - loop.time()
            try:
                return await fn(kv, max(remaining, 0.001)), uncertain
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in _TRANSIENT:
                    raise StoreError(
                        f"{what}: etcd error {exc.code().name}: {exc.details()}"
                    ) from exc
                uncertain = True
                if loop.time() + delay >= deadline:
                    raise StoreUnavailable(
                        f"{what}: etcd at {self._endpoints_text()} unavailable for "
                        f"{self.op_timeout:g}s ({exc.code().name}: {exc.details()})"
                    ) from exc
                log.debug("%s: %s (%s), retrying", what, exc.code().name, exc.details())
            await asyncio.sleep(delay)
            delay = min(delay * 2, self._backoff[1])

    def _endpoints_text(self) -> str:
        return ",".join(f"{h}:{p}" for h, p in self.endpoints)

    async def _range(self, what: str, key: bytes, **kw: Any) -> Any:
        request = rpc.RangeRequest(key=key, **kw)

        async def call(kv: Any, seconds: float) -> Any:
            return await kv.Range(request, timeout=seconds, wait_for_ready=True)

        response, _ = await self._call(what, call)
        return response

    async def _txn(
        self, what: str, compare: Iterable[Any], success: Iterable[Any], failure: Iterable[Any]
    ) -> tuple[Any, bool]:
        request = rpc.TxnRequest(compare=list(compare), success=list(success),
                                 failure=list(failure))

        async def call(kv: Any, seconds: float) -> Any:
            return await kv.Txn(request, timeout=seconds, wait_for_ready=True)

        return await self._call(what, call)

    async def _range_prefix(self, prefix: bytes, revision: int) -> _KVs:
        """Every key-value under ``prefix`` at ``revision``, paged."""
        end, start, out = _range_end(prefix), prefix, _KVs()
        while True:
            resp = await self._range(
                f"range {prefix.decode()}", start, range_end=end, revision=revision, limit=_PAGE
            )
            out.extend(resp.kvs)
            if not resp.more or not resp.kvs:
                return out
            start = resp.kvs[-1].key + b"\0"

    # -- reads -------------------------------------------------------------------------------

    async def get(self, table: str, id: str) -> Record | None:
        known = self._known.get((table, id))
        if known is not None:
            resp = await self._range(f"get {table} {id}", self._obj_key(known.topic, table, id))
            if resp.kvs:
                return self._record(resp.kvs[0])
        # Unknown topic (or the record moved): the id index names it. Read the object at the
        # index's revision, so the two reads are one consistent view.
        idx = await self._range(f"get {table} {id}", self._idx_key(table, id))
        if not idx.kvs:
            self._known.pop((table, id), None)
            return None
        topic = idx.kvs[0].value.decode()
        obj = await self._range(
            f"get {table} {id}", self._obj_key(topic, table, id), revision=idx.header.revision
        )
        return self._record(obj.kvs[0]) if obj.kvs else None

    async def list(
        self, table: str, *, topic: str | None = None, where: Mapping[str, Any] | None = None
    ) -> list[Record]:
        check_name("table", table)
        revision = await self.revision()
        if topic is not None:
            prefixes = [self._key("o", check_name("topic", topic), table, "")]
        else:
            prefixes = await self._table_prefixes(table, revision)
        kvs = await self._range_prefixes(prefixes, revision)
        recs = (self._record(kv) for kv in kvs)
        return sorted(
            (r for r in recs if r.table == table and matches(r, where)), key=lambda r: r.id
        )

    async def _table_prefixes(self, table: str, revision: int) -> _Prefixes:
        """The object prefixes holding a table's records: per topic, or all objects."""
        index = await self._range_prefix(self._key("i", table, ""), revision)
        topics = {kv.value.decode() for kv in index}
        if len(topics) > _MAX_TOPIC_RANGES:
            return [self._key("o", "")]
        return [self._key("o", t, table, "") for t in sorted(topics)]

    async def _range_prefixes(self, prefixes: Sequence[bytes], revision: int) -> _KVs:
        pages = await asyncio.gather(*(self._range_prefix(p, revision) for p in prefixes))
        return [kv for page in pages for kv in page]

    async def claim_holder(self, claim: str) -> str | None:
        resp = await self._range(f"claim {claim}", self._claim_key(claim))
        return resp.kvs[0].value.decode() if resp.kvs else None

    async def revision(self) -> int:
        resp = await self._range("revision", self._key(""), keys_only=True, limit=1)
        return int(resp.header.revision)

    async def snapshot(self, flt: WatchFilter = EVERYTHING) -> Snapshot:
        revision = await self.revision()
        kvs = await self._range_prefixes(self._filter_prefixes(flt), revision)
        recs = [r for r in map(self._record, kvs) if flt.admits(r)]
        return Snapshot(revision, sorted(recs, key=lambda r: (r.table, r.id)))

    def _filter_prefixes(self, flt: WatchFilter) -> _Prefixes:
        """The object key prefixes a filter needs: per topic (and table) when it names them."""
        if flt.topics is None:
            return [self._key("o", "")]
        if flt.tables is None:
            return [self._key("o", t, "") for t in sorted(flt.topics)]
        return [self._key("o", t, tb, "") for t in sorted(flt.topics) for tb in sorted(flt.tables)]

    # -- writes ------------------------------------------------------------------------------

    async def create(
        self, table: str, id: str, topic: str, data: Doc, *, claims: Sequence[str] = ()
    ) -> Record:
        for kind, name in (("table", table), ("id", id), ("topic", topic)):
            check_name(kind, name)
        held = tuple(sorted(set(claims)))
        token = uuid.uuid4().hex
        value = _encode(data, held, token)
        obj, idx = self._obj_key(topic, table, id), self._idx_key(table, id)
        owner = f"{table}/{id}".encode()
        claim_keys = [self._claim_key(c) for c in held]
        for _ in range(_CREATE_RETRIES):
            resp, _uncertain = await self._txn(
                f"create {table} {id}",
                [_absent(idx), _absent(obj), *map(_absent, claim_keys)],
                [_put(obj, value), _put(idx, topic.encode()),
                 *(_put(k, owner) for k in claim_keys)],
                [_get(idx), _get(obj), *map(_get, claim_keys)],
            )
            if resp.succeeded:
                rec = Record(table, id, topic, int(resp.header.revision), _decode(obj, value).data,
                             held)
                self._remember(rec)
                return rec
            mine = self._own_write(_kv_of(resp, 1), token)
            if mine is not None:
                return mine
            if _kv_of(resp, 0) is not None:
                raise AlreadyExists(table, id)
            self._raise_claim_taken(resp, held, first_op=2)
        raise StoreError(f"create {table} {id}: transaction kept failing without a cause")

    async def update(
        self, table: str, id: str, data: Doc, *, version: int, claims: Sequence[str] | None = None
    ) -> Record:
        old = await self._at_version(table, id, version)
        held = old.claims if claims is None else tuple(sorted(set(claims)))
        taken = [c for c in held if c not in old.claims]
        dropped = [c for c in old.claims if c not in held]
        token = uuid.uuid4().hex
        value = _encode(data, held, token)
        obj, owner = self._obj_key(old.topic, table, id), f"{table}/{id}".encode()
        for _ in range(_CREATE_RETRIES):
            resp, _uncertain = await self._txn(
                f"update {table} {id}",
                [_at(obj, version), *(_absent(self._claim_key(c)) for c in taken)],
                [_put(obj, value), *(_put(self._claim_key(c), owner) for c in taken),
                 *(_delete(self._claim_key(c)) for c in dropped)],
                [_get(obj), *(_get(self._claim_key(c)) for c in taken)],
            )
            if resp.succeeded:
                rec = Record(table, id, old.topic, int(resp.header.revision),
                             _decode(obj, value).data, held)
                self._remember(rec)
                return rec
            current = _kv_of(resp, 0)
            mine = self._own_write(current, token)
            if mine is not None:
                return mine
            if current is None or int(current.mod_revision) != version:
                raise Conflict(table, id, version, None if current is None else
                               int(current.mod_revision))
            self._raise_claim_taken(resp, tuple(taken), first_op=1)
        raise StoreError(f"update {table} {id}: transaction kept failing without a cause")

    async def delete(self, table: str, id: str, *, version: int | None = None) -> Record:
        while True:
            old = await self._current(table, id, version)
            if old is None:
                if version is not None:
                    raise Conflict(table, id, version, None)
                raise NotFound(table, id)
            if version is not None and old.version != version:
                raise Conflict(table, id, version, old.version)
            obj = self._obj_key(old.topic, table, id)
            resp, uncertain = await self._txn(
                f"delete {table} {id}",
                [_at(obj, old.version)],
                [_delete(obj), _delete(self._idx_key(table, id)),
                 *(_delete(self._claim_key(c)) for c in old.claims)],
                [_get(obj)],
            )
            current = _kv_of(resp, 0)
            if resp.succeeded or (uncertain and current is None):
                # After a lost reply, "gone" means our delete (or an identical one) applied.
                self._known.pop((table, id), None)
                return old
            if version is not None:
                raise Conflict(table, id, version, None if current is None else
                               int(current.mod_revision))
            # No version given: the record changed under us; delete what it is now.

    async def _current(self, table: str, id: str, version: int | None) -> Record | None:
        """The record, from memory when we know it at exactly ``version`` (the CAS checks it)."""
        known = self._known.get((table, id))
        if version is not None and known is not None and known.version == version:
            return known
        return await self.get(table, id)

    async def _at_version(self, table: str, id: str, version: int) -> Record:
        old = await self._current(table, id, version)
        if old is None or old.version != version:
            raise Conflict(table, id, version, None if old is None else old.version)
        return old

    def _own_write(self, kv: Any | None, token: str) -> Record | None:
        """The record if ``kv`` is the write carrying ``token`` (an earlier attempt applied)."""
        if kv is None or _decode(kv.key, kv.value).token != token:
            return None
        log.info("etcd: write to %s was applied before its reply was lost", kv.key.decode())
        return self._record(kv)

    def _raise_claim_taken(self, resp: Any, claims: tuple[str, ...], first_op: int) -> None:
        for i, claim in enumerate(claims):
            holder = _kv_of(resp, first_op + i)
            if holder is not None:
                raise ClaimTaken(claim, holder.value.decode())

    async def next_key(self, pool: str) -> int:
        key = self._key("k", check_name("pool", pool))
        resp = await self._range(f"next_key {pool}", key)
        current = resp.kvs[0] if resp.kvs else None
        while True:
            value = int(current.value) if current is not None else 0
            guard = _absent(key) if current is None else _at(key, int(current.mod_revision))
            txn, _ = await self._txn(
                f"next_key {pool}", [guard], [_put(key, str(value + 1).encode())], [_get(key)]
            )
            if txn.succeeded:
                return value + 1
            current = _kv_of(txn, 0)

    # -- watch -------------------------------------------------------------------------------

    async def watch(
        self, flt: WatchFilter = EVERYTHING, *, from_revision: int
    ) -> AsyncIterator[WatchEvent]:
        _, stub = self._stubs()
        merged = _MergedWatch(self, stub, [self._watch_prefix(flt)], from_revision)
        self._watches.add(merged)
        try:
            async for event in merged:
                if flt.admits(event.record):
                    yield event
        finally:
            self._watches.discard(merged)
            await merged.stop()

    def _watch_prefix(self, flt: WatchFilter) -> bytes:
        """The one key range a watch follows: as narrow as a single range can be."""
        if flt.topics is not None and len(flt.topics) == 1:
            (topic,) = flt.topics
            if flt.tables is not None and len(flt.tables) == 1:
                (table,) = flt.tables
                return self._key("o", topic, table, "")
            return self._key("o", topic, "")
        return self._key("o", "")

    def _event(self, ev: Any) -> WatchEvent:
        kv, prev = ev.kv, (ev.prev_kv if ev.HasField("prev_kv") else None)
        revision = int(kv.mod_revision)
        old = self._record(prev) if prev is not None and prev.key else None
        if ev.type == rpc.Event.DELETE:
            self._known.pop(self._table_id(kv.key), None)
            return WatchEvent(revision, EventKind.DELETED, old or self._bare(kv.key), None)
        new = self._record(kv)
        if kv.create_revision == kv.mod_revision:
            return WatchEvent(revision, EventKind.CREATED, None, new)
        return WatchEvent(revision, EventKind.UPDATED, old, new)

    def _table_id(self, key: bytes) -> tuple[str, str]:
        _, table, id = key[len(self._key("o")) + 1 :].decode().split("/")
        return table, id

    def _bare(self, key: bytes) -> Record:
        """A deleted record whose previous value etcd no longer has (compacted)."""
        topic, table, id = key[len(self._key("o")) + 1 :].decode().split("/")
        return Record(table, id, topic, 0, {})

    # -- lifecycle ---------------------------------------------------------------------------

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for merged in list(self._watches):
            merged.close()
        if self._channel is not None:
            await self._channel.close()
        self._channel = self._kv = self._watch_stub = None

    def _check_open(self) -> None:
        if self._closed:
            raise StoreUnavailable(f"{self!r} was closed")


class _MergedWatch:
    """The stream(s) of one ``watch()`` call feeding one queue of events (in arrival order)."""

    def __init__(
        self, store: EtcdStore, stub: Any, prefixes: Sequence[bytes], from_revision: int
    ) -> None:
        self._queue: asyncio.Queue[WatchEvent | BaseException] = asyncio.Queue(_WATCH_QUEUE)
        self._streams = [_WatchStream(store, stub, p, from_revision, self._queue)
                         for p in prefixes]
        self._tasks = [asyncio.create_task(s.run(), name=f"etcd-watch {s.name}")
                       for s in self._streams]

    async def __aiter__(self) -> AsyncIterator[WatchEvent]:
        while True:
            item = await self._queue.get()
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self) -> None:
        """The store is closing: stop the streams; the consumer gets ``StoreUnavailable``."""
        for task in self._tasks:
            task.cancel()
        with contextlib.suppress(asyncio.QueueFull):
            self._queue.put_nowait(StoreUnavailable("the etcd store was closed"))
        if self._queue.full():
            # A stalled consumer has a full queue: make room so it learns about the close.
            self._queue.get_nowait()
            self._queue.put_nowait(StoreUnavailable("the etcd store was closed"))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task


class _WatchStream:
    """One etcd watch on one key range that survives disconnects.

    ``next_revision`` is one past the last revision it delivered: a new stream starts there.
    """

    def __init__(
        self, store: EtcdStore, stub: Any, prefix: bytes, from_revision: int,
        queue: asyncio.Queue[WatchEvent | BaseException],
    ) -> None:
        self.store, self.stub, self.prefix, self.queue = store, stub, prefix, queue
        self.name = prefix.decode()
        self.next_revision = from_revision + 1
        self._down_since: float | None = None
        self._created = False
        self._setup_deadline: asyncio.Timeout | None = None

    async def run(self) -> None:
        try:
            await self._follow()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # handed to the consumer, who raises it
            await self.queue.put(exc)

    async def _follow(self) -> None:
        loop = asyncio.get_running_loop()
        delay = self.store._backoff[0]
        while True:
            self._created = False
            try:
                async with asyncio.timeout_at(self._give_up_at()) as self._setup_deadline:
                    await self._stream()
                reason = "the server ended the stream"
            except TimeoutError:
                reason = "no connection"
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in _TRANSIENT:
                    raise StoreError(
                        f"watch {self.name}: etcd error {exc.code().name}: {exc.details()}"
                    ) from exc
                reason = f"{exc.code().name}: {exc.details()}"
            except _Reconnect as exc:
                reason = str(exc)
            if self._created or self._down_since is None:
                self._down_since = loop.time()
                delay = self.store._backoff[0]
                log.warning("watch %s lost after revision %d (%s); reconnecting",
                            self.name, self.next_revision - 1, reason)
            self._check_give_up(loop.time(), reason)
            if not self._created:
                # The stream failed before it was set up (etcd answering but not ready):
                # back off. A stream that worked is re-opened at once; gRPC waits for the
                # connection (wait_for_ready) with its own short reconnect backoff.
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.store._backoff[1])

    def _give_up_at(self) -> float | None:
        """When a stream that is not set up yet stops waiting for etcd (loop time), or None."""
        limit = self.store.watch_timeout
        if limit is None:
            return None
        now = asyncio.get_running_loop().time()
        return (now if self._down_since is None else self._down_since) + limit

    def _check_give_up(self, now: float, reason: str) -> None:
        limit = self.store.watch_timeout
        if limit is not None and self._down_since is not None and now - self._down_since > limit:
            raise StoreUnavailable(
                f"watch {self.name}: etcd at {self.store._endpoints_text()} unavailable for "
                f"{limit:g}s ({reason})"
            )

    async def _stream(self) -> None:
        """Follow one gRPC watch stream until it breaks; ``_created`` tells if it was set up."""
        create = rpc.WatchCreateRequest(
            key=self.prefix, range_end=_range_end(self.prefix),
            start_revision=self.next_revision, prev_kv=True,
        )
        # hasleader: etcd ends the stream if its member loses the cluster leader, instead of
        # leaving it silently stale; we then reconnect (possibly to another member).
        call = self.stub.Watch(wait_for_ready=True, metadata=(("hasleader", "true"),))
        try:
            await call.write(rpc.WatchRequest(create_request=create))
            while True:
                resp = await call.read()
                if resp is grpc.aio.EOF:
                    return
                await self._handle(resp)
        finally:
            call.cancel()

    async def _handle(self, resp: Any) -> None:
        if resp.compact_revision:
            raise Compacted(self.next_revision - 1, int(resp.compact_revision))
        if resp.canceled:
            raise _Reconnect(f"etcd cancelled the watch: {resp.cancel_reason}")
        if resp.created and not self._created:
            self._created = True
            if self._setup_deadline is not None:
                self._setup_deadline.reschedule(None)  # set up: no deadline while it works
        if resp.created and self._down_since is not None:
            took = asyncio.get_running_loop().time() - self._down_since
            log.info("watch %s resumed at revision %d after %.3fs",
                     self.name, self.next_revision, took)
            self._down_since = None
        for ev in resp.events:
            await self.queue.put(self.store._event(ev))
            self.next_revision = int(ev.kv.mod_revision) + 1


class _Reconnect(Exception):
    """The watch stream ended in a way that calls for a new stream."""
