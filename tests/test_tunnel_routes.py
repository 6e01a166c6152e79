"""Pinning the tunnel routes in OVS's own table: reading ``ovs/route/show`` and deciding what
to add and remove (pure), against the output of OVS 3.1 as a lab chassis prints it."""

from __future__ import annotations

import asyncio
import ipaddress
import time
import uuid
from pathlib import Path

import pytest

from ferry.agent.route_events import RouteEvents, RouteEventsError, vswitchd_netns
from ferry.agent.tunnel_routes import kernel_route, parse_routes, plan
from ferry.lab import netns as nx
from ferry.lab.netns import pid_alive, wait_for
from ferry.lab.nova import boot
from ferry.lab.ovs_instance import OvsInstance
from ferry.lab.session import lab_session
from tests.labkit import udp_through_vif_churn
from tests.test_openflow import restart_vswitchd

SHOW = """Route Table:
Cached: 127.0.0.1/32 dev lo SRC 127.0.0.1 local
Cached: 192.168.254.1/32 dev br-phy SRC 192.168.254.1 local
Cached: 127.0.0.0/8 dev lo SRC 127.0.0.1 local
Cached: 192.168.254.0/24 dev br-phy SRC 192.168.254.1
Cached: 0.0.0.0/0 dev br-phy GW 192.168.254.254 SRC 192.168.254.1
Cached: ::1/128 dev lo SRC ::1 local
"""


def with_lines(*lines: str) -> str:
    return SHOW + "".join(f"{line}\n" for line in lines)


def test_parse_reads_kind_prefix_device_gateway_and_local() -> None:
    routes = parse_routes(with_lines("User: 192.168.254.2/32 dev br-phy SRC 192.168.254.1",
                                     "garbage line"))
    assert len(routes) == 7
    default = kernel_route(routes, "10.1.2.3")
    assert default is not None and default.gw == "192.168.254.254" and not default.user
    on_link = kernel_route(routes, "192.168.254.2")  # the pin is not the kernel's route
    assert on_link is not None and str(on_link.prefix) == "192.168.254.0/24"
    assert on_link.dev == "br-phy" and on_link.gw is None and not on_link.local
    assert [r.user for r in routes].count(True) == 1


def test_every_remote_endpoint_gets_a_copy_of_the_kernels_route() -> None:
    p = plan(parse_routes(SHOW), ["192.168.254.2", "192.168.254.3", "10.9.9.9",
                                  "192.168.254.1"])  # the last one is this chassis' own
    assert p == [("10.9.9.9", "br-phy", "192.168.254.254"), ("192.168.254.2", "br-phy", None),
                 ("192.168.254.3", "br-phy", None)]


def test_a_right_pin_stays_and_a_wrong_one_is_replaced() -> None:
    routes = parse_routes(with_lines("User: 192.168.254.2/32 dev br-phy SRC 192.168.254.1",
                                     "User: 192.168.254.3/32 dev br-old SRC 192.168.254.1",
                                     "User: 10.9.9.9/32 dev br-phy SRC 192.168.254.1"))
    assert plan(routes, ["192.168.254.2", "192.168.254.3", "10.9.9.9"]) == [
        ("10.9.9.9", "br-phy", "192.168.254.254"), ("192.168.254.3", "br-phy", None)]


def test_a_pin_outlives_a_moment_with_no_kernel_route() -> None:
    """While OVS re-reads the kernel's routes its copy is empty: that is when the pin
    matters, so nothing changes it then."""
    pin = "User: 192.168.254.2/32 dev br-phy SRC 192.168.254.1"
    assert plan(parse_routes(f"Route Table:\n{pin}\n"), ["192.168.254.2"]) == []


# -- on a real lab: the agents' pins alone keep Geneve traffic whole through VIF churn --------

PRIVATE = "10.80.0.0/24"


