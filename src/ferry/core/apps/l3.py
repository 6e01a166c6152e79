"""Distributed routing: every chassis routes the packets its own VMs send, for every router of
the topology it has. Owns l3_route and l3_nexthop.

The path of a routed packet, all on the sending chassis::

  l2_lookup   eth_dst = interface MAC of router R on network A  → reg7 = that interface's key
  l3_route    reg7 = R's interface on A, ipv4_dst in subnet B (longest prefix first)
              → metadata = B's network, eth_src = R's MAC on B, dec_ttl, reg0 = ipv4_dst
              (an extra route: reg0 = its nexthop, through the interface whose subnet holds it)
  l3_nexthop  metadata = B's network, reg0 = a port's IP → eth_dst = its MAC, reg7 = its key
  sg_ingress → egress   (L2: local delivery or Geneve with B's VNI, migrations included)

The reply is routed the same way on the other VM's chassis. Echo requests to any of a
router's addresses are answered in l3_route, on the chassis of the VM that asked.

No per-router owner: every flow belongs to a port, so the core's per-port recompute and
cookies apply unchanged. A router with an external gateway sends what it cannot route to
fip_snat (floating IPs, ``apps/fip.py``); that flow belongs to the interface it comes from.
An interface port owns what leaves the router through it (the routes
into its subnet, extra routes whose nexthop is in its subnet, echo replies for its address),
from every interface of its router; a VM port owns its l3_nexthop entries, wherever it is
located (Local, Remote or mid-migration): where that is, is the L2 app's business alone.

IPv4 and IPv6 are the same flows over an address family (``Family``): the nexthop is kept in
reg0 (IPv4) or reg0..reg3 (IPv6, OVS's xxreg0). Before a VM can use an IPv6 gateway, port
security must let IPv6 out and neighbour discovery must be answered for interface addresses
(both are IPv4-only in the L2 app today).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from ferry.core.apps.base import App, Context
from ferry.core.pipeline import REG_DST_PORT, REG_FLAGS, REG_NETWORK, table
from ferry.core.topology import Distributed, Location, Topology
from ferry.model.objects import (
    ExtraRoute,
    IPAddress,
    IPNetwork,
    LogicalPort,
    LogicalRouter,
    LogicalSwitch,
    Subnet,
)
from ferry.switch.flow import (
    OFPP_IN_PORT,
    Action,
    DecTtl,
    Flow,
    GotoTable,
    Match,
    Move,
    Output,
    SetField,
)

ICMP_ECHO_PRIORITY = 1000
"""Above every route: a router's own address is answered, never routed."""
ROUTE_PRIORITY = 100
"""Routes: ROUTE_PRIORITY + 2 * prefix length (+1 for a connected subnet over an extra route
to the same prefix), so the longest prefix wins."""
NEXTHOP_PRIORITY = 100
GATEWAY_PRIORITY = ROUTE_PRIORITY - 1
"""Below every route (a default extra route included): what the router cannot route leaves
through its gateway, as floating IP SNAT (the fip app's fip_snat)."""


@dataclass(frozen=True)
class Family:
    """What differs between IPv4 and IPv6 routing: field names, ICMP echo, and the registers
    that carry the nexthop address from l3_route to l3_nexthop."""

    version: int
    eth_type: int
    src: str
    dst: str
    icmp_proto: int
    icmp_type: str
    echo_request: int
    echo_reply: int
    nexthop_regs: tuple[str, ...]
    """Registers holding the nexthop, most significant first."""

    @property
    def width(self) -> int:
        """Address width in bits."""
        return 32 if self.version == 4 else 128

    @property
    def _reg_width(self) -> int:
        return self.width // len(self.nexthop_regs)

    def nexthop_from_dst(self) -> tuple[Move, ...]:
        """Copy the destination address into the nexthop registers (a connected route)."""
        width, n = self._reg_width, len(self.nexthop_regs)
        return tuple(Move(self.dst, reg, width, src_ofs=width * (n - 1 - i))
                     for i, reg in enumerate(self.nexthop_regs))

    def nexthop_fields(self, ip: IPAddress) -> dict[str, int]:
        """The nexthop registers' values for ``ip`` (to load, or to match)."""
        width, n, value = self._reg_width, len(self.nexthop_regs), int(ip)
        return {reg: (value >> (width * (n - 1 - i))) & ((1 << width) - 1)
                for i, reg in enumerate(self.nexthop_regs)}

    def ip_match(self, **fields: object) -> dict[str, object]:
        return {"eth_type": self.eth_type, **fields}


