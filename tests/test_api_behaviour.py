"""Neutron semantics over raw HTTP: error format and codes, auth, config, queries, concurrency,
and the ``ferry api`` command itself."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from ferry.api.config import ConfigError, load_config
from ferry.api.server import parse_listen
from ferry.api.testing import ADMIN_TOKEN, ALICE_TOKEN, serve
from ferry.model.objects import LogicalPort, LogicalRouter
from ferry.store.memory import MemoryStore


class Api:
    def __init__(self, url: str, mem: MemoryStore, token: str = ADMIN_TOKEN) -> None:
        self.url, self.mem = url, mem
        self.http = httpx.Client(base_url=url + "/v2.0", headers={"X-Auth-Token": token},
                                 timeout=20)

    def ok(self, method: str, path: str, body: Any = None) -> Any:
        resp = self.http.request(method, path, json=body)
        assert resp.status_code < 300, f"{method} {path}: {resp.status_code} {resp.text}"
        return next(iter(resp.json().values())) if resp.content else None

    def error(self, method: str, path: str, body: Any, status: int, type_: str) -> str:
        """The request fails with Neutron's error body, and the store is unchanged."""
        before = dict(self.mem._records)
        resp = self.http.request(method, path, json=body)
        assert resp.status_code == status, resp.text
        err = resp.json()["NeutronError"]
        assert err["type"] == type_, err
        assert set(err) == {"type", "message", "detail"}
        assert dict(self.mem._records) == before
        return str(err["message"])


@pytest.fixture
def api() -> Iterator[Api]:
    mem = MemoryStore()
    with serve(mem) as server:
        yield Api(server.url, mem)


def _net(api: Api, cidr: str = "10.0.0.0/24", **subnet: Any) -> tuple[str, str]:
    net = api.ok("POST", "/networks", {"network": {"name": "n"}})["id"]
    sub = api.ok("POST", "/subnets", {"subnet": {"network_id": net, "cidr": cidr,
                                                 "ip_version": 4, **subnet}})["id"]
    return net, sub


def test_auth(api: Api) -> None:
    for headers in ({}, {"X-Auth-Token": "not-a-token"}):
        resp = httpx.get(api.url + "/v2.0/networks", headers=headers)
        assert resp.status_code == 401
        assert resp.json()["NeutronError"]["type"] == "HTTPUnauthorized"
    assert httpx.get(api.url + "/").json()["versions"][0]["id"] == "v2.0"
    doc = httpx.get(api.url + "/openapi.json").json()
    assert "/v2.0/ports/{port_id}/bindings/{host}/activate" in doc["paths"]
    aliases = {e["alias"] for e in api.ok("GET", "/extensions")}
    assert {"binding", "binding-extended", "router", "security-group", "external-net",
            "port-security", "allowed-address-pairs", "pagination", "sorting"} <= aliases


def test_noauth_is_admin_of_the_default_project() -> None:
    mem = MemoryStore()
    with serve(mem, noauth=True) as server:
        net = httpx.post(server.url + "/v2.0/networks", json={"network": {"shared": True}})
        assert net.status_code == 201 and net.json()["network"]["project_id"] == "admin"


def test_config_file(tmp_path: Path) -> None:
    path = tmp_path / "api.toml"
    path.write_text('[[tokens]]\ntoken = "abcdefgh1"\nproject_id = "p"\nuser = "u"\n'
                    'roles = ["admin"]\n')
    assert load_config(path).tokens[0].is_admin
    path.write_text('[[tokens]]\ntoken = "abcdefgh1"\nproject_id = "p"\nuser = "u"\n'
                    'colour = "red"\n')
    with pytest.raises(ConfigError, match=r"tokens\.0\.colour: Extra inputs"):
        load_config(path)
    path.write_text('[[tokens]]\ntoken = "abcdefgh1"\nproject_id = "p"\nuser = "u"\n'
                    'roles = ["root"]\n')
    with pytest.raises(ConfigError, match=r"tokens\.0\.roles\.0"):
        load_config(path)
    assert parse_listen("0.0.0.0:1234") == ("0.0.0.0", 1234)
    assert parse_listen("[::1]:80") == ("::1", 80)
    assert parse_listen("localhost") == ("localhost", 9696)


