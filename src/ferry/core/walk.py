"""Walk a packet through a set of flows, as OVS would, without OVS.

Used by tests to ask forwarding questions of the core's desired flows (which ports get this
packet, and which do not) and by several cores at once to follow a packet across Geneve
tunnels. Packets are dicts of OXM field names to canonical values (see ``ferry.switch.flow``).
Covers the actions the apps use: output (incl. IN_PORT), set_field, move, goto_table,
resubmit, learn, and ct (``Conntrack``: a connection table per chassis, commit, zones, and
ct(table=N)'s fork into N with ct_state/ct_zone set). Prerequisites are not checked: real OVS
tests do that.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ferry.core.apps.security import CT_EST, CT_INV, CT_NEW, CT_RPL, CT_TRK
from ferry.switch.flow import (
    OFPP_IN_PORT,
    Controller,
    Ct,
    Flow,
    GotoTable,
    Learn,
    LearnLoad,
    LearnLoadValue,
    LearnMatch,
    LearnMatchValue,
    LearnOutput,
    Match,
    Output,
    RegMove,
    Resubmit,
    SetField,
    canonical_value,
    field_width,
)

Packet = dict[str, Any]
MAX_STEPS = 64


@dataclass
class Delivery:
    port: int
    packet: Packet


@dataclass(frozen=True)
class PacketIn:
    """What a controller action sends: the action, the packet then, and the flow's table and
    cookie (which the switch puts in the packet-in)."""

    action: Controller
    packet: Packet
    table: int
    cookie: int


@dataclass
class Walk:
    outputs: list[Delivery] = field(default_factory=list)
    trace: list[Flow] = field(default_factory=list)
    to_controller: list[PacketIn] = field(default_factory=list)

    @property
    def ports(self) -> list[int]:
        return [d.port for d in self.outputs]


ConnKey = tuple[int, int, int | str, int | str, int, int]
_ICMP_ANSWER = {(1, 8): 0, (1, 0): 8, (58, 128): 129, (58, 129): 128}
_ICMP_REQUESTS = {(1, 8), (58, 128)}


@dataclass
class Conntrack:
    """One chassis' connection tracker, as far as the apps rely on it: connections committed
    per zone, in their original direction. A packet of a committed connection is +est (+rpl
    when it travels the other way); anything else is +new, except ICMP that is not an echo
    request (+inv). Like OVS's userspace tracker, a TCP segment without SYN may start a
    connection (the walker has no TCP flags): that is what a chassis sees after a migration.
    """

    committed: set[tuple[int, ConnKey]] = field(default_factory=set)

    def state(self, zone: int, pkt: Packet) -> int:
        key = conn_key(pkt)
        if (zone, key) in self.committed:
            return CT_TRK | CT_EST
        if (zone, reverse(key)) in self.committed:
            return CT_TRK | CT_EST | CT_RPL
        proto, icmp_type = key[1], key[4]
        if proto in (1, 58) and (proto, icmp_type) not in _ICMP_REQUESTS:
            return CT_TRK | CT_INV
        return CT_TRK | CT_NEW

    def commit(self, zone: int, pkt: Packet) -> None:
        if self.state(zone, pkt) & CT_NEW:
            self.committed.add((zone, conn_key(pkt)))

    def zone(self, zone: int) -> set[ConnKey]:
        return {k for z, k in self.committed if z == zone}


def conn_key(pkt: Packet) -> ConnKey:
    """(eth_type, proto, src, dst, sport, dport) of an IP packet; ICMP: (type, answer type)."""
    eth_type = int(pkt.get("eth_type", 0))
    if eth_type not in (0x0800, 0x86DD):
        raise ValueError(f"walk: ct() on a non-IP packet: {pkt}")
    v = "ipv4" if eth_type == 0x0800 else "ipv6"
    proto = int(pkt.get("ip_proto", 0))
    src = canonical_value(f"{v}_src", pkt.get(f"{v}_src", 0))
    dst = canonical_value(f"{v}_dst", pkt.get(f"{v}_dst", 0))
    if proto in (6, 17):
        l4 = "tcp" if proto == 6 else "udp"
        return (eth_type, proto, src, dst, int(pkt.get(f"{l4}_src", 0)),
                int(pkt.get(f"{l4}_dst", 0)))
    if proto in (1, 58):
        t = int(pkt.get("icmpv4_type" if proto == 1 else "icmpv6_type", 0))
        return (eth_type, proto, src, dst, t, _ICMP_ANSWER.get((proto, t), -1))
    return (eth_type, proto, src, dst, 0, 0)


def reverse(key: ConnKey) -> ConnKey:
    """The key of the same connection's packets in the other direction."""
    eth_type, proto, src, dst, a, b = key
    return (eth_type, proto, dst, src, b, a)


def _int(name: str, value: Any) -> int:
    """A field value as an integer (MACs and addresses parsed as the flows parse them)."""
    v = canonical_value(name, value)
    if isinstance(v, int):
        return v
    if field_width(name) == 48:
        return int(v.replace(":", ""), 16)
    return int(ipaddress.ip_address(v))


def _matches(match: Match, pkt: Packet) -> bool:
    for name, want in match.fields:
        have = pkt.get(name, 0)
        if isinstance(want, tuple):
            value, mask = _int(name, want[0]), _int(name, want[1])
            if _int(name, have) & mask != value & mask:
                return False
        elif _int(name, have) != _int(name, want):
            return False
    return True


def lookup(flows: Iterable[Flow], table: int, pkt: Packet) -> Flow | None:
    best: Flow | None = None
    for f in flows:
        if f.table == table and _matches(f.match, pkt) and (
            best is None or f.priority > best.priority
        ):
            best = f
    return best


