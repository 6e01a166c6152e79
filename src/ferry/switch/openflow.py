"""OpenFlow 1.3 to Open vSwitch over asyncio.

os-ken is used only for its message classes and their (de)serialization; its eventlet-based
hub, app manager and controller are never imported. Encoded flow-mods are cached per
(Flow, command) because building them with os-ken costs ~100 us each, and a batch is written
with a single transport write followed by a BARRIER: ``apply`` returns once OVS acknowledged
the barrier, which is what "installed" means here.

Connection model: ``Switch.listen("unix:PATH")`` (OVS is configured with
``set-controller BRIDGE unix:PATH``, see :func:`controller_vsctl_args`) accepts OVS's
connection and every reconnection, re-handshakes and calls ``on_connected``; or
``Switch.connect("unix:RUNDIR/BRIDGE.mgmt")`` opens a service connection (no packet-ins).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import inspect
import itertools
import logging
import os
import struct
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from os_ken.ofproto import nicira_ext, ofproto_common, ofproto_parser
from os_ken.ofproto import ofproto_v1_3 as ofp
from os_ken.ofproto import ofproto_v1_3_parser as parser

from ferry.switch.flow import (
    COOKIE_MAX,
    OFPP_CONTROLLER,
    OFPR_ACTION,
    Action,
    Controller,
    Ct,
    DecTtl,
    Flow,
    FlowError,
    GotoTable,
    Learn,
    LearnLoad,
    LearnLoadValue,
    LearnMatch,
    LearnMatchValue,
    LearnOutput,
    LearnSpec,
    Match,
    Nat,
    Output,
    RegMove,
    Resubmit,
    SetField,
    canonical_field,
    field_width,
)

log = logging.getLogger(__name__)

OF13 = ofp.OFP_VERSION
_HEADER = struct.Struct("!BBHI")
_XID = struct.Struct("!I")
_BUNDLE_ADD_HEAD = struct.Struct("!BBHIIIIxxH")  # ofp header, experimenter, exp_type, id, flags
_BUNDLE_FLAGS = ofp.ONF_BF_ATOMIC | ofp.ONF_BF_ORDERED
_NX_CT_RECIRC_NONE = 0xFF
_NAT_FLAG_SRC = 1
_NAT_FLAG_DST = 2
_MAX_XID = 0xFFFFFFFF
# Flow-mods per barrier: bounds the bytes in flight and gives a latency sample per chunk.
DEFAULT_CHUNK = 2000


NXAST_LEARN2 = 45
_NX_LEARN_F_WRITE_RESULT = 1 << 2


class NXActionLearn2(parser.NXActionLearn):  # type: ignore[misc]
    """Nicira learn2 (OVS 2.8+): learn with a ``limit`` (os-ken has learn only). On the wire:
    learn's fields, then limit, result_dst_ofs and 2 pad bytes, then the specs (no result_dst:
    Ferry does not set NX_LEARN_F_WRITE_RESULT)."""

    _subtype = NXAST_LEARN2
    _fmt_str = "!HHHQHBxHHIHxx"

    def __init__(self, table_id: int, specs: list[Any], limit: int = 0, **kw: Any) -> None:
        super().__init__(table_id, specs, **kw)
        self.limit = limit

    @classmethod
    def parser(cls, buf: bytes) -> NXActionLearn2:
        (idle, hard, priority, cookie, flags, table_id, fin_idle, fin_hard, limit,
         _ofs) = struct.unpack_from(cls._fmt_str, buf, 0)
        if flags & _NX_LEARN_F_WRITE_RESULT:
            raise UnsupportedFlow("learn2 with result_dst")
        rest, specs = buf[struct.calcsize(cls._fmt_str):], []
        while len(rest) > 0:
            spec, rest = parser.NXFlowSpecMatch.parse(rest)  # any spec kind
            if spec is not None:
                specs.append(spec)
        return cls(table_id, specs, limit=limit, idle_timeout=idle, hard_timeout=hard,
                   priority=priority, cookie=cookie, flags=flags, fin_idle_timeout=fin_idle,
                   fin_hard_timeout=fin_hard)

    def serialize_body(self) -> bytearray:
        data = bytearray(struct.pack(self._fmt_str, self.idle_timeout, self.hard_timeout,
                                     self.priority, self.cookie, self.flags, self.table_id,
                                     self.fin_idle_timeout, self.fin_hard_timeout, self.limit,
                                     0))
        for spec in self.specs:
            data += spec.serialize()
        return data


parser.NXAction.register(NXActionLearn2)


class OpenFlowError(RuntimeError):
    """An OpenFlow request failed."""


class ConnectionLost(OpenFlowError):
    """The connection to the switch went away before the request completed."""


class NotConnected(ConnectionLost):
    """There is no connection to the switch right now."""


class HandshakeError(OpenFlowError):
    """HELLO / FEATURES exchange failed (e.g. the bridge does not allow OpenFlow 1.3)."""


class UnsupportedFlow(OpenFlowError):
    """A dumped flow uses something ferry.switch.flow cannot express."""


class Command(enum.Enum):
    """The flow-mod commands ``apply`` sends (always strict for modify/delete)."""

    ADD = ofp.OFPFC_ADD
    MODIFY = ofp.OFPFC_MODIFY_STRICT
    DELETE = ofp.OFPFC_DELETE_STRICT


@dataclass(frozen=True)
class SwitchErrorReply:
    """One OFPT_ERROR reply, decoded for humans."""

    type: int
    code: int
    name: str

    @classmethod
    def from_msg(cls, msg: Any) -> SwitchErrorReply:
        if msg.type == ofp.OFPET_EXPERIMENTER:
            return cls(msg.type, msg.exp_type, f"experimenter {msg.experimenter:#x} "
                       f"error type {msg.exp_type}")
        return cls(msg.type, msg.code, _error_name(msg.type, msg.code))

    def __str__(self) -> str:
        return f"{self.name} (type={self.type}, code={self.code})"


@dataclass(frozen=True)
class FlowModFailure:
    """A flow-mod that the switch rejected."""

    flow: Flow
    command: Command
    error: SwitchErrorReply

    def __str__(self) -> str:
        return f"{self.command.name} {self.flow}: {self.error}"


class FlowModError(OpenFlowError):
    """The switch rejected one or more flow-mods of an ``apply`` call.

    Without ``atomic``, every other flow-mod of the call was applied (OpenFlow processes them
    independently, in order). With ``atomic``, nothing was applied.
    """

    def __init__(self, failures: Sequence[FlowModFailure], *, atomic: bool) -> None:
        self.failures = list(failures)
        self.atomic = atomic
        shown = "; ".join(str(f) for f in self.failures[:5])
        more = f" (+{len(self.failures) - 5} more)" if len(self.failures) > 5 else ""
        outcome = "nothing applied" if atomic else "the rest of the batch applied"
        super().__init__(f"{len(self.failures)} flow-mod(s) rejected, {outcome}: {shown}{more}")


@dataclass(frozen=True)
class PortInfo:
    port_no: int
    name: str
    hw_addr: str
    config: int
    state: int


@dataclass(frozen=True)
class PortStatus:
    reason: int  # OFPPR_ADD / OFPPR_DELETE / OFPPR_MODIFY
    port: PortInfo


@dataclass(frozen=True)
class PacketIn:
    datapath_id: int
    table_id: int
    cookie: int
    reason: int
    match: dict[str, Any]
    data: bytes
    total_len: int
    buffer_id: int


def _error_name(type_: int, code: int) -> str:
    """OFPET_x / OFPxxC_y names from os-ken's constants, for error messages."""
    type_names = [n for n in dir(ofp) if n.startswith("OFPET_") and getattr(ofp, n) == type_]
    if not type_names:
        return f"error type {type_}"
    prefixes = {
        "OFPET_HELLO_FAILED": "OFPHFC_", "OFPET_BAD_REQUEST": "OFPBRC_",
        "OFPET_BAD_ACTION": "OFPBAC_", "OFPET_BAD_INSTRUCTION": "OFPBIC_",
        "OFPET_BAD_MATCH": "OFPBMC_", "OFPET_FLOW_MOD_FAILED": "OFPFMFC_",
        "OFPET_TABLE_FEATURES_FAILED": "OFPTFFC_", "OFPET_METER_MOD_FAILED": "OFPMMFC_",
    }
    prefix = prefixes.get(type_names[0])
    codes = [n for n in dir(ofp) if prefix and n.startswith(prefix) and getattr(ofp, n) == code]
    return f"{type_names[0]}/{codes[0] if codes else code}"


