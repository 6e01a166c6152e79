"""/v2.0/security-groups and /v2.0/security-group-rules, with the per-project default group.

The default group is created on first use (listing or creating groups, creating a port) with
Neutron's default rules: all egress (IPv4 and IPv6) and ingress from members of the group.
Its id and its rules' ids are derived from the project id, so concurrent first uses create it
once. A member cannot delete its default group; deleting a group deletes its rules.
"""

from __future__ import annotations

import ipaddress
import uuid
from typing import Any, Literal

from fastapi import APIRouter, Request, Response
from pydantic import Field

from ferry.api import query
from ferry.api.auth import Context
from ferry.api.errors import bad_request, conflict, not_found
from ferry.api.resources.common import NB, Body, Ctx, Owned, common_fields, load, rebuild
from ferry.model.northbound import Northbound, parse
from ferry.model.objects import LogicalPort, SecurityGroup, SecurityGroupRule
from ferry.store.base import AlreadyExists

router = APIRouter(tags=["security-groups"])
_NS = uuid.UUID("6f1c2a7e-3c1b-4f0e-9a55-0c7d2a3e5b10")


def default_group_id(project: str) -> str:
    return str(uuid.uuid5(_NS, f"default-sg/{project}"))


async def ensure_default(nb: Northbound, project: str) -> SecurityGroup:
    """The project's default security group, created with its rules if missing."""
    sg_id = default_group_id(project)
    sg = await nb.get(SecurityGroup, sg_id)
    if sg is not None:
        return sg
    sg = SecurityGroup(id=sg_id, topic=project, name="default",
                       description="Default security group")
    try:
        sg = await nb.create(sg)
    except AlreadyExists:
        return await nb.must_get(SecurityGroup, sg_id, "security_groups", "port")
    rules = [("egress", "IPv4", None), ("egress", "IPv6", None),
             ("ingress", "IPv4", sg_id), ("ingress", "IPv6", sg_id)]
    for i, (direction, ethertype, remote) in enumerate(rules):
        rule = parse(SecurityGroupRule, {
            "id": str(uuid.uuid5(_NS, f"default-sg/{project}/{i}")), "topic": project,
            "security_group_id": sg_id, "direction": direction, "ethertype": ethertype,
            "remote_group_id": remote})
        try:
            await nb.create(rule)
        except AlreadyExists:
            continue
    return sg


class GroupCreate(Owned):
    name: str = Field(default="", max_length=255)
    description: str = Field(default="", max_length=255)
    stateful: Literal[True] = True


class GroupUpdate(Body):
    name: str | None = Field(default=None, max_length=255)
    description: str | None = Field(default=None, max_length=255)


class GroupCreateBody(Body):
    security_group: GroupCreate


class GroupUpdateBody(Body):
    security_group: GroupUpdate


class RuleCreate(Owned):
    security_group_id: str = Field(min_length=1, max_length=255)
    direction: Literal["ingress", "egress"]
    ethertype: Literal["IPv4", "IPv6"] = "IPv4"
    protocol: str | int | None = Field(default=None)
    port_range_min: int | None = Field(default=None, ge=0, le=65535)
    port_range_max: int | None = Field(default=None, ge=0, le=65535)
    remote_ip_prefix: str | None = Field(default=None, max_length=64)
    remote_group_id: str | None = Field(default=None, min_length=1, max_length=255)
    description: str = Field(default="", max_length=255)


class RuleCreateBody(Body):
    security_group_rule: RuleCreate


def render_rule(r: SecurityGroupRule) -> dict[str, Any]:
    out = common_fields(r)
    del out["name"]
    return {
        **out,
        "security_group_id": r.security_group_id,
        "direction": r.direction.value,
        "ethertype": r.ethertype,
        "protocol": r.protocol,
        "port_range_min": r.port_range_min,
        "port_range_max": r.port_range_max,
        "remote_ip_prefix": None if r.remote_ip_prefix is None else str(r.remote_ip_prefix),
        "normalized_cidr": None if r.remote_ip_prefix is None else str(r.remote_ip_prefix),
        "remote_group_id": r.remote_group_id,
        "remote_address_group_id": None,
        "belongs_to_default_sg": r.security_group_id == default_group_id(r.topic),
    }


