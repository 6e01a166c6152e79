"""Pure value types for OpenFlow 1.3 flows, as the controller core computes them.

No I/O and no os-ken here: these are hashable, canonical values, so two flows that OVS would
treat as the same entry compare equal, a desired-state set can be diffed against a dumped one,
and an encoder can cache serialized bytes per flow.

Field names are os-ken's OXM names (``in_port``, ``eth_dst``, ``reg6``, ``tunnel_id``...).
``tun_id`` is accepted as an alias of ``tunnel_id``. Values are canonicalized: MAC addresses as
lower-case ``aa:bb:cc:dd:ee:ff``, IP addresses in their compressed text form, everything else
as ``int``. A masked value is a ``(value, mask)`` pair; an all-ones mask is dropped and the value
is masked, which is what OVS reports back.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeAlias

# Reserved OpenFlow 1.3 port numbers.
OFPP_MAX = 0xFFFFFF00
OFPP_IN_PORT = 0xFFFFFFF8
OFPP_TABLE = 0xFFFFFFF9
OFPP_NORMAL = 0xFFFFFFFA
OFPP_FLOOD = 0xFFFFFFFB
OFPP_ALL = 0xFFFFFFFC
OFPP_CONTROLLER = 0xFFFFFFFD
OFPP_LOCAL = 0xFFFFFFFE
OFPP_ANY = 0xFFFFFFFF

#: Packet-in reason of an explicit "send to controller" action (OFPR_ACTION).
OFPR_ACTION = 1
#: ``vlan_vid`` bit saying a VLAN tag is present (OFPVID_PRESENT).
OFPVID_PRESENT = 0x1000
#: Resubmit's default ``in_port``: keep the packet's own in_port (OFPP_IN_PORT in 16 bits).
RESUBMIT_IN_PORT = 0xFFF8

MAX_TABLE = 254
COOKIE_MAX = (1 << 64) - 1

FieldKind: TypeAlias = Literal["int", "mac", "ipv4", "ipv6"]

# Field name -> (width in bits, value kind). Widths are the OXM/NXM payload widths.
_FIELDS: dict[str, tuple[int, FieldKind]] = {
    "in_port": (32, "int"),
    "in_port_nxm": (16, "int"),
    "in_phy_port": (32, "int"),
    "metadata": (64, "int"),
    "eth_dst": (48, "mac"),
    "eth_src": (48, "mac"),
    "eth_type": (16, "int"),
    "vlan_vid": (13, "int"),
    "vlan_pcp": (3, "int"),
    "ip_dscp": (6, "int"),
    "ip_ecn": (2, "int"),
    "ip_proto": (8, "int"),
    "ipv4_src": (32, "ipv4"),
    "ipv4_dst": (32, "ipv4"),
    "tcp_src": (16, "int"),
    "tcp_dst": (16, "int"),
    "udp_src": (16, "int"),
    "udp_dst": (16, "int"),
    "icmpv4_type": (8, "int"),
    "icmpv4_code": (8, "int"),
    "arp_op": (16, "int"),
    "arp_spa": (32, "ipv4"),
    "arp_tpa": (32, "ipv4"),
    "arp_sha": (48, "mac"),
    "arp_tha": (48, "mac"),
    "ipv6_src": (128, "ipv6"),
    "ipv6_dst": (128, "ipv6"),
    "ipv6_flabel": (20, "int"),
    "icmpv6_type": (8, "int"),
    "icmpv6_code": (8, "int"),
    "ipv6_nd_target": (128, "ipv6"),
    "ipv6_nd_sll": (48, "mac"),
    "ipv6_nd_tll": (48, "mac"),
    "tunnel_id": (64, "int"),
    "tun_ipv4_src": (32, "ipv4"),
    "tun_ipv4_dst": (32, "ipv4"),
    "pkt_mark": (32, "int"),
    "ct_state": (32, "int"),
    "ct_zone": (16, "int"),
    "ct_mark": (32, "int"),
    **{f"reg{i}": (32, "int") for i in range(16)},
    **{f"xreg{i}": (64, "int") for i in range(8)},
}

# Alternative names of the same field: ``tun_id``, and the NXM names os-ken gives to fields that
# OVS encodes with NXM headers (learn specs, for one) although an OXM exists. ``in_port_nxm``
# is not an alias: it is 16 bits wide, ``in_port`` 32.
_ALIASES = {
    "tun_id": "tunnel_id",
    "tunnel_id_nxm": "tunnel_id",
    "nd_target": "ipv6_nd_target",
    "nd_sll": "ipv6_nd_sll",
    "nd_tll": "ipv6_nd_tll",
    **{f"{name}_nxm": name for name in (
        "eth_dst", "eth_src", "eth_type", "ip_proto", "ipv4_src", "ipv4_dst", "tcp_src",
        "tcp_dst", "udp_src", "udp_dst", "icmpv4_type", "icmpv4_code", "arp_op", "arp_spa",
        "arp_tpa", "arp_sha", "arp_tha", "ipv6_src", "ipv6_dst", "icmpv6_type", "icmpv6_code",
        "ip_ecn")},
}

MatchValue: TypeAlias = int | str | tuple[int, int] | tuple[str, str]


class FlowError(ValueError):
    """A flow, match or action that cannot be expressed; the message says what and why."""


def field_width(name: str) -> int:
    """Width in bits of a known field (raises FlowError for an unknown one)."""
    return _field(name)[0]


def canonical_field(name: str) -> str:
    """The canonical (os-ken) name of a field, resolving aliases; FlowError if unknown."""
    name = _ALIASES.get(name, name)
    _field(name)
    return name


def _field(name: str) -> tuple[int, FieldKind]:
    try:
        return _FIELDS[_ALIASES.get(name, name)]
    except KeyError:
        raise FlowError(f"unknown field {name!r}") from None


# ---------------------------------------------------------------------------------------------
# Values


def _to_int(name: str, kind: FieldKind, value: object) -> int:
    """A field value as an integer of the field's width (accepts text for addresses)."""
    if isinstance(value, bool):
        raise FlowError(f"{name}: boolean is not a field value")
    if isinstance(value, int):
        return value
    if not isinstance(value, str):
        raise FlowError(f"{name}: expected int or str, got {type(value).__name__}")
    try:
        if kind == "mac":
            parts = value.split(":")
            if len(parts) != 6 or not all(1 <= len(p) <= 2 for p in parts):
                raise ValueError(value)
            return int("".join(p.zfill(2) for p in parts), 16)
        if kind == "ipv4":
            return int(ipaddress.IPv4Address(value))
        if kind == "ipv6":
            return int(ipaddress.IPv6Address(value))
        return int(value, 0)
    except ValueError:
        raise FlowError(f"{name}: bad {kind} value {value!r}") from None


