"""Typed access to the northbound store, with the invariants between objects.

``Northbound`` turns model objects into store records and back. On every write it checks the
references the object makes, allocates unique keys (network VNIs, port keys) and claims the
values that must be unique (an IP or MAC in a network, a tunnel key, a chassis' tunnel IP) in
the same atomic store write. A rejected object raises ``InvalidObject`` naming the field and
the reason, and nothing is written.
"""

from __future__ import annotations

import builtins
import ipaddress
import random
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

from pydantic import ValidationError

from ferry.model.objects import (
    BY_TABLE,
    Chassis,
    FieldError,
    FloatingIP,
    LogicalPort,
    LogicalRouter,
    LogicalSwitch,
    Migration,
    NbObject,
    SecurityGroup,
    SecurityGroupRule,
    Subnet,
)
from ferry.store.base import ClaimTaken, Conflict, NotFound, Record, Store

T = TypeVar("T", bound=NbObject)


KEY_ATTEMPTS = 16


class InvalidObject(ValueError):
    """An object that breaks an invariant: names the table, the field and the reason."""

    def __init__(self, table: str, field: str, reason: str) -> None:
        super().__init__(f"{table}: {field}: {reason}")
        self.table, self.field, self.reason = table, field, reason


class InUse(InvalidObject):
    """A unique value is taken, or an object is still referenced."""


def parse(cls: type[T], data: Mapping[str, Any]) -> T:
    """Validate a document into a model object; errors name the field."""
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = [str(p) for p in err["loc"]]
        blamed = (err.get("ctx") or {}).get("error")
        if isinstance(blamed, FieldError):
            loc.append(blamed.field)
        where = ".".join(loc) or "(object)"
        msg = str(err["msg"]).removeprefix("Value error, ")
        extra = f" (and {len(e.errors()) - 1} more)" if len(e.errors()) > 1 else ""
        raise InvalidObject(cls.TABLE, where, msg + extra) from None


def from_record(rec: Record) -> NbObject:
    cls = BY_TABLE.get(rec.table)
    if cls is None:
        raise InvalidObject(rec.table, "(table)", "unknown table")
    return parse(cls, {**rec.data, "version": rec.version})


def claims_of(obj: NbObject) -> list[str]:
    """The unique values an object holds, as store claims."""
    if isinstance(obj, LogicalSwitch):
        return [f"netkey/{obj.tunnel_key}"]
    if isinstance(obj, LogicalPort):
        out = [f"mac/{obj.network_id}/{obj.mac}", f"portkey/{obj.tunnel_key}"]
        out += [f"ip/{obj.network_id}/{f.ip_address}" for f in obj.fixed_ips]
        return out
    if isinstance(obj, FloatingIP):
        return [f"ip/{obj.floating_network_id}/{obj.floating_ip_address}"]
    if isinstance(obj, Chassis):
        return [f"tunnel_ip/{obj.tunnel_ip}"]
    return []


def _claim_field(claim: str) -> tuple[str, str]:
    kind, _, rest = claim.partition("/")
    value = rest.rsplit("/", 1)[-1]
    field = {"netkey": "tunnel_key", "portkey": "tunnel_key", "mac": "mac",
             "ip": "fixed_ips", "tunnel_ip": "tunnel_ip"}.get(kind, kind)
    return field, value