def walk(flows: Iterable[Flow], packet: Mapping[str, Any], table: int = 0,
         learned: dict[tuple[int, int, Match], Flow] | None = None,
         conntrack: Conntrack | None = None) -> Walk:
    """Run ``packet`` (with ``in_port`` set) through ``flows`` from ``table``.

    ``learned`` holds the flows learn actions added (by key); they take part in lookups and
    learn actions of this walk add to it, as OVS's datapath would. ``conntrack`` is the
    chassis' connection table (a fresh one per walk if None)."""
    learned = {} if learned is None else learned
    conntrack = Conntrack() if conntrack is None else conntrack
    by_key = {f.key: f for f in flows}
    by_key.update(learned)
    by_table: dict[int, list[Flow]] = {}
    for f in by_key.values():
        by_table.setdefault(f.table, []).append(f)
    result = Walk()
    _run(_State(by_table, result, learned, conntrack), dict(packet), table, 0)
    return result


def learn(action: Learn, pkt: Packet) -> Flow:
    """The flow a learn action builds from a packet."""
    fields: dict[str, Any] = {}
    actions: list[Output | SetField] = []
    for spec in action.specs:
        if isinstance(spec, LearnMatchValue):
            width = field_width(spec.dst)
            n_bits = spec.n_bits if spec.n_bits is not None else width
            if spec.dst_ofs == 0 and n_bits == width:
                fields[spec.dst] = spec.value
            else:  # a subfield: a masked match
                fields[spec.dst] = (spec.value << spec.dst_ofs,
                                    ((1 << n_bits) - 1) << spec.dst_ofs)
        elif isinstance(spec, LearnMatch):
            fields[spec.dst] = _bits(pkt, spec.src or spec.dst, spec.dst)
        elif isinstance(spec, LearnLoadValue):
            actions.append(SetField(spec.dst, spec.value))
        elif isinstance(spec, LearnLoad):
            actions.append(SetField(spec.dst, _bits(pkt, spec.src, spec.dst)))
        elif isinstance(spec, LearnOutput):
            actions.append(Output(int(pkt.get(_field_of(spec.src), 0))))
    return Flow(action.table, action.priority, Match.of(fields), tuple(actions), action.cookie)


def _ct(st: _State, action: Ct, pkt: Packet, depth: int) -> None:
    """OVS's ct: commit if asked; with a table, fork: a copy with ct_state and ct_zone set
    continues there, the packet itself goes on with the next action, untracked."""
    if action.nat is not None:
        raise NotImplementedError("walk: ct(nat) is not simulated")
    state = st.conntrack.state(action.zone, pkt)
    if action.commit:
        st.conntrack.commit(action.zone, pkt)
    if action.table is not None:
        _run(st, {**pkt, "ct_state": state, "ct_zone": action.zone}, action.table, depth + 1)


def _bits(pkt: Packet, src: str, dst: str) -> Any:
    """The packet's ``src`` as a value of field ``dst`` (learn copies bits: an address may
    land in a register)."""
    value = pkt.get(_field_of(src), 0)
    if src == dst or _field_of(src) == "in_port":
        return value
    return canonical_value(dst, _int(src, value))


def _field_of(name: str) -> str:
    return "in_port" if name == "in_port_nxm" else name


@dataclass
class _State:
    """What one walk shares across tables, recirculations and forks."""

    tables: dict[int, list[Flow]]
    result: Walk
    learned: dict[tuple[int, int, Match], Flow]
    conntrack: Conntrack


def _run(st: _State, pkt: Packet, table: int, depth: int) -> None:
    if depth > MAX_STEPS:
        raise RuntimeError("packet walk too deep: a loop in the pipeline?")
    tables, result, learned = st.tables, st.result, st.learned
    flow = lookup(tables.get(table, []), table, pkt)
    if flow is None:
        return  # table miss: OpenFlow 1.3 drops
    result.trace.append(flow)
    for action in flow.actions:
        if isinstance(action, Output):
            port = pkt["in_port"] if action.port == OFPP_IN_PORT else action.port
            if action.port != OFPP_IN_PORT and port == pkt.get("in_port"):
                continue  # OpenFlow never sends a packet back out of its ingress port
            result.outputs.append(Delivery(port, dict(pkt)))
        elif isinstance(action, SetField):
            pkt[action.field] = action.value
        elif isinstance(action, RegMove):
            src = _int(action.src_field, pkt.get(action.src_field, 0))
            bits = (src >> action.src_ofs) & ((1 << action.n_bits) - 1)
            dst = _int(action.dst_field, pkt.get(action.dst_field, 0))
            mask = ((1 << action.n_bits) - 1) << action.dst_ofs
            dst = (dst & ~mask) | (bits << action.dst_ofs)
            pkt[action.dst_field] = canonical_value(action.dst_field,
                                                    dst & ((1 << field_width(
                                                        action.dst_field)) - 1))
        elif isinstance(action, Resubmit | GotoTable):
            _run(st, pkt, action.table, depth + 1)
        elif isinstance(action, Ct):
            _ct(st, action, pkt, depth)
        elif isinstance(action, Controller):
            result.to_controller.append(PacketIn(action, dict(pkt), flow.table, flow.cookie))
        elif isinstance(action, Learn):
            new = learn(action, pkt)
            learned[new.key] = new
            bucket = tables.setdefault(new.table, [])
            bucket[:] = [f for f in bucket if f.key != new.key] + [new]
        else:
            raise NotImplementedError(f"walk: {action} is not simulated")
