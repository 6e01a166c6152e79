"""Who is calling: ``X-Auth-Token`` checked against the configured tokens, or ``--noauth``.

A member acts in its own project only: other projects' objects are invisible (404, as Neutron
answers). An admin sees every project and may create objects for another project by giving
``project_id`` (or ``tenant_id``) in the request body. With ``--noauth`` (which must be asked
for explicitly) every request is an admin of the configured default project.
"""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request

from ferry.api.config import ApiConfig
from ferry.api.errors import ApiError, bad_request, forbidden


@dataclass(frozen=True, slots=True)
class Context:
    project_id: str
    user: str
    is_admin: bool

    def owns(self, topic: str) -> bool:
        """May act on objects of this project."""
        return self.is_admin or topic == self.project_id

    def project_for(self, project_id: str | None, tenant_id: str | None, what: str) -> str:
        """The project a new object belongs to (admins may name another one)."""
        if project_id is not None and tenant_id is not None and project_id != tenant_id:
            raise bad_request("project_id and tenant_id do not match")
        wanted = project_id if project_id is not None else tenant_id
        if wanted is None or wanted == self.project_id:
            return self.project_id
        if not self.is_admin:
            raise forbidden(f"rule:create_{what}:project_id")
        return wanted

    def require_admin(self, action: str) -> None:
        if not self.is_admin:
            raise forbidden(action)


class Authenticator:
    """Turns a request into a ``Context`` (a FastAPI dependency)."""

    def __init__(self, config: ApiConfig, noauth: bool) -> None:
        self.config, self.noauth = config, noauth

    async def __call__(self, request: Request) -> Context:
        if self.noauth:
            return Context(self.config.default_project, "noauth", True)
        token = request.headers.get("x-auth-token")
        if not token:
            raise ApiError(401, "HTTPUnauthorized", "Authentication required: no X-Auth-Token")
        entry = self.config.token(token)
        if entry is None:
            raise ApiError(401, "HTTPUnauthorized", "Authentication failed: unknown token")
        return Context(entry.project_id, entry.user, entry.is_admin)