def _from_int(kind: FieldKind, value: int) -> int | str:
    if kind == "mac":
        raw = f"{value:012x}"
        return ":".join(raw[i : i + 2] for i in range(0, 12, 2))
    if kind == "ipv4":
        return str(ipaddress.IPv4Address(value))
    if kind == "ipv6":
        return ipaddress.IPv6Address(value).compressed
    return value


def canonical_value(name: str, value: object) -> int | str:
    """An unmasked field value in canonical form, range-checked against the field width."""
    width, kind = _field(name)
    number = _to_int(name, kind, value)
    if not 0 <= number < (1 << width):
        raise FlowError(f"{name}: value {value!r} does not fit in {width} bits")
    return _from_int(kind, number)


def _canonical_match_value(name: str, value: object) -> MatchValue:
    width, kind = _field(name)
    if isinstance(value, str) and "/" in value and kind in ("ipv4", "ipv6"):
        net = ipaddress.ip_network(value, strict=False)
        value = (str(net.network_address), str(net.netmask))
    if not isinstance(value, tuple):
        return canonical_value(name, value)
    if len(value) != 2:
        raise FlowError(f"{name}: a masked value is a (value, mask) pair, got {value!r}")
    number = _to_int(name, kind, value[0])
    mask = _to_int(name, kind, value[1])
    full = (1 << width) - 1
    for part in (number, mask):
        if not 0 <= part <= full:
            raise FlowError(f"{name}: {value!r} does not fit in {width} bits")
    if mask == full:
        return _from_int(kind, number)
    if mask == 0:
        raise FlowError(f"{name}: an all-zero mask matches anything; leave the field out")
    masked = _from_int(kind, number & mask)
    mask_value = _from_int(kind, mask)
    if isinstance(masked, int) and isinstance(mask_value, int):
        return (masked, mask_value)
    return (str(masked), str(mask_value))


