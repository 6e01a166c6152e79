"""Walk a packet through a set of flows, as OVS would, without OVS.

Used by tests to ask forwarding questions of the core's desired flows (which ports get this
packet, and which do not) and by several cores at once to follow a packet across Geneve
tunnels. Packets are dicts of OXM field names to canonical values (see ``ferry.switch.flow``).
Covers the actions the apps use: output (incl. IN_PORT), set_field, move, goto_table,
resubmit. Prerequisites are not checked: real OVS tests do that.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ferry.switch.flow import (
    OFPP_IN_PORT,
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


@dataclass
class Walk:
    outputs: list[Delivery] = field(default_factory=list)
    trace: list[Flow] = field(default_factory=list)

    @property
    def ports(self) -> list[int]:
        return [d.port for d in self.outputs]


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
         learned: dict[tuple[int, int, Match], Flow] | None = None) -> Walk:
    """Run ``packet`` (with ``in_port`` set) through ``flows`` from ``table``.

    ``learned`` holds the flows learn actions added (by key); they take part in lookups and
    learn actions of this walk add to it, as OVS's datapath would."""
    learned = {} if learned is None else learned
    by_key = {f.key: f for f in flows}
    by_key.update(learned)
    by_table: dict[int, list[Flow]] = {}
    for f in by_key.values():
        by_table.setdefault(f.table, []).append(f)
    result = Walk()
    _run(by_table, dict(packet), table, result, 0, learned)
    return result


def learn(action: Learn, pkt: Packet) -> Flow:
    """The flow a learn action builds from a packet."""
    fields: dict[str, Any] = {}
    actions: list[Output | SetField] = []
    for spec in action.specs:
        if isinstance(spec, LearnMatchValue):
            fields[spec.dst] = spec.value
        elif isinstance(spec, LearnMatch):
            fields[spec.dst] = pkt.get(_field_of(spec.src or spec.dst), 0)
        elif isinstance(spec, LearnLoadValue):
            actions.append(SetField(spec.dst, spec.value))
        elif isinstance(spec, LearnLoad):
            actions.append(SetField(spec.dst, pkt.get(_field_of(spec.src), 0)))
        elif isinstance(spec, LearnOutput):
            actions.append(Output(int(pkt.get(_field_of(spec.src), 0))))
    return Flow(action.table, action.priority, Match.of(fields), tuple(actions), action.cookie)


def _field_of(name: str) -> str:
    return "in_port" if name == "in_port_nxm" else name


def _run(tables: dict[int, list[Flow]], pkt: Packet, table: int, result: Walk,
         depth: int, learned: dict[tuple[int, int, Match], Flow]) -> None:
    if depth > MAX_STEPS:
        raise RuntimeError("packet walk too deep: a loop in the pipeline?")
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
            _run(tables, pkt, action.table, result, depth + 1, learned)
        elif isinstance(action, Learn):
            new = learn(action, pkt)
            learned[new.key] = new
            bucket = tables.setdefault(new.table, [])
            bucket[:] = [f for f in bucket if f.key != new.key] + [new]
        else:
            raise NotImplementedError(f"walk: {action} is not simulated")