def _pins(ovs: OvsInstance) -> list[tuple[object, str]]:
    """The user routes of that OVS: (prefix, device)."""
    out = ovs.appctl("ovs-vswitchd", "ovs/route/show")
    return [(r.prefix, r.dev) for r in parse_routes(out) if r.user]


@pytest.mark.lab
@pytest.mark.asyncio(loop_scope="function")
async def test_the_agents_pins_keep_geneve_whole_through_vif_churn() -> None:
    """Without the lab's own route pin, each chassis' agent pins the other's tunnel IP; VIFs
    plugged and unplugged on the sender's chassis (each a route re-read in its OVS) then cost
    a 1 kHz Geneve flow between two VMs nothing."""
    async with lab_session(2) as (lab, api):
        net = await api.create("network", name="n")
        await api.create("subnet", network_id=net["id"], cidr=PRIVATE, ip_version=4)
        ips = {}
        for name, ch in (("a", "chassis-1"), ("c", "chassis-2")):
            port = await api.create("port", network_id=net["id"], name=name)
            await boot(lab, api, name, port["id"], ch)
            ips[name] = port["fixed_ips"][0]["ip_address"]
        for ch, other in (("chassis-1", "chassis-2"), ("chassis-2", "chassis-1")):
            ovs, theirs = lab.ovs(ch), lab.chassis(other).tunnel_ip
            underlay = ipaddress.ip_interface(lab.chassis(ch).tunnel_cidr).network
            mine = (ipaddress.ip_network(theirs), "br-phy")
            both = sorted([mine, (underlay, "br-phy")])  # type: ignore[type-var]
            await asyncio.to_thread(wait_for, lambda: sorted(_pins(ovs)) == both,  # type: ignore[type-var]  # noqa: B023
                                    10, 0.1, f"{ch}'s agent pins its route to {other}")
            # The lab's own pin of the whole underlay subnet goes. Deleting a route makes OVS
            # forget br-phy's address as a tunnel endpoint until a route on br-phy is added:
            # the agent's pin, added again as it would be, brings it back.
            await asyncio.to_thread(ovs.appctl, "ovs-vswitchd", "ovs/route/del", str(underlay))
            await asyncio.to_thread(ovs.appctl, "ovs-vswitchd", "ovs/route/add",
                                    f"{theirs}/32", "br-phy")
            assert _pins(ovs) == [mine]
        await asyncio.to_thread(wait_for, lambda: lab.exec_in_vm(
            "a", ["ping", "-c1", "-W1", ips["c"]]).returncode == 0, 10, 0.1, "a → c")
        sent = 6000
        received, _, cycles = await asyncio.to_thread(
            udp_through_vif_churn, lab, "a", "c", ips["c"], "chassis-1", "fa:16:3e:00:0e:09",
            "10.80.0.99/24", sent)
    print(f"\n{cycles} VIF plug/unplug cycles on the sender's chassis; {received} of {sent} "
          "Geneve packets received")
    assert cycles >= 10
    assert received == sent


@pytest.mark.lab
@pytest.mark.asyncio(loop_scope="function")
async def test_a_restarted_vswitchd_gets_its_pins_back() -> None:
    """A restarted ovs-vswitchd has forgotten every pin (the lab's own one stays gone): the
    agent puts its own back once its switch reconnects."""
    async with lab_session(2) as (lab, _api):
        ch = lab.chassis("chassis-1")
        ovs = lab.ovs(ch.name)
        mine = (ipaddress.ip_network(lab.chassis("chassis-2").tunnel_ip), "br-phy")
        labs = (ipaddress.ip_interface(ch.tunnel_cidr).network, "br-phy")
        await asyncio.to_thread(wait_for, lambda: mine in _pins(ovs), 10, 0.1, "the first pin")
        assert labs in _pins(ovs)
        old = ovs.pids["ovs-vswitchd"]
        await asyncio.to_thread(ovs.appctl, "ovs-vswitchd", "exit")
        await asyncio.to_thread(wait_for, lambda: not pid_alive(old), 10, 0.05,
                                "ovs-vswitchd gone")
        await asyncio.to_thread(restart_vswitchd, ovs)
        await asyncio.to_thread(wait_for, lambda: link_exists(ch.netns, "br-phy"), 10, 0.05,
                                "br-phy back")
        # The host's network configuration would give br-phy its address again if its tap
        # had gone with the daemon.
        nx.ip(ch.netns, "addr", "replace", ch.tunnel_cidr, "dev", "br-phy")
        nx.link_set(ch.netns, "br-phy", "up")
        await asyncio.to_thread(wait_for, lambda: mine in _pins(ovs), 15, 0.1,
                                "the pin after the restart")
        assert labs not in _pins(ovs)  # the restart did forget the pins