# ---------------------------------------------------------------------------------------------
# Encoding and decoding between ferry.switch.flow and os-ken


class _Datapath:
    """The two attributes os-ken's message classes need from a datapath."""

    ofproto = ofp
    ofproto_parser = parser
    id: int | None = None


_DP = _Datapath()


def _serialize(msg: Any, xid: int = 0) -> bytes:
    msg.set_xid(xid)
    msg.serialize()
    return bytes(msg.buf)


def _learn_spec_to_os_ken(spec: LearnSpec) -> Any:
    if isinstance(spec, LearnMatch):
        assert spec.src is not None and spec.n_bits is not None
        return parser.NXFlowSpecMatch(src=(spec.src, spec.src_ofs),
                                      dst=(spec.dst, spec.dst_ofs), n_bits=spec.n_bits)
    if isinstance(spec, LearnMatchValue):
        return parser.NXFlowSpecMatch(src=spec.value, dst=(spec.dst, spec.dst_ofs),
                                      n_bits=spec.n_bits)
    if isinstance(spec, LearnLoad):
        return parser.NXFlowSpecLoad(src=(spec.src, spec.src_ofs),
                                     dst=(spec.dst, spec.dst_ofs), n_bits=spec.n_bits)
    if isinstance(spec, LearnLoadValue):
        return parser.NXFlowSpecLoad(src=spec.value, dst=(spec.dst, spec.dst_ofs),
                                     n_bits=spec.n_bits)
    return parser.NXFlowSpecOutput(src=(spec.src, spec.src_ofs), n_bits=spec.n_bits)


def _nat_to_os_ken(nat: Nat) -> Any:
    flags = {None: 0, "src": _NAT_FLAG_SRC, "dst": _NAT_FLAG_DST}[nat.kind]
    v6 = nat.ip_min is not None and ":" in nat.ip_min
    kwargs: dict[str, Any] = {}
    if nat.ip_min is not None:
        kwargs["range_ipv6_min" if v6 else "range_ipv4_min"] = nat.ip_min
    if nat.ip_max is not None:
        kwargs["range_ipv6_max" if v6 else "range_ipv4_max"] = nat.ip_max
    return parser.NXActionNAT(flags, range_proto_min=nat.port_min,
                              range_proto_max=nat.port_max, **kwargs)


def _action_to_os_ken(action: Action) -> Any:
    if isinstance(action, Output):
        return parser.OFPActionOutput(action.port, max_len=0)
    if isinstance(action, SetField):
        return parser.OFPActionSetField(**{action.field: action.value})
    if isinstance(action, Resubmit):
        return parser.NXActionResubmitTable(in_port=action.in_port, table_id=action.table)
    if isinstance(action, RegMove):
        return parser.NXActionRegMove(action.src_field, action.dst_field, action.n_bits,
                                      src_ofs=action.src_ofs, dst_ofs=action.dst_ofs)
    if isinstance(action, Controller):
        return _controller_to_os_ken(action)
    if isinstance(action, DecTtl):
        return parser.OFPActionDecNwTtl()
    if isinstance(action, Learn):
        learn = NXActionLearn2 if action.limit else parser.NXActionLearn
        return learn(
            table_id=action.table, specs=[_learn_spec_to_os_ken(s) for s in action.specs],
            idle_timeout=action.idle_timeout, hard_timeout=action.hard_timeout,
            priority=action.priority, cookie=action.cookie, flags=action.flags,
            fin_idle_timeout=action.fin_idle_timeout, fin_hard_timeout=action.fin_hard_timeout,
            **({"limit": action.limit} if action.limit else {}))
    if isinstance(action, Ct):
        return parser.NXActionCT(
            flags=nicira_ext.NX_CT_F_COMMIT if action.commit else 0, zone_src="",
            zone_ofs_nbits=action.zone,
            recirc_table=_NX_CT_RECIRC_NONE if action.table is None else action.table,
            alg=0, actions=[] if action.nat is None else [_nat_to_os_ken(action.nat)])
    raise FlowError(f"cannot encode {action!r}")  # GotoTable is an instruction, not an action


