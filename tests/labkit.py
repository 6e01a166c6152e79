"""Helpers for tests that run chassis agents in-process against a real lab."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ferry.agent.agent import AgentConfig, ChassisAgent
from ferry.lab.lab import Lab
from ferry.model.northbound import Northbound
from ferry.model.objects import FixedIP, LogicalPort, PortBinding
from ferry.store.base import Store

P = "projA"


async def eventually(check: Callable[[], Any], within: float = 15.0, what: str = "") -> Any:
    """Run the blocking ``check`` in a thread until it returns something truthy."""
    deadline = asyncio.get_running_loop().time() + within
    last: Any = None
    while True:
        last = await asyncio.to_thread(check)
        if last:
            return last
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what or check}: last {last!r}")
        await asyncio.sleep(0.05)


def agent_config(lab: Lab, ref: str | int) -> AgentConfig:
    ch = lab.chassis(ref)
    return AgentConfig(chassis=ch.name, tunnel_ip=ch.tunnel_ip, ovsdb_url=ch.ovsdb_url,
                       rundir=Path(ch.rundir), bridge=ch.bridge)


@dataclass
class LabRig:
    lab: Lab
    store: Store
    agents: dict[str, ChassisAgent] = field(default_factory=dict)

    @property
    def nb(self) -> Northbound:
        return Northbound(self.store)

    async def start_agent(self, ref: str | int) -> ChassisAgent:
        cfg = agent_config(self.lab, ref)
        agent = ChassisAgent(cfg, self.store)
        await agent.start()
        self.agents[cfg.chassis] = agent
        return agent

    async def stop_agent(self, name: str) -> None:
        await self.agents.pop(name).stop()

    async def synced(self) -> None:
        """Every agent has applied everything it has seen so far."""
        for agent in self.agents.values():
            await asyncio.wait_for(agent.flows.wait_synced(), 15)

    async def vm(self, name: str, port: LogicalPort, chassis: str) -> None:
        ip = port.fixed_ips[0].ip_address
        await asyncio.to_thread(self.lab.add_vm, name, chassis, port.mac, f"{ip}/24", port.id)

    def ping(self, vm: str, ip: str, count: int = 1, wait: float = 1.0,
             extra: tuple[str, ...] = ()) -> bool:
        r = self.lab.exec_in_vm(vm, ["ping", "-n", "-q", "-c", str(count), "-i", "0.2",
                                     "-W", str(wait), *extra, ip])
        return r.returncode == 0

    def rx_packets(self, vm: str) -> int:
        v = self.lab.vm(vm)
        iface = v.active_vif.guest_if if v.active_vif else "eth0"
        r = self.lab.exec_in_vm(vm, ["cat", f"/sys/class/net/{iface}/statistics/rx_packets"])
        return int(r.stdout)

    def flows_of(self, ref: str | int) -> list[str]:
        return bridge_flows(self.lab, ref)


def bridge_flows(lab: Lab, ref: str | int) -> list[str]:
    """br-int's flows without counters, sorted: comparable across restarts."""
    out = lab.ovs(ref).ofctl("dump-flows", "br-int", "--no-stats")
    lines = [re.sub(r"\s+", " ", line.strip()) for line in out.splitlines()]
    return sorted(line for line in lines if line and not line.startswith("OFPST"))


async def make_port(nb: Northbound, id: str, net: str, sub: str, mac: str, ip: str,
                    host: str, **kw: Any) -> LogicalPort:
    return await nb.create(LogicalPort(id=id, topic=kw.pop("topic", P), network_id=net, mac=mac,
                                       fixed_ips=[FixedIP(subnet_id=sub, ip_address=ip)],  # type: ignore[arg-type]
                                       bindings=[PortBinding(host=host)], **kw))


UDP_SEQ_SINK = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[1])))
print("ready", flush=True)
s.settimeout(float(sys.argv[2]))
got = set()
try:
    while True:
        got.add(int(s.recv(64)))
except TimeoutError:
    pass
print(len(got), max(got) + 1 if got else 0)
"""

UDP_SEQ_SOURCE = """
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
start = time.monotonic()
for seq in range(int(sys.argv[3])):
    time.sleep(max(0.0, start + seq / 1000 - time.monotonic()))
    s.sendto(str(seq).encode(), (sys.argv[1], int(sys.argv[2])))
"""


def udp_through_vif_churn(lab: Lab, sender: str, receiver: str, target: str, churn_on: str,
                          churn_mac: str, churn_cidr: str, sent: int = 6000
                          ) -> tuple[int, int, int]:
    """VM ``sender`` sends ``sent`` numbered UDP datagrams at 1 kHz to ``target`` (VM
    ``receiver``) while a VM ``z`` is plugged on ``churn_on`` and deleted again and again.
    Returns (datagrams received, highest sequence number + 1, plug/unplug cycles)."""
    sink = lab.popen_in_vm(receiver, [sys.executable, "-c", UDP_SEQ_SINK, "9997", "1.0"],
                           stdout=subprocess.PIPE, text=True)
    source = None
    try:
        assert sink.stdout is not None and sink.stdout.readline().strip() == "ready"
        source = lab.popen_in_vm(sender, [sys.executable, "-c", UDP_SEQ_SOURCE, target,
                                          "9997", str(sent)])
        cycles = 0
        while source.poll() is None:
            lab.add_vm("z", churn_on, churn_mac, churn_cidr, "port-z")
            lab.delete_vm("z")
            cycles += 1
        assert source.returncode == 0
        out, _ = sink.communicate(timeout=10)
    finally:
        for proc in (source, sink):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
    received, highest = map(int, out.split())
    return received, highest, cycles
