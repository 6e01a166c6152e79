"""Version discovery (``/``, ``/v2.0``) and ``/v2.0/extensions``: what Ferry supports."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from ferry.api.errors import ApiError
from ferry.api.resources.common import Ctx

router = APIRouter(tags=["extensions"])

UPDATED = "2024-01-01T00:00:00-00:00"
EXTENSIONS: dict[str, tuple[str, str]] = {
    "allowed-address-pairs": ("Allowed Address Pairs", "Extra addresses a port may use"),
    "binding": ("Port Binding", "binding:host_id, binding:profile, binding:vif_type..."),
    "binding-extended": ("Port Bindings Extended", "Several bindings per port (live "
                         "migration): /ports/{id}/bindings"),
    "external-net": ("Neutron external network", "router:external networks"),
    "ext-gw-mode": ("Neutron L3 Configurable external gateway mode", "enable_snat"),
    "extraroute": ("Neutron Extra Route", "Extra routes on routers"),
    "network-mtu": ("Network MTU", "The mtu of networks"),
    "pagination": ("Pagination support", "limit and marker"),
    "port-security": ("Port Security", "port_security_enabled"),
    "project-id": ("project_id field enabled", "project_id alongside tenant_id"),
    "provider": ("Provider Network", "provider:network_type (geneve, flat)..."),
    "router": ("Neutron L3 Router", "Routers, interfaces and floating IPs"),
    "security-group": ("security-group", "Security groups and rules"),
    "sorting": ("Sorting support", "sort_key and sort_dir"),
    "standard-attr-description": ("standard-attr-description", "description attributes"),
    "standard-attr-revisions": ("Resource revision numbers", "revision_number"),
    "filter-validation": ("Filter parameters validation", "unknown filters are a 400"),
}

COLLECTIONS = ["networks", "subnets", "ports", "routers", "floatingips", "security-groups",
               "security-group-rules", "extensions"]


def render(alias: str) -> dict[str, Any]:
    name, description = EXTENSIONS[alias]
    return {"alias": alias, "name": name, "description": description, "updated": UPDATED,
            "links": []}


@router.get("/")
async def versions(request: Request) -> dict[str, Any]:
    base = str(request.base_url)
    return {"versions": [{"id": "v2.0", "status": "CURRENT",
                          "links": [{"rel": "self", "href": f"{base}v2.0/"}]}]}


@router.get("/v2.0")
@router.get("/v2.0/")
async def resources(request: Request) -> dict[str, Any]:
    base = str(request.base_url)
    return {"resources": [
        {"name": c.rstrip("s").replace("-", "_"), "collection": c.replace("-", "_"),
         "links": [{"rel": "self", "href": f"{base}v2.0/{c}"}]} for c in COLLECTIONS]}


@router.get("/v2.0/extensions")
async def list_extensions(_: Ctx) -> dict[str, Any]:
    return {"extensions": [render(a) for a in sorted(EXTENSIONS)]}


@router.get("/v2.0/extensions/{alias}")
async def show_extension(alias: str, _: Ctx) -> dict[str, Any]:
    if alias not in EXTENSIONS:
        raise ApiError(404, "HTTPNotFound", f"Extension with alias {alias} does not exist")
    return {"extension": render(alias)}
