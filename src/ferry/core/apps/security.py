"""Security groups: stateful (conntrack) filtering of what leaves and reaches a local VM.

Owns sg_egress → sg_egress_ct (after port security, reg6 = the sending port) and sg_ingress →
sg_ingress_ct (before delivery, reg7 = the receiving port). Decisions, and why:

Where.  Only on the chassis where the port is (Local, Outgoing, Incoming), for both of its
directions. Every other chassis passes the port's traffic on (table defaults, priority 0): the
port's own chassis filters it, once per direction. During a live migration the source and the
destination each filter with their own conntrack (traffic to the VM goes to both).

Who is filtered.  A port with port security and at least one group. A port without port
security, or without groups, gets no flows here and passes (Neutron's semantics). Non-IP
frames (ARP, RARP) pass: port security has already checked their addresses. DHCP (client to
server on egress, server to client on ingress) and IPv6 neighbour discovery/router
solicitation pass without conntrack, like Neutron's base rules: a VM must be able to get an
address whatever its groups say.

Zones.  One conntrack zone per VIF plugged on this chassis, so that two local VMs talking to
each other keep two independent entries (the sender's egress, the receiver's ingress), and
overlapping addresses of different networks never share an entry. 16 bits; ports use
``ZONE_MIN..ZONE_MAX`` (zones above are left to other apps, e.g. NAT). The allocation is a
pure function of the set of plugged VIFs (a hash of the iface-id, linear probing in a fixed
order): a restarted controller, a full recompute and the incremental path all agree, and the
chassis core recomputes the rare port whose zone moved when another VIF came or went (a
collision), which costs that port its conntrack entries and nothing else (see pick-up below).

Stateful, both directions.  Each side sends IP through ct(zone, table=<side>_ct). There:
``+inv`` is dropped; ``+est+rpl`` and ``+rel`` pass without looking at rules (replies of a
connection this port's side allowed, ICMP errors about it); every other packet (``+new``, and
``+est`` in the original direction) is checked against the rules and, when a rule admits it,
committed in the port's zone. Committing on both sides means A → B on one chassis creates an
entry in A's zone (egress) and in B's (ingress); B's answers are replies in both.

Rule changes.  Because packets in a connection's original direction are checked against the
rules every time (OVN does the same since "Apply ACL changes to existing connections"),
removing a rule stops exactly the connections no other rule admits; a connection that
another rule still allows keeps flowing, with its conntrack entry. Without a ct_mark write
(``Ct`` has no ``exec``), the replies of a connection that lost its rule still pass; the
connection is dead anyway because its original direction is dropped.

Live migration.  Conntrack state is not migrated. OVS's userspace conntrack accepts a TCP
segment without SYN as a new connection (``tcp_valid_new`` refuses only SYN+ACK and invalid
flag combinations) and tracks it with unknown window scaling, i.e. liberally: the first
packet of an established connection on the destination is ``+new``, is checked against the
rules and committed. Either end's next packet therefore rebuilds the state as long as the
rules admit the direction it travels in: the originator's direction is admitted by the rule
that admitted the connection in the first place, and with the default group (all egress,
ingress from the group) both directions are. Left open: the responder speaking first towards
a silent originator through rules that do not admit the reverse direction. And TCP windows:
the destination commits the client's segments that reach it before the VM runs there (traffic
goes to both chassis), without ever seeing the VM's side; past the window a pickup allows
(about 64 kB) they become ``+inv`` and a busy connection dies (measured in the lab test); an
entry left in the zone by the VM's previous stay on a chassis is as stale. The agent must
therefore turn TCP sequence checking off (``dpctl/ct-disable-tcp-seq-chk``: the userspace
datapath has no per-entry be_liberal, which the kernel datapath sets on commit and OVN relies
on), and should flush a port's zone when the port becomes local (OVN flushes on assignment).

IPv6.  Rules carry their ethertype: IPv4 rules match eth_type 0x0800 and ipv4_src/dst, IPv6
rules 0x86dd and ipv6_src/dst, ICMP in an IPv6 rule means ICMPv6. (Port security does not let
IPv6 out yet; these flows are ready for when it does.)

Remote groups.  One flow per (rule, member prefix): the members' addresses (fixed IPs and
allowed address pairs) of the rule's family, collapsed into the fewest exact CIDRs
(``ipaddress.collapse_addresses``: addresses allocated in sequence collapse well). A
conjunctive match would make it rules + members flows instead of rules * members, but
``ferry.switch.flow`` has no conjunction action yet, and shared per-group flows would need an
owner kind the core does not have (flows are owned per port). The cost is flows per local
port * members of the groups its rules name; the ports to recompute on a change are found by
``affected_ports``.

Port ranges become masked matches on the destination port (tcp_dst/udp_dst; the fewest
aligned blocks). ICMP rules use port_range_min/max as type/code. SCTP port ranges cannot be
expressed (no sctp_dst field yet): such a rule admits nothing rather than too much.
"""

