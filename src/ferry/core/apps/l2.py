"""Classification, port security, ARP responder and L2 forwarding (local and over Geneve)."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Iterator

from ferry.core.apps.base import App, Context
from ferry.core.pipeline import (
    FLAG_FROM_TUNNEL,
    REG_DST_PORT,
    REG_FLAGS,
    REG_NETWORK,
    REG_SRC_PORT,
    table,
)
from ferry.core.topology import Local, Location, Remote
from ferry.model.objects import LogicalPort, LogicalSwitch
from ferry.switch.flow import (
    OFPP_IN_PORT,
    Flow,
    GotoTable,
    Match,
    Move,
    Output,
    SetField,
)

ETH_ARP, ETH_IPV4, ETH_RARP, ETH_IPV6 = 0x0806, 0x0800, 0x8035, 0x86DD
MULTICAST = ("01:00:00:00:00:00", "01:00:00:00:00:00")


def ipv4s(port: LogicalPort) -> list[str]:
    return [str(f.ip_address) for f in port.fixed_ips if f.ip_address.version == 4]


class Classifier(App):
    """in_port → (logical port, network); Geneve in_port + VNI → network."""

    name = "classifier"

    def port_flows(self, ctx: Context, port: LogicalPort, net: LogicalSwitch,
                   loc: Location) -> Iterable[Flow]:
        if isinstance(loc, Local):
            yield Flow(table("classify"), 100, Match(in_port=loc.ofport), (
                SetField(REG_SRC_PORT, port.tunnel_key),
                SetField(REG_NETWORK, net.tunnel_key),
                GotoTable(table("port_security")),
            ))

    def network_flows(self, ctx: Context, net: LogicalSwitch) -> Iterable[Flow]:
        if ctx.tunnel_ofport is None or not ctx.topology.local_ofports_of(net.id):
            return
        yield Flow(table("classify"), 100,
                   Match(in_port=ctx.tunnel_ofport, tunnel_id=net.tunnel_key), (
                       SetField(REG_NETWORK, net.tunnel_key),
                       SetField(REG_FLAGS, FLAG_FROM_TUNNEL),
                       GotoTable(table("l2_lookup")),
                   ))


class PortSecurity(App):
    """A local VM sends only from its MAC, its IPs and its allowed address pairs."""

    name = "port_security"

    def port_flows(self, ctx: Context, port: LogicalPort, net: LogicalSwitch,
                   loc: Location) -> Iterable[Flow]:
        if not isinstance(loc, Local):
            return
        t, nxt = table("port_security"), (GotoTable(table("arp_responder")),)
        key = port.tunnel_key
        if not port.port_security_enabled:
            yield Flow(t, 100, Match(reg6=key), nxt)
            return
        for mac, cidr in self._allowed(port):
            yield Flow(t, 200, Match(reg6=key, eth_src=mac, eth_type=ETH_ARP, arp_sha=mac,
                                     arp_spa=cidr), nxt)
            yield Flow(t, 200, Match(reg6=key, eth_src=mac, eth_type=ETH_IPV4, ipv4_src=cidr),
                       nxt)
        # RARP announces where a VM now runs (QEMU sends it on resume); it carries no IP.
        for mac in sorted({m for m, _ in self._allowed(port)} | {port.mac}):
            yield Flow(t, 200, Match(reg6=key, eth_src=mac, eth_type=ETH_RARP), nxt)
        # DHCP discovery before the VM has an address.
        yield Flow(t, 200, Match(reg6=key, eth_src=port.mac, eth_type=ETH_IPV4,
                                 ipv4_src="0.0.0.0", ip_proto=17, udp_src=68, udp_dst=67), nxt)

    @staticmethod
    def _allowed(port: LogicalPort) -> Iterator[tuple[str, str]]:
        for ip in ipv4s(port):
            yield port.mac, ip
        for pair in port.allowed_address_pairs:
            if pair.ip_address.version == 4:
                net = pair.ip_address
                value = (str(net.network_address) if net.prefixlen == 32
                         else f"{net.network_address}/{net.prefixlen}")
                yield pair.mac_address or port.mac, value


class ArpResponder(App):
    """Answer ARP requests for every located port of the network on this chassis."""

    name = "arp_responder"

    def static_flows(self, ctx: Context) -> Iterable[Flow]:
        yield Flow(table("arp_responder"), 0, Match(), (GotoTable(table("l2_lookup")),))

    def port_flows(self, ctx: Context, port: LogicalPort, net: LogicalSwitch,
                   loc: Location) -> Iterable[Flow]:
        if loc is None:
            return
        t = table("arp_responder")
        for ip in ipv4s(port):
            match = Match(metadata=net.tunnel_key, eth_type=ETH_ARP, arp_op=1, arp_tpa=ip)
            yield Flow(t, 100, match, self._reply(port.mac, ip))
            # A port asking for its own address (gratuitous ARP, duplicate address detection)
            # must get no answer from us: let it go where broadcasts go.
            yield Flow(t, 110, match.with_fields(reg6=port.tunnel_key),
                       (GotoTable(table("l2_lookup")),))

    @staticmethod
    def _reply(mac: str, ip: str) -> tuple[Move | SetField | Output, ...]:
        return (
            Move("eth_src", "eth_dst", 48),
            SetField("eth_src", mac),
            SetField("arp_op", 2),
            Move("arp_sha", "arp_tha", 48),
            SetField("arp_sha", mac),
            Move("arp_spa", "arp_tpa", 32),
            SetField("arp_spa", ip),
            Output(OFPP_IN_PORT),
        )


class L2(App):
    """Destination MAC → port; local delivery, Geneve to remote ports, flooding."""

    name = "l2"

    def port_flows(self, ctx: Context, port: LogicalPort, net: LogicalSwitch,
                   loc: Location) -> Iterable[Flow]:
        if loc is None:
            return
        yield Flow(table("l2_lookup"), 100, Match(metadata=net.tunnel_key, eth_dst=port.mac), (
            SetField(REG_DST_PORT, port.tunnel_key), GotoTable(table("egress"))))
        if isinstance(loc, Local):
            yield Flow(table("egress"), 100, Match(reg7=port.tunnel_key), (Output(loc.ofport),))
        elif isinstance(loc, Remote) and ctx.tunnel_ofport is not None:
            # Only traffic that entered here goes into a tunnel: never tunnel-to-tunnel.
            yield Flow(table("egress"), 100, Match(reg7=port.tunnel_key, reg5=0),
                       tuple(tunnel_to(net, loc.tunnel_ip, ctx.tunnel_ofport)))

    def network_flows(self, ctx: Context, net: LogicalSwitch) -> Iterable[Flow]:
        topo = ctx.topology
        local = topo.local_ofports_of(net.id)
        if not local:
            return
        lookup, flood = table("l2_lookup"), table("flood")
        yield Flow(lookup, 50, Match(metadata=net.tunnel_key, eth_dst=MULTICAST),
                   (GotoTable(flood),))
        # Unknown unicast floods too (a MAC we do not know may sit behind a port).
        yield Flow(lookup, 10, Match(metadata=net.tunnel_key), (GotoTable(flood),))
        to_local = tuple(Output(p) for p in local)
        # From a tunnel: local ports only, so that floods never loop between chassis.
        yield Flow(flood, 100, Match(metadata=net.tunnel_key, reg5=FLAG_FROM_TUNNEL), to_local)
        to_remote: list[SetField | Output] = []
        if ctx.tunnel_ofport is not None:
            for ip in topo.remote_chassis_of(net.id).values():
                to_remote += tunnel_to(net, ip, ctx.tunnel_ofport)
        yield Flow(flood, 50, Match(metadata=net.tunnel_key), (*to_local, *to_remote))


def tunnel_to(net: LogicalSwitch, ip: str, tunnel_ofport: int) -> list[SetField | Output]:
    ipaddress.IPv4Address(ip)  # Geneve over IPv4 underlays only, for now.
    return [SetField("tunnel_id", net.tunnel_key), SetField("tun_ipv4_dst", ip),
            Output(tunnel_ofport)]


ALL_APPS: tuple[App, ...] = (Classifier(), PortSecurity(), ArpResponder(), L2())