def render_group(sg: SecurityGroup, rules: list[SecurityGroupRule]) -> dict[str, Any]:
    return {**common_fields(sg), "stateful": True, "shared": False,
            "security_group_rules": [render_rule(r) for r in rules]}


async def _rules_by_group(nb: Northbound, sg_id: str | None = None) -> dict[str, list[Any]]:
    where = None if sg_id is None else {"security_group_id": sg_id}
    out: dict[str, list[SecurityGroupRule]] = {}
    for r in await nb.list(SecurityGroupRule, where=where):
        out.setdefault(r.security_group_id, []).append(r)
    return out


@router.get("/v2.0/security-groups")
async def list_groups(request: Request, nb: NB, ctx: Ctx) -> dict[str, Any]:
    await ensure_default(nb, ctx.project_id)
    rules = await _rules_by_group(nb)
    topic = None if ctx.is_admin else ctx.project_id
    items = [render_group(g, rules.get(g.id, []))
             for g in await nb.list(SecurityGroup, topic=topic)]
    return query.apply(request, items, "security_groups")


@router.get("/v2.0/security-groups/{sg_id}")
async def show_group(sg_id: str, request: Request, nb: NB, ctx: Ctx) -> dict[str, Any]:
    sg = await load(nb, SecurityGroup, sg_id, ctx)
    rules = await _rules_by_group(nb, sg.id)
    return {"security_group": query.project(render_group(sg, rules.get(sg.id, [])),
                                            query.fields_of(request))}


@router.post("/v2.0/security-groups", status_code=201)
async def create_group(body: GroupCreateBody, nb: NB, ctx: Ctx) -> dict[str, Any]:
    req = body.security_group
    topic = ctx.project_for(req.project_id, req.tenant_id, "security_group")
    if req.name == "default":
        raise conflict("SecurityGroupDefaultAlreadyExists",
                       "Default security group already exists.")
    sg = parse(SecurityGroup, {"topic": topic, "name": req.name, "description": req.description})
    await ensure_default(nb, topic)
    sg = await nb.create(sg)
    rules = []
    for ethertype in ("IPv4", "IPv6"):  # Neutron gives a new group its egress rules
        rules.append(await nb.create(parse(SecurityGroupRule, {
            "topic": topic, "security_group_id": sg.id, "direction": "egress",
            "ethertype": ethertype})))
    return {"security_group": render_group(sg, rules)}


@router.put("/v2.0/security-groups/{sg_id}")
async def update_group(sg_id: str, body: GroupUpdateBody, nb: NB, ctx: Ctx) -> dict[str, Any]:
    sg = await load(nb, SecurityGroup, sg_id, ctx)
    changes = body.security_group.model_dump(exclude_unset=True, exclude_none=True)
    if sg.id == default_group_id(sg.topic) and changes.get("name", "default") != "default":
        raise conflict("SecurityGroupCannotUpdateDefault", "Updating default security group "
                       "not allowed.")
    if changes.get("name") == "default" and sg.name != "default":
        raise conflict("SecurityGroupDefaultAlreadyExists",
                       "Default security group already exists.")
    sg = await nb.modify(SecurityGroup, sg_id, lambda g: rebuild(g, **changes))
    rules = await _rules_by_group(nb, sg.id)
    return {"security_group": render_group(sg, rules.get(sg.id, []))}


@router.delete("/v2.0/security-groups/{sg_id}", status_code=204)
async def delete_group(sg_id: str, nb: NB, ctx: Ctx) -> Response:
    sg = await load(nb, SecurityGroup, sg_id, ctx)
    if sg.id == default_group_id(sg.topic) and not ctx.is_admin:
        raise conflict("SecurityGroupCannotRemoveDefault",
                       "Removing default security group not allowed.")
    for port in await nb.list(LogicalPort):
        if sg_id in port.security_groups:
            raise conflict("SecurityGroupInUse",
                           f"Security Group {sg_id} in use (by port {port.id}).")
    for rule in await nb.list(SecurityGroupRule, where={"remote_group_id": sg_id}):
        if rule.security_group_id != sg_id:
            raise conflict("SecurityGroupInUse", f"Security Group {sg_id} in use (by rule "
                           f"{rule.id} of group {rule.security_group_id}).")
    for rule in await nb.list(SecurityGroupRule, where={"security_group_id": sg_id}):
        await nb.delete(SecurityGroupRule, rule.id)
    await nb.delete(SecurityGroup, sg_id)
    return Response(status_code=204)