def _controller_to_os_ken(action: Controller) -> Any:
    if action.userdata:
        return parser.NXActionController2(max_len=action.max_len, reason=action.reason,
                                          controller_id=action.controller_id,
                                          userdata=list(action.userdata))
    if action.reason != OFPR_ACTION or action.controller_id:
        return parser.NXActionController(action.max_len, action.controller_id, action.reason)
    return parser.OFPActionOutput(OFPP_CONTROLLER, max_len=action.max_len)


def _instructions(flow: Flow) -> list[Any]:
    instructions: list[Any] = []
    actions = [_action_to_os_ken(a) for a in flow.apply_actions]
    if actions:
        instructions.append(parser.OFPInstructionActions(ofp.OFPIT_APPLY_ACTIONS, actions))
    if flow.goto is not None:
        instructions.append(parser.OFPInstructionGotoTable(flow.goto))
    return instructions


def _os_ken_match(match: Match) -> Any:
    return parser.OFPMatch(**dict(match.fields))


_FLOW_MOD_BODY = struct.Struct(ofp.OFP_FLOW_MOD_PACK_STR0)
_MATCH_HEAD = struct.Struct("!HH")
_INSTRUCTION_ACTIONS = struct.Struct(ofp.OFP_INSTRUCTION_ACTIONS_PACK_STR)
_INSTRUCTION_GOTO = struct.Struct(ofp.OFP_INSTRUCTION_GOTO_TABLE_PACK_STR)


@functools.lru_cache(maxsize=1 << 16)
def _match_tlv(name: str, value: Any) -> tuple[int, bytes]:
    """One OXM/NXM TLV, serialized by os-ken, with os-ken's sort key (the OXM type).

    Match values are already canonical (masked), so os-ken's normalization is skipped.
    """
    header, val, mask = ofp.oxm_from_user(name, value)
    buf = bytearray()
    ofp.oxm_serialize(header, val, mask, buf, 0)
    return (header[0] if isinstance(header, tuple) else header), bytes(buf)


@functools.lru_cache(maxsize=1 << 16)
def _action_bytes(action: Action) -> bytes:
    buf = bytearray()
    act = _action_to_os_ken(action)
    act.serialize(buf, 0)
    # os-ken's Nicira actions append their body and leave the padding to whatever is
    # serialized next: pad to the declared length here.
    return bytes(buf).ljust(act.len, b"\0")


@functools.lru_cache(maxsize=1 << 17)
def encode_flow_mod(flow: Flow, command: Command) -> bytes:
    """The serialized OFPT_FLOW_MOD (xid 0) for ``command`` on ``flow``; LRU-cached.

    Modify and delete are strict and filter on the full cookie, so they never touch a flow
    owned by someone else (a different cookie) or the same match at another priority.

    Assembled from per-field and per-action bytes that os-ken serialized (also cached, they
    repeat across flows), in os-ken's field order: byte-identical to os-ken's OFPFlowMod
    (tests check), at a fraction of its cost.
    """
    tlvs = sorted(_match_tlv(name, value) for name, value in flow.match.fields)
    match_len = _MATCH_HEAD.size + sum(len(tlv) for _, tlv in tlvs)
    parts = [b"", b"", _MATCH_HEAD.pack(ofp.OFPMT_OXM, match_len)]
    parts.extend(tlv for _, tlv in tlvs)
    parts.append(bytes(-match_len % 8))
    if command is not Command.DELETE:
        actions = b"".join(_action_bytes(a) for a in flow.apply_actions)
        if actions:
            parts.append(_INSTRUCTION_ACTIONS.pack(ofp.OFPIT_APPLY_ACTIONS, 8 + len(actions)))
            parts.append(actions)
        if flow.goto is not None:
            parts.append(_INSTRUCTION_GOTO.pack(ofp.OFPIT_GOTO_TABLE, 8, flow.goto))
    parts[1] = _FLOW_MOD_BODY.pack(
        flow.cookie, COOKIE_MAX if command is not Command.ADD else 0, flow.table,
        command.value, 0, 0, flow.priority, ofp.OFP_NO_BUFFER, ofp.OFPP_ANY, ofp.OFPG_ANY, 0)
    length = _HEADER.size + sum(len(p) for p in parts)
    parts[0] = _HEADER.pack(OF13, ofp.OFPT_FLOW_MOD, length, 0)
    return b"".join(parts)


def reference_flow_mod(flow: Flow, command: Command) -> bytes:
    """The same message built entirely by os-ken's OFPFlowMod (slow; for tests)."""
    strict = command is not Command.ADD
    msg = parser.OFPFlowMod(
        _DP, cookie=flow.cookie, cookie_mask=COOKIE_MAX if strict else 0,
        table_id=flow.table, command=command.value, priority=flow.priority,
        buffer_id=ofp.OFP_NO_BUFFER, out_port=ofp.OFPP_ANY, out_group=ofp.OFPG_ANY,
        match=_os_ken_match(flow.match),
        instructions=[] if command is Command.DELETE else _instructions(flow))
    return _serialize(msg)


