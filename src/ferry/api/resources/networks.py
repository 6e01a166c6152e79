"""/v2.0/networks: LogicalSwitch as Neutron networks (with provider and external-net)."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Request, Response
from pydantic import Field

from ferry.api import query
from ferry.api.errors import bad_request, conflict
from ferry.api.resources.common import (
    NB,
    Body,
    Ctx,
    Owned,
    common_fields,
    load_network,
    load_own_network,
    network_visible,
    rebuild,
)
from ferry.model.northbound import Northbound, parse
from ferry.model.objects import LogicalPort, LogicalSwitch, NetworkType, Subnet

router = APIRouter(tags=["networks"])


class NetworkCreate(Owned):
    name: str = Field(default="", max_length=255)
    description: str = Field(default="", max_length=255)
    admin_state_up: bool = True
    shared: bool = False
    mtu: int | None = Field(default=None, ge=68, le=9000)
    router_external: bool = Field(default=False, alias="router:external")
    network_type: Literal["geneve", "flat"] | None = Field(
        default=None, alias="provider:network_type")
    physical_network: str | None = Field(default=None, alias="provider:physical_network",
                                         min_length=1, max_length=64)
    segmentation_id: int | None = Field(default=None, alias="provider:segmentation_id",
                                        ge=1, lt=2**24)
    port_security_enabled: bool = True
    availability_zone_hints: list[str] = Field(default_factory=list, max_length=0)


class NetworkUpdate(Body):
    name: str | None = Field(default=None, max_length=255)
    description: str | None = Field(default=None, max_length=255)
    admin_state_up: bool | None = None
    shared: bool | None = None
    mtu: int | None = Field(default=None, ge=68, le=9000)
    router_external: bool | None = Field(default=None, alias="router:external")
    port_security_enabled: bool | None = None


class NetworkCreateBody(Body):
    network: NetworkCreate


class NetworkUpdateBody(Body):
    network: NetworkUpdate


def render(net: LogicalSwitch, subnets: list[str]) -> dict[str, Any]:
    return {
        **common_fields(net),
        "admin_state_up": net.admin_state_up,
        "status": "ACTIVE",
        "subnets": sorted(subnets),
        "shared": net.shared,
        "mtu": net.mtu,
        "router:external": net.external,
        "provider:network_type": net.network_type.value,
        "provider:physical_network": net.physical_network,
        "provider:segmentation_id": (
            net.tunnel_key if net.network_type is NetworkType.GENEVE else None),
        "port_security_enabled": net.port_security_enabled,
        "availability_zone_hints": [],
        "availability_zones": [],
        "ipv4_address_scope": None,
        "ipv6_address_scope": None,
        "is_default": False,
        "l2_adjacency": True,
    }


async def _subnet_ids(nb: Northbound, network_id: str | None = None) -> dict[str, list[str]]:
    where = None if network_id is None else {"network_id": network_id}
    out: dict[str, list[str]] = {}
    for s in await nb.list(Subnet, where=where):
        out.setdefault(s.network_id, []).append(s.id)
    return out


@router.get("/v2.0/networks")
async def list_networks(request: Request, nb: NB, ctx: Ctx) -> dict[str, Any]:
    subnets = await _subnet_ids(nb)
    items = [render(n, subnets.get(n.id, [])) for n in await nb.list(LogicalSwitch)
             if network_visible(ctx, n)]
    return query.apply(request, items, "networks")


@router.get("/v2.0/networks/{network_id}")
async def show_network(network_id: str, request: Request, nb: NB, ctx: Ctx) -> dict[str, Any]:
    net = await load_network(nb, network_id, ctx)
    subnets = await _subnet_ids(nb, net.id)
    return {"network": query.project(render(net, subnets.get(net.id, [])),
                                     query.fields_of(request))}


@router.post("/v2.0/networks", status_code=201)
async def create_network(body: NetworkCreateBody, nb: NB, ctx: Ctx) -> dict[str, Any]:
    req = body.network
    topic = ctx.project_for(req.project_id, req.tenant_id, "network")
    for admin_only in ("shared", "router_external", "network_type", "physical_network",
                       "segmentation_id"):
        if admin_only in req.model_fields_set:
            ctx.require_admin(f"rule:create_network:{admin_only}")
    ntype = req.network_type or ("flat" if req.physical_network else "geneve")
    if ntype == "flat" and req.segmentation_id is not None:
        raise bad_request("provider:segmentation_id is not allowed for flat networks")
    data: dict[str, Any] = {
        "topic": topic, "name": req.name, "description": req.description,
        "admin_state_up": req.admin_state_up, "shared": req.shared,
        "mtu": req.mtu or (1500 if ntype == "flat" else 1442), "external": req.router_external,
        "network_type": ntype, "physical_network": req.physical_network,
        "port_security_enabled": req.port_security_enabled,
        "tunnel_key": req.segmentation_id or 0,
    }
    net = await nb.create(parse(LogicalSwitch, data))
    return {"network": render(net, [])}


@router.put("/v2.0/networks/{network_id}")
async def update_network(network_id: str, body: NetworkUpdateBody, nb: NB,
                         ctx: Ctx) -> dict[str, Any]:
    req = body.network
    await load_own_network(nb, network_id, ctx, "rule:update_network")
    if {"shared", "router_external"} & req.model_fields_set:
        ctx.require_admin("rule:update_network:shared")
    changes = req.model_dump(exclude_unset=True, exclude_none=True)
    if "router_external" in changes:
        changes["external"] = changes.pop("router_external")
    net = await nb.modify(LogicalSwitch, network_id, lambda n: rebuild(n, **changes))
    subnets = await _subnet_ids(nb, net.id)
    return {"network": render(net, subnets.get(net.id, []))}


@router.delete("/v2.0/networks/{network_id}", status_code=204)
async def delete_network(network_id: str, nb: NB, ctx: Ctx) -> Response:
    """Refused while ports remain (NetworkInUse); the network's subnets go with it."""
    await load_own_network(nb, network_id, ctx, "rule:delete_network")
    ports = await nb.list(LogicalPort, where={"network_id": network_id})
    if ports:
        raise conflict("NetworkInUse", f"Unable to complete operation on network {network_id}. "
                       f"There are one or more ports still in use on the network "
                       f"({len(ports)}, e.g. {ports[0].id}).")
    for subnet in await nb.list(Subnet, where={"network_id": network_id}):
        await nb.delete(Subnet, subnet.id)
    await nb.delete(LogicalSwitch, network_id)
    return Response(status_code=204)
