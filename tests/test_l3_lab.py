"""Distributed routing on a real three-chassis lab, set up through the API as a tenant would:
two subnets joined by a router, VMs on different chassis with a default route via their
subnet's gateway. They ping each other across subnets and ping their gateways (answered by
the datapath on their own chassis), and still do after one of them live-migrates."""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
import pytest_asyncio

from ferry.lab.lab import Lab
from ferry.lab.migrate import migrate
from ferry.lab.neutron import Neutron
from ferry.lab.nova import boot
from ferry.lab.session import lab_session
from tests.labkit import eventually

pytestmark = [pytest.mark.lab, pytest.mark.asyncio(loop_scope="module")]

SUBNETS = {"left": "10.60.1.0/24", "right": "10.60.2.0/24"}
GATEWAYS = {"left": "10.60.1.1", "right": "10.60.2.1"}
VMS = {"va": ("left", "chassis-1"), "vb": ("right", "chassis-2"), "vc": ("left", "chassis-3")}


@dataclass
class Ping:
    sent: int
    received: int
    duplicates: int
    ttls: set[int]
    avg_rtt_ms: float | None


class Rig:
    def __init__(self, lab: Lab, api: Neutron, ips: dict[str, str]) -> None:
        self.lab, self.api, self.ips = lab, api, ips

    def ping(self, vm: str, ip: str, count: int = 1, interval: float = 0.2,
             ttl: int | None = None, wait: float = 1.0) -> Ping:
        argv = ["ping", "-n", "-c", str(count), "-i", str(interval), "-W", str(wait)]
        if ttl is not None:
            argv += ["-t", str(ttl)]
        r = self.lab.exec_in_vm(vm, [*argv, ip], timeout=count * interval + wait + 10)
        return parse_ping(r.stdout)

    def reaches(self, vm: str, ip: str) -> bool:
        return self.ping(vm, ip).received == 1


def parse_ping(out: str) -> Ping:
    """iputils ping's summary and per-reply lines."""
    m = re.search(r"(\d+) packets transmitted, (\d+) received", out)
    if m is None:
        raise AssertionError(f"unexpected ping output: {out!r}")
    rtt = re.search(r"= [\d.]+/([\d.]+)/", out)
    return Ping(int(m.group(1)), int(m.group(2)), out.count("(DUP!)"),
                {int(t) for t in re.findall(r"ttl=(\d+)", out)},
                float(rtt.group(1)) if rtt else None)


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def rig() -> AsyncIterator[Rig]:
    async with lab_session(3) as (lab, api):
        router = await api.create("router", name="r1")
        subnets = {}
        for name, cidr in SUBNETS.items():
            net = await api.create("network", name=name)
            subnets[name] = await api.create("subnet", network_id=net["id"], cidr=cidr,
                                             ip_version=4)
            assert subnets[name]["gateway_ip"] == GATEWAYS[name]
            await api.call("PUT", f"/routers/{router['id']}/add_router_interface",
                           {"subnet_id": subnets[name]["id"]})
        ips = {}
        for vm, (side, chassis) in VMS.items():
            port = await api.create("port", network_id=subnets[side]["network_id"], name=vm)
            ips[vm] = port["fixed_ips"][0]["ip_address"]
            await boot(lab, api, vm, port["id"], chassis)
        yield Rig(lab, api, ips)


async def routed_everywhere(rig: Rig) -> None:
    """Every VM reaches its gateway, the router's other address and the VMs on the other
    subnet; waits for the controllers (no fixed sleeps)."""
    for vm, (side, _) in VMS.items():
        other = "right" if side == "left" else "left"
        for ip in (GATEWAYS[side], GATEWAYS[other],
                   *(rig.ips[o] for o, (s, _) in VMS.items() if s != side)):
            await eventually(lambda vm=vm, ip=ip: rig.reaches(vm, ip), within=20,
                             what=f"{vm} pings {ip}")


async def test_vms_ping_across_subnets_and_their_gateways(rig: Rig) -> None:
    await routed_everywhere(rig)
    across = await asyncio.to_thread(rig.ping, "va", rig.ips["vb"], 20, 0.05)
    gateway = await asyncio.to_thread(rig.ping, "va", GATEWAYS["left"], 20, 0.05)
    print(f"\nrouted va→vb (chassis-1→chassis-2): {across}\ngateway va→10.60.1.1: {gateway}")
    assert across.received == across.sent == 20 and across.duplicates == 0
    # One router hop each way: vb's reply (TTL 64) arrives with 63. The gateway's own reply
    # is generated in the datapath from the request, not routed.
    assert across.ttls == {63}
    assert gateway.received == 20 and gateway.duplicates == 0


async def test_ttl_is_decremented_in_the_datapath(rig: Rig) -> None:
    await eventually(lambda: rig.reaches("va", rig.ips["vb"]), what="va pings vb")
    assert (await asyncio.to_thread(rig.ping, "va", rig.ips["vb"], 1, 0.2, 2)).received == 1
    assert (await asyncio.to_thread(rig.ping, "va", rig.ips["vb"], 1, 0.2, 1)).received == 0


async def test_routing_follows_a_live_migration(rig: Rig) -> None:
    await routed_everywhere(rig)
    # A 100 Hz routed ping from va to vb runs through the migration of vb.
    result: list[Ping] = []
    pinger = threading.Thread(target=lambda: result.append(
        rig.ping("va", rig.ips["vb"], 300, 0.01, wait=0.5)))
    pinger.start()
    try:
        run = await migrate(rig.lab, rig.api, "vb", "chassis-3", pause_ms=50)
    finally:
        await asyncio.to_thread(pinger.join)
    assert run.record is not None
    during = result[0]
    print(f"\n100 Hz routed ping va→vb through vb's migration chassis-2→chassis-3: {during}")
    assert during.duplicates == 0
    assert during.received >= during.sent - 30, during  # the 50 ms pause, and some slack
    await routed_everywhere(rig)
    # vb is now on chassis-3, with vc (other subnet): routed on the same chassis too.
    assert rig.lab.vm("vb").active_vif.chassis == "chassis-3"  # type: ignore[union-attr]
    back = await asyncio.to_thread(rig.ping, "vc", rig.ips["vb"], 10, 0.05)
    assert back.received == 10 and back.ttls == {63}
