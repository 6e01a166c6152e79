"""Pins the routes to the other chassis' tunnel endpoints in ovs-vswitchd's own routing table.

OVS's userspace tunnelling (the netdev datapath Ferry runs) routes Geneve packets with its copy
of the kernel's routes. At any link change on the host (a VIF plugged or unplugged: every
migration does both) OVS empties that copy and reads it again; a tunnelled flow translated
meanwhile finds no route, and the datapath drops its packets until the next revalidation
(measured in the lab: up to 6 ms of the other VMs' Geneve traffic at each plug or unplug). A
route added with ``ovs/route/add`` is OVS's own and survives the re-reads.

So the agent pins a /32 for each remote chassis' tunnel IP, a copy of OVS's cached kernel
route to it (device and gateway), and keeps it in step with that route: when the set of chassis
changes, when ovs-vswitchd (re)connects (a restarted one has forgotten its pins), just after
the kernel's routes change (a /32 pin outranks the kernel route it copies:
:mod:`ferry.agent.route_events`) and every ``REFRESH_S``. A pin is replaced by
adding the new one over it, never deleted: deleting any route on a device makes OVS forget that
device's addresses as tunnel endpoints until a route on it is inserted again
(``rt_entry_delete__`` in ``lib/ovs-router.c``: Geneve to this chassis was not decapsulated, seen
in the lab), so the pin of a chassis that left stays, unused.
"""

from __future__ import annotations

import ipaddress
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ferry.agent.datapath import DatapathSettingError, appctl

log = logging.getLogger(__name__)

REFRESH_S = 30.0
"""How often the pins are checked against OVS's copy of the kernel's routes, besides after
each change the kernel notifies (:mod:`ferry.agent.route_events`)."""

POLL_S = 5.0
"""How often, when the kernel's route notifications cannot be had."""

SETTLE_S = (0.02, 0.2, 1.0)
"""When the pins are checked after a route notification: OVS hears of the change by the same
notification and must re-read its copy of the routes first."""

_LINE = re.compile(r"^(?P<kind>Cached|User): (?P<prefix>\S+)(?: MARK \d+)? dev (?P<dev>\S+)"
                   r"(?: GW (?P<gw>\S+))?(?: SRC \S+)?(?P<local> local)?\s*$")


@dataclass(frozen=True)
class Route:
    user: bool  # added with ovs/route/add; else OVS's copy of a kernel route
    prefix: ipaddress.IPv4Network | ipaddress.IPv6Network
    dev: str
    gw: str | None
    local: bool


def parse_routes(text: str) -> list[Route]:
    """The routes of ``ovs-appctl ovs/route/show``; lines it cannot read are skipped."""
    out = []
    for line in text.splitlines():
        m = _LINE.match(line.strip())
        if m is None:
            continue
        try:
            prefix = ipaddress.ip_network(m["prefix"], strict=False)
        except ValueError:
            continue
        gw = m["gw"]
        if gw is not None and ipaddress.ip_address(gw.split("%")[0]).is_unspecified:
            gw = None
        out.append(Route(m["kind"] == "User", prefix, m["dev"], gw, m["local"] is not None))
    return out


def kernel_route(routes: Iterable[Route], ip: str) -> Route | None:
    """OVS's copy of the kernel's route for ``ip`` (longest prefix), if it has one now."""
    addr = ipaddress.ip_address(ip)
    best: Route | None = None
    for r in routes:
        if not r.user and addr in r.prefix and (best is None
                                                 or r.prefix.prefixlen > best.prefix.prefixlen):
            best = r
    return best


def _pin_of(routes: Iterable[Route], ip: str) -> Route | None:
    host = ipaddress.ip_network(ip)
    return next((r for r in routes if r.user and r.prefix == host), None)


def plan(routes: list[Route], remotes: Iterable[str]) -> list[tuple[str, str, str | None]]:
    """The pins to add, as (tunnel IP, device, gateway or None), so that each remote endpoint
    has one equal to the kernel's route to it. An endpoint with no kernel route now (OVS may be
    re-reading them) keeps the pin it has: that is when it is needed."""
    out: list[tuple[str, str, str | None]] = []
    for ip in sorted(set(remotes)):
        kernel, pin = kernel_route(routes, ip), _pin_of(routes, ip)
        if kernel is None or kernel.local:
            continue
        if pin is None or (pin.dev, pin.gw) != (kernel.dev, kernel.gw):
            out.append((ip, kernel.dev, kernel.gw))
    return out


class TunnelRoutes:
    """The pins of one chassis' ovs-vswitchd (through its control socket)."""

    def __init__(self, chassis: str, ovs_rundir: Path) -> None:
        self.chassis = chassis
        self.ovs_rundir = ovs_rundir

    async def sync(self, remotes: Iterable[str]) -> None:
        """Bring the pins in step with OVS's routes for ``remotes`` (tunnel IPs). Failures
        are logged; the next sync tries again."""
        try:
            routes = parse_routes(await appctl(self.ovs_rundir, "ovs/route/show"))
            for ip, dev, gw in plan(routes, remotes):
                await appctl(self.ovs_rundir, "ovs/route/add", f"{ip}/32", dev,
                             *([gw] if gw else []))
                log.info("chassis %s: tunnel route to %s pinned (dev %s%s)", self.chassis, ip,
                         dev, f" via {gw}" if gw else "")
        except DatapathSettingError as e:
            log.warning("chassis %s: tunnel routes not pinned: %s", self.chassis, e)