from __future__ import annotations

import ipaddress
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import lru_cache

from ferry.core.apps.base import App, Context
from ferry.core.pipeline import REG_DST_PORT, REG_SRC_PORT, table
from ferry.core.topology import Incoming, Local, Location, Outgoing, Topology
from ferry.model.objects import (
    Direction,
    IPNetwork,
    LogicalPort,
    LogicalSwitch,
    NbObject,
    SecurityGroup,
    SecurityGroupRule,
)
from ferry.switch.flow import Ct, Flow, FlowError, GotoTable, Match, MatchValue

# ct_state bits, as OVS defines them.
CT_NEW, CT_EST, CT_REL, CT_RPL, CT_INV, CT_TRK = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20

ZONE_MIN, ZONE_MAX = 1, 0xEFFF
"""Conntrack zones of VIFs; 0 (the default zone) and 0xF000.. stay free for other apps."""

ETH_IPV4, ETH_IPV6 = 0x0800, 0x86DD
_ETH = {"IPv4": ETH_IPV4, "IPv6": ETH_IPV6}
_PROTO_ICMP, _PROTO_ICMPV6, _PROTO_TCP, _PROTO_UDP = 1, 58, 6, 17

# Priorities inside the side's tables.
_P_INFRA = 110   # before conntrack: DHCP, IPv6 ND (pass)
_P_TO_CT = 100   # before conntrack: the port's IP into its zone
_P_INVALID = 200
_P_REPLY = 190
_P_RELATED = 180
_P_RULE = 100
_P_DROP = 1


@dataclass(frozen=True)
class Side:
    """One direction of a port's traffic, as the pipeline lays it out."""

    direction: Direction
    pre: str
    post: str
    next: str
    port_reg: str
    remote_is_src: bool
    """Ingress: the remote end is the packet's source; egress: its destination."""


EGRESS = Side(Direction.EGRESS, "sg_egress", "sg_egress_ct", "arp_responder", REG_SRC_PORT,
              remote_is_src=False)
INGRESS = Side(Direction.INGRESS, "sg_ingress", "sg_ingress_ct", "egress", REG_DST_PORT,
               remote_is_src=True)


# -- what the topology says -------------------------------------------------------------------


def filtered(port: LogicalPort) -> bool:
    """Is the port subject to security groups at all?"""
    return port.port_security_enabled and bool(port.security_groups)


def rules_of(topo: Topology, port: LogicalPort) -> list[SecurityGroupRule]:
    """The rules of every group of the port (a group's object need not have arrived yet)."""
    groups = set(port.security_groups)
    return sorted((r for r in topo.table(SecurityGroupRule).values()
                   if r.security_group_id in groups), key=lambda r: r.id)


def members(topo: Topology, group_id: str) -> list[LogicalPort]:
    """Every port in the group, wherever it is (remote-group membership ignores location)."""
    return sorted((p for p in topo.table(LogicalPort).values() if group_id in p.security_groups),
                  key=lambda p: p.id)


def member_prefixes(topo: Topology, group_id: str, version: int) -> list[IPNetwork]:
    """The group's members' addresses of one IP version, as the fewest exact prefixes."""
    nets: list[IPNetwork] = []
    for port in members(topo, group_id):
        nets += [ipaddress.ip_network(f.ip_address) for f in port.fixed_ips]
        nets += [pair.ip_address for pair in port.allowed_address_pairs]
    if version == 4:
        return list(ipaddress.collapse_addresses(
            n for n in nets if isinstance(n, ipaddress.IPv4Network)))
    return list(ipaddress.collapse_addresses(
        n for n in nets if isinstance(n, ipaddress.IPv6Network)))