def encode_bundle_add(bundle_id: int, inner: bytes, xid: int) -> bytes:
    """An ONF (OF1.3 EXT-230) bundle-add wrapping an already serialized message.

    Built by hand around the cached flow-mod bytes; the inner message carries the same xid
    as the outer one, as the extension requires, so an error maps back to the flow.
    """
    head = _BUNDLE_ADD_HEAD.pack(
        OF13, ofp.OFPT_EXPERIMENTER, _BUNDLE_ADD_HEAD.size + len(inner), xid,
        ofproto_common.ONF_EXPERIMENTER_ID, ofp.ONF_ET_BUNDLE_ADD_MESSAGE, bundle_id,
        _BUNDLE_FLAGS)
    return head + inner[:4] + _XID.pack(xid) + inner[8:]


def _decode_learn_spec(spec: Any) -> LearnSpec:
    src, dst, n_bits = spec.src, spec.dst, spec.n_bits
    if isinstance(spec, parser.NXFlowSpecOutput):
        return LearnOutput(src[0], n_bits=n_bits, src_ofs=src[1])
    is_load = isinstance(spec, parser.NXFlowSpecLoad)
    if isinstance(src, int):
        cls_value = LearnLoadValue if is_load else LearnMatchValue
        return cls_value(dst[0], src, n_bits=n_bits, dst_ofs=dst[1])
    cls_field = LearnLoad if is_load else LearnMatch
    return cls_field(dst[0], src[0], n_bits=n_bits, dst_ofs=dst[1], src_ofs=src[1])


def _decode_nat(act: Any) -> Nat:
    kind: Literal["src", "dst"] | None = None
    if act.flags & _NAT_FLAG_SRC:
        kind = "src"
    elif act.flags & _NAT_FLAG_DST:
        kind = "dst"
    ip_min = act.range_ipv4_min or act.range_ipv6_min or None
    ip_max = act.range_ipv4_max or act.range_ipv6_max or None
    return Nat(kind=kind, ip_min=ip_min, ip_max=ip_max, port_min=act.range_proto_min,
               port_max=act.range_proto_max)


def _decode_ct(act: Any) -> Ct:
    if act.zone_src or act.alg or act.flags & ~nicira_ext.NX_CT_F_COMMIT:
        raise UnsupportedFlow(f"ct with zone field/alg/flags: {act}")
    nats = [a for a in act.actions if isinstance(a, parser.NXActionNAT)]
    if len(nats) != len(act.actions) or len(nats) > 1:
        raise UnsupportedFlow(f"ct with nested actions other than one nat: {act}")
    table = None if act.recirc_table == _NX_CT_RECIRC_NONE else act.recirc_table
    return Ct(commit=bool(act.flags & nicira_ext.NX_CT_F_COMMIT), zone=act.zone_ofs_nbits,
              table=table, nat=_decode_nat(nats[0]) if nats else None)


def _decode_action(act: Any) -> Action:
    if isinstance(act, parser.OFPActionOutput):
        if act.port == OFPP_CONTROLLER:
            return Controller(max_len=act.max_len)
        return Output(act.port)
    if isinstance(act, parser.OFPActionSetField):
        return SetField(act.key, act.value)
    if isinstance(act, parser.OFPActionDecNwTtl):
        return DecTtl()
    if isinstance(act, parser.NXActionResubmitTable):
        return Resubmit(act.table_id, in_port=act.in_port)
    if isinstance(act, parser.NXActionRegMove):
        return RegMove(act.src_field, act.dst_field, act.n_bits, act.src_ofs, act.dst_ofs)
    if isinstance(act, parser.NXActionController):
        return Controller(max_len=act.max_len, reason=act.reason,
                          controller_id=act.controller_id)
    if isinstance(act, parser.NXActionController2):
        return Controller(max_len=getattr(act, "max_len", 0xFFFF),
                          reason=getattr(act, "reason", OFPR_ACTION),
                          controller_id=getattr(act, "controller_id", 0),
                          userdata=bytes(getattr(act, "userdata", b"")))
    if isinstance(act, parser.NXActionLearn):  # NXActionLearn2 too
        return Learn(table=act.table_id, specs=tuple(_decode_learn_spec(s) for s in act.specs),
                     priority=act.priority, idle_timeout=act.idle_timeout,
                     hard_timeout=act.hard_timeout, cookie=act.cookie, flags=act.flags,
                     fin_idle_timeout=act.fin_idle_timeout, fin_hard_timeout=act.fin_hard_timeout,
                     limit=getattr(act, "limit", 0))
    if isinstance(act, parser.NXActionCT):
        return _decode_ct(act)
    if isinstance(act, parser.NXActionRegLoad):
        return _decode_reg_load(act)
    raise UnsupportedFlow(f"action {type(act).__name__} not expressible: {act}")


def _decode_reg_load(act: Any) -> SetField:
    """A Nicira load of a whole field, as flows learned by OVS carry them, is a set_field."""
    field = canonical_field(act.dst)
    ofs, n_bits = act.ofs_nbits >> 6, (act.ofs_nbits & 0x3F) + 1
    if ofs != 0 or n_bits != field_width(field):
        raise UnsupportedFlow(f"a load of part of a field is not expressible: {act}")
    return SetField(field, act.value)


def decode_flow_stats(stats: Any) -> Flow:
    """An os-ken OFPFlowStats entry as a Flow (timeouts, flags and counters are dropped)."""
    actions: list[Action] = []
    for inst in stats.instructions:
        if isinstance(inst, parser.OFPInstructionActions) and inst.type == ofp.OFPIT_APPLY_ACTIONS:
            actions.extend(_decode_action(a) for a in inst.actions)
        elif isinstance(inst, parser.OFPInstructionGotoTable):
            actions.append(GotoTable(inst.table_id))
        else:
            raise UnsupportedFlow(f"instruction {type(inst).__name__} not expressible: {inst}")
    try:
        match = Match.of(dict(stats.match.items()))
        return Flow(table=stats.table_id, priority=stats.priority, match=match,
                    actions=tuple(actions), cookie=stats.cookie)
    except FlowError as exc:
        raise UnsupportedFlow(f"table={stats.table_id} priority={stats.priority}: {exc}") from exc


def _port_info(port: Any) -> PortInfo:
    name = port.name.decode("utf-8", "replace") if isinstance(port.name, bytes) else port.name
    return PortInfo(port.port_no, name, port.hw_addr, port.config, port.state)


