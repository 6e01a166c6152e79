"""L2 over Geneve on a real three-chassis lab, with real packets.

Three chassis (OVS in namespaces), the controllers running in this process on the memory
store. net1 has a1, a2 on chassis-1, b1 on chassis-2 and c1 on chassis-3; net2 reuses net1's
CIDR, with x1 on chassis-1 and y1 on chassis-2.
"""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from ferry.lab.lab import Lab, destroy_leftovers
from ferry.model.objects import LogicalSwitch, Subnet
from ferry.store.memory import MemoryStore
from tests.labkit import LabRig, P, eventually, make_port

pytestmark = [pytest.mark.lab, pytest.mark.asyncio(loop_scope="module")]

IPS = {"a1": "10.0.0.11", "a2": "10.0.0.12", "b1": "10.0.0.21", "c1": "10.0.0.31",
       "x1": "10.0.0.11", "y1": "10.0.0.21"}


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def rig() -> AsyncIterator[LabRig]:
    lab = await asyncio.to_thread(Lab.create, 3)
    store = MemoryStore()
    r = LabRig(lab, store)
    try:
        for i in (1, 2, 3):
            await r.start_agent(i)
        nb = r.nb
        await nb.create(LogicalSwitch(id="net1", topic=P))
        await nb.create(LogicalSwitch(id="net2", topic=P))
        await nb.create(Subnet(id="s1", topic=P, network_id="net1", cidr="10.0.0.0/24"))  # type: ignore[arg-type]
        await nb.create(Subnet(id="s2", topic=P, network_id="net2", cidr="10.0.0.0/24"))  # type: ignore[arg-type]
        placement = {"a1": ("net1", "chassis-1"), "a2": ("net1", "chassis-1"),
                     "b1": ("net1", "chassis-2"), "c1": ("net1", "chassis-3"),
                     "x1": ("net2", "chassis-1"), "y1": ("net2", "chassis-2")}
        for i, (name, (net, ch)) in enumerate(placement.items()):
            sub = "s1" if net == "net1" else "s2"
            port = await make_port(nb, name, net, sub, f"fa:16:3e:00:01:{i:02x}", IPS[name], ch)
            await r.vm(name, port, ch)
        await r.synced()
        yield r
    finally:
        for name in list(r.agents):
            await r.stop_agent(name)
        await asyncio.to_thread(lab.destroy)
        await asyncio.to_thread(destroy_leftovers, lab.prefix)


async def test_same_chassis_and_cross_chassis_ping(rig: LabRig) -> None:
    for dst in ("a2", "b1", "c1"):
        await eventually(lambda d=dst: rig.ping("a1", IPS[d]), what=f"a1 → {dst}")  # type: ignore[misc]
    await eventually(lambda: rig.ping("c1", IPS["b1"]), what="c1 → b1")
    await eventually(lambda: rig.ping("y1", IPS["x1"]), what="y1 → x1 on net2")


async def test_networks_are_isolated_with_overlapping_ips(rig: LabRig) -> None:
    await eventually(lambda: rig.ping("x1", IPS["y1"]), what="x1 → y1")
    b1_before = await asyncio.to_thread(rig.rx_packets, "b1")
    # 10.0.0.12 exists only on net1 (a2): x1 on net2 must not reach it.
    assert not await asyncio.to_thread(rig.ping, "x1", IPS["a2"], 3)
    # x1 → 10.0.0.21 reaches y1 (net2) and not b1 (net1, same address).
    assert await asyncio.to_thread(rig.ping, "x1", IPS["y1"], 3)
    assert await asyncio.to_thread(rig.rx_packets, "b1") == b1_before


async def test_spoofed_ip_gets_nothing_through(rig: LabRig) -> None:
    await eventually(lambda: rig.ping("a1", IPS["b1"]), what="a1 → b1")
    rig.lab.exec_in_vm("a1", ["ip", "addr", "add", "10.0.0.99/24", "dev", "eth0"], check=True)
    try:
        b1_before = await asyncio.to_thread(rig.rx_packets, "b1")
        assert not await asyncio.to_thread(rig.ping, "a1", IPS["b1"], 3, 1.0,
                                           ("-I", "10.0.0.99"))
        # Not one packet (not even the ARP) from the spoofed address reached b1.
        assert await asyncio.to_thread(rig.rx_packets, "b1") == b1_before
    finally:
        rig.lab.exec_in_vm("a1", ["ip", "addr", "del", "10.0.0.99/24", "dev", "eth0"])


async def test_spoofed_mac_gets_nothing_through(rig: LabRig) -> None:
    vm = rig.lab.vm("a1")
    rig.lab.exec_in_vm("a1", ["ip", "link", "set", "eth0", "address", "fa:16:3e:99:99:99"],
                       check=True)
    try:
        rig.lab.exec_in_vm("a1", ["ip", "neigh", "flush", "dev", "eth0"])
        b1_before = await asyncio.to_thread(rig.rx_packets, "b1")
        assert not await asyncio.to_thread(rig.ping, "a1", IPS["b1"], 3)
        assert await asyncio.to_thread(rig.rx_packets, "b1") == b1_before
    finally:
        rig.lab.exec_in_vm("a1", ["ip", "link", "set", "eth0", "address", vm.mac], check=True)
    await eventually(lambda: rig.ping("a1", IPS["b1"]), what="a1 → b1 with its own MAC again")


async def test_broadcast_reaches_exactly_the_network(rig: LabRig) -> None:
    for vm in IPS:
        rig.lab.exec_in_vm(vm, ["sysctl", "-qw", "net.ipv4.icmp_echo_ignore_broadcasts=0"],
                           check=True)
    await eventually(lambda: rig.ping("a1", IPS["c1"]), what="a1 → c1")
    others = {vm: await asyncio.to_thread(rig.rx_packets, vm) for vm in ("x1", "y1")}
    r = await asyncio.to_thread(rig.lab.exec_in_vm, "a1",
                                ["ping", "-n", "-b", "-c", "3", "-i", "0.3", "-W", "1",
                                 "10.0.0.255"])
    responders = {line.split()[3].rstrip(":") for line in r.stdout.splitlines()
                  if " bytes from " in line}
    # a1's own kernel answers too; everyone else on net1 answers, no one else does.
    assert responders == {IPS["a1"], IPS["a2"], IPS["b1"], IPS["c1"]}, r.stdout
    for vm, before in others.items():
        assert await asyncio.to_thread(rig.rx_packets, vm) == before, f"{vm} got net1's flood"


async def test_controller_restart_keeps_traffic_and_flows(rig: LabRig) -> None:
    await eventually(lambda: rig.ping("a1", IPS["b1"]), what="a1 → b1")
    before = {i: await asyncio.to_thread(rig.flows_of, i) for i in (1, 2, 3)}
    assert any("tun_dst" in f or "tun_ipv4_dst" in f for f in before[2])
    pinger = rig.lab.popen_in_vm("a1", ["ping", "-n", "-q", "-c", "300", "-i", "0.01",
                                        IPS["b1"]], stdout=subprocess.PIPE, text=True)
    try:
        await rig.stop_agent("chassis-2")
        agent = await rig.start_agent(2)
        await asyncio.wait_for(agent.flows.wait_synced(), 15)
        assert pinger.poll() is None, "the restart did not happen while traffic was flowing"
    finally:
        out, _ = await asyncio.to_thread(pinger.communicate)
    assert " 0% packet loss" in out, out
    after = {i: await asyncio.to_thread(rig.flows_of, i) for i in (1, 2, 3)}
    assert after == before
