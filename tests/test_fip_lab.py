"""Floating IPs on a real three-chassis lab, set up through the API as an admin and a tenant
would: an external flat network on physnet1 (every chassis' br-ex, the lab's outside host
172.24.4.1 on it), a router with its gateway there and an interface on the tenant's subnet, a
VM with a floating IP. The outside reaches the VM by its floating IP, the VM reaches the
outside as its floating IP, and both still hold after a live migration, where a gratuitous
ARP from the new chassis moves the external fabric's entry for the FIP's MAC at once."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
import pytest_asyncio

from ferry.lab import netns as nx
from ferry.lab.lab import EXTERNAL_PHYSNET, Lab
from ferry.lab.migrate import migrate
from ferry.lab.neutron import Neutron
from ferry.lab.nova import boot
from ferry.lab.session import lab_session
from tests.labkit import eventually
from tests.test_l3_lab import Ping, parse_ping

pytestmark = [pytest.mark.lab, pytest.mark.asyncio(loop_scope="module")]

PRIVATE = "10.70.1.0/24"
EXTERNAL = "172.24.4.0/24"

# Run on the outside host: wait for one UDP datagram on port 9999, print its source address.
_RECEIVE = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", 9999))
s.settimeout(float(sys.argv[1]))
data, addr = s.recvfrom(100)
print(addr[0], flush=True)
"""

# Run in the root namespace on one of the lab's own links (argv[1]) for argv[2] seconds: print
# the sender of every gratuitous ARP (sender IP = target IP) for the IP argv[3], or with
# "rarp" there, the source MAC of every RARP (QEMU's announcement on resume).
_ANNOUNCEMENTS = """
import socket, sys, time
dev, secs, what = sys.argv[1], float(sys.argv[2]), sys.argv[3]
ip = None if what == "rarp" else socket.inet_aton(what)
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
s.bind((dev, 0))
print("ready", flush=True)
end = time.monotonic() + secs
while time.monotonic() < end:
    s.settimeout(max(0.01, end - time.monotonic()))
    try:
        f = s.recv(100)
    except OSError:
        continue
    if ip is None and f[12:14].hex() == "8035":
        print(f[6:12].hex(":"), flush=True)
    elif ip is not None and f[12:14].hex() == "0806" and f[28:32] == ip and f[38:42] == ip:
        print(f[22:28].hex(":"), flush=True)
"""


@dataclass
class Rig:
    lab: Lab
    api: Neutron
    fip: str
    fixed: str
    mac: str

    def ping_from_outside(self, count: int = 1, interval: float = 0.2,
                          wait: float = 1.0) -> Ping:
        argv = ["ping", "-n", "-c", str(count), "-i", str(interval), "-W", str(wait), self.fip]
        r = self.lab.exec_outside(argv, timeout=count * interval + wait + 10)
        return parse_ping(r.stdout)

    def source_seen_outside(self) -> str | None:
        """The source address of a UDP datagram the VM sends to the outside host."""
        server = self.lab.popen_outside([sys.executable, "-c", _RECEIVE, "3"],
                                        stdout=subprocess.PIPE, text=True)
        try:
            for _ in range(25):
                self.lab.exec_in_vm("vm1", [sys.executable, "-c",
                                            "import socket; socket.socket(2, 2).sendto("
                                            f"b'x', ('{self.lab.outside_ip}', 9999))"])
                try:
                    out, _ = server.communicate(timeout=0.1)
                    return out.strip() or None
                except subprocess.TimeoutExpired:
                    continue
            return None
        finally:
            if server.poll() is None:
                server.kill()
                server.wait()

    def fdb_port(self) -> str | None:
        """The external bridge's port for the FIP's MAC (which chassis gets its frames)."""
        out = nx.run(["bridge", "fdb", "show", "br", self.lab.external_bridge]).stdout
        m = re.search(rf"^{self.mac} dev (\S+)", out, re.M)
        return m.group(1) if m else None


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def rig() -> AsyncIterator[Rig]:
    async with lab_session(3) as (lab, api):
        public = await api.create("network", name="public", **{
            "router:external": True, "provider:network_type": "flat",
            "provider:physical_network": EXTERNAL_PHYSNET})
        await api.create("subnet", network_id=public["id"], cidr=EXTERNAL, ip_version=4,
                         gateway_ip=lab.outside_ip, enable_dhcp=False)
        private = await api.create("network", name="private")
        subnet = await api.create("subnet", network_id=private["id"], cidr=PRIVATE,
                                  ip_version=4)
        router = await api.create("router", name="r1",
                                  external_gateway_info={"network_id": public["id"]})
        await api.call("PUT", f"/routers/{router['id']}/add_router_interface",
                       {"subnet_id": subnet["id"]})
        port = await api.create("port", network_id=private["id"], name="vm1")
        for proto in ("icmp", "udp"):  # the tenant lets the outside in
            await api.call("POST", "/security-group-rules", {"security_group_rule": {
                "security_group_id": port["security_groups"][0], "direction": "ingress",
                "ethertype": "IPv4", "protocol": proto,
                "remote_ip_prefix": "0.0.0.0/0"}})
        await boot(lab, api, "vm1", port["id"], "chassis-1")
        fip = await api.create("floatingip", floating_network_id=public["id"],
                               port_id=port["id"])
        yield Rig(lab, api, fip["floating_ip_address"],
                  port["fixed_ips"][0]["ip_address"], port["mac_address"])