def affected_ports(topo: Topology, old: NbObject | None, new: NbObject | None) -> list[str]:
    """Ports with a VIF here whose security flows a change of ``old`` → ``new`` may change,
    besides a changed port itself: the members of a group whose rules changed, and the ports
    whose rules name a group as remote group when that group or a member's addresses or
    groups changed."""
    groups: set[str] = set()
    remote: set[str] = set()
    objs = [o for o in (old, new) if o is not None]
    if any(isinstance(o, SecurityGroupRule) for o in objs):
        groups = {o.security_group_id for o in objs if isinstance(o, SecurityGroupRule)}
    elif any(isinstance(o, SecurityGroup) for o in objs):
        groups = remote = {o.id for o in objs}
    elif any(isinstance(o, LogicalPort) for o in objs) and _membership_changed(old, new):
        remote = {g for o in objs if isinstance(o, LogicalPort) for g in o.security_groups}
    if remote:
        groups |= {r.security_group_id for r in topo.table(SecurityGroupRule).values()
                   if r.remote_group_id in remote}
    return sorted(p.id for p in topo.table(LogicalPort).values()
                  if p.id in topo.vifs and groups.intersection(p.security_groups))


def _membership_changed(old: NbObject | None, new: NbObject | None) -> bool:
    if not isinstance(old, LogicalPort) or not isinstance(new, LogicalPort):
        return True
    return ((old.security_groups, old.fixed_ips, old.allowed_address_pairs)
            != (new.security_groups, new.fixed_ips, new.allowed_address_pairs))


def ct_zones(topo: Topology) -> dict[str, int]:
    """The conntrack zone of every VIF plugged on this chassis, by iface-id (= port id)."""
    return dict(_allocate_zones(frozenset(topo.vifs)))


@lru_cache(maxsize=16)
def _allocate_zones(ifaces: frozenset[str]) -> tuple[tuple[str, int], ...]:
    """Each iface at its hashed zone, or the next free one, in (hash, name) order: a pure
    function of the set, so every computation on the same VIFs agrees."""
    span = ZONE_MAX - ZONE_MIN + 1
    if len(ifaces) > span:
        raise FlowError(f"security: {len(ifaces)} VIFs, only {span} conntrack zones")
    taken: set[int] = set()
    out = []
    for iface in sorted(ifaces, key=lambda i: (_preferred_zone(i), i)):
        zone = _preferred_zone(iface)
        while zone in taken:
            zone = ZONE_MIN + (zone - ZONE_MIN + 1) % span
        taken.add(zone)
        out.append((iface, zone))
    return tuple(out)


def _preferred_zone(iface: str) -> int:
    return ZONE_MIN + zlib.crc32(iface.encode()) % (ZONE_MAX - ZONE_MIN + 1)


# -- flows ------------------------------------------------------------------------------------


class SecurityGroups(App):
    name = "security"

    def static_flows(self, ctx: Context) -> Iterable[Flow]:
        for side in (EGRESS, INGRESS):
            yield Flow(table(side.pre), 0, Match(), (GotoTable(table(side.next)),))

    def port_flows(self, ctx: Context, port: LogicalPort, net: LogicalSwitch,
                   loc: Location) -> Iterable[Flow]:
        if not isinstance(loc, Local | Outgoing | Incoming) or not filtered(port):
            return
        zone = ct_zones(ctx.topology).get(port.id)
        if zone is None:
            return  # not plugged here: cannot be local (defensive)
        rules = rules_of(ctx.topology, port)
        for side in (EGRESS, INGRESS):
            yield from self._side(ctx.topology, port, zone, side,
                                  [r for r in rules if r.direction is side.direction])

    def _side(self, topo: Topology, port: LogicalPort, zone: int, side: Side,
              rules: list[SecurityGroupRule]) -> Iterator[Flow]:
        me = Match(**{side.port_reg: port.tunnel_key})
        pre, post, nxt = table(side.pre), table(side.post), GotoTable(table(side.next))
        for eth in (ETH_IPV4, ETH_IPV6):
            yield Flow(pre, _P_TO_CT, me.with_fields(eth_type=eth),
                       (Ct(zone=zone, table=post),))
        for infra in _infrastructure(side):
            yield Flow(pre, _P_INFRA, me.with_fields(**infra), (nxt,))
        yield Flow(post, _P_INVALID, me.with_fields(ct_state=(CT_TRK | CT_INV,
                                                              CT_TRK | CT_INV)), ())
        yield Flow(post, _P_REPLY, me.with_fields(
            ct_state=(CT_TRK | CT_EST | CT_RPL, CT_TRK | CT_EST | CT_RPL | CT_INV)), (nxt,))
        yield Flow(post, _P_RELATED, me.with_fields(
            ct_state=(CT_TRK | CT_REL, CT_TRK | CT_REL | CT_INV)), (nxt,))
        admit = (Ct(commit=True, zone=zone), nxt)
        original = me.with_fields(ct_state=(CT_TRK, CT_TRK | CT_RPL | CT_INV))
        for rule in rules:
            for fields in rule_matches(topo, rule, side):
                yield Flow(post, _P_RULE, original.with_fields(**fields), admit)
        yield Flow(post, _P_DROP, me, ())


