"""Address management: default gateways and pools, IP allocation from pools, MAC generation.

Allocation reads the addresses in use on the network (ports' fixed IPs and floating IPs) and
picks the lowest free address of the subnet's pools. The store's claims make the final word:
two concurrent requests that pick the same address cannot both be written, and the loser
retries (see ``ferry.api.resources.ports``) with a random one of the lowest ``WINDOW`` free
addresses, so that concurrent retries spread out instead of colliding again.
"""

from __future__ import annotations

import ipaddress
import itertools
import random
from collections.abc import Iterable, Iterator

from ferry.api.errors import ApiError, bad_request
from ferry.model.northbound import Northbound
from ferry.model.objects import (
    AllocationPool,
    FloatingIP,
    IPAddress,
    IPNetwork,
    LogicalPort,
    Subnet,
)

MAC_PREFIX = "fa:16:3e"
WINDOW = 64


def random_mac() -> str:
    tail = ":".join(f"{random.randrange(256):02x}" for _ in range(3))
    return f"{MAC_PREFIX}:{tail}"


def host_range(cidr: IPNetwork) -> tuple[int, int]:
    """First and last usable host address of a CIDR, as integers."""
    first, last = int(cidr.network_address), int(cidr.broadcast_address)
    if cidr.version == 4 and cidr.prefixlen < 31:
        return first + 1, last - 1
    if cidr.version == 6 and cidr.prefixlen < 127:
        return first + 1, last  # ::0 is the subnet-router anycast address
    return first, last


def default_gateway(cidr: IPNetwork) -> IPAddress | None:
    first, last = host_range(cidr)
    return ipaddress.ip_address(first) if first <= last else None


def default_pools(cidr: IPNetwork, gateway: IPAddress | None) -> tuple[AllocationPool, ...]:
    """The host range of the CIDR without the gateway."""
    first, last = host_range(cidr)
    ranges = [(first, last)]
    if gateway is not None and first <= int(gateway) <= last:
        g = int(gateway)
        ranges = [(first, g - 1), (g + 1, last)]
    return tuple(
        AllocationPool(start=ipaddress.ip_address(lo), end=ipaddress.ip_address(hi))
        for lo, hi in ranges if lo <= hi
    )


async def used_addresses(nb: Northbound, network_id: str) -> set[IPAddress]:
    """Addresses held on a network (read from the raw records: this runs on every create)."""
    used: set[IPAddress] = set()
    for rec in await nb.store.list(LogicalPort.TABLE, where={"network_id": network_id}):
        used.update(ipaddress.ip_address(f["ip_address"]) for f in rec.data.get("fixed_ips", ()))
    for rec in await nb.store.list(FloatingIP.TABLE,
                                   where={"floating_network_id": network_id}):
        used.add(ipaddress.ip_address(rec.data["floating_ip_address"]))
    return used


def free_addresses(subnet: Subnet, used: Iterable[IPAddress]) -> Iterator[IPAddress]:
    """The free pool addresses of ``subnet``, lowest first."""
    taken = {int(a) for a in used if a in subnet.cidr}
    if subnet.gateway_ip is not None:
        taken.add(int(subnet.gateway_ip))
    for pool in sorted(subnet.allocation_pools, key=lambda p: int(p.start)):
        for n in range(int(pool.start), int(pool.end) + 1):
            if n not in taken:
                yield ipaddress.ip_address(n)


def first_free(subnet: Subnet, used: Iterable[IPAddress], attempt: int = 0) -> IPAddress | None:
    """The lowest free address; on a retry (``attempt`` > 0) a random one of the lowest few."""
    window = list(itertools.islice(free_addresses(subnet, used), 1 if attempt == 0 else WINDOW))
    return random.choice(window) if window else None


def allocate(subnet: Subnet, used: set[IPAddress], attempt: int = 0) -> IPAddress:
    """A free pool address of ``subnet`` (recorded in ``used``), or 409."""
    ip = first_free(subnet, used, attempt)
    if ip is None:
        raise ApiError(409, "IpAddressGenerationFailure",
                       f"No more IP addresses available on network {subnet.network_id}.")
    used.add(ip)
    return ip


def parse_ip(value: str, field: str) -> IPAddress:
    try:
        return ipaddress.ip_address(value)
    except ValueError:
        raise bad_request(f"{field}: {value!r} is not a valid IP address") from None


def in_pools(subnet: Subnet, ip: IPAddress) -> bool:
    return any(int(p.start) <= int(ip) <= int(p.end) for p in subnet.allocation_pools)
