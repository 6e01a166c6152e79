"""Tenant isolation: a member sees and changes only its project's objects (others' are 404).

Alice (project-a) builds a topology; Bob (project-b) tries to read and change every piece of it,
and to use it from his own objects. Every attempt fails, and the store is left unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from ferry.api.testing import (
    ADMIN_TOKEN,
    ALICE_TOKEN,
    BOB_TOKEN,
    PROJECT_A,
    PROJECT_B,
    serve,
)
from ferry.store.memory import MemoryStore


class Client:
    def __init__(self, url: str, token: str) -> None:
        self.http = httpx.Client(base_url=url + "/v2.0", headers={"X-Auth-Token": token},
                                 timeout=10)

    def call(self, method: str, path: str, body: Any = None, expect: int = 200) -> Any:
        resp = self.http.request(method, path, json=body)
        assert resp.status_code == expect, f"{method} {path}: {resp.status_code} {resp.text}"
        return resp.json() if resp.content else None

    def post(self, path: str, body: Any, expect: int = 201) -> Any:
        return self.call("POST", path, body, expect)


@pytest.fixture(scope="module")
def world() -> Iterator[dict[str, Any]]:
    mem = MemoryStore()
    with serve(mem) as server:
        admin, alice, bob = (Client(server.url, t) for t in (ADMIN_TOKEN, ALICE_TOKEN, BOB_TOKEN))
        pub = admin.post("/networks", {"network": {"name": "public", "router:external": True}})
        admin.post("/subnets", {"subnet": {"network_id": pub["network"]["id"],
                                           "cidr": "172.24.4.0/24", "ip_version": 4}})
        w: dict[str, Any] = {"mem": mem, "admin": admin, "alice": alice, "bob": bob,
                             "public": pub["network"]["id"]}
        for who, cidr in (("a", "10.0.0.0/24"), ("b", "10.9.0.0/24")):
            c = alice if who == "a" else bob
            net = c.post("/networks", {"network": {"name": f"net-{who}"}})["network"]
            sub = c.post("/subnets", {"subnet": {"network_id": net["id"], "cidr": cidr,
                                                 "ip_version": 4}})["subnet"]
            port = c.post("/ports", {"port": {"network_id": net["id"],
                                              "device_owner": "compute:nova"}})["port"]
            router = c.post("/routers", {"router": {"name": f"r-{who}", "external_gateway_info":
                                                    {"network_id": w["public"]}}})["router"]
            c.call("PUT", f"/routers/{router['id']}/add_router_interface",
                   {"subnet_id": sub["id"]})
            fip = c.post("/floatingips", {"floatingip": {"floating_network_id": w["public"]}})
            sg = c.post("/security-groups", {"security_group": {"name": f"sg-{who}"}})
            w[who] = {"net": net["id"], "sub": sub["id"], "port": port["id"],
                      "router": router["id"], "fip": fip["floatingip"]["id"],
                      "sg": sg["security_group"]["id"],
                      "rule": sg["security_group"]["security_group_rules"][0]["id"]}
        yield w


def _unchanged(w: dict[str, Any], method: str, path: str, body: Any, expect: int,
               error: str | None = None) -> None:
    mem: MemoryStore = w["mem"]
    before = dict(mem._records)
    resp = w["bob"].http.request(method, path, json=body)
    assert resp.status_code == expect, f"{method} {path}: {resp.status_code} {resp.text}"
    if error is not None:
        assert resp.json()["NeutronError"]["type"] == error
    assert dict(mem._records) == before


@pytest.mark.parametrize(("collection", "key"), [
    ("networks", "net"), ("subnets", "sub"), ("ports", "port"), ("routers", "router"),
    ("floatingips", "fip"), ("security-groups", "sg"), ("security-group-rules", "rule"),
])
def test_other_projects_objects_are_invisible(world: dict[str, Any], collection: str,
                                              key: str) -> None:
    alices = world["a"][key]
    listed = world["bob"].call("GET", f"/{collection}")
    items = next(iter(v for k, v in listed.items() if not k.endswith("_links")))
    assert alices not in {i["id"] for i in items}
    shared = collection in ("networks", "subnets")  # the public network is visible to all
    assert all(i["project_id"] == PROJECT_B for i in items if not shared)
    assert world["bob"].call("GET", f"/{collection}?id={alices}")[
        collection.replace("-", "_")] == []
    _unchanged(world, "GET", f"/{collection}/{alices}", None, 404)
    _unchanged(world, "DELETE", f"/{collection}/{alices}", None, 404)
    if collection != "security-group-rules":
        singular = {"networks": "network", "subnets": "subnet", "ports": "port",
                    "routers": "router", "floatingips": "floatingip",
                    "security-groups": "security_group"}[collection]
        _unchanged(world, "PUT", f"/{collection}/{alices}", {singular: {"description": "x"}},
                   404)
    # the admin sees them
    assert world["admin"].call("GET", f"/{collection}/{alices}")


def test_cannot_use_another_projects_objects(world: dict[str, Any]) -> None:
    a, b = world["a"], world["b"]
    _unchanged(world, "PUT", f"/routers/{a['router']}/add_router_interface",
               {"subnet_id": b["sub"]}, 404, "RouterNotFound")
    _unchanged(world, "PUT", f"/routers/{a['router']}/remove_router_interface",
               {"subnet_id": a["sub"]}, 404, "RouterNotFound")
    _unchanged(world, "PUT", f"/routers/{b['router']}/add_router_interface",
               {"subnet_id": a["sub"]}, 404, "SubnetNotFound")
    _unchanged(world, "PUT", f"/routers/{b['router']}/add_router_interface",
               {"port_id": a["port"]}, 404, "PortNotFound")
    _unchanged(world, "PUT", f"/floatingips/{a['fip']}", {"floatingip": {"port_id": b["port"]}},
               404, "FloatingIPNotFound")
    _unchanged(world, "PUT", f"/floatingips/{b['fip']}", {"floatingip": {"port_id": a["port"]}},
               404, "PortNotFound")
    _unchanged(world, "POST", "/floatingips", {"floatingip": {
        "floating_network_id": world["public"], "port_id": a["port"]}}, 404, "PortNotFound")
    _unchanged(world, "POST", "/ports", {"port": {"network_id": a["net"]}}, 404,
               "NetworkNotFound")
    _unchanged(world, "POST", "/subnets", {"subnet": {"network_id": a["net"],
                                                      "cidr": "10.7.0.0/24"}},
               404, "NetworkNotFound")
    _unchanged(world, "POST", "/ports", {"port": {"network_id": b["net"],
                                                  "security_groups": [a["sg"]]}},
               404, "SecurityGroupNotFound")
    _unchanged(world, "PUT", f"/ports/{b['port']}", {"port": {"security_groups": [a["sg"]]}},
               404, "SecurityGroupNotFound")
    _unchanged(world, "POST", "/security-group-rules", {"security_group_rule": {
        "security_group_id": a["sg"], "direction": "ingress"}}, 404, "SecurityGroupNotFound")
    _unchanged(world, "POST", "/security-group-rules", {"security_group_rule": {
        "security_group_id": b["sg"], "direction": "ingress", "remote_group_id": a["sg"]}},
        404, "SecurityGroupNotFound")
    _unchanged(world, "GET", f"/ports/{a['port']}/bindings", None, 404, "PortNotFound")
    _unchanged(world, "POST", f"/ports/{a['port']}/bindings", {"binding": {"host": "h"}}, 404,
               "PortNotFound")


def test_member_cannot_act_for_another_project(world: dict[str, Any]) -> None:
    _unchanged(world, "POST", "/networks", {"network": {"name": "x", "project_id": PROJECT_A}},
               403, "PolicyNotAuthorized")
    _unchanged(world, "POST", "/networks", {"network": {"name": "x", "router:external": True}},
               403, "PolicyNotAuthorized")
    b = world["b"]
    _unchanged(world, "PUT", f"/ports/{b['port']}", {"port": {"binding:host_id": "h1"}}, 403,
               "PolicyNotAuthorized")
    _unchanged(world, "POST", f"/ports/{b['port']}/bindings", {"binding": {"host": "h"}}, 403,
               "PolicyNotAuthorized")
    # The shared external network is visible but not Bob's to change.
    _unchanged(world, "PUT", f"/networks/{world['public']}", {"network": {"name": "mine"}},
               403, "PolicyNotAuthorized")
    _unchanged(world, "DELETE", f"/networks/{world['public']}", None, 403)


def test_admin_acts_for_another_project(world: dict[str, Any]) -> None:
    admin, alice = world["admin"], world["alice"]
    net = admin.post("/networks", {"network": {"name": "for-alice", "tenant_id": PROJECT_A}})
    assert net["network"]["project_id"] == PROJECT_A
    assert net["network"]["id"] in {n["id"] for n in alice.call("GET", "/networks")["networks"]}
    alice.call("DELETE", f"/networks/{net['network']['id']}", expect=204)
    every = admin.call("GET", "/ports")["ports"]
    assert {p["project_id"] for p in every} >= {PROJECT_A, PROJECT_B}