def test_errors_in_neutron_format(api: Api) -> None:
    net, sub = _net(api)
    msg = api.error("GET", "/networks/nope", None, 404, "NetworkNotFound")
    assert msg == "Network nope could not be found."
    api.error("GET", "/ports/nope", None, 404, "PortNotFound")
    api.error("POST", "/networks", {"network": {"colour": "red"}}, 400, "BadRequest")
    api.error("POST", "/networks", {"colour": "red"}, 400, "BadRequest")
    api.error("POST", "/subnets", {"subnet": {"network_id": net, "cidr": "10.0.0.128/25"}},
              400, "InvalidInput")
    api.error("POST", "/subnets", {"subnet": {"network_id": net, "cidr": "10.1.0.1/24"}},
              400, "BadRequest")
    port = api.ok("POST", "/ports", {"port": {"network_id": net}})
    taken = [{"ip_address": port["fixed_ips"][0]["ip_address"]}]
    api.error("POST", "/ports", {"port": {"network_id": net, "fixed_ips": taken}}, 409,
              "IpAddressAlreadyAllocated")
    api.error("POST", "/ports", {"port": {"network_id": net,
                                          "mac_address": port["mac_address"]}},
              409, "MacAddressInUse")
    api.error("POST", "/ports", {"port": {"network_id": net, "mac_address": "01:00:5e:0:0:1"}},
              400, "BadRequest")
    api.error("POST", "/ports", {"port": {"network_id": net,
                                          "fixed_ips": [{"ip_address": "10.9.9.9"}]}},
              400, "BadRequest")
    # Checked before the new project's default security group would be created.
    for ip in ("10.1.0.5", "10.0.0.255"):
        api.error("POST", "/ports", {"port": {"network_id": net, "project_id": "fresh",
                                              "fixed_ips": [{"subnet_id": sub,
                                                             "ip_address": ip}]}},
                  400, "BadRequest")
    api.error("DELETE", f"/networks/{net}", None, 409, "NetworkInUse")
    api.error("DELETE", f"/subnets/{sub}", None, 409, "SubnetInUse")
    api.error("PUT", f"/ports/{port['id']}", {"port": {"port_security_enabled": False}}, 409,
              "PortSecurityPortHasSecurityGroup")
    resp = httpx.get(api.url + "/v2.0/nothing", headers={"X-Auth-Token": ADMIN_TOKEN})
    assert resp.status_code == 404 and "NeutronError" in resp.json()


def test_ip_allocation_and_pools(api: Api) -> None:
    net, sub = _net(api, "10.2.0.0/29", allocation_pools=[{"start": "10.2.0.4",
                                                           "end": "10.2.0.5"}])
    assert api.ok("GET", f"/subnets/{sub}")["gateway_ip"] == "10.2.0.1"
    ips = [api.ok("POST", "/ports", {"port": {"network_id": net}})["fixed_ips"][0]["ip_address"]
           for _ in range(2)]
    assert ips == ["10.2.0.4", "10.2.0.5"]
    api.error("POST", "/ports", {"port": {"network_id": net}}, 409, "IpAddressGenerationFailure")
    # An address outside the pools may still be asked for explicitly (as in Neutron).
    p = api.ok("POST", "/ports", {"port": {"network_id": net, "fixed_ips": [
        {"subnet_id": sub, "ip_address": "10.2.0.6"}]}})
    assert p["fixed_ips"] == [{"subnet_id": sub, "ip_address": "10.2.0.6"}]
    p = api.ok("PUT", f"/ports/{p['id']}", {"port": {"fixed_ips": [{"ip_address": "10.2.0.3"}]}})
    assert p["fixed_ips"][0]["ip_address"] == "10.2.0.3"
    net2, _ = _net(api, "10.3.0.0/24", gateway_ip=None)
    assert api.ok("GET", f"/subnets?network_id={net2}")[0]["gateway_ip"] is None


def test_filters_fields_sort_pagination(api: Api) -> None:
    net, _ = _net(api)
    for name in ("c", "a", "b", "a"):
        api.ok("POST", "/ports", {"port": {"network_id": net, "name": name}})
    names = [p["name"] for p in api.ok("GET", "/ports?sort_key=name&sort_dir=asc")]
    assert names == ["a", "a", "b", "c"]
    assert sorted(p["name"] for p in api.ok("GET", "/ports?name=a&name=c")) == ["a", "a", "c"]
    only = api.ok("GET", "/ports?fields=id&fields=name")
    assert all(set(p) == {"id", "name"} for p in only)
    assert api.ok("GET", "/networks?router:external=false")[0]["id"] == net
    assert api.ok("GET", "/networks?router:external=true") == []
    resp = api.http.get("/ports?sort_key=name&limit=3").json()
    assert len(resp["ports"]) == 3 and resp["ports_links"][0]["rel"] == "next"
    rest = httpx.get(resp["ports_links"][0]["href"],
                     headers={"X-Auth-Token": ADMIN_TOKEN}).json()["ports"]
    assert [p["name"] for p in resp["ports"] + rest] == ["a", "a", "b", "c"]
    api.error("GET", "/ports?colour=red", None, 400, "BadRequest")
    api.error("GET", "/ports?sort_key=colour", None, 400, "BadRequest")