async def reachable(rig: Rig) -> None:
    await eventually(lambda: rig.ping_from_outside().received == 1, within=20,
                     what=f"outside pings {rig.fip}")


async def test_outside_reaches_the_vm_by_its_floating_ip(rig: Rig) -> None:
    await reachable(rig)
    ping = await asyncio.to_thread(rig.ping_from_outside, 20, 0.05)
    print(f"\noutside → FIP {rig.fip} (vm1 on chassis-1): {ping}")
    assert ping.received == ping.sent == 20 and ping.duplicates == 0
    # The outside resolved the FIP to the VM's MAC (answered by chassis-1's datapath), and
    # one router hop was taken each way (DNAT in, SNAT out: the reply has TTL 63).
    neigh = rig.lab.exec_outside(["ip", "neigh", "show", rig.fip]).stdout
    assert rig.mac in neigh, neigh
    assert ping.ttls == {63}
    assert rig.fdb_port() == f"{rig.lab.prefix}-e1"


async def test_the_vm_reaches_the_outside_as_its_floating_ip(rig: Rig) -> None:
    await reachable(rig)
    ping = await asyncio.to_thread(
        lambda: parse_ping(rig.lab.exec_in_vm("vm1", ["ping", "-n", "-c", "5", "-i", "0.05",
                                                       "-W", "1", rig.lab.outside_ip]).stdout))
    assert ping.received == 5 and ping.duplicates == 0, ping
    assert await asyncio.to_thread(rig.source_seen_outside) == rig.fip


async def test_the_floating_ip_follows_a_live_migration(rig: Rig) -> None:
    await reachable(rig)
    # ETH_P_ALL: a protocol-specific packet socket does not see frames a bridge port takes.
    watcher = await asyncio.to_thread(
        subprocess.Popen,
        [sys.executable, "-c", _ANNOUNCEMENTS, f"{rig.lab.prefix}-e2", "8", rig.fip],
        stdout=subprocess.PIPE, text=True)
    assert watcher.stdout is not None
    assert (await asyncio.to_thread(watcher.stdout.readline)).strip() == "ready"
    result: list[Ping] = []
    pinger = threading.Thread(target=lambda: result.append(
        rig.ping_from_outside(300, 0.01, wait=0.5)))
    pinger.start()
    try:
        run = await migrate(rig.lab, rig.api, "vm1", "chassis-2", pause_ms=50)
    finally:
        await asyncio.to_thread(pinger.join)
        out, _ = await asyncio.to_thread(watcher.communicate)
    assert run.record is not None
    during = result[0]
    lost_ms = (during.sent - during.received) * 10
    print(f"\n100 Hz ping outside → FIP through vm1's migration chassis-1→chassis-2 "
          f"(50 ms pause): {during}; lost {during.sent - during.received} "
          f"(≈{lost_ms} ms, pause included)")
    assert during.duplicates == 0
    assert during.received >= during.sent - 30, during
    # The new chassis announced the FIP (gratuitous ARP with the FIP's MAC, seen on its own
    # link to the external fabric), and the fabric sends the FIP's frames there.
    assert rig.mac in out.split(), out
    assert rig.fdb_port() == f"{rig.lab.prefix}-e2"
    neigh = rig.lab.exec_outside(["ip", "neigh", "show", rig.fip]).stdout
    assert rig.mac in neigh, neigh
    await reachable(rig)
    assert await asyncio.to_thread(rig.source_seen_outside) == rig.fip
    after = await asyncio.to_thread(rig.ping_from_outside, 20, 0.05)
    assert after.received == 20 and after.duplicates == 0


async def test_the_rarp_moves_the_fip_when_nova_moved_the_binding_in_the_pause(
        rig: Rig) -> None:
    """Nova activates the destination binding on libvirt's event that the source paused
    (``at-pause``): with a long pause, the port is simply Local on the destination before the
    VM runs there, no activation left for its RARP to do. The RARP must still go out on the
    destination's link to the external fabric, at the resume: the agent's gratuitous ARP
    follows the controller, which can come after the resume."""
    await reachable(rig)
    here = rig.lab.vm("vm1").active_vif.chassis  # type: ignore[union-attr]
    dest = next(c for c in ("chassis-1", "chassis-2", "chassis-3") if c != here)
    link = f"{rig.lab.prefix}-e{dest[-1]}"
    watcher = await asyncio.to_thread(
        subprocess.Popen, [sys.executable, "-c", _ANNOUNCEMENTS, link, "6", "rarp"],
        stdout=subprocess.PIPE, text=True)
    assert watcher.stdout is not None
    assert (await asyncio.to_thread(watcher.stdout.readline)).strip() == "ready"
    try:
        run = await migrate(rig.lab, rig.api, "vm1", dest, pause_ms=300,
                            binding_activation="at-pause")
    finally:
        out, _ = await asyncio.to_thread(watcher.communicate)
    # The binding moved before the VM resumed: the destination never had to activate it.
    assert run.events["binding_activated"] < run.events["resumed"], run.events
    assert run.record is not None and run.record["status"] == "done", run.record
    assert not run.record["activated"], run.record
    assert rig.mac in out.split(), f"no RARP from {rig.mac} on {link}: {out!r}"
    assert rig.fdb_port() == link
    await reachable(rig)
