"""The API driven by unmodified clients: openstacksdk and the openstack CLI.

Auth without Keystone: keystoneauth's ``admin_token`` plugin (``auth_type="admin_token"``,
``auth={"endpoint": URL, "token": TOKEN}``; on the CLI ``--os-auth-type admin_token
--os-endpoint URL --os-token TOKEN``) sends X-Auth-Token to the given endpoint for every service.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openstack.exceptions
import pytest

from ferry.api.server import ThreadedServer
from ferry.api.testing import ADMIN_TOKEN, ALICE_TOKEN, PROJECT_A, connect, etcd_factory, serve
from ferry.model.objects import BindingStatus, LogicalPort
from ferry.store.memory import MemoryStore

OPENSTACK = Path(sys.executable).parent / "openstack"


@pytest.fixture(params=["memory", pytest.param("etcd", marks=pytest.mark.etcd)])
def api(request: pytest.FixtureRequest) -> Iterator[tuple[ThreadedServer, MemoryStore | None]]:
    mem = None
    if request.param == "memory":
        mem = MemoryStore()
        server = serve(mem)
    else:
        etcd = request.getfixturevalue("etcd_server")
        server = serve(etcd_factory(etcd.endpoints))
    try:
        yield server, mem
    finally:
        server.stop()


def _external_network(admin: Any) -> tuple[Any, Any]:
    public = admin.network.create_network(name="public", is_router_external=True,
                                          provider_network_type="flat",
                                          provider_physical_network="physnet1")
    sub = admin.network.create_subnet(network_id=public.id, cidr="172.24.4.0/24",
                                      ip_version=4, name="public-sub")
    return public, sub


def test_full_lifecycle(api: tuple[ThreadedServer, MemoryStore | None]) -> None:
    server, mem = api
    admin, alice = connect(server.url, ADMIN_TOKEN), connect(server.url, ALICE_TOKEN)
    public, _ = _external_network(admin)

    net = alice.network.create_network(name="net1")
    assert net.project_id == PROJECT_A and net.mtu == 1442
    assert net.provider_network_type == "geneve" and net.provider_segmentation_id > 0
    sub = alice.network.create_subnet(network_id=net.id, cidr="10.0.0.0/24", ip_version=4,
                                      name="sub1", dns_nameservers=["10.0.0.53"])
    assert sub.gateway_ip == "10.0.0.1"
    assert sub.allocation_pools == [{"start": "10.0.0.2", "end": "10.0.0.254"}]
    assert alice.network.get_network(net.id).subnet_ids == [sub.id]

    vm = alice.network.create_port(network_id=net.id, name="vm1", device_owner="compute:nova",
                                   device_id="instance-1")
    assert vm.mac_address.startswith("fa:16:3e:")
    assert vm.fixed_ips == [{"subnet_id": sub.id, "ip_address": "10.0.0.2"}]
    assert vm.binding_vif_type == "unbound" and vm.binding_host_id == ""
    assert vm.status == "DOWN" and vm.is_port_security_enabled
    [default] = list(alice.network.security_groups(name="default"))
    assert vm.security_group_ids == [default.id]
    assert {(r["direction"], r["ethertype"], r["remote_group_id"])
            for r in default.security_group_rules} == {
        ("egress", "IPv4", None), ("egress", "IPv6", None),
        ("ingress", "IPv4", default.id), ("ingress", "IPv6", default.id)}
    vm2 = alice.network.create_port(network_id=net.id, name="vm2",
                                    fixed_ips=[{"ip_address": "10.0.0.50"}],
                                    allowed_address_pairs=[{"ip_address": "10.0.0.200"}])
    assert vm2.fixed_ips[0]["ip_address"] == "10.0.0.50"
    assert vm2.allowed_address_pairs == [{"ip_address": "10.0.0.200",
                                          "mac_address": vm2.mac_address}]
    assert [p.id for p in alice.network.ports(fixed_ips="ip_address=10.0.0.50")] == [vm2.id]

    # Router: interface on the subnet, gateway on the external network.
    router = alice.network.create_router(name="r1")
    iface = alice.network.add_interface_to_router(router, subnet=sub.id)
    assert iface["subnet_id"] == sub.id
    rport = alice.network.get_port(iface["port_id"])
    assert rport.device_owner == "network:router_interface" and rport.device_id == router.id
    assert rport.fixed_ips[0]["ip_address"] == "10.0.0.1"
    router = alice.network.update_router(router, external_gateway_info={"network_id":
                                                                        public.id})
    gw = router.external_gateway_info
    assert gw["network_id"] == public.id and gw["enable_snat"] is True
    assert gw["external_fixed_ips"][0]["ip_address"] == "172.24.4.2"

    # Floating IP, associated with vm1.
    fip = alice.network.create_ip(floating_network_id=public.id)
    assert fip.floating_ip_address == "172.24.4.3" and fip.status == "DOWN"
    fip = alice.network.update_ip(fip, port_id=vm.id)
    assert fip.router_id == router.id and fip.fixed_ip_address == "10.0.0.2"
    assert fip.status == "ACTIVE"
    with pytest.raises(openstack.exceptions.ConflictException):
        alice.network.update_router(router, external_gateway_info={})  # the FIP needs it

    # Security groups and rules.
    web = alice.network.create_security_group(name="web", description="web servers")
    rule = alice.network.create_security_group_rule(
        security_group_id=web.id, direction="ingress", protocol="tcp", port_range_min=80,
        port_range_max=80, remote_ip_prefix="0.0.0.0/0", ethertype="IPv4")
    assert rule.protocol == "tcp" and rule.port_range_max == 80
    with pytest.raises(openstack.exceptions.ConflictException):
        alice.network.create_security_group_rule(
            security_group_id=web.id, direction="ingress", protocol="tcp", port_range_min=80,
            port_range_max=80, remote_ip_prefix="0.0.0.0/0", ethertype="IPv4")
    vm = alice.network.update_port(vm, security_group_ids=[default.id, web.id])
    assert sorted(vm.security_group_ids) == sorted([default.id, web.id])
    with pytest.raises(openstack.exceptions.ConflictException):
        alice.network.delete_security_group(web)  # in use by vm1

    # Pagination and sorting as openstacksdk drives them.
    for i in range(5):
        alice.network.create_port(network_id=net.id, name=f"extra{i}")
    names = [p.name for p in alice.network.ports(sort_key="name", sort_dir="desc", limit=2)]
    assert len(names) == 9 and names == sorted(names, reverse=True)

    # Teardown, in Neutron's order.
    alice.network.update_ip(fip, port_id=None)
    alice.network.delete_ip(fip)
    alice.network.update_router(router, external_gateway_info={})
    assert alice.network.get_router(router.id).external_gateway_info is None
    with pytest.raises(openstack.exceptions.ConflictException):
        alice.network.delete_router(router)  # still has an interface
    alice.network.remove_interface_from_router(router, subnet=sub.id)
    alice.network.delete_router(router)
    with pytest.raises(openstack.exceptions.ConflictException):
        alice.network.delete_network(net)  # ports remain
    for p in list(alice.network.ports()):
        alice.network.delete_port(p)
    alice.network.delete_security_group(web)
    alice.network.delete_network(net)
    assert list(alice.network.networks(name="net1")) == []
    assert [p.device_owner for p in admin.network.ports()] == []
    if mem is not None:
        tables = {r.table for r in mem._records.values()}
        assert tables <= {"network", "subnet", "secgroup", "secgrouprule"}


def test_port_bindings_live_migration(api: tuple[ThreadedServer, MemoryStore | None]) -> None:
    """Nova's flow: bind on host1, add an inactive binding on host2, activate it, delete
    host1's. Uses openstacksdk's create_port_binding/port_bindings/activate_port_binding/
    delete_port_binding."""
    server, mem = api
    admin = connect(server.url, ADMIN_TOKEN)
    net = admin.network.create_network(name="n")
    admin.network.create_subnet(network_id=net.id, cidr="10.1.0.0/24", ip_version=4)
    port = admin.network.create_port(network_id=net.id, device_owner="compute:nova",
                                     binding_host_id="host1", binding_vnic_type="normal")
    assert port.binding_host_id == "host1" and port.binding_vif_type == "ovs"
    assert port.binding_vif_details["port_filter"] is True

    b2 = admin.network.create_port_binding(port, host="host2", profile={"x": 1})
    assert b2.status == "INACTIVE" and b2.host == "host2"
    with pytest.raises(openstack.exceptions.ConflictException):
        admin.network.create_port_binding(port, host="host2")  # one binding per host
    got = {b.host: b.status for b in admin.network.port_bindings(port)}
    assert got == {"host1": "ACTIVE", "host2": "INACTIVE"}
    port = admin.network.update_port(port, binding_profile={"migrating_to": "host2"})
    assert port.binding_profile == {"migrating_to": "host2"}
    assert port.binding_host_id == "host1"

    admin.network.activate_port_binding(port, "host2")
    port = admin.network.get_port(port.id)
    assert port.binding_host_id == "host2" and port.binding_profile == {"x": 1}
    got = {b.host: b.status for b in admin.network.port_bindings(port)}
    assert got == {"host1": "INACTIVE", "host2": "ACTIVE"}
    with pytest.raises(openstack.exceptions.ConflictException):
        admin.network.activate_port_binding(port, "host2")  # already active
    admin.network.delete_port_binding(port, "host1")
    assert [b.host for b in admin.network.port_bindings(port)] == ["host2"]
    with pytest.raises(openstack.exceptions.NotFoundException):
        admin.network.delete_port_binding(port, "host2", ignore_missing=False)  # the active
    if mem is not None:  # what the chassis controllers read
        stored = mem._records[("port", port.id)].data
        obj = LogicalPort.model_validate(stored)
        assert [(b.host, b.status) for b in obj.bindings] == [("host2", BindingStatus.ACTIVE)]
        assert obj.host == "host2"

    # binding:host_id moves the active binding.
    port = admin.network.update_port(port, binding_host_id="host3")
    assert [(b.host, b.status) for b in admin.network.port_bindings(port)] == [
        ("host3", "ACTIVE")]
    port = admin.network.update_port(port, binding_host_id="")
    assert port.binding_vif_type == "unbound" and list(admin.network.port_bindings(port)) == []


def _cli(url: str, token: str, *args: str, json_out: bool = True) -> Any:
    fmt = ["-f", "json"] if json_out else []
    cmd = [str(OPENSTACK), "--os-auth-type", "admin_token", "--os-endpoint", url,
           "--os-token", token, "--os-region-name", "RegionOne", *args, *fmt]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, f"{' '.join(args)}: {done.stderr}"
    return json.loads(done.stdout) if done.stdout.strip() else None


def test_openstack_cli() -> None:
    mem = MemoryStore()
    with serve(mem) as server:
        url = server.url
        admin = connect(url, ADMIN_TOKEN)
        public, _ = _external_network(admin)
        net = _cli(url, ALICE_TOKEN, "network", "create", "clinet")
        assert net["name"] == "clinet" and net["project_id"] == PROJECT_A
        sub = _cli(url, ALICE_TOKEN, "subnet", "create", "--network", "clinet",
                   "--subnet-range", "10.5.0.0/24", "clisub")
        assert sub["gateway_ip"] == "10.5.0.1"
        port = _cli(url, ALICE_TOKEN, "port", "create", "--network", "clinet", "cliport")
        assert port["fixed_ips"][0]["ip_address"] == "10.5.0.2"
        router = _cli(url, ALICE_TOKEN, "router", "create", "clirouter")
        _cli(url, ALICE_TOKEN, "router", "add", "subnet", "clirouter", "clisub",
             json_out=False)
        _cli(url, ALICE_TOKEN, "router", "set", "--external-gateway", public.id, "clirouter",
             json_out=False)
        rule = _cli(url, ALICE_TOKEN, "security", "group", "rule", "create", "--protocol",
                    "tcp", "--dst-port", "22", "default")
        assert rule["port_range_min"] == 22
        fip = _cli(url, ALICE_TOKEN, "floating", "ip", "create", "--port", port["id"],
                   public.id)
        assert fip["router_id"] == router["id"] and fip["fixed_ip_address"] == "10.5.0.2"
        listed = _cli(url, ALICE_TOKEN, "network", "list")
        assert {n["Name"] for n in listed} == {"clinet", "public"}
