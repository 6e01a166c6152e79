"""Helpers for tests that run chassis agents in-process against a real lab."""

from __future__ import annotations

import asyncio
import re
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
