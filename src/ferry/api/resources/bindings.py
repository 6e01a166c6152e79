"""/v2.0/ports/{id}/bindings: Neutron's binding-extended API, as Nova's live migration uses it.

Semantics (see ``ferry.api.resources.portdata`` for the model mapping): one binding per host,
at most one ACTIVE binding per port. Only compute ports (device_owner ``compute:*``) take
bindings through this API, and only admins may use it (Nova calls it with an admin token).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from pydantic import Field

from ferry.api import query
from ferry.api.errors import ApiError, bad_request, conflict
from ferry.api.resources.common import NB, Body, Ctx, check_binding_profile, load, rebuild
from ferry.api.resources.portdata import VnicName, render_binding
from ferry.model.objects import BindingStatus, LogicalPort, PortBinding, VnicType

router = APIRouter(tags=["port-bindings"])


class BindingCreate(Body):
    host: str = Field(min_length=1, max_length=255, pattern=r"^[^/\s]+$")
    vnic_type: VnicName | None = None
    profile: dict[str, Any] = Field(default_factory=dict)


class BindingCreateBody(Body):
    binding: BindingCreate


def _binding_not_found(port_id: str, host: str) -> ApiError:
    return ApiError(404, "PortBindingNotFound",
                    f"Binding for port {port_id} for host {host} could not be found.")


async def _port(nb: NB, port_id: str, ctx: Ctx, action: str) -> LogicalPort:
    port = await load(nb, LogicalPort, port_id, ctx)
    ctx.require_admin(f"rule:{action}")
    return port


@router.get("/v2.0/ports/{port_id}/bindings")
async def list_bindings(port_id: str, request: Request, nb: NB, ctx: Ctx) -> dict[str, Any]:
    port = await _port(nb, port_id, ctx, "get_port_binding")
    items = [{"id": b.host, **render_binding(b)} for b in port.bindings]
    body = query.apply(request, items, "bindings")
    for item in body["bindings"]:
        item.pop("id", None)
    return body


@router.post("/v2.0/ports/{port_id}/bindings", status_code=201)
async def create_binding(port_id: str, body: BindingCreateBody, nb: NB,
                         ctx: Ctx) -> dict[str, Any]:
    req = body.binding
    port = await _port(nb, port_id, ctx, "create_port_binding")
    check_binding_profile(req.profile)
    if not port.device_owner.startswith("compute:"):
        raise bad_request(f"Port {port_id} is not a compute port (device_owner "
                          f"{port.device_owner!r}); port bindings are for compute ports")

    def change(p: LogicalPort) -> LogicalPort:
        if p.binding_for(req.host) is not None:
            raise conflict("PortBindingAlreadyExists",
                           f"Binding for port {p.id} on host {req.host} already exists.")
        active = p.active_binding
        status = BindingStatus.INACTIVE if active is not None else BindingStatus.ACTIVE
        vnic = VnicType(req.vnic_type) if req.vnic_type else (
            active.vnic_type if active else p.vnic_type)
        new = PortBinding(host=req.host, vnic_type=vnic, profile=req.profile, status=status)
        return rebuild(p, bindings=[b.model_dump(mode="json") for b in (*p.bindings, new)])

    updated = await nb.modify(LogicalPort, port.id, change)
    binding = updated.binding_for(req.host)
    assert binding is not None
    return {"binding": render_binding(binding)}


@router.put("/v2.0/ports/{port_id}/bindings/{host}/activate")
async def activate_binding(port_id: str, host: str, nb: NB, ctx: Ctx) -> dict[str, Any]:
    await _port(nb, port_id, ctx, "activate")

    def change(p: LogicalPort) -> LogicalPort:
        target = p.binding_for(host)
        if target is not None and target.status is BindingStatus.ACTIVE:
            raise conflict("PortBindingAlreadyActive",
                           f"Binding for port {p.id} on host {host} is already active.")
        if target is None:
            raise _binding_not_found(p.id, host)
        out = []
        for b in p.bindings:
            status = BindingStatus.ACTIVE if b.host == host else BindingStatus.INACTIVE
            out.append({**b.model_dump(mode="json"), "status": status.value})
        return rebuild(p, bindings=out)

    updated = await nb.modify(LogicalPort, port_id, change)
    binding = updated.binding_for(host)
    assert binding is not None
    return {"binding": render_binding(binding)}


@router.delete("/v2.0/ports/{port_id}/bindings/{host}", status_code=204)
async def delete_binding(port_id: str, host: str, nb: NB, ctx: Ctx) -> Response:
    await _port(nb, port_id, ctx, "delete_port_binding")

    def change(p: LogicalPort) -> LogicalPort:
        b = p.binding_for(host)
        if b is None or b.status is BindingStatus.ACTIVE:
            raise _binding_not_found(p.id, host)
        keep = [x.model_dump(mode="json") for x in p.bindings if x.host != host]
        return rebuild(p, bindings=keep)

    await nb.modify(LogicalPort, port_id, change)
    return Response(status_code=204)