IPV4 = Family(4, 0x0800, "ipv4_src", "ipv4_dst", 1, "icmpv4_type", 8, 0, ("reg0",))
IPV6 = Family(6, 0x86DD, "ipv6_src", "ipv6_dst", 58, "icmpv6_type", 128, 129,
              ("reg0", "reg1", "reg2", "reg3"))
"""IPv6 nexthops in reg0..reg3 (OVS's xxreg0), as four 32-bit registers: OVS reports a match
on xreg0 back as reg0 and reg1, and flows must read back exactly as written."""
FAMILIES = {4: IPV4, 6: IPV6}
REG_NEXTHOP = IPV4.nexthop_regs[0]


@dataclass(frozen=True)
class Interface:
    """A router's interface: its port (MAC, key), subnet, network and address there."""

    port: LogicalPort
    subnet: Subnet
    net: LogicalSwitch
    ip: IPAddress

    @property
    def family(self) -> Family:
        return FAMILIES[self.ip.version]


@dataclass(frozen=True)
class Route:
    """One entry of a router's table: ``dest`` leaves through ``out``; ``nexthop`` None means
    the destination itself is on ``out``'s subnet (a connected route)."""

    dest: IPNetwork
    out: Interface
    nexthop: IPAddress | None

    @property
    def priority(self) -> int:
        return ROUTE_PRIORITY + 2 * self.dest.prefixlen + (1 if self.nexthop is None else 0)


def interfaces(topo: Topology, router: LogicalRouter) -> list[Interface]:
    """The router's interfaces this chassis can route through (see
    ``Topology.router_interfaces``), each with its address in its subnet."""
    out = []
    for port, subnet in topo.router_interfaces(router):
        net = topo.get(LogicalSwitch, subnet.network_id)
        ip = next((f.ip_address for f in port.fixed_ips
                   if f.subnet_id == subnet.id and f.ip_address in subnet.cidr), None)
        if net is not None and ip is not None:
            out.append(Interface(port, subnet, net, ip))
    return out


def routes(ifaces: list[Interface], extra: Iterable[ExtraRoute]) -> list[Route]:
    """The router's table: its subnets, then its extra routes whose nexthop is on one of them.

    Neutron accepts several nexthops for one destination (ECMP); one table entry per
    destination is kept, the lowest nexthop, so that every chassis picks the same one and two
    owners never want the same flow."""
    table = [Route(i.subnet.cidr, i, None) for i in ifaces]
    chosen: dict[IPNetwork, Route] = {}
    for r in sorted(extra, key=lambda r: (r.destination.version, int(r.nexthop))):
        out = next((i for i in ifaces if r.nexthop in i.subnet.cidr
                    and r.destination.version == r.nexthop.version), None)
        if out is not None and r.destination not in chosen:
            chosen[r.destination] = Route(r.destination, out, r.nexthop)
    return table + list(chosen.values())