class Northbound:
    """The northbound database: model objects over a ``Store``."""

    def __init__(self, store: Store, rng: random.Random | None = None) -> None:
        self.store = store
        self._random = rng or random.Random()

    # -- reads -------------------------------------------------------------------------------

    async def get(self, cls: type[T], id: str) -> T | None:
        rec = await self.store.get(cls.TABLE, id)
        return None if rec is None else parse(cls, {**rec.data, "version": rec.version})

    async def must_get(self, cls: type[T], id: str, field: str, table: str) -> T:
        obj = await self.get(cls, id)
        if obj is None:
            raise InvalidObject(table, field, f"{cls.TABLE} {id} does not exist")
        return obj

    async def list(
        self, cls: type[T], *, topic: str | None = None, where: Mapping[str, Any] | None = None
    ) -> list[T]:
        recs = await self.store.list(cls.TABLE, topic=topic, where=where)
        return [parse(cls, {**r.data, "version": r.version}) for r in recs]

    async def ports_on(self, chassis: str, topic: str | None = None) -> builtins.list[LogicalPort]:
        """Ports whose active binding is on ``chassis`` (the "ports on chassis X" index)."""
        return [p for p in await self.list(LogicalPort, topic=topic) if p.host == chassis]

    # -- writes ------------------------------------------------------------------------------

    async def create(self, obj: T) -> T:
        """Validate and write ``obj``; its keys are allocated in the same atomic write."""
        await self._check_references(obj)
        for _ in range(KEY_ATTEMPTS):
            candidate, own_key = self._allocate(obj)
            try:
                rec = await self.store.create(candidate.TABLE, candidate.id, candidate.topic,
                                              candidate.to_doc(), claims=claims_of(candidate))
            except ClaimTaken as e:
                if own_key is not None and e.claim == own_key:
                    continue  # another object drew the same key: draw again
                raise self._in_use(candidate, e) from None
            return candidate.model_copy(update={"version": rec.version})
        raise InvalidObject(obj.TABLE, "tunnel_key", "no free key found; the key space is full")

    async def update(self, obj: T) -> T:
        """Write ``obj`` if the stored one is still at ``obj.version`` (else ``Conflict``)."""
        old = await self.get(type(obj), obj.id)
        if old is None:
            raise NotFound(obj.TABLE, obj.id)
        if old.topic != obj.topic:
            raise InvalidObject(obj.TABLE, "topic", "an object cannot move to another project")
        for key_field in ("tunnel_key",):
            if getattr(old, key_field, None) != getattr(obj, key_field, None):
                raise InvalidObject(obj.TABLE, key_field, "allocated by the store; read-only")
        await self._check_references(obj)
        try:
            rec = await self.store.update(obj.TABLE, obj.id, obj.to_doc(), version=obj.version,
                                          claims=claims_of(obj))
        except ClaimTaken as e:
            raise self._in_use(obj, e) from None
        return obj.model_copy(update={"version": rec.version})

    async def modify(
        self, cls: type[T], id: str, change: Callable[[T], T | Awaitable[T]], attempts: int = 20
    ) -> T:
        """Read-modify-write with compare-and-swap, retried on concurrent changes."""
        for _ in range(attempts):
            current = await self.get(cls, id)
            if current is None:
                raise NotFound(cls.TABLE, id)
            changed = change(current)
            new = changed if isinstance(changed, NbObject) else await changed
            if new == current:
                return current  # nothing to change: no write, no event
            try:
                return await self.update(new)
            except Conflict:
                continue
        raise Conflict(cls.TABLE, id, -1, None)

    async def delete(self, cls: type[T], id: str, *, version: int | None = None) -> T:
        await self._check_unreferenced(cls, id)
        rec = await self.store.delete(cls.TABLE, id, version=version)
        return parse(cls, {**rec.data, "version": rec.version})

    # -- invariants --------------------------------------------------------------------------

    def _allocate(self, obj: T) -> tuple[T, str | None]:
        """Draw a random free-looking key for objects that need one. Keys are claims, taken
        atomically with the object: a rejected object consumes nothing, and two objects that
        draw the same key cannot both be written (the loser draws again)."""
        if not isinstance(obj, LogicalSwitch | LogicalPort) or obj.tunnel_key != 0:
            return obj, None
        limit = 2**24 if isinstance(obj, LogicalSwitch) else 2**31
        key = self._random.randrange(1, limit)
        kind = "netkey" if isinstance(obj, LogicalSwitch) else "portkey"
        return obj.model_copy(update={"tunnel_key": key}), f"{kind}/{key}"  # type: ignore[return-value]

    def _in_use(self, obj: NbObject, e: ClaimTaken) -> InUse:
        field, value = _claim_field(e.claim)
        return InUse(obj.TABLE, field, f"{value} is already in use by {e.holder}")

    async def _check_references(self, obj: NbObject) -> None:
        table = obj.TABLE
        if isinstance(obj, Subnet):
            await self.must_get(LogicalSwitch, obj.network_id, "network_id", table)
            for other in await self.list(Subnet, where={"network_id": obj.network_id}):
                if other.id != obj.id and other.cidr.overlaps(obj.cidr):
                    raise InUse(table, "cidr", f"{obj.cidr} overlaps subnet {other.id} "
                                f"({other.cidr}) on network {obj.network_id}")
        elif isinstance(obj, LogicalPort):
            await self._check_port(obj)
        elif isinstance(obj, LogicalRouter):
            await self._check_router(obj)
        elif isinstance(obj, FloatingIP):
            await self._check_floatingip(obj)
        elif isinstance(obj, SecurityGroupRule):
            await self.must_get(SecurityGroup, obj.security_group_id, "security_group_id", table)
            if obj.remote_group_id is not None:
                await self.must_get(SecurityGroup, obj.remote_group_id, "remote_group_id", table)
        elif isinstance(obj, Migration):
            await self.must_get(LogicalPort, obj.port_id, "port_id", table)
            if obj.id != obj.port_id:
                raise InvalidObject(table, "id", "a migration's id is its port's id")
            await self.must_get(Chassis, obj.source_chassis, "source_chassis", table)
            await self.must_get(Chassis, obj.dest_chassis, "dest_chassis", table)

    async def _check_port(self, port: LogicalPort) -> None:
        table = port.TABLE
        await self.must_get(LogicalSwitch, port.network_id, "network_id", table)
        for i, fip in enumerate(port.fixed_ips):
            where = f"fixed_ips.{i}.subnet_id"
            subnet = await self.must_get(Subnet, fip.subnet_id, where, table)
            if subnet.network_id != port.network_id:
                raise InvalidObject(table, where, f"subnet {subnet.id} is not on network "
                                    f"{port.network_id}")
            net = subnet.cidr
            if fip.ip_address not in net:
                raise InvalidObject(table, f"fixed_ips.{i}.ip_address",
                                    f"{fip.ip_address} is outside subnet {subnet.id} ({net})")
            if isinstance(net, ipaddress.IPv4Network) and net.prefixlen < 31 and (
                fip.ip_address in (net.network_address, net.broadcast_address)
            ):
                raise InvalidObject(table, f"fixed_ips.{i}.ip_address",
                                    f"{fip.ip_address} is the network or broadcast address")
        for i, sg in enumerate(port.security_groups):
            await self.must_get(SecurityGroup, sg, f"security_groups.{i}", table)

    async def _check_router(self, router: LogicalRouter) -> None:
        table = router.TABLE
        for i, rp in enumerate(router.ports):
            port = await self.must_get(LogicalPort, rp.port_id, f"ports.{i}.port_id", table)
            if rp.subnet_id not in {f.subnet_id for f in port.fixed_ips}:
                raise InvalidObject(table, f"ports.{i}.subnet_id",
                                    f"port {port.id} has no address on subnet {rp.subnet_id}")
        if router.gateway is not None:
            net = await self.must_get(LogicalSwitch, router.gateway.network_id,
                                      "gateway.network_id", table)
            if not net.external:
                raise InvalidObject(table, "gateway.network_id",
                                    f"network {net.id} is not external")

    async def _check_floatingip(self, fip: FloatingIP) -> None:
        table = fip.TABLE
        net = await self.must_get(LogicalSwitch, fip.floating_network_id,
                                  "floating_network_id", table)
        if not net.external:
            raise InvalidObject(table, "floating_network_id", f"network {net.id} is not external")
        subnets = await self.list(Subnet, where={"network_id": net.id})
        if not any(fip.floating_ip_address in s.cidr for s in subnets):
            raise InvalidObject(table, "floating_ip_address",
                                f"{fip.floating_ip_address} is in no subnet of network {net.id}")
        if fip.port_id is not None:
            port = await self.must_get(LogicalPort, fip.port_id, "port_id", table)
            ips = {f.ip_address for f in port.fixed_ips}
            if fip.fixed_ip_address is not None and fip.fixed_ip_address not in ips:
                raise InvalidObject(table, "fixed_ip_address",
                                    f"{fip.fixed_ip_address} is not an address of port {port.id}")
        if fip.router_id is not None:
            await self.must_get(LogicalRouter, fip.router_id, "router_id", table)

    async def _check_unreferenced(self, cls: type[NbObject], id: str) -> None:
        """Refuse deleting an object others still point at (Neutron's *InUse errors)."""
        refs: list[tuple[type[NbObject], Mapping[str, Any] | None, Callable[[Any], bool]]] = []
        if cls is LogicalSwitch:
            refs = [(Subnet, {"network_id": id}, lambda _: True),
                    (LogicalPort, {"network_id": id}, lambda _: True)]
        elif cls is Subnet:
            refs = [(LogicalPort, None,
                     lambda p: any(f.subnet_id == id for f in p.fixed_ips))]
        elif cls is SecurityGroup:
            refs = [(LogicalPort, None, lambda p: id in p.security_groups),
                    (SecurityGroupRule, {"remote_group_id": id},
                     lambda r: r.security_group_id != id)]
        elif cls is LogicalPort:
            refs = [(LogicalRouter, None, lambda r: any(p.port_id == id for p in r.ports))]
        for ref_cls, where, pred in refs:
            for other in await self.list(ref_cls, where=where):
                if pred(other):
                    raise InUse(cls.TABLE, "id",
                                f"{cls.TABLE} {id} is in use by {ref_cls.TABLE} {other.id}")
