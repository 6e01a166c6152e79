"""/v2.0/subnets: IP ranges with gateway and allocation pools (defaults as Neutron's).

A subnet belongs to its network's project. Without ``gateway_ip`` the gateway is the first host
address; ``"gateway_ip": null`` means no gateway. Without ``allocation_pools`` the pool is the
host range minus the gateway.
"""

from __future__ import annotations

import ipaddress
from typing import Any, Literal

from fastapi import APIRouter, Request, Response
from pydantic import Field

from ferry.api import ipam, query
from ferry.api.errors import bad_request, not_found
from ferry.api.resources.common import (
    NB,
    Body,
    Ctx,
    Owned,
    common_fields,
    load_own_network,
    network_visible,
    rebuild,
)
from ferry.model.northbound import parse
from ferry.model.objects import LogicalSwitch, Subnet

router = APIRouter(tags=["subnets"])


class Pool(Body):
    start: str = Field(max_length=64)
    end: str = Field(max_length=64)


class Route(Body):
    destination: str = Field(max_length=64)
    nexthop: str = Field(max_length=64)


class SubnetCreate(Owned):
    network_id: str = Field(min_length=1, max_length=255)
    cidr: str = Field(max_length=64)
    ip_version: Literal[4, 6] = 4
    name: str = Field(default="", max_length=255)
    description: str = Field(default="", max_length=255)
    gateway_ip: str | None = Field(default=None, max_length=64)
    allocation_pools: list[Pool] | None = Field(default=None, max_length=64)
    enable_dhcp: bool = True
    dns_nameservers: list[str] = Field(default_factory=list, max_length=16)
    host_routes: list[Route] = Field(default_factory=list, max_length=64)
    ipv6_ra_mode: None = None
    ipv6_address_mode: None = None
    subnetpool_id: None = None


class SubnetUpdate(Body):
    name: str | None = Field(default=None, max_length=255)
    description: str | None = Field(default=None, max_length=255)
    gateway_ip: str | None = Field(default=None, max_length=64)
    allocation_pools: list[Pool] | None = Field(default=None, max_length=64)
    enable_dhcp: bool | None = None
    dns_nameservers: list[str] | None = Field(default=None, max_length=16)
    host_routes: list[Route] | None = Field(default=None, max_length=64)


class SubnetCreateBody(Body):
    subnet: SubnetCreate


class SubnetUpdateBody(Body):
    subnet: SubnetUpdate


def render(s: Subnet) -> dict[str, Any]:
    return {
        **common_fields(s),
        "network_id": s.network_id,
        "ip_version": s.cidr.version,
        "cidr": str(s.cidr),
        "gateway_ip": None if s.gateway_ip is None else str(s.gateway_ip),
        "allocation_pools": [{"start": str(p.start), "end": str(p.end)}
                             for p in s.allocation_pools],
        "enable_dhcp": s.enable_dhcp,
        "dns_nameservers": [str(d) for d in s.dns_nameservers],
        "host_routes": [{"destination": str(r.destination), "nexthop": str(r.nexthop)}
                        for r in s.host_routes],
        "ipv6_ra_mode": None,
        "ipv6_address_mode": None,
        "subnetpool_id": None,
        "segment_id": None,
        "service_types": [],
    }


def _cidr(value: str, version: int) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        net = ipaddress.ip_network(value, strict=True)
    except ValueError as e:
        raise bad_request(f"cidr: {value!r} is not a valid CIDR: {e}") from None
    if net.version != version:
        raise bad_request(f"cidr {value} is not an IPv{version} network (ip_version {version})")
    return net


@router.get("/v2.0/subnets")
async def list_subnets(request: Request, nb: NB, ctx: Ctx) -> dict[str, Any]:
    visible = {n.id for n in await nb.list(LogicalSwitch) if network_visible(ctx, n)}
    items = [render(s) for s in await nb.list(Subnet) if s.network_id in visible]
    return query.apply(request, items, "subnets")


async def load_subnet(nb: NB, subnet_id: str, ctx: Ctx) -> Subnet:
    subnet = await nb.get(Subnet, subnet_id)
    if subnet is None:
        raise not_found("subnet", subnet_id)
    net = await nb.get(LogicalSwitch, subnet.network_id)
    if net is None or not network_visible(ctx, net):
        raise not_found("subnet", subnet_id)
    return subnet


@router.get("/v2.0/subnets/{subnet_id}")
async def show_subnet(subnet_id: str, request: Request, nb: NB, ctx: Ctx) -> dict[str, Any]:
    subnet = await load_subnet(nb, subnet_id, ctx)
    return {"subnet": query.project(render(subnet), query.fields_of(request))}


@router.post("/v2.0/subnets", status_code=201)
async def create_subnet(body: SubnetCreateBody, nb: NB, ctx: Ctx) -> dict[str, Any]:
    req = body.subnet
    net = await load_own_network(nb, req.network_id, ctx, "rule:create_subnet")
    topic = ctx.project_for(req.project_id, req.tenant_id, "subnet")
    if topic != net.topic:
        raise bad_request(f"a subnet belongs to its network's project ({net.topic})")
    cidr = _cidr(req.cidr, req.ip_version)
    if "gateway_ip" in req.model_fields_set:
        gateway = None if req.gateway_ip is None else ipam.parse_ip(req.gateway_ip, "gateway_ip")
    else:
        gateway = ipam.default_gateway(cidr)
    pools: Any
    if req.allocation_pools is None:
        pools = [p.model_dump(mode="json") for p in ipam.default_pools(cidr, gateway)]
    else:
        pools = [p.model_dump() for p in req.allocation_pools]
    data = {
        "topic": net.topic, "network_id": net.id, "cidr": str(cidr), "name": req.name,
        "description": req.description, "gateway_ip": None if gateway is None else str(gateway),
        "allocation_pools": pools, "enable_dhcp": req.enable_dhcp,
        "dns_nameservers": req.dns_nameservers,
        "host_routes": [r.model_dump() for r in req.host_routes],
    }
    subnet = await nb.create(parse(Subnet, data))
    return {"subnet": render(subnet)}


@router.put("/v2.0/subnets/{subnet_id}")
async def update_subnet(subnet_id: str, body: SubnetUpdateBody, nb: NB,
                        ctx: Ctx) -> dict[str, Any]:
    subnet = await load_subnet(nb, subnet_id, ctx)
    await load_own_network(nb, subnet.network_id, ctx, "rule:update_subnet")
    req = body.subnet
    changes = req.model_dump(exclude_unset=True)
    for key in ("name", "description", "enable_dhcp", "dns_nameservers", "host_routes",
                "allocation_pools"):
        if key in changes and changes[key] is None:
            raise bad_request(f"{key} may not be null")
    if "gateway_ip" in changes and changes["gateway_ip"] is not None:
        ipam.parse_ip(changes["gateway_ip"], "gateway_ip")
    updated = await nb.modify(Subnet, subnet_id, lambda s: rebuild(s, **changes))
    return {"subnet": render(updated)}


@router.delete("/v2.0/subnets/{subnet_id}", status_code=204)
async def delete_subnet(subnet_id: str, nb: NB, ctx: Ctx) -> Response:
    subnet = await load_subnet(nb, subnet_id, ctx)
    await load_own_network(nb, subnet.network_id, ctx, "rule:delete_subnet")
    await nb.delete(Subnet, subnet_id)  # SubnetInUse while a port has an address on it
    return Response(status_code=204)

