"""/v2.0/floatingips: addresses of an external network, associated with a port's fixed IP.

Association needs a router with an interface on the fixed IP's subnet and its gateway on the
floating IP's network (else 404 ExternalGatewayForFloatingIPNotFound); that router becomes
``router_id``. A port's fixed IP takes at most one floating IP per external network.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from pydantic import Field

from ferry.api import ipam, query
from ferry.api.auth import Context
from ferry.api.errors import ApiError, bad_request, conflict, not_found
from ferry.api.resources.common import NB, Body, Ctx, Owned, common_fields, load, rebuild
from ferry.model.northbound import InUse, Northbound, parse
from ferry.model.objects import (
    FloatingIP,
    LogicalPort,
    LogicalRouter,
    LogicalSwitch,
    Subnet,
    new_id,
)

router = APIRouter(tags=["floatingips"])
ATTEMPTS = 20


class FipCreate(Owned):
    floating_network_id: str = Field(min_length=1, max_length=255)
    floating_ip_address: str | None = Field(default=None, max_length=64)
    subnet_id: str | None = Field(default=None, min_length=1, max_length=255)
    port_id: str | None = Field(default=None, min_length=1, max_length=255)
    fixed_ip_address: str | None = Field(default=None, max_length=64)
    description: str = Field(default="", max_length=255)


class FipUpdate(Body):
    port_id: str | None = Field(default=None, min_length=1, max_length=255)
    fixed_ip_address: str | None = Field(default=None, max_length=64)
    description: str | None = Field(default=None, max_length=255)


class FipCreateBody(Body):
    floatingip: FipCreate


class FipUpdateBody(Body):
    floatingip: FipUpdate


def render(f: FloatingIP) -> dict[str, Any]:
    out = common_fields(f)
    del out["name"]
    return {
        **out,
        "floating_network_id": f.floating_network_id,
        "floating_ip_address": str(f.floating_ip_address),
        "port_id": f.port_id,
        "fixed_ip_address": None if f.fixed_ip_address is None else str(f.fixed_ip_address),
        "router_id": f.router_id,
        "status": "ACTIVE" if f.port_id else "DOWN",
        "qos_policy_id": None,
        "port_forwardings": [],
        "dns_domain": "",
        "dns_name": "",
    }


async def association(nb: Northbound, ctx: Context, topic: str, fip_id: str, network_id: str,
                      port_id: str, fixed: str | None) -> dict[str, Any]:
    """port_id, fixed_ip_address and router_id for associating with ``port_id``."""
    port = await nb.get(LogicalPort, port_id)
    if port is None or not ctx.owns(port.topic) or port.topic != topic:
        raise not_found("port", port_id)
    v4 = [f for f in port.fixed_ips if f.ip_address.version == 4]
    if fixed is not None:
        ip = ipam.parse_ip(fixed, "fixed_ip_address")
        chosen = next((f for f in port.fixed_ips if f.ip_address == ip), None)
        if chosen is None:
            raise bad_request(f"Port {port_id} does not have fixed ip {fixed}")
    elif len(v4) == 1:
        chosen = v4[0]
    elif not v4:
        raise bad_request(f"Port {port_id} has no IPv4 address to associate a floating IP to")
    else:
        raise bad_request(f"Port {port_id} has multiple fixed IPv4 addresses. Must provide a "
                          "specific IPv4 address when assigning a floating IP")
    for other in await nb.list(FloatingIP, where={"port_id": port_id}):
        if other.id != fip_id and other.fixed_ip_address == chosen.ip_address and (
                other.floating_network_id == network_id):
            raise conflict("FloatingIPPortAlreadyAssociated", f"Cannot associate floating IP "
                           f"with port {port_id} using fixed IP {chosen.ip_address}, as that "
                           f"fixed IP already has a floating IP {other.id}.")
    for r in await nb.list(LogicalRouter):
        if r.gateway is not None and r.gateway.network_id == network_id and any(
                rp.subnet_id == chosen.subnet_id for rp in r.ports):
            return {"port_id": port_id, "fixed_ip_address": str(chosen.ip_address),
                    "router_id": r.id}
    raise ApiError(404, "ExternalGatewayForFloatingIPNotFound",
                   f"External network {network_id} is not reachable from subnet "
                   f"{chosen.subnet_id}. Therefore, cannot associate Port {port_id} with a "
                   "Floating IP.")


@router.get("/v2.0/floatingips")
async def list_fips(request: Request, nb: NB, ctx: Ctx) -> dict[str, Any]:
    topic = None if ctx.is_admin else ctx.project_id
    items = [render(f) for f in await nb.list(FloatingIP, topic=topic)]
    return query.apply(request, items, "floatingips")


@router.get("/v2.0/floatingips/{fip_id}")
async def show_fip(fip_id: str, request: Request, nb: NB, ctx: Ctx) -> dict[str, Any]:
    fip = await load(nb, FloatingIP, fip_id, ctx)
    return {"floatingip": query.project(render(fip), query.fields_of(request))}


@router.post("/v2.0/floatingips", status_code=201)
async def create_fip(body: FipCreateBody, nb: NB, ctx: Ctx) -> dict[str, Any]:
    req = body.floatingip
    topic = ctx.project_for(req.project_id, req.tenant_id, "floatingip")
    net = await nb.get(LogicalSwitch, req.floating_network_id)
    if net is None or not net.external:
        raise bad_request(f"Network {req.floating_network_id} is not a valid external network")
    subnets = await nb.list(Subnet, where={"network_id": net.id})
    if req.subnet_id is not None:
        subnets = [s for s in subnets if s.id == req.subnet_id]
        if not subnets:
            raise bad_request(f"Subnet {req.subnet_id} is not on network {net.id}")
    wanted = None
    if req.floating_ip_address is not None:
        wanted = ipam.parse_ip(req.floating_ip_address, "floating_ip_address")
        if not any(wanted in s.cidr for s in subnets):
            raise bad_request(f"{wanted} is not in a subnet of network {net.id}")
    fip_id = new_id()
    assoc: dict[str, Any] = {}
    if req.port_id is not None:
        assoc = await association(nb, ctx, topic, fip_id, net.id, req.port_id,
                                  req.fixed_ip_address)
    elif req.fixed_ip_address is not None:
        raise bad_request("fixed_ip_address needs port_id")
    for attempt in range(ATTEMPTS):
        used = await ipam.used_addresses(nb, net.id)
        if wanted is not None:
            if wanted in used:
                raise conflict("IpAddressAlreadyAllocated",
                               f"IP address {wanted} already allocated in network {net.id}")
            address = wanted
        else:
            free = [ip for ip in (ipam.first_free(s, used, attempt) for s in subnets
                                  if s.cidr.version == 4) if ip is not None]
            if not free:
                raise ApiError(409, "IpAddressGenerationFailure",
                               f"No more IP addresses available on network {net.id}.")
            address = free[0]
        fip = parse(FloatingIP, {"id": fip_id, "topic": topic, "floating_network_id": net.id,
                                 "floating_ip_address": str(address),
                                 "description": req.description, **assoc})
        try:
            fip = await nb.create(fip)
        except InUse:
            if wanted is None:
                continue
            raise
        return {"floatingip": render(fip)}
    raise ApiError(409, "IpAddressGenerationFailure", "no free floating IP after retries")


@router.put("/v2.0/floatingips/{fip_id}")
async def update_fip(fip_id: str, body: FipUpdateBody, nb: NB, ctx: Ctx) -> dict[str, Any]:
    req = body.floatingip
    fip = await load(nb, FloatingIP, fip_id, ctx)
    changes: dict[str, Any] = {}
    if req.description is not None:
        changes["description"] = req.description
    if "port_id" in req.model_fields_set:
        if req.port_id is None:
            changes.update(port_id=None, fixed_ip_address=None, router_id=None)
        else:
            changes.update(await association(nb, ctx, fip.topic, fip.id,
                                             fip.floating_network_id, req.port_id,
                                             req.fixed_ip_address))
    elif req.fixed_ip_address is not None:
        raise bad_request("fixed_ip_address needs port_id")
    fip = await nb.modify(FloatingIP, fip_id, lambda f: rebuild(f, **changes))
    return {"floatingip": render(fip)}


@router.delete("/v2.0/floatingips/{fip_id}", status_code=204)
async def delete_fip(fip_id: str, nb: NB, ctx: Ctx) -> Response:
    await load(nb, FloatingIP, fip_id, ctx)
    await nb.delete(FloatingIP, fip_id)
    return Response(status_code=204)
