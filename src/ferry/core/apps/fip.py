"""Floating IPs: 1:1 DNAT/SNAT, distributed to the chassis of the VM that has the address.

The external network is a flat provider network (``physical_network`` physnet1 in the lab).
A chassis reaches it through the OVS bridge its bridge mappings name (br-ex): the agent makes a
patch port pair br-int <-> br-ex; br-ex is the operator's bridge in NORMAL mode (a plain
learning switch between its NIC and the patch port, as Neutron and OVN leave it; nothing to
translate on a flat network). Owns ext_ingress, fip_snat, ext_nexthop and mac_binding::

  classify     in_port = patch port of physnet P → metadata = the flat network on P (classifier)
  ext_ingress  ARP request for a FIP → answered (where its port is); every ARP → its sender
               learned into mac_binding; IPv4 to (FIP MAC, FIP) → DNAT: ipv4_dst = fixed IP,
               eth_src = the router's MAC on the VM's network, metadata = that network,
               reg7 = the port, dec_ttl → sg_ingress → egress (L2: local, tunnel, migrations)
  l3_route     a router with a gateway: what no route matches → fip_snat (l3 app)
  fip_snat     reg6 = a port with a FIP, ipv4_src = its fixed IP → ipv4_src = FIP,
               eth_src = FIP MAC, metadata = external network, dec_ttl
  ext_nexthop  reg0 = ipv4_dst if on-link on the external subnet, else the subnet's gateway
  mac_binding  learned: reg0 = IP → eth_dst = its MAC, out the patch port it was learned on

Decisions, and why:

The FIP's MAC is the VM port's MAC, as networking-ovn does for distributed floating IPs
(``external_mac`` = the port's MAC). Ferry's floating IPs have no port of their own; the VM's
MAC is unique (a claim of the store), stays the same wherever the VM runs, so the outside's
ARP cache is never wrong, and a migration only has to move the external L2 fabric's
forwarding entry: the VM's RARP on resume, sent out to the external networks by the
chassis where it resumes (l2 app), and the gratuitous ARP of the chassis where the port is
now Local (the agent). Only a chassis where the VM runs announces: a destination that
announced from the claim (as Ferry once did) taught the source chassis' br-ex that the VM's
MAC is on its uplink, while the VM still ran behind its patch port; when the fabric then sent
the outside's frames to the source (taught back by the VM's own replies in flight), that br-ex
dropped them until the resume (lab: 1 migration in 30-100, 120-150 ms of FIP traffic lost).

Where.  The chassis where the port is: Local, Outgoing (a live migration's source until step
2) and Incoming (its destination) do DNAT and SNAT; ARP requests for the FIP are answered on
Local and Outgoing only, so exactly one chassis answers a broadcast. Every other chassis
ignores the FIP, so an unknown-unicast flood of the external fabric never duplicates a packet.
During a live migration whichever of source and destination gets the outside's frames
forwards them right: the DNATed packet meets the live-mode L2 flows (source: local copy plus
tunnel to the destination, switched to the destination only by the VM's first frame there;
destination: to the source until the activation, then local).

Stateless.  1:1 rewriting needs no conntrack (no zone of NAT's own); the VM's security groups
see the packet as the VM sends and receives it (fixed IP), in its own zone.

Next hop MAC.  Learned in the datapath: every ARP frame from the patch port teaches
mac_binding (sender IP → sender MAC, out the port it came in on). The outside's own ARP
requests (for a FIP) teach every chassis; the agent sends an ARP request for the external
subnet's gateway when a chassis starts hosting a FIP, so the first SNATed packet finds its
binding. Learned bindings carry ``MAC_BINDING_COOKIE``, which is not a Ferry cookie: flow sync
leaves them alone (they are state, like a neighbour table) and a reconcile keeps them.

Scope.  IPv4 only; one floating IP per fixed IP and external network; no SNAT for VMs
without a floating IP (the router's own gateway address is not implemented in the datapath);
the external network must be in a topic the chassis follows (the VM's project or GLOBAL).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from ferry.core.apps.base import App, Context
from ferry.core.pipeline import REG_DST_PORT, REG_NETWORK, REG_SRC_PORT, table
from ferry.core.topology import Incoming, Local, Location, Outgoing, Topology
from ferry.model.objects import (
    FloatingIP,
    IPAddress,
    LogicalPort,
    LogicalRouter,
    LogicalSwitch,
    NetworkType,
    Subnet,
)
from ferry.switch.flow import (
    OFPP_IN_PORT,
    DecTtl,
    Flow,
    GotoTable,
    Learn,
    LearnLoad,
    LearnMatch,
    LearnOutput,
    Match,
    Move,
    Output,
    SetField,
)

ETH_ARP, ETH_IPV4 = 0x0806, 0x0800
MAC_BINDING_COOKIE = 0x00FB_0000_0000_0000
"""Cookie of learned MAC bindings: top byte 0, outside Ferry's cookies (flow sync ignores it)."""
REG_NEXTHOP = "reg0"
FIP_PRIORITY = 200
GARP_PRIORITY = 210
LEARN_PRIORITY = 100
MAC_BINDING_PRIORITY = 100


