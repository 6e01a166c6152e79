"""What every resource module shares: dependencies, visibility, rendering of common fields."""

from __future__ import annotations

from typing import Annotated, Any, TypeVar

from fastapi import Depends, Request
from pydantic import BaseModel, ConfigDict, Field

from ferry.api.auth import Context
from ferry.api.errors import forbidden, invalid_input, not_found
from ferry.model.northbound import Northbound, parse
from ferry.model.objects import FieldError, LogicalSwitch, NbObject, check_profile

T = TypeVar("T", bound=NbObject)


async def _nb(request: Request) -> Northbound:
    nb: Northbound = request.app.state.nb
    return nb


async def _context(request: Request) -> Context:
    ctx: Context = await request.app.state.auth(request)
    return ctx


NB = Annotated[Northbound, Depends(_nb)]
Ctx = Annotated[Context, Depends(_context)]


class Body(BaseModel):
    """A request body's resource: unknown attributes are refused (400), aliases allowed."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class Owned(Body):
    """Create bodies: the owning project, which only an admin may set to another one."""

    project_id: str | None = Field(default=None, min_length=1, max_length=255, pattern=r"^[^/\s]")
    tenant_id: str | None = Field(default=None, min_length=1, max_length=255, pattern=r"^[^/\s]")


def rebuild(obj: T, **changes: Any) -> T:
    """``obj`` with ``changes``, validated again (model_copy would not validate)."""
    data = obj.model_dump(mode="json")
    data.update({k: (v.model_dump(mode="json") if isinstance(v, BaseModel) else v)
                 for k, v in changes.items()})
    return parse(type(obj), data)


def common_fields(obj: NbObject) -> dict[str, Any]:
    return {
        "id": obj.id,
        "name": obj.name,
        "description": getattr(obj, "description", ""),
        "project_id": obj.topic,
        "tenant_id": obj.topic,
        "revision_number": obj.version,
        "tags": [],
    }


def network_visible(ctx: Context, net: LogicalSwitch) -> bool:
    """Own networks, shared ones and external ones (for floating IPs and gateways)."""
    return ctx.owns(net.topic) or net.shared or net.external


async def load(nb: Northbound, cls: type[T], id: str, ctx: Context) -> T:
    """An object the caller may see, or the resource's 404."""
    obj = await nb.get(cls, id)
    if obj is None or not ctx.owns(obj.topic):
        raise not_found(cls.TABLE, id)
    return obj


async def load_network(nb: Northbound, id: str, ctx: Context) -> LogicalSwitch:
    net = await nb.get(LogicalSwitch, id)
    if net is None or not network_visible(ctx, net):
        raise not_found("network", id)
    return net


async def load_own_network(nb: Northbound, id: str, ctx: Context, action: str) -> LogicalSwitch:
    """A network the caller may change: 404 if invisible, 403 if visible but another's."""
    net = await load_network(nb, id, ctx)
    if not ctx.owns(net.topic):
        raise forbidden(action)
    return net


def check_binding_profile(profile: dict[str, Any] | None) -> None:
    """A requested binding:profile: Ferry's own keys must hold one of their values."""
    try:
        check_profile(profile or {}, "binding:profile")
    except FieldError as e:
        raise invalid_input(f"Invalid input for binding:profile: {e}") from None