# ---------------------------------------------------------------------------------------------
# OVSDB helper (pure: returns arguments for ovs-vsctl)


def controller_vsctl_args(bridge: str, target: str, max_backoff_ms: int = 1000,
                          inactivity_probe_ms: int = 5000,
                          fail_mode: str = "secure") -> list[str]:
    """ovs-vsctl arguments that make ``bridge`` connect to our listener at ``target``.

    Also disables in-band control and lowers the reconnect backoff so OVS comes back within
    about a second after a controller restart (the default is up to 8 s). ``secure`` fail
    mode keeps our flows in charge while the controller is away; OVS's default
    (``standalone``) turns the bridge into a learning switch after a few missed probes.
    """
    return [
        "--", "set-controller", bridge, target,
        "--", "set", "bridge", bridge, "other_config:disable-in-band=true",
        f"fail_mode={fail_mode}",
        "--", "set", "controller", bridge, f"max_backoff={max_backoff_ms}",
        f"inactivity_probe={inactivity_probe_ms}",
    ]


# ---------------------------------------------------------------------------------------------
# Connection


class _OpRange:
    """The flow-mods of one apply() chunk: xid base..base+len(ops)-1, and their failures."""

    __slots__ = ("base", "failures", "ops")

    def __init__(self, base: int, ops: list[tuple[Flow, Command]]) -> None:
        self.base = base
        self.ops = ops
        self.failures: list[FlowModFailure] = []

    def owns(self, xid: int) -> bool:
        return self.base <= xid < self.base + len(self.ops)