@dataclass(frozen=True)
class FipBinding:
    """A floating IP as this chassis can implement it: everything its flows need."""

    fip: FloatingIP
    ip: str
    fixed: str
    mac: str
    ext: LogicalSwitch
    patch_ofport: int
    router_mac: str
    """The router's interface MAC on the VM's network (DNATed packets come from it)."""


def external_networks(topo: Topology, ctx: Context) -> list[tuple[LogicalSwitch, int]]:
    """External flat networks whose physical network has a patch port here, with it. One per
    physical network (a flat physical network carries one network; the lowest id wins)."""
    out: dict[str, tuple[LogicalSwitch, int]] = {}
    for net in sorted(topo.table(LogicalSwitch).values(), key=lambda n: n.id):
        physnet = net.physical_network
        if (net.network_type is NetworkType.FLAT and physnet is not None
                and physnet in ctx.patch_ofports
                and physnet not in out and net.admin_state_up):
            out[physnet] = (net, ctx.patch_ofports[physnet])
    return list(out.values())


def bindings(ctx: Context, port: LogicalPort) -> list[FipBinding]:
    """The port's floating IPs this chassis can implement: IPv4, on an external network
    reachable here, associated through a router whose gateway is on that network and which
    has an interface on the fixed IP's subnet. One per fixed IP (the lowest FIP id)."""
    topo = ctx.topology
    reachable = {net.id: (net, ofport) for net, ofport in external_networks(topo, ctx)}
    out: dict[str, FipBinding] = {}
    for fip in topo.floating_ips_of(port.id):
        if fip.fixed_ip_address is None or fip.floating_ip_address.version != 4:
            continue
        fixed = next((f for f in port.fixed_ips if f.ip_address == fip.fixed_ip_address), None)
        ext = reachable.get(fip.floating_network_id)
        router = topo.get(LogicalRouter, fip.router_id) if fip.router_id else None
        if fixed is None or ext is None or router is None or router.gateway is None:
            continue
        if router.gateway.network_id != ext[0].id or str(fixed.ip_address) in out:
            continue
        iface = next((p for p, s in topo.router_interfaces(router) if s.id == fixed.subnet_id),
                     None)
        if iface is None:
            continue
        out[str(fixed.ip_address)] = FipBinding(
            fip, str(fip.floating_ip_address), str(fixed.ip_address), port.mac, ext[0],
            ext[1], iface.mac)
    return list(out.values())


def arp_learn() -> Learn:
    """mac_binding: (network, sender IP) → eth_dst = sender MAC, out the port it came in on."""
    return Learn(table("mac_binding"), priority=MAC_BINDING_PRIORITY, cookie=MAC_BINDING_COOKIE,
                 specs=(LearnMatch(REG_NETWORK), LearnMatch(REG_NEXTHOP, src="arp_spa"),
                        LearnLoad("eth_dst", src="arp_sha"), LearnOutput("in_port_nxm")))