class Router(App):
    name = "l3"

    def port_flows(self, ctx: Context, port: LogicalPort, net: LogicalSwitch,
                   loc: Location) -> Iterable[Flow]:
        if loc is None:
            return
        topo = ctx.topology
        if isinstance(loc, Distributed):
            for router in topo.routers_touching(port_id=port.id):
                yield from self._interface_flows(topo, router, port)
            return
        if topo.routers_of_network(net.id):
            yield from self._nexthop_flows(port, net)

    def _interface_flows(self, topo: Topology, router: LogicalRouter,
                         port: LogicalPort) -> Iterator[Flow]:
        """What leaves ``router`` through ``port``, from each of the router's interfaces."""
        ifaces = interfaces(topo, router)
        mine = [i for i in ifaces if i.port.id == port.id]
        if not mine:
            return
        out = mine[0]
        if router.gateway is not None and out.ip.version == 4:
            # From this interface's network, unroutable here: towards the gateway (fip_snat
            # lets out the ports that have a floating IP on the gateway's network).
            yield Flow(table("l3_route"), GATEWAY_PRIORITY, self._from(out),
                       (GotoTable(table("fip_snat")),))
        leaving = [r for r in routes(ifaces, router.routes) if r.out == out]
        for src in ifaces:
            if src.ip.version != out.ip.version:
                continue
            yield self._echo_reply(src, out)
            for route in leaving:
                yield self._route(src, route)

    @staticmethod
    def _from(src: Interface, **fields: object) -> Match:
        """Packets a local VM sent to the router's MAC on ``src``'s network. Routing happens
        once, where the packet entered (reg5 = 0): never again after a tunnel."""
        return Match.of(src.family.ip_match(**{
            REG_DST_PORT: src.port.tunnel_key, REG_NETWORK: src.net.tunnel_key,
            REG_FLAGS: 0, **fields}))

    def _echo_reply(self, src: Interface, target: Interface) -> Flow:
        """An echo request to ``target``'s address, arriving on ``src``'s network, answered
        back out of the VM's own port (IN_PORT: where it is, migrating or not), from the
        router's MAC on the VM's network. OVS updates the ICMP checksum for the new type;
        swapping the addresses leaves the IPv6 pseudo-header sum unchanged."""
        fam = src.family
        match = self._from(src, ip_proto=fam.icmp_proto,
                           **{fam.icmp_type: fam.echo_request, fam.dst: str(target.ip)})
        return Flow(table("l3_route"), ICMP_ECHO_PRIORITY, match, (
            Move("eth_src", "eth_dst", 48),
            SetField("eth_src", src.port.mac),
            Move(fam.src, fam.dst, fam.width),
            SetField(fam.src, str(target.ip)),
            SetField(fam.icmp_type, fam.echo_reply),
            Output(OFPP_IN_PORT),
        ))

    def _route(self, src: Interface, route: Route) -> Flow:
        """From ``src``'s network to ``route.dest``: into the outgoing interface's network,
        from its MAC, one hop less to live, nexthop set for l3_nexthop."""
        fam, out = src.family, route.out
        nexthop: tuple[Action, ...]
        if route.nexthop is None:
            nexthop = fam.nexthop_from_dst()
        else:
            nexthop = tuple(SetField(reg, value)
                            for reg, value in fam.nexthop_fields(route.nexthop).items())
        match = self._from(src, **_dst_match(fam, route.dest))
        return Flow(table("l3_route"), route.priority, match, (
            SetField(REG_NETWORK, out.net.tunnel_key),
            SetField("eth_src", out.port.mac),
            DecTtl(),
            *nexthop,
            GotoTable(table("l3_nexthop")),
        ))

    @staticmethod
    def _nexthop_flows(port: LogicalPort, net: LogicalSwitch) -> Iterator[Flow]:
        """The port's addresses as nexthops on its network: its MAC and logical port."""
        for fixed in port.fixed_ips:
            fam = FAMILIES[fixed.ip_address.version]
            match = Match.of(fam.ip_match(**{REG_NETWORK: net.tunnel_key},
                                          **fam.nexthop_fields(fixed.ip_address)))
            yield Flow(table("l3_nexthop"), NEXTHOP_PRIORITY, match, (
                SetField("eth_dst", port.mac),
                SetField(REG_DST_PORT, port.tunnel_key),
                GotoTable(table("sg_ingress")),
            ))


def _dst_match(fam: Family, dest: IPNetwork) -> dict[str, str]:
    """The destination's match fields: none for a default route (the family's eth_type in
    the match already says "every address"; OpenFlow has no all-zero mask)."""
    if dest.prefixlen == 0:
        return {}
    if dest.prefixlen == dest.max_prefixlen:
        return {fam.dst: str(dest.network_address)}
    return {fam.dst: str(dest)}