class Match(Mapping[str, MatchValue]):
    """An immutable, hashable, canonical OpenFlow match: field name -> value or (value, mask).

    ``Match(in_port=3, reg6=5)`` or ``Match.of({"eth_dst": "AA:BB:CC:00:00:01"})``. Two matches
    that OVS treats as the same compare and hash equal. Prerequisites (``eth_type`` before
    ``ipv4_dst``...) are not added: OVS rejects a flow that lacks them, naming the flow.
    """

    __slots__ = ("_hash", "_items")
    _items: tuple[tuple[str, MatchValue], ...]
    _hash: int

    def __init__(self, **fields: object) -> None:
        items: dict[str, MatchValue] = {}
        for name, value in fields.items():
            canon = canonical_field(name)
            if canon in items:
                raise FlowError(f"field {canon!r} given twice (alias {name!r})")
            items[canon] = _canonical_match_value(canon, value)
        object.__setattr__(self, "_items", tuple(sorted(items.items())))
        object.__setattr__(self, "_hash", hash(self._items))

    @classmethod
    def of(cls, fields: Mapping[str, object]) -> Match:
        return cls(**fields)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("Match is immutable")

    def __getitem__(self, name: str) -> MatchValue:
        name = _ALIASES.get(name, name)
        for key, value in self._items:
            if key == name:
                return value
        raise KeyError(name)

    def __iter__(self) -> Iterator[str]:
        return (key for key, _ in self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Match):
            return self._items == other._items
        return NotImplemented

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}={v!r}" for k, v in self._items)
        return f"Match({inner})"

    def __str__(self) -> str:
        return ",".join(f"{k}={_fmt_value(v)}" for k, v in self._items)

    @property
    def fields(self) -> tuple[tuple[str, MatchValue], ...]:
        """The (field, value) pairs sorted by field name."""
        return self._items

    def with_fields(self, **fields: object) -> Match:
        """A copy with fields added or replaced."""
        merged: dict[str, object] = dict(self._items)
        merged.update({canonical_field(k): v for k, v in fields.items()})
        return Match(**merged)


def _fmt_value(value: MatchValue) -> str:
    if isinstance(value, tuple):
        return f"{_fmt_value(value[0])}/{_fmt_value(value[1])}"
    return hex(value) if isinstance(value, int) and value > 9 else str(value)


# ---------------------------------------------------------------------------------------------
# Actions


