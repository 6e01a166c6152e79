"""/v2.0/routers: interfaces (add/remove_router_interface), external gateway, extra routes.

An interface is a port on the subnet's network owned by ``network:router_interface`` (with the
subnet's gateway address when added by subnet); the gateway is a port on the external network
owned by ``network:router_gateway``. Both belong to the router's project. When a router write
fails after its port was created, the port is deleted again, so a rejected request leaves the
store as it was.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

from fastapi import APIRouter, Request, Response
from pydantic import Field

from ferry.api import ipam, query
from ferry.api.auth import Context
from ferry.api.errors import ApiError, bad_request, conflict, not_found
from ferry.api.resources.common import NB, Body, Ctx, Owned, common_fields, load, rebuild
from ferry.api.resources.portdata import FixedIPReq
from ferry.api.resources.ports import create_with_retry, resolve_fixed_ips
from ferry.api.resources.subnets import load_subnet
from ferry.model.northbound import Northbound, parse
from ferry.model.objects import (
    FloatingIP,
    LogicalPort,
    LogicalRouter,
    LogicalSwitch,
    RouterPort,
    Subnet,
)

log = logging.getLogger(__name__)
router = APIRouter(tags=["routers"])
GATEWAY_OWNER = "network:router_gateway"
INTERFACE_OWNER = "network:router_interface"


class GatewayReq(Body):
    """``{}`` (no network_id) means "no gateway", as in Neutron."""

    network_id: str | None = Field(default=None, min_length=1, max_length=255)
    enable_snat: bool = True
    external_fixed_ips: list[FixedIPReq] | None = Field(default=None, max_length=8)


class RouteReq(Body):
    destination: str = Field(max_length=64)
    nexthop: str = Field(max_length=64)


class RouterCreate(Owned):
    name: str = Field(default="", max_length=255)
    description: str = Field(default="", max_length=255)
    admin_state_up: bool = True
    external_gateway_info: GatewayReq | None = None


class RouterUpdate(Body):
    name: str | None = Field(default=None, max_length=255)
    description: str | None = Field(default=None, max_length=255)
    admin_state_up: bool | None = None
    external_gateway_info: GatewayReq | None = None
    routes: list[RouteReq] | None = Field(default=None, max_length=64)


class RouterCreateBody(Body):
    router: RouterCreate


class RouterUpdateBody(Body):
    router: RouterUpdate


class InterfaceReq(Body):
    subnet_id: str | None = Field(default=None, min_length=1, max_length=255)
    port_id: str | None = Field(default=None, min_length=1, max_length=255)


async def render(nb: Northbound, r: LogicalRouter) -> dict[str, Any]:
    gw: dict[str, Any] | None = None
    if r.gateway is not None:
        port = None if r.gateway.port_id is None else await nb.get(LogicalPort, r.gateway.port_id)
        gw = {"network_id": r.gateway.network_id, "enable_snat": r.gateway.enable_snat,
              "external_fixed_ips": [] if port is None else [
                  {"subnet_id": f.subnet_id, "ip_address": str(f.ip_address)}
                  for f in port.fixed_ips]}
    return {
        **common_fields(r),
        "admin_state_up": r.admin_state_up,
        "status": "ACTIVE",
        "external_gateway_info": gw,
        "routes": [{"destination": str(x.destination), "nexthop": str(x.nexthop)}
                   for x in r.routes],
        "distributed": True,
        "ha": False,
        "flavor_id": None,
        "availability_zone_hints": [],
        "availability_zones": [],
    }


async def _gateway_port(nb: Northbound, ctx: Context, router_id: str, topic: str,
                        gw: GatewayReq) -> LogicalPort:
    assert gw.network_id is not None
    net = await nb.get(LogicalSwitch, gw.network_id)
    if net is None or not net.external:
        raise bad_request(f"Network {gw.network_id} is not a valid external network")
    if gw.external_fixed_ips is not None:
        ctx.require_admin("rule:create_router:external_gateway_info:external_fixed_ips")

    async def build(attempt: int) -> LogicalPort:
        fixed = await resolve_fixed_ips(nb, net, gw.external_fixed_ips, attempt=attempt)
        if not fixed:
            raise bad_request(f"external network {net.id} has no subnet to take an address "
                              "from")
        return parse(LogicalPort, {
            "topic": topic, "network_id": net.id, "mac": _mac(), "fixed_ips": fixed,
            "device_owner": GATEWAY_OWNER, "device_id": router_id,
            "port_security_enabled": False})

    first = await build(0)
    auto = gw.external_fixed_ips is None or any(
        f.ip_address is None for f in gw.external_fixed_ips)
    return await create_with_retry(nb, build, auto, True, first)


def _mac() -> str:
    return ipam.random_mac()


async def _undo_port(nb: Northbound, port: LogicalPort) -> None:
    """Delete a port created for a router write that then failed (the first error wins)."""
    try:
        await nb.delete(LogicalPort, port.id)
    except Exception:
        log.exception("could not delete port %s after a failed router write; it is left "
                      "behind", port.id)


@router.get("/v2.0/routers")
async def list_routers(request: Request, nb: NB, ctx: Ctx) -> dict[str, Any]:
    topic = None if ctx.is_admin else ctx.project_id
    items = [await render(nb, r) for r in await nb.list(LogicalRouter, topic=topic)]
    return query.apply(request, items, "routers")


@router.get("/v2.0/routers/{router_id}")
async def show_router(router_id: str, request: Request, nb: NB, ctx: Ctx) -> dict[str, Any]:
    r = await load(nb, LogicalRouter, router_id, ctx)
    return {"router": query.project(await render(nb, r), query.fields_of(request))}


@router.post("/v2.0/routers", status_code=201)
async def create_router(body: RouterCreateBody, nb: NB, ctx: Ctx) -> dict[str, Any]:
    req = body.router
    topic = ctx.project_for(req.project_id, req.tenant_id, "router")
    router_id = str(uuid.uuid4())
    data: dict[str, Any] = {"id": router_id, "topic": topic, "name": req.name,
                            "description": req.description,
                            "admin_state_up": req.admin_state_up}
    obj = parse(LogicalRouter, data)
    gw = req.external_gateway_info
    if gw is None or gw.network_id is None:
        obj = await nb.create(obj)
        return {"router": await render(nb, obj)}
    port = await _gateway_port(nb, ctx, router_id, topic, gw)
    try:
        obj = await nb.create(rebuild(obj, gateway={
            "network_id": gw.network_id, "port_id": port.id, "enable_snat": gw.enable_snat}))
    except BaseException:
        await _undo_port(nb, port)
        raise
    return {"router": await render(nb, obj)}


async def _check_gateway_unused(nb: Northbound, r: LogicalRouter) -> None:
    for fip in await nb.list(FloatingIP, where={"router_id": r.id}):
        raise conflict("RouterExternalGatewayInUseByFloatingIp",
                       f"Gateway cannot be updated for router {r.id}, since a gateway to "
                       f"external network {fip.floating_network_id} is required by one or "
                       f"more floating IPs ({fip.id}).")


@router.put("/v2.0/routers/{router_id}")
async def update_router(router_id: str, body: RouterUpdateBody, nb: NB,
                        ctx: Ctx) -> dict[str, Any]:
    req = body.router
    r = await load(nb, LogicalRouter, router_id, ctx)
    changes = req.model_dump(exclude_unset=True, exclude={"external_gateway_info"})
    for key, value in list(changes.items()):
        if value is None:
            raise bad_request(f"{key} may not be null")
    new_port: LogicalPort | None = None
    old_port: str | None = None
    if "external_gateway_info" in req.model_fields_set:
        gw = req.external_gateway_info
        if gw is not None and gw.network_id is None:
            gw = None
        same_net = gw is not None and r.gateway is not None and (
            r.gateway.network_id == gw.network_id and gw.external_fixed_ips is None)
        if same_net:
            assert gw is not None and r.gateway is not None
            changes["gateway"] = {**r.gateway.model_dump(mode="json"),
                                  "enable_snat": gw.enable_snat}
        else:
            if r.gateway is not None:
                await _check_gateway_unused(nb, r)
                old_port = r.gateway.port_id
            if gw is not None:
                new_port = await _gateway_port(nb, ctx, r.id, r.topic, gw)
                changes["gateway"] = {"network_id": gw.network_id, "port_id": new_port.id,
                                      "enable_snat": gw.enable_snat}
            else:
                changes["gateway"] = None
    expected_gw = r.gateway

    def change(cur: LogicalRouter) -> LogicalRouter:
        if "gateway" in changes and cur.gateway != expected_gw:
            raise conflict("Conflict", f"router {cur.id}'s gateway changed concurrently")
        return rebuild(cur, **changes)

    try:
        r = await nb.modify(LogicalRouter, router_id, change)
    except BaseException:
        if new_port is not None:
            await _undo_port(nb, new_port)
        raise
    if old_port is not None and await nb.get(LogicalPort, old_port) is not None:
        await nb.delete(LogicalPort, old_port)
    return {"router": await render(nb, r)}


@router.delete("/v2.0/routers/{router_id}", status_code=204)
async def delete_router(router_id: str, nb: NB, ctx: Ctx) -> Response:
    r = await load(nb, LogicalRouter, router_id, ctx)
    if r.ports:
        raise conflict("RouterInUse", f"Router {router_id} still has ports "
                       f"({len(r.ports)} interfaces)")
    if r.gateway is not None:
        await _check_gateway_unused(nb, r)
    await nb.delete(LogicalRouter, router_id, version=r.version)
    if r.gateway is not None and r.gateway.port_id is not None and await nb.get(
            LogicalPort, r.gateway.port_id) is not None:
        await nb.delete(LogicalPort, r.gateway.port_id)
    return Response(status_code=204)


# -- interfaces -------------------------------------------------------------------------------

def _interface_body(r: LogicalRouter, port: LogicalPort, subnet_id: str) -> dict[str, Any]:
    return {"id": r.id, "tenant_id": r.topic, "project_id": r.topic, "port_id": port.id,
            "subnet_id": subnet_id, "subnet_ids": [f.subnet_id for f in port.fixed_ips],
            "network_id": port.network_id}


async def _check_subnet_free(nb: Northbound, r: LogicalRouter, subnet: Subnet) -> None:
    for rp in r.ports:
        if rp.subnet_id == subnet.id:
            raise bad_request(f"Router already has a port on subnet {subnet.id}")
        other = await nb.get(Subnet, rp.subnet_id)
        if other is not None and other.cidr.overlaps(subnet.cidr):
            raise bad_request(f"Cidr {subnet.cidr} of subnet {subnet.id} overlaps with cidr "
                              f"{other.cidr} of subnet {other.id}")


def _req_one(req: InterfaceReq) -> None:
    if (req.subnet_id is None) == (req.port_id is None):
        raise bad_request("Either subnet_id or port_id must be specified (not both)")


@router.put("/v2.0/routers/{router_id}/add_router_interface")
async def add_interface(router_id: str, req: InterfaceReq, nb: NB,
                        ctx: Ctx) -> dict[str, Any]:
    _req_one(req)
    r = await load(nb, LogicalRouter, router_id, ctx)
    created: LogicalPort | None = None
    if req.subnet_id is not None:
        subnet = await load_subnet(nb, req.subnet_id, ctx)
        if not ctx.owns(subnet.topic):
            raise not_found("subnet", req.subnet_id)
        if subnet.gateway_ip is None:
            raise bad_request(f"Subnet {subnet.id} has no gateway_ip; add a port instead")
        await _check_subnet_free(nb, r, subnet)
        net = await nb.must_get(LogicalSwitch, subnet.network_id, "network_id", "subnet")
        wanted = [FixedIPReq(subnet_id=subnet.id, ip_address=str(subnet.gateway_ip))]

        async def build(attempt: int) -> LogicalPort:
            fixed = await resolve_fixed_ips(nb, net, wanted)
            return parse(LogicalPort, {
                "topic": r.topic, "network_id": net.id, "mac": _mac(), "fixed_ips": fixed,
                "device_owner": INTERFACE_OWNER, "device_id": r.id,
                "port_security_enabled": False})

        first = await build(0)
        port = created = await create_with_retry(nb, build, False, True, first)
    else:
        assert req.port_id is not None
        port = await load(nb, LogicalPort, req.port_id, ctx)
        if port.topic != r.topic:
            raise not_found("port", port.id)
        if port.device_id or port.device_owner:
            raise conflict("PortInUse", f"Unable to complete operation on port {port.id} for "
                           f"network {port.network_id}. Port already has an attached device "
                           f"{port.device_id or port.device_owner}.")
        if len(port.fixed_ips) != 1:
            raise bad_request(f"Port {port.id} must have exactly one fixed IP to be a router "
                              "interface")
        subnet = await nb.must_get(Subnet, port.fixed_ips[0].subnet_id, "fixed_ips", "port")
        await _check_subnet_free(nb, r, subnet)
    subnet_id = port.fixed_ips[0].subnet_id

    def change(cur: LogicalRouter) -> LogicalRouter:
        if any(rp.subnet_id == subnet_id for rp in cur.ports):
            raise bad_request(f"Router already has a port on subnet {subnet_id}")
        ports = [*cur.ports, RouterPort(port_id=port.id, subnet_id=subnet_id)]
        return rebuild(cur, ports=[p.model_dump() for p in ports])

    try:
        if created is None:
            port = await nb.modify(LogicalPort, port.id, lambda p: rebuild(
                p, device_owner=INTERFACE_OWNER, device_id=r.id, security_groups=[],
                port_security_enabled=False, allowed_address_pairs=[]))
        r = await nb.modify(LogicalRouter, r.id, change)
    except BaseException:
        if created is not None:
            await _undo_port(nb, created)
        raise
    return _interface_body(r, port, subnet_id)


@router.put("/v2.0/routers/{router_id}/remove_router_interface")
async def remove_interface(router_id: str, req: InterfaceReq, nb: NB,
                           ctx: Ctx) -> dict[str, Any]:
    _req_one(req)
    r = await load(nb, LogicalRouter, router_id, ctx)
    if req.port_id is not None:
        rp = next((p for p in r.ports if p.port_id == req.port_id), None)
        if rp is None:
            raise ApiError(404, "RouterInterfaceNotFound", f"Router {router_id} does not have "
                           f"an interface with id {req.port_id}")
    else:
        rp = next((p for p in r.ports if p.subnet_id == req.subnet_id), None)
        if rp is None:
            raise ApiError(404, "RouterInterfaceNotFoundForSubnet", f"Router {router_id} has "
                           f"no interface on subnet {req.subnet_id}")
    if req.subnet_id is not None and req.port_id is not None and rp.subnet_id != req.subnet_id:
        raise bad_request(f"port {req.port_id} is not on subnet {req.subnet_id}")
    port = await nb.get(LogicalPort, rp.port_id)
    fips = await nb.list(FloatingIP, where={"router_id": r.id})
    for fip in fips:
        holder = None if fip.port_id is None else await nb.get(LogicalPort, fip.port_id)
        if holder is not None and any(f.subnet_id == rp.subnet_id for f in holder.fixed_ips):
            raise conflict("RouterInterfaceInUseByFloatingIP", f"Router interface for subnet "
                           f"{rp.subnet_id} on router {r.id} cannot be deleted, as it is "
                           f"required by one or more floating IPs ({fip.id}).")

    def change(cur: LogicalRouter) -> LogicalRouter:
        ports = [p.model_dump() for p in cur.ports if p.port_id != rp.port_id]
        return rebuild(cur, ports=ports)

    r = await nb.modify(LogicalRouter, r.id, change)
    if port is not None:
        await nb.delete(LogicalPort, port.id)
        return _interface_body(r, port, rp.subnet_id)
    return {"id": r.id, "tenant_id": r.topic, "project_id": r.topic, "port_id": rp.port_id,
            "subnet_id": rp.subnet_id, "subnet_ids": [rp.subnet_id], "network_id": None}
