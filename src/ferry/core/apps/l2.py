"""Classification, port security, ARP responder and L2 forwarding (local and over Geneve)."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Iterator

from ferry.core.apps.base import App, Context
from ferry.core.pipeline import (
    FLAG_FLOOD,
    FLAG_FROM_TUNNEL,
    REG_DST_PORT,
    REG_FLAGS,
    REG_NETWORK,
    REG_SRC_PORT,
    table,
)
from ferry.core.topology import (
    Both,
    Distributed,
    Incoming,
    Local,
    Location,
    Outgoing,
    Remote,
)
from ferry.model.objects import LogicalPort, LogicalSwitch
from ferry.switch.flow import (
    OFPP_IN_PORT,
    Controller,
    Flow,
    GotoTable,
    Learn,
    LearnLoadValue,
    LearnMatchValue,
    LearnOutput,
    Match,
    Move,
    Output,
    Resubmit,
    SetField,
)

ETH_ARP, ETH_IPV4, ETH_RARP, ETH_IPV6 = 0x0806, 0x0800, 0x8035, 0x86DD
MULTICAST = ("01:00:00:00:00:00", "01:00:00:00:00:00")
NO_MAC = "00:00:00:00:00:00"

LEARN_LIMIT = 64
"""The limit on every live-migration learn: far above the few flows a port has per table and
cookie, so it never refuses one. It is there for OVS's datapath cache: the VM's RARP from a
chassis it left a few seconds earlier matches a datapath flow cached then, takes no slow path,
and so learns nothing (measured: the third chassis and the source went on sending the stopped
copy every packet until their controllers caught up). With a limit, OVS drops such a cached
flow when the new migration's flows are installed, as the learned flow it would refresh does
not exist (``avoid_caching`` in ofproto-dpif-xlate.c), and the RARP learns again."""


def ipv4s(port: LogicalPort) -> list[str]:
    return [str(f.ip_address) for f in port.fixed_ips if f.ip_address.version == 4]


class Classifier(App):
    """in_port → (logical port, network); Geneve in_port + VNI → network."""

    name = "classifier"

    def static_flows(self, ctx: Context) -> Iterable[Flow]:
        """Frames from a tunnel on a network with no port here (a VM has just left; a peer
        has not caught up) are dropped, but not by a table miss. A miss would be cached in
        the datapath as one drop for the whole network (its tunnel key only), overlapping
        every narrower flow still cached for it; and OVS 3.1's userspace datapath applies a
        revalidator's change to the flow a key looks up, not to the flow it names. When the
        network's flows come back, the change meant for a narrower flow lands on the wide one,
        the wide one is then deleted, and the narrower one keeps its old drop for as long as
        traffic hits it (measured: a client cut off from a VM that had come back, for 10 s
        and more; docs/measuring.md). Consulting the destination MAC (against one no frame
        has) makes each such cached drop per destination: it overlaps no other flow."""
        if ctx.tunnel_ofport is None:
            return
        yield Flow(table("classify"), 1, Match(in_port=ctx.tunnel_ofport),
                   (GotoTable(table("tunnel_unknown")),))
        yield Flow(table("tunnel_unknown"), 1, Match(eth_dst=NO_MAC), ())

    def port_flows(self, ctx: Context, port: LogicalPort, net: LogicalSwitch,
                   loc: Location) -> Iterable[Flow]:
        if not isinstance(loc, Local | Outgoing | Incoming):
            return
        activate: tuple[Learn, ...] = ()
        if isinstance(loc, Incoming):
            # Live migration, destination: the VM's first frame here (its RARP on resume)
            # installs its delivery flow, in the datapath, at once. That flow is exactly the
            # one the L2 app wants once the port is simply local here: nothing to undo later.
            activate = (Learn(table("egress"), priority=100, limit=LEARN_LIMIT,
                              cookie=ctx.port_cookie(L2_APP, port),
                              specs=(LearnMatchValue(REG_DST_PORT, port.tunnel_key),
                                     LearnOutput("in_port_nxm"))),)
        tell: tuple[Resubmit, ...] = ()
        if isinstance(loc, Incoming):
            tell = (Resubmit(table("activation")),)
            yield from self._tell_controller(ctx, port)
        classify: tuple[SetField | Resubmit | GotoTable, ...] = (
            SetField(REG_SRC_PORT, port.tunnel_key), SetField(REG_NETWORK, net.tunnel_key),
            *tell, GotoTable(table("port_security")))
        yield Flow(table("classify"), 100, Match(in_port=loc.ofport), (*activate, *classify))
        # The VM's RARP on resume also goes out to the external networks where the port has
        # a floating IP (whose MAC is the VM's): their switches learn at once that the
        # floating IP is now behind this chassis, as the internal network does. Not only on
        # a live migration's destination: Nova may activate the destination's binding during
        # the pause (then the port is Local here before the VM runs), and the agent's
        # gratuitous ARP comes only when its flows are in, which can be after the resume.
        from ferry.core.apps.fip import bindings

        patches = sorted({b.patch_ofport for b in bindings(ctx, port)})
        if patches:
            yield Flow(table("classify"), 110, Match(in_port=loc.ofport, eth_type=ETH_RARP),
                       (*activate, *(Output(p) for p in patches), *classify))

    def _tell_controller(self, ctx: Context, port: LogicalPort) -> Iterable[Flow]:
        """The activation, once done in the datapath, is reported to this chassis' controller
        (a packet-in with this flow's cookie), once: the same frame learns a higher-priority
        entry that does nothing, so the frames after it are not sent up."""
        key, t = port.tunnel_key, table("activation")
        once = Learn(t, priority=110, cookie=ctx.port_cookie(self, port), limit=LEARN_LIMIT,
                     specs=(LearnMatchValue(REG_SRC_PORT, key),))
        yield Flow(t, 100, Match(reg6=key), (once, ACTIVATION_NOTICE))

    def network_flows(self, ctx: Context, net: LogicalSwitch) -> Iterable[Flow]:
        from ferry.core.apps.fip import external_networks

        for ext, patch in external_networks(ctx.topology, ctx):
            if ext.id == net.id:  # a flat network: frames from its physical network
                yield Flow(table("classify"), 100, Match(in_port=patch), (
                    SetField(REG_NETWORK, net.tunnel_key),
                    GotoTable(table("ext_ingress")),
                ))
        if ctx.tunnel_ofport is None or not ctx.topology.has_local_port(net.id):
            return
        yield Flow(table("classify"), 100,
                   Match(in_port=ctx.tunnel_ofport, tunnel_id=net.tunnel_key), (
                       SetField(REG_NETWORK, net.tunnel_key),
                       SetField(REG_FLAGS, FLAG_FROM_TUNNEL),
                       GotoTable(table("tunnel_ingress")),
                   ))


class PortSecurity(App):
    """A local VM sends only from its MAC, its IPs and its allowed address pairs."""

    name = "port_security"

    def port_flows(self, ctx: Context, port: LogicalPort, net: LogicalSwitch,
                   loc: Location) -> Iterable[Flow]:
        if not isinstance(loc, Local | Outgoing | Incoming):
            return
        t, nxt = table("port_security"), (GotoTable(table("sg_egress")),)
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
        key, egress, tun = port.tunnel_key, table("egress"), ctx.tunnel_ofport
        if isinstance(loc, Distributed):
            # A router interface: the router is on every chassis; route where the packet is.
            yield Flow(table("l2_lookup"), 100, Match(metadata=net.tunnel_key, eth_dst=port.mac),
                       (SetField(REG_DST_PORT, key), GotoTable(table("l3_route"))))
            return
        yield Flow(table("l2_lookup"), 100, Match(metadata=net.tunnel_key, eth_dst=port.mac), (
            SetField(REG_DST_PORT, key), GotoTable(table("sg_ingress"))))
        if isinstance(loc, Local):
            yield Flow(egress, 100, Match(reg7=key), (Output(loc.ofport),))
            return
        if tun is None:
            return
        # Only traffic that entered here goes into a tunnel (reg5=0): never tunnel-to-tunnel.
        if isinstance(loc, Remote):
            yield Flow(egress, 100, Match(reg7=key, reg5=0), tunnel_to(net, loc, tun))
        elif isinstance(loc, Incoming):
            # Until the VM runs here, local senders still reach it on the source; traffic
            # from tunnels is not delivered (the activation learns the delivery flow).
            yield Flow(egress, 90, Match(reg7=key, reg5=0), tunnel_to(net, loc.source, tun))
            yield Flow(egress, 90, Match(reg7=key, reg5=FLAG_FROM_TUNNEL), ())
        elif isinstance(loc, Outgoing):
            yield Flow(egress, 100, Match(reg7=key, reg5=0),
                       (Output(loc.ofport), *tunnel_to(net, loc.dest, tun)))
            yield Flow(egress, 100, Match(reg7=key, reg5=FLAG_FROM_TUNNEL), (Output(loc.ofport),))
            yield Flow(egress, 101, Match(reg7=key, reg5=(FLAG_FLOOD, FLAG_FLOOD)),
                       (Output(loc.ofport),))
            yield self._follow(ctx, port, net, loc.dest, tun)
        elif isinstance(loc, Both):
            yield Flow(egress, 100, Match(reg7=key, reg5=0),
                       (*tunnel_to(net, loc.source, tun), *tunnel_to(net, loc.dest, tun)))
            yield self._follow(ctx, port, net, loc.dest, tun)

    def _follow(self, ctx: Context, port: LogicalPort, net: LogicalSwitch, dest: Remote,
                tun: int) -> Flow:
        """Live migration, on every chassis but the destination: the first frame of the VM
        arriving from its new chassis (its RARP, flooded) switches this chassis' traffic for
        it to the new chassis only, and stops local delivery to the stopped copy. Matching on
        the tunnel source keeps frames from the old chassis from learning anything, and makes
        the first frame from the new one take the slow path, where learn runs."""
        key, cookie = port.tunnel_key, ctx.port_cookie(self, port)
        egress = table("egress")
        to_dest = Learn(egress, priority=110, cookie=cookie, limit=LEARN_LIMIT, specs=(
            LearnMatchValue(REG_DST_PORT, key), LearnMatchValue(REG_FLAGS, 0),
            LearnLoadValue("tunnel_id", net.tunnel_key),
            LearnLoadValue("tun_ipv4_dst", int(ipaddress.IPv4Address(dest.tunnel_ip))),
            LearnOutput("in_port_nxm")))
        no_local = Learn(egress, priority=110, cookie=cookie, limit=LEARN_LIMIT, specs=(
            LearnMatchValue(REG_DST_PORT, key), LearnMatchValue(REG_FLAGS, FLAG_FROM_TUNNEL)))
        no_flood = Learn(egress, priority=110, cookie=cookie, limit=LEARN_LIMIT, specs=(
            LearnMatchValue(REG_DST_PORT, key),
            LearnMatchValue(REG_FLAGS, 1, n_bits=1, dst_ofs=FLAG_FLOOD.bit_length() - 1)))
        return Flow(table("tunnel_ingress"), 100,
                    Match(metadata=net.tunnel_key, eth_src=port.mac,
                          tun_ipv4_src=dest.tunnel_ip),
                    (to_dest, no_local, no_flood, GotoTable(table("l2_lookup"))))

    def static_flows(self, ctx: Context) -> Iterable[Flow]:
        yield Flow(table("tunnel_ingress"), 0, Match(), (GotoTable(table("l2_lookup")),))

    def network_flows(self, ctx: Context, net: LogicalSwitch) -> Iterable[Flow]:
        topo = ctx.topology
        local = topo.local_ports_of(net.id)
        if not local:
            return
        lookup, flood = table("l2_lookup"), table("flood")
        yield Flow(lookup, 50, Match(metadata=net.tunnel_key, eth_dst=MULTICAST),
                   (GotoTable(flood),))
        # Unknown unicast floods too (a MAC we do not know may sit behind a port).
        yield Flow(lookup, 10, Match(metadata=net.tunnel_key), (GotoTable(flood),))
        # Each local copy goes the way a unicast to that port goes: through its ingress
        # security groups to the egress table (flagged, so that a live migration's source
        # copy is delivered only locally, and a destination only once activated).
        def to_local(origin: int) -> list[SetField | Resubmit]:
            out: list[SetField | Resubmit] = [SetField(REG_FLAGS, origin | FLAG_FLOOD)]
            for port in local:
                out += [SetField(REG_DST_PORT, port.tunnel_key), Resubmit(table("sg_ingress"))]
            return out

        # From a tunnel: local ports only, so that floods never loop between chassis.
        yield Flow(flood, 100, Match(metadata=net.tunnel_key, reg5=FLAG_FROM_TUNNEL),
                   tuple(to_local(FLAG_FROM_TUNNEL)))
        to_remote: list[SetField | Output] = []
        if ctx.tunnel_ofport is not None:
            for name, ip in topo.remote_chassis_of(net.id).items():
                to_remote += tunnel_to(net, Remote(name, ip), ctx.tunnel_ofport)
        yield Flow(flood, 50, Match(metadata=net.tunnel_key), (*to_local(0), *to_remote))


ACTIVATION_NOTICE = Controller(max_len=0)
"""The destination's report of an activation: the flow's cookie names the port; no data."""


def tunnel_to(net: LogicalSwitch, to: Remote, tunnel_ofport: int) -> tuple[SetField | Output,
                                                                             ...]:
    ipaddress.IPv4Address(to.tunnel_ip)  # Geneve over IPv4 underlays only, for now.
    return (SetField("tunnel_id", net.tunnel_key), SetField("tun_ipv4_dst", to.tunnel_ip),
            Output(tunnel_ofport))


L2_APP = L2()