class _Connection(asyncio.Protocol):
    """One transport to the switch: framing, xid bookkeeping, replies to requests."""

    def __init__(self, switch: Switch) -> None:
        self.switch = switch
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.datapath_id: int | None = None
        loop = asyncio.get_running_loop()
        self.hello: asyncio.Future[int] = loop.create_future()
        self.ready: asyncio.Future[None] = loop.create_future()  # handshake done
        # Only connect() awaits `ready`; a failed handshake is logged by abort() either way.
        self.ready.add_done_callback(_retrieve)
        self.hello.add_done_callback(_retrieve)
        self.pending: dict[int, asyncio.Future[Any]] = {}
        self.multipart: dict[int, list[Any]] = {}
        self.ranges: list[_OpRange] = []
        self.writable = asyncio.Event()
        self.writable.set()
        self.closed = asyncio.Event()
        self.lost_reason: str | None = None
        self.last_rx = time.monotonic()
        self._xids = itertools.count(1)

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(self._hello())
        self.switch._on_transport(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost_reason = self.lost_reason or (str(exc) if exc else "closed by peer")
        error = ConnectionLost(f"{self.label}: connection lost ({self.lost_reason})")
        futures: list[asyncio.Future[Any]] = [self.hello, self.ready, *self.pending.values()]
        for fut in futures:
            if not fut.done():
                fut.set_exception(error)
        self.pending.clear()
        self.writable.set()
        self.closed.set()
        self.switch._on_lost(self)

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()

    def data_received(self, data: bytes) -> None:
        self.last_rx = time.monotonic()
        buf = self.buf
        buf += data
        while len(buf) >= 8:
            version, msg_type, length, xid = _HEADER.unpack_from(buf)
            if length < 8:
                self.abort(f"bad OpenFlow length {length}")
                return
            if len(buf) < length:
                break
            raw = bytes(buf[:length])
            del buf[:length]
            self._dispatch(version, msg_type, xid, raw)

    # -- helpers

    @property
    def label(self) -> str:
        dpid = f"dpid={self.datapath_id:016x}" if self.datapath_id is not None else "dpid=?"
        return f"{self.switch.name}[{dpid}]"

    @property
    def is_open(self) -> bool:
        return self.transport is not None and not self.closed.is_set()

    def next_xids(self, count: int) -> int:
        """Reserve ``count`` consecutive xids and return the first (never wraps inside)."""
        base = next(self._xids)
        if base + count > _MAX_XID:
            self._xids = itertools.count(1)
            base = next(self._xids)
        if count > 1:
            self._xids = itertools.count(base + count)
        return base

    def write(self, data: bytes | bytearray) -> None:
        if not self.is_open:
            raise ConnectionLost(f"{self.label}: not connected ({self.lost_reason})")
        assert self.transport is not None
        self.transport.write(data)

    def abort(self, why: str) -> None:
        log.error("%s: closing connection: %s", self.label, why)
        self.lost_reason = why
        if self.transport is not None:
            self.transport.abort()

    def expect(self, xid: int) -> asyncio.Future[Any]:
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.pending[xid] = fut
        return fut

    async def request(self, msg: Any) -> Any:
        """Send an os-ken message and await its reply (or its error)."""
        xid = self.next_xids(1)
        fut = self.expect(xid)
        try:
            self.write(_serialize(msg, xid))
            return await fut
        finally:
            self.pending.pop(xid, None)
            self.multipart.pop(xid, None)

    @staticmethod
    def _hello() -> bytes:
        # HELLO with a version bitmap element containing only OpenFlow 1.3.
        bitmap = struct.pack("!HHI", ofp.OFPHET_VERSIONBITMAP, 8, 1 << OF13)
        return _HEADER.pack(OF13, ofp.OFPT_HELLO, 8 + len(bitmap), 0) + bitmap

    # -- incoming messages

    def _dispatch(self, version: int, msg_type: int, xid: int, raw: bytes) -> None:
        if msg_type == ofp.OFPT_HELLO:
            self._on_hello(version, raw)
        elif version != OF13:
            self.abort(f"message version {version} on an OpenFlow 1.3 connection")
        elif msg_type == ofp.OFPT_BARRIER_REPLY or msg_type == ofp.OFPT_ECHO_REPLY:
            self._resolve(xid, raw)
        elif msg_type == ofp.OFPT_ECHO_REQUEST:
            self.write(_HEADER.pack(OF13, ofp.OFPT_ECHO_REPLY, len(raw), xid) + raw[8:])
            self.switch.echo_requests += 1
        else:
            self._dispatch_parsed(version, msg_type, xid, raw)

    def _dispatch_parsed(self, version: int, msg_type: int, xid: int, raw: bytes) -> None:
        msg = ofproto_parser.msg(_DP, version, msg_type, len(raw), xid, raw)
        if msg is None:  # os-ken logged the parse failure with the bytes
            log.error("%s: could not parse message type %d xid %d", self.label, msg_type, xid)
            self._fail(xid, OpenFlowError(f"{self.label}: unparsable reply type {msg_type}"))
        elif msg_type == ofp.OFPT_ERROR:
            self._on_error(xid, msg)
        elif msg_type == ofp.OFPT_MULTIPART_REPLY:
            self._on_multipart(xid, msg)
        elif msg_type == ofp.OFPT_PACKET_IN:
            self.switch._on_packet_in(self, msg)
        elif msg_type == ofp.OFPT_PORT_STATUS:
            self.switch._on_port_status(self, msg)
        elif msg_type in (ofp.OFPT_FEATURES_REPLY, ofp.OFPT_EXPERIMENTER):
            self._resolve(xid, msg)
        else:
            log.debug("%s: ignoring message type %d", self.label, msg_type)

    def _on_hello(self, version: int, raw: bytes) -> None:
        versions = _hello_versions(version, raw)
        if OF13 in versions:
            if not self.hello.done():
                self.hello.set_result(OF13)
            return
        err = HandshakeError(f"{self.label}: switch does not speak OpenFlow 1.3 "
                             f"(offers {sorted(versions)}); set the bridge's protocols")
        if not self.hello.done():
            self.hello.set_exception(err)

    def _resolve(self, xid: int, value: Any) -> None:
        fut = self.pending.pop(xid, None)
        if fut is not None and not fut.done():
            fut.set_result(value)

    def _fail(self, xid: int, exc: Exception) -> None:
        fut = self.pending.pop(xid, None)
        if fut is not None and not fut.done():
            fut.set_exception(exc)

    def _on_error(self, xid: int, msg: Any) -> None:
        error = SwitchErrorReply.from_msg(msg)
        for rng in self.ranges:
            if rng.owns(xid):
                flow, command = rng.ops[xid - rng.base]
                rng.failures.append(FlowModFailure(flow, command, error))
                log.warning("%s: %s %s rejected: %s", self.label, command.name, flow, error)
                return
        if xid in self.pending:
            self._fail(xid, OpenFlowError(f"{self.label}: switch error {error}"))
        else:
            log.error("%s: switch error for unknown xid %d: %s", self.label, xid, error)

    def _on_multipart(self, xid: int, msg: Any) -> None:
        parts = self.multipart.setdefault(xid, [])
        parts.extend(msg.body)
        if not msg.flags & ofp.OFPMPF_REPLY_MORE:
            self.multipart.pop(xid, None)
            self._resolve(xid, parts)


def _retrieve(fut: asyncio.Future[Any]) -> None:
    """Mark a future's exception as seen (it is reported elsewhere)."""
    if not fut.cancelled():
        fut.exception()


def _hello_versions(version: int, raw: bytes) -> set[int]:
    """Versions offered by a HELLO: its bitmap element if any, else everything <= version."""
    offset = 8
    while offset + 4 <= len(raw):
        el_type, el_len = struct.unpack_from("!HH", raw, offset)
        if el_len < 4:
            break
        if el_type == ofp.OFPHET_VERSIONBITMAP:
            words = struct.unpack_from(f"!{(el_len - 4) // 4}I", raw, offset + 4)
            return {i * 32 + bit for i, word in enumerate(words) for bit in range(32)
                    if word >> bit & 1}
        offset += (el_len + 7) // 8 * 8
    return set(range(1, version + 1))


# ---------------------------------------------------------------------------------------------
# Switch

ConnectedCallback = Callable[["Switch"], Awaitable[None] | None]


class Switch:
    """One OpenFlow 1.3 switch (bridge), reached over a listening or an active connection.

    Callbacks run on the event loop: ``on_connected(switch)`` after every (re)handshake (may be
    a coroutine function; the caller reconciles there), ``on_packet_in(PacketIn)``,
    ``on_port_status(PortStatus)``. Liveness: when nothing was received for ``echo_interval``
    seconds an echo is sent; no reply within ``echo_timeout`` closes the connection.
    """

    def __init__(self, name: str = "switch", *, on_connected: ConnectedCallback | None = None,
                 on_packet_in: Callable[[PacketIn], None] | None = None,
                 on_port_status: Callable[[PortStatus], None] | None = None,
                 on_disconnected: Callable[[Switch], None] | None = None,
                 echo_interval: float = 5.0, echo_timeout: float = 5.0,
                 handshake_timeout: float = 5.0) -> None:
        self.name = name
        self.on_connected = on_connected
        self.on_packet_in = on_packet_in
        self.on_port_status = on_port_status
        self.on_disconnected = on_disconnected
        self.echo_interval = echo_interval
        self.echo_timeout = echo_timeout
        self.handshake_timeout = handshake_timeout
        self._conn: _Connection | None = None
        self._server: asyncio.Server | None = None
        self._unix_path: str | None = None
        self._connected = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._bundle_ids = itertools.count(1)
        self._closing = False
        self.connections = 0  # completed handshakes, for observers and tests
        self.echo_requests = 0  # echo requests from the switch that were answered

    # -- lifecycle

    async def listen(self, target: str) -> None:
        """Accept the switch's connections on ``unix:PATH`` or ``tcp:HOST:PORT``."""
        loop = asyncio.get_running_loop()
        kind, addr = _parse_target(target)
        if kind == "unix":
            with contextlib.suppress(FileNotFoundError):
                os.unlink(addr)
            self._server = await loop.create_unix_server(lambda: _Connection(self), addr)
            self._unix_path = addr
        else:
            host, port = addr.rsplit(":", 1)
            self._server = await loop.create_server(lambda: _Connection(self), host, int(port))
        log.info("%s: listening on %s", self.name, target)

    async def connect(self, target: str) -> None:
        """Open a connection to the switch (e.g. ``unix:RUNDIR/br-int.mgmt``) and handshake.

        No reconnect: if it drops, requests fail with ConnectionLost; call connect() again.
        Raises HandshakeError if the handshake fails (bounded by ``handshake_timeout``).
        """
        loop = asyncio.get_running_loop()
        kind, addr = _parse_target(target)
        if kind == "unix":
            _, conn = await loop.create_unix_connection(lambda: _Connection(self), addr)
        else:
            host, port = addr.rsplit(":", 1)
            _, conn = await loop.create_connection(lambda: _Connection(self), host, int(port))
        await conn.ready

    async def close(self) -> None:
        """Stop listening, drop the connection, cancel background tasks."""
        self._closing = True
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        if self._unix_path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._unix_path)
            self._unix_path = None
        conn = self._conn
        if conn is not None and conn.transport is not None:
            conn.lost_reason = "closed by us"
            conn.transport.close()
            await conn.closed.wait()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def wait_connected(self) -> None:
        """Wait until a handshake completed (wrap in ``asyncio.timeout`` to bound it)."""
        await self._connected.wait()

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def datapath_id(self) -> int | None:
        return self._conn.datapath_id if self._conn is not None else None

    # -- requests

    async def barrier(self) -> None:
        await self._require().request(parser.OFPBarrierRequest(_DP))

    async def echo(self) -> float:
        """Round trip of an echo request, in seconds."""
        start = time.perf_counter()
        await self._require().request(parser.OFPEchoRequest(_DP, data=b"ferry"))
        return time.perf_counter() - start

    async def port_desc(self) -> list[PortInfo]:
        body = await self._require().request(parser.OFPPortDescStatsRequest(_DP, 0))
        return [_port_info(p) for p in body]

    async def dump_flows(self, table: int | None = None, cookie: int | None = None) -> list[Flow]:
        """All flows (of ``table``, with exactly ``cookie``) as Flow values.

        Raises UnsupportedFlow for an entry Flow cannot express.
        """
        req = parser.OFPFlowStatsRequest(
            _DP, 0, ofp.OFPTT_ALL if table is None else table, ofp.OFPP_ANY, ofp.OFPG_ANY,
            cookie or 0, COOKIE_MAX if cookie is not None else 0, parser.OFPMatch())
        body = await self._require().request(req)
        return [decode_flow_stats(stats) for stats in body]

    async def packet_out(self, data: bytes, actions: Sequence[Action],
                         in_port: int = OFPP_CONTROLLER) -> None:
        """Send a packet through ``actions`` (use Output(OFPP_TABLE) to run the pipeline)."""
        msg = parser.OFPPacketOut(_DP, buffer_id=ofp.OFP_NO_BUFFER, in_port=in_port,
                                  actions=[_action_to_os_ken(a) for a in actions], data=data)
        conn = self._require()
        conn.write(_serialize(msg, conn.next_xids(1)))

    async def apply(self, adds: Iterable[Flow] = (), modifies: Iterable[Flow] = (),
                    deletes: Iterable[Flow] = (), *, atomic: bool = False,
                    chunk: int = DEFAULT_CHUNK) -> None:
        """Install ``adds``, modify ``modifies`` and delete ``deletes``; return once acked.

        Order is adds, modifies, deletes: replacing a flow by one with the same key but a new
        cookie is an add (it replaces) plus a delete of the old cookie (then matches nothing),
        without a window where neither is installed. Modify and delete are strict and filtered
        by cookie. Modify leaves the cookie as is and does nothing if no such flow exists.

        Raises FlowModError naming each rejected flow (non-atomic: the others were applied;
        ``atomic=True`` uses an OpenFlow bundle and then nothing was applied) and
        ConnectionLost if the connection drops first (then an unknown prefix was applied).
        """
        ops = [(f, Command.ADD) for f in adds]
        ops += [(f, Command.MODIFY) for f in modifies]
        ops += [(f, Command.DELETE) for f in deletes]
        if not ops:
            return
        conn = self._require()
        if atomic:
            await self._apply_bundle(conn, ops)
        else:
            await self._apply_plain(conn, ops, chunk)

    async def _apply_plain(self, conn: _Connection, ops: list[tuple[Flow, Command]],
                           chunk: int) -> None:
        ranges: list[_OpRange] = []
        barriers: list[asyncio.Future[Any]] = []
        try:
            for start in range(0, len(ops), chunk):
                await conn.writable.wait()
                part = ops[start : start + chunk]
                rng = _OpRange(conn.next_xids(len(part) + 1), part)
                conn.ranges.append(rng)
                ranges.append(rng)
                barrier_xid = rng.base + len(part)
                barriers.append(conn.expect(barrier_xid))
                conn.write(_encode_batch(rng) + _barrier(barrier_xid))
            await asyncio.gather(*barriers)
        finally:
            for rng in ranges:
                conn.ranges.remove(rng)
            for fut in barriers:
                if not fut.done():
                    fut.cancel()
        failures = [f for rng in ranges for f in rng.failures]
        if failures:
            raise FlowModError(failures, atomic=False)

    async def _apply_bundle(self, conn: _Connection, ops: list[tuple[Flow, Command]]) -> None:
        """Open a bundle, add every flow-mod, check add-time errors, then commit or discard.

        OVS validates each flow-mod when it is added and reports a bad one with an error while
        the bundle stays open, so a barrier separates adding from committing: on any error the
        bundle is discarded instead of committed.
        """
        bundle_id = next(self._bundle_ids) & 0xFFFFFFFF
        rng = _OpRange(conn.next_xids(len(ops) + 2), ops)
        open_xid, barrier_xid = rng.base + len(ops), rng.base + len(ops) + 1
        conn.ranges.append(rng)
        try:
            opened = conn.expect(open_xid)
            barrier = conn.expect(barrier_xid)
            data = bytearray(_bundle_ctrl(bundle_id, ofp.ONF_BCT_OPEN_REQUEST, open_xid))
            for i, (flow, command) in enumerate(ops):
                data += encode_bundle_add(bundle_id, encode_flow_mod(flow, command), rng.base + i)
            conn.write(data + _barrier(barrier_xid))
            await asyncio.gather(opened, barrier)
            if rng.failures:
                await self._bundle_ctrl(conn, bundle_id, ofp.ONF_BCT_DISCARD_REQUEST)
                raise FlowModError(rng.failures, atomic=True)
            try:
                await self._bundle_ctrl(conn, bundle_id, ofp.ONF_BCT_COMMIT_REQUEST)
            except ConnectionLost:
                raise
            except OpenFlowError as exc:
                if rng.failures:
                    raise FlowModError(rng.failures, atomic=True) from exc
                raise
        finally:
            conn.ranges.remove(rng)

    async def _bundle_ctrl(self, conn: _Connection, bundle_id: int, type_: int) -> None:
        xid = conn.next_xids(1)
        fut = conn.expect(xid)
        conn.write(_bundle_ctrl(bundle_id, type_, xid))
        reply = await fut
        if reply.type != type_ + 1:  # every *_REQUEST is answered by its *_REPLY
            raise OpenFlowError(f"{conn.label}: bundle {bundle_id}: unexpected reply {reply}")

    # -- connection events (called by _Connection)

    def _require(self) -> _Connection:
        conn = self._conn
        if conn is None or not conn.is_open or conn.datapath_id is None:
            raise NotConnected(f"{self.name}: not connected to the switch")
        return conn

    def _on_transport(self, conn: _Connection) -> None:
        self._spawn(self._handshake(conn))

    def _on_lost(self, conn: _Connection) -> None:
        if conn is self._conn:
            level = logging.INFO if self._closing else logging.WARNING
            log.log(level, "%s: connection lost: %s", conn.label, conn.lost_reason)
            self._connected.clear()
            if self.on_disconnected is not None:
                self._callback(self.on_disconnected, self)

    async def _handshake(self, conn: _Connection) -> None:
        try:
            async with asyncio.timeout(self.handshake_timeout):
                await conn.hello
                features = await conn.request(parser.OFPFeaturesRequest(_DP))
        except (TimeoutError, OpenFlowError) as exc:
            conn.abort(f"handshake failed: {exc!r}")
            if not conn.ready.done():
                conn.ready.set_exception(HandshakeError(f"{conn.label}: {exc!r}"))
            return
        conn.datapath_id = features.datapath_id
        conn.ready.set_result(None)
        old, self._conn = self._conn, conn
        if old is not None and old.transport is not None and old is not conn:
            old.transport.close()
        self.connections += 1
        self._connected.set()
        log.info("%s: connected (n_tables=%d)", conn.label, features.n_tables)
        self._spawn(self._keepalive(conn))
        self._fire_connected()

    def _fire_connected(self) -> None:
        if self.on_connected is None:
            return
        result = self.on_connected(self)
        if inspect.isawaitable(result):
            self._spawn(_await(result))

    async def _keepalive(self, conn: _Connection) -> None:
        while conn.is_open:
            idle = time.monotonic() - conn.last_rx
            if idle < self.echo_interval:
                await asyncio.sleep(self.echo_interval - idle)
                continue
            try:
                async with asyncio.timeout(self.echo_timeout):
                    await conn.request(parser.OFPEchoRequest(_DP, data=b"ferry"))
            except TimeoutError:
                conn.abort(f"no echo reply within {self.echo_timeout} s")
            except ConnectionLost:
                return

    def _spawn(self, coro: Awaitable[None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("%s: background task failed", self.name, exc_info=task.exception())

    def _on_packet_in(self, conn: _Connection, msg: Any) -> None:
        if self.on_packet_in is None:
            return
        assert conn.datapath_id is not None
        event = PacketIn(conn.datapath_id, msg.table_id, msg.cookie, msg.reason,
                         dict(msg.match.items()), bytes(msg.data), msg.total_len, msg.buffer_id)
        self._callback(self.on_packet_in, event)

    def _on_port_status(self, conn: _Connection, msg: Any) -> None:
        log.info("%s: port status reason=%d port=%s", conn.label, msg.reason, msg.desc.name)
        if self.on_port_status is not None:
            self._callback(self.on_port_status, PortStatus(msg.reason, _port_info(msg.desc)))

    def _callback(self, func: Callable[[Any], None], event: object) -> None:
        try:
            func(event)
        except Exception:
            log.exception("%s: callback %r failed on %s", self.name, func, event)


async def _await(awaitable: Awaitable[None]) -> None:
    await awaitable


def _parse_target(target: str) -> tuple[str, str]:
    kind, _, addr = target.partition(":")
    if kind not in ("unix", "tcp") or not addr:
        raise ValueError(f"target must be unix:PATH or tcp:HOST:PORT, got {target!r}")
    return kind, addr


def _barrier(xid: int) -> bytes:
    return _HEADER.pack(OF13, ofp.OFPT_BARRIER_REQUEST, 8, xid)


def _bundle_ctrl(bundle_id: int, type_: int, xid: int) -> bytes:
    msg = parser.ONFBundleCtrlMsg(_DP, bundle_id, type_, _BUNDLE_FLAGS, [])
    return _serialize(msg, xid)


def _encode_batch(rng: _OpRange) -> bytearray:
    """The flow-mods of a chunk in one buffer, each with its own xid patched in."""
    out = bytearray()
    xid = rng.base
    for flow, command in rng.ops:
        data = encode_flow_mod(flow, command)
        pos = len(out)
        out += data
        _XID.pack_into(out, pos + 4, xid)
        xid += 1
    return out


def clear_encode_cache() -> None:
    """Forget all cached bytes (benchmarks measure the cold path with it)."""
    encode_flow_mod.cache_clear()
    _match_tlv.cache_clear()
    _action_bytes.cache_clear()