def test_binding_activation_conflict_and_mapping(api: Api) -> None:
    net, _ = _net(api)
    port = api.ok("POST", "/ports", {"port": {"network_id": net, "device_owner": "compute:az"}})
    pid = port["id"]
    b1 = api.ok("POST", f"/ports/{pid}/bindings", {"binding": {"host": "h1"}})
    assert b1["status"] == "ACTIVE"  # the port had no active binding
    assert api.ok("GET", f"/ports/{pid}")["binding:host_id"] == "h1"
    api.ok("POST", f"/ports/{pid}/bindings", {"binding": {"host": "h2"}})
    api.error("PUT", f"/ports/{pid}/bindings/h1/activate", None, 409, "PortBindingAlreadyActive")
    api.error("PUT", f"/ports/{pid}/bindings/h9/activate", None, 404, "PortBindingNotFound")
    api.error("POST", f"/ports/{pid}/bindings", {"binding": {"host": "h2"}}, 409,
              "PortBindingAlreadyExists")
    api.error("PUT", f"/ports/{pid}", {"port": {"binding:host_id": "h2"}}, 409,
              "PortBindingAlreadyExists")
    api.error("DELETE", f"/ports/{pid}/bindings/h1", None, 404, "PortBindingNotFound")
    router_port = api.ok("POST", "/ports", {"port": {"network_id": net}})
    api.error("POST", f"/ports/{router_port['id']}/bindings", {"binding": {"host": "h"}}, 400,
              "BadRequest")
    stored = LogicalPort.model_validate(api.mem._records[("port", pid)].data)
    assert [(b.host, b.status.value) for b in stored.bindings] == [("h1", "ACTIVE"),
                                                                    ("h2", "INACTIVE")]


def test_ferry_binding_profile_values_are_checked(api: Api) -> None:
    """binding:profile keys of Ferry's own take only their values, on every way in."""
    net, _ = _net(api)
    port = api.ok("POST", "/ports", {"port": {"network_id": net, "device_owner": "compute:az",
                                              "binding:host_id": "h1"}})
    pid = port["id"]
    msg = api.error("POST", f"/ports/{pid}/bindings",
                    {"binding": {"host": "h2", "profile": {"ferry_live_fallback": "never"}}},
                    400, "InvalidInput")
    assert "ferry_live_fallback must be one of source-unplug, binding, not 'never'" in msg
    msg = api.error("PUT", f"/ports/{pid}",
                    {"port": {"binding:profile": {"ferry_migration_mode": "fast"}}},
                    400, "InvalidInput")
    assert "ferry_migration_mode" in msg and "binding:profile" in msg
    api.error("POST", "/ports", {"port": {"network_id": net, "binding:profile": {
        "ferry_migration_mode": "fast"}}}, 400, "InvalidInput")
    b = api.ok("POST", f"/ports/{pid}/bindings", {"binding": {"host": "h2", "profile": {
        "ferry_live_fallback": "binding", "ferry_migration_mode": "live"}}})
    assert b["profile"]["ferry_live_fallback"] == "binding"


def test_concurrent_writes_lose_nothing(api: Api) -> None:
    """Concurrent creates get distinct addresses; concurrent router interface additions
    (read-modify-write of one router) are all kept."""
    net, _ = _net(api, "10.4.0.0/24")
    with ThreadPoolExecutor(8) as pool:
        ports = list(pool.map(lambda _: api.ok("POST", "/ports", {"port": {"network_id": net}}),
                              range(24)))
    ips = {p["fixed_ips"][0]["ip_address"] for p in ports}
    assert len(ips) == 24
    router = api.ok("POST", "/routers", {"router": {"name": "r"}})["id"]
    subnets = [_net(api, f"10.{10 + i}.0.0/24")[1] for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda s: api.ok("PUT", f"/routers/{router}/add_router_interface",
                                       {"subnet_id": s}), subnets))
    stored = LogicalRouter.model_validate(api.mem._records[("router", router)].data)
    assert sorted(p.subnet_id for p in stored.ports) == sorted(subnets)


def test_member_default_security_group(api: Api) -> None:
    alice = Api(api.url, api.mem, ALICE_TOKEN)
    groups = alice.ok("GET", "/security-groups")
    assert [g["name"] for g in groups] == ["default"]
    alice.error("DELETE", f"/security-groups/{groups[0]['id']}", None, 409,
                "SecurityGroupCannotRemoveDefault")
    alice.error("POST", "/security-groups", {"security_group": {"name": "default"}}, 409,
                "SecurityGroupDefaultAlreadyExists")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def test_ferry_api_command(tmp_path: Path) -> None:
    """``api_command`` as typer runs it: refuses to start without tokens or --noauth, serves
    with --noauth."""
    run = [sys.executable, "-c", "import typer; from ferry.api.cli import api_command; "
           "typer.run(api_command)"]
    done = subprocess.run([*run, "--store", "memory://"], capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode != 0 and "--noauth" in done.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text("tokenz = []\n")
    done = subprocess.run([*run, "--config", str(bad)], capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode != 0 and "tokenz" in done.stderr
    port = _free_port()
    proc = subprocess.Popen([*run, "--noauth", "--listen", f"127.0.0.1:{port}",
                             "--log-level", "warning"])
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                resp = httpx.get(f"http://127.0.0.1:{port}/v2.0/networks", timeout=1)
                break
            except httpx.TransportError:
                assert proc.poll() is None, "ferry api exited"
                assert time.monotonic() < deadline, "ferry api did not start"
                time.sleep(0.05)  # polling for readiness
        assert resp.status_code == 200 and resp.json() == {"networks": []}
    finally:
        proc.terminate()
        proc.wait(10)
