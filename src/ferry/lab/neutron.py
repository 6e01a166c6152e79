"""A small Neutron API client for the lab's own tools (VM creation, migrations).

Tests and operators use openstacksdk; the lab only needs a handful of calls and must not
depend on a cloud config, so it speaks the REST API directly with httpx.
"""

from __future__ import annotations

from typing import Any

import httpx


class NeutronError(RuntimeError):
    """An API call failed; the message carries Neutron's error type and message."""

    def __init__(self, method: str, path: str, status: int, body: str) -> None:
        super().__init__(f"{method} {path}: HTTP {status}: {body}")
        self.status = status


class Neutron:
    def __init__(self, url: str, token: str | None = None, timeout: float = 10.0) -> None:
        headers = {"X-Auth-Token": token} if token else {}
        self.url = url.rstrip("/")
        self._http = httpx.AsyncClient(base_url=self.url, headers=headers, timeout=timeout)

    async def __aenter__(self) -> Neutron:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._http.aclose()

    async def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        resp = await self._http.request(method, f"/v2.0{path}", json=body)
        if resp.status_code >= 400:
            raise NeutronError(method, path, resp.status_code, resp.text)
        return resp.json() if resp.content else None

    async def get(self, kind: str, id: str) -> dict[str, Any]:
        out: dict[str, Any] = (await self.call("GET", f"/{kind}s/{id}"))[kind]
        return out

    async def create(self, kind: str, **fields: Any) -> dict[str, Any]:
        out: dict[str, Any] = (await self.call("POST", f"/{kind}s", {kind: fields}))[kind]
        return out

    async def update(self, kind: str, id: str, **fields: Any) -> dict[str, Any]:
        out: dict[str, Any] = (await self.call("PUT", f"/{kind}s/{id}", {kind: fields}))[kind]
        return out

    async def delete(self, kind: str, id: str) -> None:
        await self.call("DELETE", f"/{kind}s/{id}")

    async def list(self, kind: str, **filters: str) -> list[dict[str, Any]]:
        query = "&".join(f"{k}={v}" for k, v in filters.items())
        out: list[dict[str, Any]] = (await self.call("GET", f"/{kind}s?{query}"))[f"{kind}s"]
        return out

    # -- the port-bindings extension, as Nova uses it ---------------------------------------

    async def create_binding(self, port_id: str, host: str, **fields: Any) -> dict[str, Any]:
        body = {"binding": {"host": host, **fields}}
        out: dict[str, Any] = (await self.call("POST", f"/ports/{port_id}/bindings",
                                                body))["binding"]
        return out

    async def activate_binding(self, port_id: str, host: str) -> dict[str, Any]:
        out: dict[str, Any] = (await self.call(
            "PUT", f"/ports/{port_id}/bindings/{host}/activate"))["binding"]
        return out

    async def delete_binding(self, port_id: str, host: str) -> None:
        await self.call("DELETE", f"/ports/{port_id}/bindings/{host}")