def link_exists(netns: str, name: str) -> bool:
    return nx.run(nx.in_netns(netns, ["ip", "link", "show", name])).returncode == 0


# -- the kernel's route changes reach the pins at once ---------------------------------------


@pytest.mark.lab
@pytest.mark.asyncio(loop_scope="function")
async def test_route_changes_are_heard_in_the_namespace_watched() -> None:
    """The notifications come from the namespace given (OVS's), not the agent's own: the only
    change made is in that namespace."""
    name = f"ferry-rt-{uuid.uuid4().hex[:8]}"
    nx.netns_add(name)
    try:
        heard = asyncio.Event()
        events = RouteEvents(nx.NETNS_DIR / name, heard.set)
        events.start()
        try:
            assert not heard.is_set()
            await asyncio.to_thread(nx.ip, name, "route", "add", "10.81.0.0/24", "dev", "lo")
            await asyncio.wait_for(heard.wait(), 5)
        finally:
            events.close()
    finally:
        nx.netns_delete(name)


def test_no_namespace_is_a_named_error(tmp_path: Path) -> None:
    with pytest.raises(RouteEventsError, match=r"ovs-vswitchd\.pid"):
        vswitchd_netns(tmp_path)
    with pytest.raises(RouteEventsError, match="nowhere"):
        RouteEvents(tmp_path / "nowhere", lambda: None).start()


def _pins_with_gateways(ovs: OvsInstance) -> dict[str, tuple[str, str | None]]:
    out = ovs.appctl("ovs-vswitchd", "ovs/route/show")
    return {str(r.prefix): (r.dev, r.gw) for r in parse_routes(out) if r.user}


@pytest.mark.lab
@pytest.mark.asyncio(loop_scope="function")
async def test_a_pin_follows_the_kernels_route_at_once() -> None:
    """A new kernel route to the other chassis (through a gateway) and its removal each reach
    the agent's pin within seconds, long before its periodic check (``REFRESH_S``)."""
    async with lab_session(2) as (lab, _api):
        ch, theirs = lab.chassis("chassis-1"), lab.chassis("chassis-2").tunnel_ip
        ovs, pin = lab.ovs(ch.name), f"{theirs}/32"
        underlay = ipaddress.ip_interface(ch.tunnel_cidr).network
        gateway = str(underlay[250])

        def pinned(want: tuple[str, str | None]) -> bool:
            return _pins_with_gateways(ovs).get(pin) == want

        await asyncio.to_thread(wait_for, lambda: pinned(("br-phy", None)), 10, 0.05,
                                "the first pin")
        took = []
        for change, want, label in (
                (("add", pin, "via", gateway, "dev", "br-phy"), ("br-phy", gateway),
                 "the pin through the new gateway"),
                (("del", pin), ("br-phy", None), "the pin back on the link")):
            start = time.monotonic()
            nx.ip(ch.netns, "route", *change)
            await asyncio.to_thread(wait_for, lambda: pinned(want), 3, 0.01, label)  # noqa: B023
            took.append(time.monotonic() - start)
    print("\nthe pin followed the kernel's route in " + ", ".join(f"{t * 1000:.0f} ms"
                                                                 for t in took))
