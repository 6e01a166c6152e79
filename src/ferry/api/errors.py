"""Errors in Neutron's wire format: ``{"NeutronError": {"type", "message", "detail"}}``.

Handlers turn every exception the API can meet into that format with Neutron's status code and
type name: our own ``ApiError``s, the model's ``InvalidObject``/``InUse`` (mapped by table and
field), the store's ``NotFound``/``Conflict``, request validation errors (400, as Neutron does,
not FastAPI's 422) and Starlette's routing errors (404/405). Anything else is a bug: it is
logged with its traceback and answered 500 ``InternalError``.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ferry.model.northbound import InUse, InvalidObject
from ferry.store.base import Conflict, NotFound, StoreUnavailable

log = logging.getLogger(__name__)


class ApiError(Exception):
    """An error answered in Neutron's format."""

    def __init__(self, status: int, type: str, message: str, detail: str = "") -> None:
        super().__init__(message)
        self.status, self.type, self.message, self.detail = status, type, message, detail


# Neutron's "not found" types and messages, by resource.
_NOT_FOUND = {
    "network": ("NetworkNotFound", "Network {} could not be found."),
    "subnet": ("SubnetNotFound", "Subnet {} could not be found."),
    "port": ("PortNotFound", "Port {} could not be found."),
    "router": ("RouterNotFound", "Router {} could not be found"),
    "floatingip": ("FloatingIPNotFound", "Floating IP {} could not be found"),
    "secgroup": ("SecurityGroupNotFound", "Security group {} does not exist"),
    "secgrouprule": ("SecurityGroupRuleNotFound", "Security group rule {} does not exist"),
}

# The field names the model uses, as Neutron's API spells them.
_FIELD_NAMES = {"mac": "mac_address", "topic": "project_id", "gateway": "external_gateway_info",
                "tunnel_key": "provider:segmentation_id", "bindings": "binding:host_id",
                "binding_profile": "binding:profile", "vnic_type": "binding:vnic_type"}


def not_found(table: str, id: str) -> ApiError:
    type_, msg = _NOT_FOUND.get(table, ("NotFound", table + " {} could not be found."))
    return ApiError(404, type_, msg.format(id))


def bad_request(message: str) -> ApiError:
    return ApiError(400, "BadRequest", f"Bad request: {message}")


def invalid_input(message: str) -> ApiError:
    return ApiError(400, "InvalidInput", f"Invalid input for operation: {message}")


def conflict(type_: str, message: str) -> ApiError:
    return ApiError(409, type_, message)


def forbidden(action: str) -> ApiError:
    return ApiError(403, "PolicyNotAuthorized", f"({action}) is disallowed by policy")


def neutron_field(field: str) -> str:
    head, _, rest = field.partition(".")
    name = _FIELD_NAMES.get(head, head)
    return f"{name}.{rest}" if rest else name


def from_model_error(e: InvalidObject) -> ApiError:
    """A model error as Neutron would report it."""
    field = neutron_field(e.field)
    if isinstance(e, InUse):
        if e.field == "id":
            type_ = {"network": "NetworkInUse", "subnet": "SubnetInUse", "port": "PortInUse",
                     "secgroup": "SecurityGroupInUse", "router": "RouterInUse"}.get(
                e.table, "InUse")
            return conflict(type_, e.reason)
        if e.field == "fixed_ips":
            return conflict("IpAddressAlreadyAllocated", f"IP address {e.reason}")
        if e.field == "mac":
            return conflict("MacAddressInUse", f"MAC address {e.reason}")
        if e.field == "cidr":
            return invalid_input(e.reason)
        return conflict("Conflict", f"{field}: {e.reason}")
    if e.reason.endswith("does not exist"):
        # A reference to a missing object: Neutron reports the missing object (404).
        table, _, rest = e.reason.partition(" ")
        return not_found(table, rest.removesuffix(" does not exist"))
    return invalid_input(f"Invalid input for {field}: {e.reason}")


def _body(e: ApiError) -> dict[str, Any]:
    return {"NeutronError": {"type": e.type, "message": e.message, "detail": e.detail}}


def error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(_body(e), status_code=e.status)


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors()[:3]:
        loc = [str(p) for p in err.get("loc", ()) if p not in ("body",)]
        where = ".".join(loc[1:] if loc and loc[0] in ("query", "path") else loc)
        msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        parts.append(f"{where}: {msg}" if where else msg)
    more = len(exc.errors()) - 3
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")


def install(app: FastAPI) -> None:
    """Register the handlers that answer every error in Neutron's format."""

    @app.exception_handler(ApiError)
    async def _api(_: Request, e: ApiError) -> JSONResponse:
        return error_response(e)

    @app.exception_handler(InvalidObject)
    async def _model(_: Request, e: InvalidObject) -> JSONResponse:
        return error_response(from_model_error(e))

    @app.exception_handler(NotFound)
    async def _missing(_: Request, e: NotFound) -> JSONResponse:
        return error_response(not_found(e.table, e.id))

    @app.exception_handler(Conflict)
    async def _cas(_: Request, e: Conflict) -> JSONResponse:
        # Only after Northbound.modify ran out of retries, or a create raced a delete.
        return error_response(conflict("Conflict", f"Concurrent modification: {e}"))

    @app.exception_handler(StoreUnavailable)
    async def _down(_: Request, e: StoreUnavailable) -> JSONResponse:
        log.error("store unavailable: %s", e)
        return error_response(ApiError(503, "ServiceUnavailable", str(e)))

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        return error_response(bad_request(_validation_message(e)))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, e: StarletteHTTPException) -> JSONResponse:
        names = {404: "HTTPNotFound", 405: "HTTPMethodNotAllowed", 401: "HTTPUnauthorized"}
        type_ = names.get(e.status_code, f"HTTP{e.status_code}")
        return JSONResponse(_body(ApiError(e.status_code, type_, str(e.detail))),
                            status_code=e.status_code, headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def _bug(request: Request, e: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(ApiError(500, "InternalError", "Request failed: internal error"))