# -- rules ------------------------------------------------------------------------------------

@router.get("/v2.0/security-group-rules")
async def list_rules(request: Request, nb: NB, ctx: Ctx) -> dict[str, Any]:
    topic = None if ctx.is_admin else ctx.project_id
    items = [render_rule(r) for r in await nb.list(SecurityGroupRule, topic=topic)]
    return query.apply(request, items, "security_group_rules")


@router.get("/v2.0/security-group-rules/{rule_id}")
async def show_rule(rule_id: str, request: Request, nb: NB, ctx: Ctx) -> dict[str, Any]:
    rule = await load(nb, SecurityGroupRule, rule_id, ctx)
    return {"security_group_rule": query.project(render_rule(rule), query.fields_of(request))}


def _protocol(value: str | int | None) -> str | None:
    if value is None:
        return None
    text = str(value).lower()
    if text in ("any", "0", ""):
        return None
    return {"ipv6-icmp": "icmpv6", "icmp6": "icmpv6"}.get(text, text)


def _same(a: SecurityGroupRule, b: SecurityGroupRule) -> bool:
    keys = ("direction", "ethertype", "protocol", "port_range_min", "port_range_max",
            "remote_ip_prefix", "remote_group_id")
    return all(getattr(a, k) == getattr(b, k) for k in keys)


@router.post("/v2.0/security-group-rules", status_code=201)
async def create_rule(body: RuleCreateBody, nb: NB, ctx: Ctx) -> dict[str, Any]:
    req = body.security_group_rule
    sg = await load(nb, SecurityGroup, req.security_group_id, ctx)
    topic = ctx.project_for(req.project_id, req.tenant_id, "security_group_rule")
    if topic != sg.topic:
        raise bad_request("a rule belongs to its security group's project")
    if req.remote_group_id is not None:
        await load(nb, SecurityGroup, req.remote_group_id, ctx)
    prefix = req.remote_ip_prefix
    if prefix is not None:
        try:
            net = ipaddress.ip_network(prefix, strict=False)
        except ValueError:
            raise bad_request(f"remote_ip_prefix {prefix!r} is not a CIDR") from None
        prefix = str(net)
    rule = parse(SecurityGroupRule, {
        "topic": sg.topic, "security_group_id": sg.id, "direction": req.direction,
        "ethertype": req.ethertype, "protocol": _protocol(req.protocol),
        "port_range_min": req.port_range_min, "port_range_max": req.port_range_max,
        "remote_ip_prefix": prefix, "remote_group_id": req.remote_group_id,
        "description": req.description})
    for other in await nb.list(SecurityGroupRule, where={"security_group_id": sg.id}):
        if _same(rule, other):
            raise conflict("SecurityGroupRuleExists",
                           f"Security group rule already exists. Rule id is {other.id}.")
    rule = await nb.create(rule)
    return {"security_group_rule": render_rule(rule)}


@router.delete("/v2.0/security-group-rules/{rule_id}", status_code=204)
async def delete_rule(rule_id: str, nb: NB, ctx: Ctx) -> Response:
    await load(nb, SecurityGroupRule, rule_id, ctx)
    await nb.delete(SecurityGroupRule, rule_id)
    return Response(status_code=204)


async def check_groups(nb: Northbound, ctx: Context, groups: list[str], project: str) -> None:
    """Every group exists and belongs to the port's project (else SecurityGroupNotFound)."""
    for sg_id in groups:
        sg = await nb.get(SecurityGroup, sg_id)
        if sg is None or sg.topic != project or not ctx.owns(sg.topic):
            raise not_found("secgroup", sg_id)


__all__ = ["bad_request", "check_groups", "ensure_default", "router"]