def _check_range(what: str, value: int, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise FlowError(f"{what} must be an int in [{low}, {high}], got {value!r}")


def _check_bits(name: str, ofs: int, n_bits: int) -> None:
    width = field_width(name)
    _check_range(f"{name} offset", ofs, 0, width - 1)
    _check_range(f"{name} bit count", n_bits, 1, width - ofs)


def _set(obj: object, name: str, value: object) -> None:
    """Assign during __post_init__ of a frozen dataclass (canonicalization)."""
    object.__setattr__(obj, name, value)


@dataclass(frozen=True)
class Output:
    """Output to a port number or a reserved port (OFPP_IN_PORT, OFPP_LOCAL...)."""

    port: int

    def __post_init__(self) -> None:
        _check_range("Output port", self.port, 1, OFPP_LOCAL)
        if self.port == OFPP_CONTROLLER:
            raise FlowError("use Controller(...) to send packets to the controller")

    def __str__(self) -> str:
        return f"output:{self.port}"


@dataclass(frozen=True)
class SetField:
    """Set a whole field to a value (OFPAT_SET_FIELD)."""

    field: str
    value: int | str

    def __post_init__(self) -> None:
        name = canonical_field(self.field)
        _set(self, "field", name)
        _set(self, "value", canonical_value(name, self.value))

    def __str__(self) -> str:
        return f"set_field:{self.value}->{self.field}"


@dataclass(frozen=True)
class GotoTable:
    """Continue in a later table; only valid as the last action of a flow."""

    table: int

    def __post_init__(self) -> None:
        _check_range("GotoTable table", self.table, 0, MAX_TABLE)

    def __str__(self) -> str:
        return f"goto_table:{self.table}"


@dataclass(frozen=True)
class Resubmit:
    """Nicira resubmit(in_port, table): look the packet up in ``table`` and come back."""

    table: int
    in_port: int = RESUBMIT_IN_PORT

    def __post_init__(self) -> None:
        _check_range("Resubmit table", self.table, 0, MAX_TABLE)
        _check_range("Resubmit in_port", self.in_port, 0, 0xFFFF)

    def __str__(self) -> str:
        port = "" if self.in_port == RESUBMIT_IN_PORT else str(self.in_port)
        return f"resubmit({port},{self.table})"


@dataclass(frozen=True)
class RegMove:
    """Nicira move: copy ``n_bits`` from src_field[src_ofs:] to dst_field[dst_ofs:]."""

    src_field: str
    dst_field: str
    n_bits: int
    src_ofs: int = 0
    dst_ofs: int = 0

    def __post_init__(self) -> None:
        _set(self, "src_field", canonical_field(self.src_field))
        _set(self, "dst_field", canonical_field(self.dst_field))
        _check_bits(self.src_field, self.src_ofs, self.n_bits)
        _check_bits(self.dst_field, self.dst_ofs, self.n_bits)

    def __str__(self) -> str:
        src_end = self.src_ofs + self.n_bits - 1
        dst_end = self.dst_ofs + self.n_bits - 1
        return (f"move:{self.src_field}[{self.src_ofs}..{src_end}]"
                f"->{self.dst_field}[{self.dst_ofs}..{dst_end}]")


Move = RegMove


@dataclass(frozen=True)
class Controller:
    """Send the packet to the controller.

    With the defaults this is the standard output:CONTROLLER action; a non-default ``reason``
    or ``userdata`` makes it Nicira's controller2 action (OVS delivers userdata only to
    connections using NXT_PACKET_IN2; this module's Switch does not request that format).
    """

    max_len: int = 0xFFFF
    reason: int = OFPR_ACTION
    userdata: bytes = b""
    controller_id: int = 0  # only connections with this id get the packet-in

    def __post_init__(self) -> None:
        _check_range("Controller max_len", self.max_len, 0, 0xFFFF)
        _check_range("Controller reason", self.reason, 0, 0xFF)
        _check_range("Controller controller_id", self.controller_id, 0, 0xFFFF)
        if not isinstance(self.userdata, bytes):
            raise FlowError("Controller userdata must be bytes")

    def __str__(self) -> str:
        cid = f",id={self.controller_id}" if self.controller_id else ""
        return f"controller(max_len={self.max_len},reason={self.reason}{cid})"


@dataclass(frozen=True)
class DecTtl:
    """Decrement the IP TTL (OFPAT_DEC_NW_TTL)."""

    def __str__(self) -> str:
        return "dec_ttl"


def _resolve_bits(spec: Any, src: str | None = None) -> tuple[str, int]:
    """Canonical names and ``n_bits`` (default: the rest of ``dst``) of a learn spec, set and
    checked; ``src`` for the specs that copy bits from the packet."""
    dst = canonical_field(spec.dst)
    src = canonical_field(src) if src is not None else None
    n_bits = spec.n_bits if spec.n_bits is not None else field_width(dst) - spec.dst_ofs
    _set(spec, "dst", dst)
    if src is not None:
        _set(spec, "src", src)
    _set(spec, "n_bits", n_bits)
    _check_bits(dst, spec.dst_ofs, n_bits)
    if src is not None:
        _check_bits(src, spec.src_ofs, n_bits)
    return dst, n_bits


def _resolve_value(spec: Any) -> None:
    """LearnMatchValue / LearnLoadValue: an immediate value that must fit."""
    dst, n_bits = _resolve_bits(spec)
    _check_range(f"learn value for {dst}", spec.value, 0, (1 << n_bits) - 1)


@dataclass(frozen=True)
class LearnMatch:
    """Learned flow matches ``dst[dst_ofs:+n_bits]`` == this packet's ``src[src_ofs:]``.

    ``src`` defaults to ``dst`` (ovs-ofctl ``learn(NXM_OF_VLAN_TCI[0..11])``); ``n_bits`` to the
    rest of the destination field.
    """

    dst: str
    src: str | None = None
    n_bits: int | None = None
    dst_ofs: int = 0
    src_ofs: int = 0

    def __post_init__(self) -> None:
        _resolve_bits(self, self.src if self.src is not None else self.dst)


@dataclass(frozen=True)
class LearnMatchValue:
    """Learned flow matches ``dst[dst_ofs:+n_bits]`` == an immediate ``value``."""

    dst: str
    value: int
    n_bits: int | None = None
    dst_ofs: int = 0

    def __post_init__(self) -> None:
        _resolve_value(self)


@dataclass(frozen=True)
class LearnLoad:
    """Learned flow loads this packet's ``src[src_ofs:+n_bits]`` into ``dst[dst_ofs:]``."""

    dst: str
    src: str
    n_bits: int | None = None
    dst_ofs: int = 0
    src_ofs: int = 0

    def __post_init__(self) -> None:
        _resolve_bits(self, self.src)


@dataclass(frozen=True)
class LearnLoadValue:
    """Learned flow loads an immediate ``value`` into ``dst[dst_ofs:+n_bits]``."""

    dst: str
    value: int
    n_bits: int | None = None
    dst_ofs: int = 0

    def __post_init__(self) -> None:
        _resolve_value(self)


@dataclass(frozen=True)
class LearnOutput:
    """Learned flow outputs to the port number held in this packet's ``src[src_ofs:+n_bits]``.

    Use ``in_port_nxm`` (16 bits) for "the port this packet came from".
    """

    src: str
    n_bits: int | None = None
    src_ofs: int = 0

    def __post_init__(self) -> None:
        src = canonical_field(self.src)
        n_bits = self.n_bits if self.n_bits is not None else field_width(src) - self.src_ofs
        _set(self, "src", src)
        _set(self, "n_bits", n_bits)
        _check_bits(src, self.src_ofs, n_bits)


LearnSpec: TypeAlias = LearnMatch | LearnMatchValue | LearnLoad | LearnLoadValue | LearnOutput
_LEARN_SPECS = (LearnMatch, LearnMatchValue, LearnLoad, LearnLoadValue, LearnOutput)


@dataclass(frozen=True)
class Learn:
    """Nicira learn: add (or refresh) a flow in ``table`` built from this packet.

    Example, "a packet from port P makes eth_dst=<its eth_src> deliver to P"::

        Learn(table=5, priority=200, specs=(
            LearnMatch("eth_dst", src="eth_src"), LearnOutput("in_port_nxm")))
    """

    table: int
    specs: tuple[LearnSpec, ...]
    priority: int = 0x8000
    idle_timeout: int = 0
    hard_timeout: int = 0
    cookie: int = 0
    flags: int = 0
    fin_idle_timeout: int = 0
    fin_hard_timeout: int = 0
    limit: int = 0
    """Nicira learn2: at most this many flows with this cookie in ``table`` (0: no limit).
    With a limit, OVS also drops rather than keeps a cached datapath flow whose learned
    flow is missing, so the next such packet goes to the slow path and learns again."""

    def __post_init__(self) -> None:
        _check_range("Learn table", self.table, 0, MAX_TABLE)
        _check_range("Learn limit", self.limit, 0, 0xFFFFFFFF)
        _check_range("Learn priority", self.priority, 0, 0xFFFF)
        _check_range("Learn cookie", self.cookie, 0, COOKIE_MAX)
        _check_range("Learn flags", self.flags, 0, 0xFFFF)
        for name in ("idle_timeout", "hard_timeout", "fin_idle_timeout", "fin_hard_timeout"):
            _check_range(f"Learn {name}", getattr(self, name), 0, 0xFFFF)
        specs = tuple(self.specs)
        if not specs:
            raise FlowError("Learn needs at least one spec")
        for spec in specs:
            if not isinstance(spec, _LEARN_SPECS):
                raise FlowError(f"not a learn spec: {spec!r}")
        _set(self, "specs", specs)

    def __str__(self) -> str:
        return f"learn(table={self.table},priority={self.priority},{len(self.specs)} specs)"


NAT_SRC = "src"
NAT_DST = "dst"


@dataclass(frozen=True)
class Nat:
    """NAT inside a Ct action. ``kind=None`` applies the NAT of an existing connection."""

    kind: Literal["src", "dst"] | None = None
    ip_min: str | None = None
    ip_max: str | None = None
    port_min: int | None = None
    port_max: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in (None, NAT_SRC, NAT_DST):
            raise FlowError(f"Nat kind must be 'src', 'dst' or None, got {self.kind!r}")
        if self.kind is None and (self.ip_min or self.ip_max or self.port_min or self.port_max):
            raise FlowError("Nat addresses/ports need kind='src' or 'dst'")
        if self.ip_min is None and (self.ip_max is not None or self.port_min is not None):
            raise FlowError("Nat ip_max/ports need ip_min")
        if self.port_min is None and self.port_max is not None:
            raise FlowError("Nat port_max needs port_min")
        for name in ("ip_min", "ip_max"):
            value = getattr(self, name)
            if value is not None:
                try:
                    _set(self, name, ipaddress.ip_address(value).compressed)
                except ValueError:
                    raise FlowError(f"Nat {name}: bad address {value!r}") from None
        for name in ("port_min", "port_max"):
            value = getattr(self, name)
            if value is not None:
                _check_range(f"Nat {name}", value, 0, 0xFFFF)


@dataclass(frozen=True)
class Ct:
    """Nicira ct: send through the connection tracker in ``zone``; recirculate to ``table``.

    OVS requires an IP ``eth_type`` in the flow's match.
    """

    commit: bool = False
    zone: int = 0
    table: int | None = None
    nat: Nat | None = None

    def __post_init__(self) -> None:
        _check_range("Ct zone", self.zone, 0, 0xFFFF)
        if self.table is not None:
            _check_range("Ct table", self.table, 0, MAX_TABLE)
        if self.nat is not None and not isinstance(self.nat, Nat):
            raise FlowError(f"Ct nat must be a Nat, got {self.nat!r}")

    def __str__(self) -> str:
        return f"ct(commit={self.commit},zone={self.zone},table={self.table},nat={self.nat})"


Action: TypeAlias = (
    Output | SetField | GotoTable | Resubmit | RegMove | Controller | DecTtl | Learn | Ct
)
ACTION_TYPES = (Output, SetField, GotoTable, Resubmit, RegMove, Controller, DecTtl, Learn, Ct)

#: The empty action list: matching packets are dropped.
DROP: tuple[Action, ...] = ()

# ---------------------------------------------------------------------------------------------
# Flows


@dataclass(frozen=True)
class Flow:
    """One OpenFlow flow entry.

    ``actions`` are applied in order (an apply-actions instruction); a ``GotoTable`` must be the
    last one and becomes a goto-table instruction. ``()`` drops. ``key`` is the identity
    OpenFlow uses for strict modify/delete; ``cookie`` says who owns the flow.
    """

    table: int
    priority: int
    match: Match
    actions: tuple[Action, ...] = DROP
    cookie: int = 0
    _hash: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _check_range("Flow table", self.table, 0, MAX_TABLE)
        _check_range("Flow priority", self.priority, 0, 0xFFFF)
        _check_range("Flow cookie", self.cookie, 0, COOKIE_MAX - 1)
        if not isinstance(self.match, Match):
            raise FlowError(f"Flow match must be a Match, got {type(self.match).__name__}")
        actions = tuple(self.actions)
        _set(self, "actions", actions)
        self._check_actions(actions)
        # Flows are cache keys on the hot path: hash once.
        _set(self, "_hash", hash((self.table, self.priority, self.match, actions, self.cookie)))

    def _check_actions(self, actions: tuple[Action, ...]) -> None:
        for i, action in enumerate(actions):
            if not isinstance(action, ACTION_TYPES):
                raise FlowError(f"{self}: not an action: {action!r}")
            if isinstance(action, GotoTable):
                if i != len(actions) - 1:
                    raise FlowError(f"{self}: GotoTable must be the last action")
                if action.table <= self.table:
                    raise FlowError(f"{self}: GotoTable must go to a later table")

    def __hash__(self) -> int:
        return self._hash

    @property
    def key(self) -> tuple[int, int, Match]:
        return (self.table, self.priority, self.match)

    @property
    def apply_actions(self) -> tuple[Action, ...]:
        """The actions without a trailing GotoTable."""
        if self.actions and isinstance(self.actions[-1], GotoTable):
            return self.actions[:-1]
        return self.actions

    @property
    def goto(self) -> int | None:
        """The table of a trailing GotoTable, if any."""
        if self.actions and isinstance(self.actions[-1], GotoTable):
            return self.actions[-1].table
        return None

    def __str__(self) -> str:
        acts = ",".join(str(a) for a in self.actions) or "drop"
        match = f",{self.match}" if len(self.match) else ""
        return (f"cookie={self.cookie:#x},table={self.table},priority={self.priority}{match}"
                f" actions={acts}")