class FloatingIps(App):
    name = "fip"

    def port_flows(self, ctx: Context, port: LogicalPort, net: LogicalSwitch,
                   loc: Location) -> Iterable[Flow]:
        if not isinstance(loc, Local | Outgoing | Incoming):
            return
        for b in bindings(ctx, port):
            if isinstance(loc, Local | Outgoing):
                yield from self._arp(b)
            yield self._dnat(b, port, net)
            yield self._snat(b, port)

    @staticmethod
    def _arp(b: FipBinding) -> Iterator[Flow]:
        t = table("ext_ingress")
        match = Match(metadata=b.ext.tunnel_key, eth_type=ETH_ARP, arp_op=1, arp_tpa=b.ip)
        # A gratuitous ARP for the FIP (another chassis announcing it) is learned, never
        # answered: an answer from here would pull the fabric's entry for the MAC back here.
        yield Flow(t, GARP_PRIORITY, match.with_fields(arp_spa=b.ip), (arp_learn(),))
        yield Flow(t, FIP_PRIORITY, match, (
            arp_learn(),
            Move("eth_src", "eth_dst", 48),
            SetField("eth_src", b.mac),
            SetField("arp_op", 2),
            Move("arp_sha", "arp_tha", 48),
            SetField("arp_sha", b.mac),
            Move("arp_spa", "arp_tpa", 32),
            SetField("arp_spa", b.ip),
            Output(OFPP_IN_PORT),
        ))

    @staticmethod
    def _dnat(b: FipBinding, port: LogicalPort, net: LogicalSwitch) -> Flow:
        return Flow(table("ext_ingress"), FIP_PRIORITY,
                    Match(metadata=b.ext.tunnel_key, eth_type=ETH_IPV4, eth_dst=b.mac,
                          ipv4_dst=b.ip), (
                        SetField("ipv4_dst", b.fixed),
                        SetField("eth_src", b.router_mac),
                        SetField(REG_NETWORK, net.tunnel_key),
                        SetField(REG_DST_PORT, port.tunnel_key),
                        DecTtl(),
                        GotoTable(table("sg_ingress")),
                    ))

    @staticmethod
    def _snat(b: FipBinding, port: LogicalPort) -> Flow:
        return Flow(table("fip_snat"), FIP_PRIORITY,
                    Match(**{REG_SRC_PORT: port.tunnel_key}, eth_type=ETH_IPV4,
                          ipv4_src=b.fixed), (
                        SetField("ipv4_src", b.ip),
                        SetField("eth_src", b.mac),
                        SetField(REG_NETWORK, b.ext.tunnel_key),
                        DecTtl(),
                        GotoTable(table("ext_nexthop")),
                    ))

    def network_flows(self, ctx: Context, net: LogicalSwitch) -> Iterable[Flow]:
        topo = ctx.topology
        if not any(n.id == net.id for n, _ in external_networks(topo, ctx)):
            return
        key = net.tunnel_key
        yield Flow(table("ext_ingress"), LEARN_PRIORITY, Match(metadata=key, eth_type=ETH_ARP),
                   (arp_learn(),))
        nexthop, to_binding = table("ext_nexthop"), GotoTable(table("mac_binding"))
        gateway: IPAddress | None = None
        for subnet in topo.subnets_of(net.id):
            if subnet.cidr.version != 4:
                continue
            yield Flow(nexthop, 200 + subnet.cidr.prefixlen,
                       Match(metadata=key, eth_type=ETH_IPV4, ipv4_dst=str(subnet.cidr)),
                       (Move("ipv4_dst", REG_NEXTHOP, 32), to_binding))
            if gateway is None and subnet.gateway_ip is not None:
                gateway = subnet.gateway_ip
        if gateway is not None:
            yield Flow(nexthop, 100, Match(metadata=key, eth_type=ETH_IPV4),
                       (SetField(REG_NEXTHOP, int(ipaddress.IPv4Address(str(gateway)))),
                        to_binding))


def affected(topo: Topology, old: object, new: object) -> tuple[set[str], set[str]]:
    """(ports, networks) whose floating IP flows a change may alter: a floating IP's old and
    new ports; for a router, network, subnet or router interface port, the ports of every
    floating IP (there are few) and, for a subnet, its network (ext_nexthop)."""
    ports: set[str] = set()
    nets: set[str] = set()
    for obj in (old, new):
        if isinstance(obj, FloatingIP):
            if obj.port_id:
                ports.add(obj.port_id)
        elif isinstance(obj, LogicalRouter | LogicalSwitch | Subnet) or (
                isinstance(obj, LogicalPort) and obj.device_owner.startswith("network:")):
            ports |= {f.port_id for f in topo.table(FloatingIP).values() if f.port_id}
            if isinstance(obj, Subnet):
                nets.add(obj.network_id)
    return ports, nets


@dataclass(frozen=True)
class Hosted:
    """A floating IP this chassis implements, as the agent announces it on the external
    network: a gratuitous ARP for it, and an ARP request for the next hop (so that
    mac_binding learns it before the first SNATed packet)."""

    fip_ip: str
    mac: str
    patch_ofport: int
    gateway: str | None


def hosted(ctx: Context, locations: dict[str, Location]) -> dict[tuple[str, str], Hosted]:
    """Floating IPs to announce from here, keyed by (FIP id, location kind): those of ports
    that are Local (not a live migration's destination before its activation: see the module
    docstring); a new key (a FIP newly associated, a port newly Local) is announced."""
    topo = ctx.topology
    out: dict[tuple[str, str], Hosted] = {}
    for port_id, loc in sorted(locations.items()):
        port = topo.get(LogicalPort, port_id)
        if port is None or not isinstance(loc, Local):
            continue
        for b in bindings(ctx, port):
            gateway = next((str(s.gateway_ip) for s in topo.subnets_of(b.ext.id)
                            if s.gateway_ip is not None and s.cidr.version == 4), None)
            out[(b.fip.id, type(loc).__name__)] = Hosted(b.ip, b.mac, b.patch_ofport, gateway)
    return out


def arp_frame(op: int, sha: str, spa: str, tpa: str, dst: str = "ff:ff:ff:ff:ff:ff") -> bytes:
    """An Ethernet ARP frame (request: op 1; a gratuitous ARP is a request with tpa = spa)."""
    mac = bytes.fromhex(sha.replace(":", ""))
    body = bytes.fromhex("000108000604") + op.to_bytes(2, "big")
    body += mac + ipaddress.IPv4Address(spa).packed + bytes(6) + ipaddress.IPv4Address(tpa).packed
    frame = bytes.fromhex(dst.replace(":", "")) + mac + b"\x08\x06" + body
    return frame + bytes(max(0, 60 - len(frame)))
