"""Fuzzing over the served OpenAPI document (schemathesis strategies driven by hypothesis).

Every operation of ``/openapi.json`` gets schema-conforming and schema-violating requests, as
the admin or as a member, sometimes aimed at objects that exist. No request may answer 5xx, and
a rejected (4xx) request must leave the store's records exactly as they were.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis.generation.modes import GenerationMode

from ferry.api.server import ThreadedServer
from ferry.api.testing import ADMIN_TOKEN, ALICE_TOKEN, serve
from ferry.store.memory import MemoryStore

EXAMPLES = 25  # per operation and mode: about 30 operations x 2 modes, well under a minute
ID_KEYS = {"network_id": "net", "subnet_id": "sub", "port_id": "port", "router_id": "router",
           "fip_id": "fip", "sg_id": "sg", "rule_id": "rule",
           "security_group_id": "sg", "floating_network_id": "public"}


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[ThreadedServer, MemoryStore, dict[str, str]]]:
    mem = MemoryStore()
    with serve(mem) as server:
        yield server, mem, _topology(server.url)


def _topology(url: str) -> dict[str, str]:
    """Objects for fuzzed requests to aim at (ids substituted into paths and bodies)."""
    h = {"X-Auth-Token": ALICE_TOKEN}
    admin = {"X-Auth-Token": ADMIN_TOKEN}
    c = httpx.Client(base_url=url + "/v2.0", timeout=10)

    def post(path: str, body: Any, headers: dict[str, str] = h) -> Any:
        resp = c.post(path, json=body, headers=headers)
        assert resp.status_code == 201, resp.text
        return next(iter(resp.json().values()))

    pub = post("/networks", {"network": {"router:external": True}}, admin)
    post("/subnets", {"subnet": {"network_id": pub["id"], "cidr": "172.24.4.0/24"}}, admin)
    net = post("/networks", {"network": {"name": "n"}})
    sub = post("/subnets", {"subnet": {"network_id": net["id"], "cidr": "10.0.0.0/24"}})
    port = post("/ports", {"port": {"network_id": net["id"], "device_owner": "compute:x"}})
    router = post("/routers", {"router": {"external_gateway_info": {"network_id": pub["id"]}}})
    assert c.put(f"/routers/{router['id']}/add_router_interface", json={"subnet_id": sub["id"]},
                 headers=h).status_code == 200
    fip = post("/floatingips", {"floatingip": {"floating_network_id": pub["id"]}})
    sg = post("/security-groups", {"security_group": {"name": "web"}})
    for token in (ADMIN_TOKEN, ALICE_TOKEN):  # the default groups exist before fuzzing
        assert c.get("/security-groups", headers={"X-Auth-Token": token}).status_code == 200
    return {"net": net["id"], "sub": sub["id"], "port": port["id"], "router": router["id"],
            "fip": fip["id"], "sg": sg["id"], "rule": sg["security_group_rules"][0]["id"],
            "public": pub["id"]}


def _aim(case: Any, ids: dict[str, str], rnd: random.Random) -> None:
    """Point some of the case's ids at existing objects."""
    for key in list(case.path_parameters or {}):
        if key in ID_KEYS and rnd.random() < 0.7:
            case.path_parameters[key] = ids[ID_KEYS[key]]
    body = case.body if isinstance(case.body, dict) else {}
    for inner in body.values():
        if isinstance(inner, dict):
            for key in list(inner):
                if key in ID_KEYS and rnd.random() < 0.7:
                    inner[key] = ids[ID_KEYS[key]]
    for key in ("subnet_id", "port_id"):
        if key in body and rnd.random() < 0.7:
            body[key] = ids[ID_KEYS[key]]


def test_fuzz_no_5xx_and_rejections_change_nothing(
        served: tuple[ThreadedServer, MemoryStore, dict[str, str]]) -> None:
    server, mem, ids = served
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    operations = [r.ok() for r in schema.get_all_operations()]
    assert len(operations) >= 30
    session = httpx.Client(timeout=10)
    seen: dict[int, int] = {}
    skipped: list[str] = []

    for op in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @settings(max_examples=EXAMPLES, deadline=None, database=None,
                      suppress_health_check=list(HealthCheck))
            @given(case=op.as_strategy(generation_mode=mode), seed=st.integers(0, 2**16),
                   admin=st.booleans())
            def run(case: Any, seed: int, admin: bool) -> None:
                _aim(case, ids, random.Random(seed))
                kwargs = case.as_transport_kwargs(base_url=server.url)
                headers = dict(kwargs.get("headers") or {})
                headers["X-Auth-Token"] = ADMIN_TOKEN if admin else ALICE_TOKEN
                before = dict(mem._records)
                resp = session.request(kwargs["method"], kwargs["url"],
                                       params=kwargs.get("params"), headers=headers,
                                       json=kwargs.get("json"),
                                       content=kwargs.get("data"))
                seen[resp.status_code] = seen.get(resp.status_code, 0) + 1
                where = f"{kwargs['method']} {kwargs['url']} {kwargs.get('json')!r}"
                assert resp.status_code < 500, f"{where}: {resp.status_code} {resp.text}"
                if 400 <= resp.status_code < 500:
                    assert dict(mem._records) == before, f"{where} changed the store"
                    assert "NeutronError" in resp.json(), f"{where}: {resp.text}"

            try:
                run()
            except Unsatisfiable:
                # Nothing to violate: no body, no constrained parameters.
                assert mode is GenerationMode.NEGATIVE, op.label
                skipped.append(op.label)
    print("statuses:", dict(sorted(seen.items())))
    assert any(400 <= s < 500 for s in seen) and any(s < 300 for s in seen), seen
    # Only operations without a body (their unconstrained string ids cannot be made invalid)
    assert not [label for label in skipped if label.startswith("POST")], skipped
