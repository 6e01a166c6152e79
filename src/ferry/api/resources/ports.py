"""/v2.0/ports: fixed IP allocation, MAC generation, security groups and bindings.

See ``ferry.api.resources.portdata`` for how Neutron's ``binding:*`` attributes map onto
``LogicalPort.bindings``. Writes go through ``Northbound``: creates claim their IPs and MAC
atomically (an automatically chosen IP or MAC that a concurrent request took is chosen again),
updates are compare-and-swap retried by ``Northbound.modify``.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter, Request, Response
from pydantic import Field

from ferry.api import ipam, query
from ferry.api.errors import ApiError, bad_request, conflict, forbidden
from ferry.api.resources import portdata
from ferry.api.resources.common import (
    NB,
    Body,
    Ctx,
    Owned,
    check_binding_profile,
    load,
    load_network,
    rebuild,
)
from ferry.api.resources.portdata import FixedIPReq, PairReq, VnicName
from ferry.api.resources.secgroups import check_groups, ensure_default
from ferry.model.northbound import InUse, Northbound, parse
from ferry.model.objects import (
    FloatingIP,
    LogicalPort,
    LogicalRouter,
    LogicalSwitch,
    PortBinding,
    Subnet,
    VnicType,
    normalize_mac,
)

log = logging.getLogger(__name__)
router = APIRouter(tags=["ports"])
ATTEMPTS = 20


class PortCreate(Owned):
    network_id: str = Field(min_length=1, max_length=255)
    name: str = Field(default="", max_length=255)
    description: str = Field(default="", max_length=255)
    admin_state_up: bool = True
    mac_address: str | None = Field(default=None, max_length=32)
    fixed_ips: list[FixedIPReq] | None = Field(default=None, max_length=32)
    device_owner: str = Field(default="", max_length=255)
    device_id: str = Field(default="", max_length=255)
    security_groups: list[str] | None = Field(default=None, max_length=32)
    port_security_enabled: bool | None = None
    allowed_address_pairs: list[PairReq] = Field(default_factory=list, max_length=32)
    binding_host_id: str | None = Field(default=None, alias="binding:host_id", max_length=255)
    binding_profile: dict[str, Any] | None = Field(default=None, alias="binding:profile")
    binding_vnic_type: VnicName | None = Field(default=None, alias="binding:vnic_type")


class PortUpdate(Body):
    name: str | None = Field(default=None, max_length=255)
    description: str | None = Field(default=None, max_length=255)
    admin_state_up: bool | None = None
    mac_address: str | None = Field(default=None, max_length=32)
    fixed_ips: list[FixedIPReq] | None = Field(default=None, max_length=32)
    device_owner: str | None = Field(default=None, max_length=255)
    device_id: str | None = Field(default=None, max_length=255)
    security_groups: list[str] | None = Field(default=None, max_length=32)
    port_security_enabled: bool | None = None
    allowed_address_pairs: list[PairReq] | None = Field(default=None, max_length=32)
    binding_host_id: str | None = Field(default=None, alias="binding:host_id", max_length=255)
    binding_profile: dict[str, Any] | None = Field(default=None, alias="binding:profile")
    binding_vnic_type: VnicName | None = Field(default=None, alias="binding:vnic_type")


class PortCreateBody(Body):
    port: PortCreate


class PortUpdateBody(Body):
    port: PortUpdate


# -- addresses --------------------------------------------------------------------------------

async def resolve_fixed_ips(
    nb: Northbound, net: LogicalSwitch, requested: list[FixedIPReq] | None,
    keep: frozenset[str] = frozenset(), attempt: int = 0,
) -> list[dict[str, str]]:
    """fixed_ips for a port on ``net``: requested ones checked, missing addresses allocated.

    ``keep``: addresses the port already holds (on update), which are not "in use";
    ``attempt``: how many times a concurrent request took the address chosen before.
    """
    subnets = await nb.list(Subnet, where={"network_id": net.id})
    used = {ip for ip in await ipam.used_addresses(nb, net.id) if str(ip) not in keep}
    if requested is None:
        for version in (4, 6):
            for subnet in (s for s in subnets if s.cidr.version == version):
                ip = ipam.first_free(subnet, used, attempt)
                if ip is not None:
                    return [{"subnet_id": subnet.id, "ip_address": str(ip)}]
        if subnets:
            ipam.allocate(subnets[0], used)  # raises IpAddressGenerationFailure
        return []
    by_id = {s.id: s for s in subnets}
    out: list[dict[str, str]] = []
    for i, req in enumerate(requested):
        where = f"fixed_ips.{i}"
        if req.subnet_id is None and req.ip_address is None:
            raise bad_request(f"{where}: needs subnet_id or ip_address")
        if req.subnet_id is not None and req.subnet_id not in by_id:
            raise bad_request(f"Failed to create port on network {net.id}, because "
                              f"fixed_ips included invalid subnet {req.subnet_id}")
        if req.ip_address is None:
            assert req.subnet_id is not None
            ip = ipam.allocate(by_id[req.subnet_id], used, attempt)
            out.append({"subnet_id": req.subnet_id, "ip_address": str(ip)})
            continue
        ip = ipam.parse_ip(req.ip_address, f"{where}.ip_address")
        if req.subnet_id is None:
            match = next((s for s in subnets if ip in s.cidr), None)
            if match is None:
                raise bad_request(f"IP address {ip} is not a valid IP for any of the subnets "
                                  f"on network {net.id}")
            subnet_id = match.id
        else:
            subnet_id = req.subnet_id
            cidr = by_id[subnet_id].cidr
            if ip not in cidr:
                raise bad_request(f"{where}.ip_address: {ip} is outside subnet {subnet_id} "
                                  f"({cidr})")
        cidr = by_id[subnet_id].cidr
        if cidr.version == 4 and cidr.prefixlen < 31 and ip in (cidr.network_address,
                                                                cidr.broadcast_address):
            raise bad_request(f"{where}.ip_address: {ip} is the network or broadcast address "
                              f"of {cidr}")
        if ip in used:
            raise conflict("IpAddressAlreadyAllocated", f"IP address {ip} already allocated "
                           f"in subnet {subnet_id}")
        used.add(ip)
        out.append({"subnet_id": subnet_id, "ip_address": str(ip)})
    return out


async def create_with_retry(nb: Northbound, build: Callable[[int], Awaitable[LogicalPort]],
                            auto_ip: bool, auto_mac: bool,
                            first: LogicalPort | None = None) -> LogicalPort:
    """Write a new port; automatically chosen values a concurrent writer took are re-chosen.

    ``build(attempt)`` makes the port afresh (reading the addresses in use again); ``first``
    is an already built first attempt."""
    for attempt in range(ATTEMPTS):
        port = first if attempt == 0 and first is not None else await build(attempt)
        try:
            return await nb.create(port)
        except InUse as e:
            if (e.field == "fixed_ips" and auto_ip) or (e.field == "mac" and auto_mac):
                log.debug("port %s: %s taken concurrently, choosing again", port.id, e.field)
                continue
            raise
    raise conflict("IpAddressGenerationFailure", "could not allocate a free address or MAC "
                   f"after {ATTEMPTS} attempts under contention")


async def check_mac_free(nb: Northbound, network_id: str, mac: str, port_id: str = "") -> None:
    holder = await nb.store.claim_holder(f"mac/{network_id}/{mac}")
    if holder is not None and holder != f"port/{port_id}":
        raise conflict("MacAddressInUse", f"Unable to complete operation for network "
                       f"{network_id}. The mac address {mac} is in use.")


def _mac(value: str) -> str:
    try:
        return normalize_mac(value)
    except ValueError as e:
        raise bad_request(f"mac_address: {e}") from None


# -- routes -----------------------------------------------------------------------------------

def _fixed_ip_filter(item: dict[str, Any], wanted: list[str]) -> bool:
    for w in wanted:
        key, _, value = w.partition("=")
        for f in item.get("fixed_ips", []):
            if key == "ip_address_substr" and value in f["ip_address"]:
                return True
            if key in ("ip_address", "subnet_id") and f[key] == value:
                return True
    return False


@router.get("/v2.0/ports")
async def list_ports(request: Request, nb: NB, ctx: Ctx) -> dict[str, Any]:
    topic = None if ctx.is_admin else ctx.project_id
    where = None
    if "network_id" in request.query_params and len(
            request.query_params.getlist("network_id")) == 1:
        where = {"network_id": request.query_params["network_id"]}
    items = [portdata.render(p) for p in await nb.list(LogicalPort, topic=topic, where=where)]
    return query.apply(request, items, "ports", {"fixed_ips": _fixed_ip_filter})


@router.get("/v2.0/ports/{port_id}")
async def show_port(port_id: str, request: Request, nb: NB, ctx: Ctx) -> dict[str, Any]:
    port = await load(nb, LogicalPort, port_id, ctx)
    return {"port": query.project(portdata.render(port), query.fields_of(request))}


@router.post("/v2.0/ports", status_code=201)
async def create_port(body: PortCreateBody, nb: NB, ctx: Ctx) -> dict[str, Any]:
    req = body.port
    topic = ctx.project_for(req.project_id, req.tenant_id, "port")
    net = await load_network(nb, req.network_id, ctx)
    if not (ctx.owns(net.topic) or net.shared):
        raise forbidden("rule:create_port:network")
    for attr in ("binding_host_id", "binding_profile"):
        if getattr(req, attr) is not None:
            ctx.require_admin(f"rule:create_port:{attr.replace('_', ':', 1)}")
    secure = net.port_security_enabled if req.port_security_enabled is None else (
        req.port_security_enabled)
    groups = req.security_groups
    if groups is not None:
        await check_groups(nb, ctx, groups, topic)
    mac = None if req.mac_address is None else _mac(req.mac_address)
    if mac is not None:
        await check_mac_free(nb, net.id, mac)
    pairs = portdata.pairs_doc(req.allowed_address_pairs)
    vnic = VnicType(req.binding_vnic_type or "normal")
    profile = req.binding_profile or {}
    check_binding_profile(profile)
    bindings = [PortBinding(host=req.binding_host_id, vnic_type=vnic, profile=profile)
                ] if req.binding_host_id else []

    async def build(attempt: int) -> LogicalPort:
        fixed = await resolve_fixed_ips(nb, net, req.fixed_ips, attempt=attempt)
        return parse(LogicalPort, {
            "topic": topic, "network_id": net.id, "name": req.name,
            "description": req.description, "admin_state_up": req.admin_state_up,
            "mac": mac or ipam.random_mac(), "fixed_ips": fixed,
            "device_owner": req.device_owner, "device_id": req.device_id,
            "port_security_enabled": secure, "security_groups": sg_ids,
            "allowed_address_pairs": pairs, "vnic_type": vnic, "binding_profile": profile,
            "bindings": [b.model_dump(mode="json") for b in bindings]})

    sg_ids: list[str] = groups or []
    first = await build(0)  # validate everything before the default group may be created
    if groups is None and secure and not req.device_owner.startswith("network:"):
        sg_ids = [(await ensure_default(nb, topic)).id]
        first = rebuild(first, security_groups=sg_ids)
    auto_ip = req.fixed_ips is None or any(f.ip_address is None for f in req.fixed_ips)
    port = await create_with_retry(nb, build, auto_ip, mac is None, first)
    return {"port": portdata.render(port)}


@router.put("/v2.0/ports/{port_id}")
async def update_port(port_id: str, body: PortUpdateBody, nb: NB, ctx: Ctx) -> dict[str, Any]:
    req = body.port
    port = await load(nb, LogicalPort, port_id, ctx)
    sent = req.model_fields_set
    for attr in ("binding_host_id", "binding_profile", "mac_address"):
        if attr in sent:
            ctx.require_admin(f"rule:update_port:{attr.replace('_', ':', 1)}")
    if req.security_groups is not None:
        await check_groups(nb, ctx, req.security_groups, port.topic)
    net = await nb.must_get(LogicalSwitch, port.network_id, "network_id", "port")
    mac = None if req.mac_address is None else _mac(req.mac_address)
    if mac is not None:
        await check_mac_free(nb, net.id, mac, port.id)
    pairs = None if req.allowed_address_pairs is None else portdata.pairs_doc(
        req.allowed_address_pairs)

    async def change(p: LogicalPort) -> LogicalPort:
        changes: dict[str, Any] = {}
        for key in ("name", "description", "admin_state_up", "device_owner", "device_id",
                    "port_security_enabled", "security_groups"):
            value = getattr(req, key)
            if value is not None:
                changes[key] = value
        if mac is not None and mac != p.mac:
            if p.active_binding is not None:
                raise conflict("PortBound", f"Unable to complete operation on port {p.id}, "
                               "port is already bound; the MAC address cannot be changed.")
            changes["mac"] = mac
        if pairs is not None:
            changes["allowed_address_pairs"] = pairs
        if req.fixed_ips is not None:
            keep = frozenset(str(f.ip_address) for f in p.fixed_ips)
            changes["fixed_ips"] = await resolve_fixed_ips(nb, net, req.fixed_ips, keep)
        if changes.get("port_security_enabled") is False:
            groups = changes.get("security_groups", p.security_groups)
            if groups:
                raise conflict("PortSecurityPortHasSecurityGroup", "Port has security group "
                               "associated. Cannot disable port security until security "
                               "group is removed")
        if "binding_host_id" in sent:
            changes.update(portdata.move_binding(p, req.binding_host_id))
        vnic = None if req.binding_vnic_type is None else VnicType(req.binding_vnic_type)
        profile = req.binding_profile if "binding_profile" in sent else None
        if "binding_profile" in sent and profile is None:
            profile = {}
        check_binding_profile(profile)
        portdata.set_binding_attrs(p, changes, vnic, profile)
        return rebuild(p, **changes) if changes else p

    updated = await nb.modify(LogicalPort, port_id, change)
    return {"port": portdata.render(updated)}


@router.delete("/v2.0/ports/{port_id}", status_code=204)
async def delete_port(port_id: str, nb: NB, ctx: Ctx) -> Response:
    """Router ports are refused (remove the interface instead); floating IPs are released."""
    port = await load(nb, LogicalPort, port_id, ctx)
    await refuse_router_port(nb, port)
    for fip in await nb.list(FloatingIP, where={"port_id": port_id}):
        await nb.modify(FloatingIP, fip.id, lambda f: rebuild(
            f, port_id=None, fixed_ip_address=None, router_id=None))
    await nb.delete(LogicalPort, port_id)
    return Response(status_code=204)


async def refuse_router_port(nb: Northbound, port: LogicalPort) -> None:
    for r in await nb.list(LogicalRouter):
        if any(rp.port_id == port.id for rp in r.ports) or (
                r.gateway is not None and r.gateway.port_id == port.id):
            raise ApiError(409, "L3PortInUse", f"Port {port.id} cannot be deleted directly via "
                           f"the port API: has device owner {port.device_owner} (router "
                           f"{r.id}).")