def _infrastructure(side: Side) -> list[dict[str, MatchValue]]:
    """What passes without conntrack: DHCP and IPv6 neighbour discovery."""
    v4: dict[str, MatchValue] = {"eth_type": ETH_IPV4}
    v6: dict[str, MatchValue] = {"eth_type": ETH_IPV6}
    if side is EGRESS:
        dhcp = [{**v4, "ip_proto": _PROTO_UDP, "udp_src": 68, "udp_dst": 67},
                {**v6, "ip_proto": _PROTO_UDP, "udp_src": 546, "udp_dst": 547}]
        nd = (133, 135, 136)  # router solicitation, neighbour solicitation/advertisement
    else:
        dhcp = [{**v4, "ip_proto": _PROTO_UDP, "udp_src": 67, "udp_dst": 68},
                {**v6, "ip_proto": _PROTO_UDP, "udp_src": 547, "udp_dst": 546}]
        nd = (134, 135, 136)  # router advertisement, neighbour solicitation/advertisement
    return dhcp + [{**v6, "ip_proto": _PROTO_ICMPV6, "icmpv6_type": t} for t in nd]


def rule_matches(topo: Topology, rule: SecurityGroupRule,
                 side: Side) -> list[dict[str, MatchValue]]:
    """The matches (besides port and ct_state) that together admit what the rule admits."""
    base: dict[str, MatchValue] = {"eth_type": _ETH[rule.ethertype]}
    v6 = rule.ethertype == "IPv6"
    proto = rule.ip_proto
    if proto == _PROTO_ICMP and v6:
        proto = _PROTO_ICMPV6
    if proto is not None:
        base["ip_proto"] = proto
    l4 = _l4_matches(rule, proto, v6)
    remotes = _remote_matches(topo, rule, side)
    return [{**base, **a, **b} for a in l4 for b in remotes]


def _l4_matches(rule: SecurityGroupRule, proto: int | None,
                v6: bool) -> list[dict[str, MatchValue]]:
    lo, hi = rule.port_range_min, rule.port_range_max
    if proto in (_PROTO_ICMP, _PROTO_ICMPV6):
        prefix = "icmpv6" if v6 else "icmpv4"
        out: dict[str, MatchValue] = {}
        if lo is not None:
            out[f"{prefix}_type"] = lo
            if hi is not None:
                out[f"{prefix}_code"] = hi
        return [out]
    if lo is None and hi is None:
        return [{}]
    if proto not in (_PROTO_TCP, _PROTO_UDP):
        return []  # SCTP ports: not expressible yet; admit nothing rather than too much
    field = "tcp_dst" if proto == _PROTO_TCP else "udp_dst"
    lo = 0 if lo is None else lo
    hi = lo if hi is None else hi
    if (lo, hi) == (0, 0xFFFF):
        return [{}]
    return [{field: m} for m in port_range_masks(lo, hi)]


def _remote_matches(topo: Topology, rule: SecurityGroupRule,
                    side: Side) -> list[dict[str, MatchValue]]:
    family = "ipv6" if rule.ethertype == "IPv6" else "ipv4"
    field = f"{family}_{'src' if side.remote_is_src else 'dst'}"
    if rule.remote_group_id is not None:
        nets = member_prefixes(topo, rule.remote_group_id, 6 if family == "ipv6" else 4)
    elif rule.remote_ip_prefix is not None:
        nets = [rule.remote_ip_prefix]
    else:
        return [{}]
    return [{} if n.prefixlen == 0 else {field: str(n)} for n in nets]


def port_range_masks(lo: int, hi: int) -> list[MatchValue]:
    """``lo..hi`` (16-bit ports) as the fewest aligned (value, mask) blocks."""
    out: list[MatchValue] = []
    while lo <= hi:
        size = 1
        while lo % (size * 2) == 0 and lo + size * 2 - 1 <= hi and size < 0x8000:
            size *= 2
        out.append(lo if size == 1 else (lo, 0xFFFF & ~(size - 1)))
        lo += size
    return out
