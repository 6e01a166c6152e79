"""The OpenFlow pipeline of br-int, declared as data.

Every table has a name, a number, the one app that owns it and the tables it may continue to.
Numbers are assigned here and nowhere else; ``check_flow`` rejects a flow that an app writes to
a table it does not own or that jumps where the declaration does not allow.

Registers carry the logical context between tables:
  metadata  the network's tunnel key (VNI)
  reg6      the logical source port's key (set by classification)
  reg7      the logical destination port's key (set by L2 lookup)
  reg5      flags; bit 0 = the packet came in from a tunnel, bit 1 = a flooded copy
  reg0      routing: the IPv4 next hop, from l3_route to l3_nexthop (reg0..reg3 for IPv6);
            on an external network, from ext_nexthop to mac_binding
"""

from __future__ import annotations

from dataclasses import dataclass

from ferry.switch.flow import Flow, FlowError, Resubmit

REG_NETWORK = "metadata"
REG_SRC_PORT = "reg6"
REG_DST_PORT = "reg7"
REG_FLAGS = "reg5"
FLAG_FROM_TUNNEL = 1
FLAG_FLOOD = 2


@dataclass(frozen=True)
class Table:
    name: str
    number: int
    owner: str
    next: tuple[str, ...]
    doc: str


TABLES: tuple[Table, ...] = (
    Table("classify", 0, "classifier",
          ("tunnel_unknown", "activation", "ext_ingress", "port_security", "tunnel_ingress"),
          "in_port → logical port and network; tunnel → network; patch port → the flat "
          "network of its physical network"),
    Table("tunnel_unknown", 1, "classifier", (),
          "from a tunnel, a network this chassis has no port on: dropped, per destination MAC "
          "(see Classifier.static_flows)"),
    Table("activation", 2, "classifier", (),
          "live migration, destination: the VM's first frame tells this chassis' controller "
          "(one packet-in: the first frame learns an override that stops the next)"),
    Table("ext_ingress", 5, "fip", ("sg_ingress",),
          "frames from a physical network: ARP for a floating IP answered where its port is, "
          "ARP senders learned into mac_binding, IP to a floating IP DNATed to its port"),
    Table("port_security", 10, "port_security", ("sg_egress",),
          "a VM sends only with its own MAC/IPs and allowed address pairs"),
    Table("sg_egress", 12, "security", ("sg_egress_ct", "arp_responder"),
          "security groups, traffic leaving a VM: into conntrack (or straight on)"),
    Table("sg_egress_ct", 13, "security", ("arp_responder",),
          "security groups, leaving a VM, after conntrack: the group's egress rules"),
    Table("arp_responder", 20, "arp_responder", ("l2_lookup",),
          "ARP requests for known ports (and router interfaces) answered on this chassis"),
    Table("tunnel_ingress", 25, "l2", ("l2_lookup",),
          "frames from other chassis; a live-migrating VM's first frame from its new chassis "
          "moves this chassis' traffic for it there (learn)"),
    Table("l2_lookup", 30, "l2", ("l3_route", "flood", "sg_ingress"),
          "destination MAC → logical destination port; router MAC → routing; broadcast and "
          "unknown → flood"),
    Table("l3_route", 32, "l3", ("l3_nexthop", "fip_snat"),
          "distributed routing on the sending chassis: destination network, TTL, MACs"),
    Table("l3_nexthop", 34, "l3", ("sg_ingress",),
          "routed packets: destination IP → the port's MAC and logical port"),
    Table("fip_snat", 36, "fip", ("ext_nexthop",),
          "routed to a router's gateway: a port with a floating IP leaves as that IP"),
    Table("ext_nexthop", 37, "fip", ("mac_binding",),
          "on an external network: the next hop (on-link destination or subnet gateway)"),
    Table("mac_binding", 38, "fip", (),
          "next hop → MAC and patch port, learned in the datapath from ARP"),
    Table("flood", 40, "l2", ("sg_ingress",),
          "to every local port of the network and every other chassis hosting it"),
    Table("sg_ingress", 45, "security", ("sg_ingress_ct", "egress"),
          "security groups, traffic to a local VM: into conntrack (or straight on)"),
    Table("sg_ingress_ct", 46, "security", ("egress",),
          "security groups, to a VM, after conntrack: the group's ingress rules"),
    Table("egress", 50, "l2", (),
          "logical destination port → local OpenFlow port or Geneve tunnel"),
)

BY_NAME: dict[str, Table] = {t.name: t for t in TABLES}
BY_NUMBER: dict[int, Table] = {t.number: t for t in TABLES}


def table(name: str) -> int:
    return BY_NAME[name].number


def check_declaration() -> None:
    """Names and numbers unique, every jump forward to a declared table."""
    if len(BY_NAME) != len(TABLES) or len(BY_NUMBER) != len(TABLES):
        raise FlowError("pipeline: duplicate table name or number")
    for t in TABLES:
        for nxt in t.next:
            if nxt not in BY_NAME or BY_NAME[nxt].number <= t.number:
                raise FlowError(f"pipeline: {t.name} → {nxt} is not a forward jump")


def check_flow(app: str, flow: Flow) -> Flow:
    """A flow is in a table its app owns and continues only where the table may."""
    decl = BY_NUMBER.get(flow.table)
    if decl is None:
        raise FlowError(f"{app}: table {flow.table} is not declared: {flow}")
    if decl.owner != app:
        raise FlowError(f"{app}: table {decl.name} belongs to {decl.owner}: {flow}")
    targets = [flow.goto] + [a.table for a in flow.actions if isinstance(a, Resubmit)]
    allowed = {BY_NAME[n].number for n in decl.next}
    for target in targets:
        if target is not None and target not in allowed:
            raise FlowError(f"{app}: {decl.name} may not continue to table {target}: {flow}")
    return flow


check_declaration()
