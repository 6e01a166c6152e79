"""FlowSync against a real OVS: the switch goes from one flow set to the next at once.

A packet traced while a sync is in flight meets the old flows or the new ones, never a mix.
The new set here is shaped like a port whose security groups start to apply on a chassis (a
live migration's claim): a gate that sends the port's traffic to a table of rules, many rules,
and last the rule that admits the sender. Applied flow-mod by flow-mod, the gate is in before
the rule, and the sender's packets are dropped in between (the datapath then caches the drop).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Iterable
from typing import cast

import pytest

from ferry.agent.flowsync import FlowSync
from ferry.core.chassis import FlowKey
from ferry.lab.ovs_instance import OvsInstance
from ferry.switch.flow import OFPP_IN_PORT, OFPP_LOCAL, Flow, GotoTable, Match, Output
from ferry.switch.openflow import OpenFlowError, Switch
from tests.test_openflow import BRIDGE, TIMEOUT, events, ovs, switch  # noqa: F401 (fixtures)

PACKET = "in_port=LOCAL,ip,nw_src=10.0.0.1,nw_dst=10.0.0.2"
RULES = 20_000


def flow_set(gated: bool) -> dict[FlowKey, Flow]:
    back = (Output(OFPP_IN_PORT),)
    if not gated:
        flows = [Flow(0, 100, Match(in_port=OFPP_LOCAL), back)]
    else:
        flows = [Flow(0, 200, Match(in_port=OFPP_LOCAL, eth_type=0x800), (GotoTable(1),))]
        flows += [Flow(1, 100, Match(eth_type=0x800, reg0=i), back) for i in range(1, RULES)]
        flows.append(Flow(1, 50, Match(eth_type=0x800, ipv4_src="10.0.0.1"), back))
    return {f.key: f for f in flows}


class Tracer:
    """ofproto/trace of PACKET in a loop (a thread): the datapath actions each trace got."""

    def __init__(self, switch_ovs: OvsInstance) -> None:
        self.ovs = switch_ovs
        self.results: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.loop = asyncio.get_running_loop()
        self.answered = asyncio.Event()

    def _run(self) -> None:
        while not self.stop.is_set():
            out = self.ovs.appctl("ovs-vswitchd", "ofproto/trace", BRIDGE, PACKET)
            self.results.append(out.strip().splitlines()[-1])
            self.loop.call_soon_threadsafe(self.answered.set)

    async def next_answer(self) -> None:
        """Wait for a trace that started after this call."""
        for _ in range(2):  # the one in progress may have started before
            self.answered.clear()
            await self.answered.wait()

    def __enter__(self) -> Tracer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()


@pytest.mark.ovs
async def test_a_sync_is_never_seen_half_applied(ovs: OvsInstance,  # noqa: F811
                                                switch: Switch) -> None:  # noqa: F811
    gated = False
    sync = FlowSync("test", switch, lambda: flow_set(gated), n_apps=1)
    task = asyncio.create_task(sync.run())
    traces: list[str] = []
    in_flight = 0  # traces that OVS answered while a sync was in flight
    try:
        sync.mark_dirty()
        async with asyncio.timeout(TIMEOUT):
            await sync.wait_synced()
        for gated in (True, False) * 3:
            with Tracer(ovs) as tracer:
                await tracer.next_answer()  # tracing from before the sync ...
                sync.mark_dirty()
                start = len(tracer.results)
                async with asyncio.timeout(TIMEOUT):
                    await sync.wait_synced()
                done = len(tracer.results)
                await tracer.next_answer()  # ... to after it
            in_flight += done - start
            traces += tracer.results
            assert sorted(map(str, await switch.dump_flows())) == sorted(
                map(str, flow_set(gated).values()))
    finally:
        task.cancel()
    assert in_flight >= 6, f"only {in_flight} traces while syncing: the test saw nothing"
    assert "Datapath actions: drop" not in traces, traces


@pytest.mark.ovs
async def test_a_refused_flow_holds_back_no_other(switch: Switch) -> None:  # noqa: F811
    """The bundle is refused whole; FlowSync then installs every flow the switch accepts, and
    keeps syncing what comes next."""
    good = [Flow(0, 10 + i, Match(in_port=i + 1), (Output(2),)) for i in range(3)]
    bad = Flow(0, 99, Match(ipv4_src="10.0.0.1"), (Output(2),))  # no eth_type: refused
    desired: dict[FlowKey, Flow] = {f.key: f for f in [good[0], bad, *good[1:]]}
    sync = FlowSync("test", switch, lambda: desired, n_apps=1)
    refused = ErrorLogged("switch rejected flows")
    logging.getLogger("ferry.agent.flowsync").addHandler(refused)
    task = asyncio.create_task(sync.run())
    try:
        sync.mark_dirty()
        async with asyncio.timeout(TIMEOUT):
            await refused.seen.wait()
        assert set(await switch.dump_flows()) == set(good)
        later = Flow(0, 20, Match(in_port=7), (Output(2),))
        del desired[bad.key]
        desired[later.key] = later
        sync.mark_dirty()
        async with asyncio.timeout(TIMEOUT):
            await sync.wait_synced()
        assert set(await switch.dump_flows()) == {*good, later}
    finally:
        task.cancel()
        logging.getLogger("ferry.agent.flowsync").removeHandler(refused)


class ErrorLogged(logging.Handler):
    """Sets ``seen`` once an error record containing ``text`` is logged."""

    def __init__(self, text: str) -> None:
        super().__init__(logging.ERROR)
        self.text = text
        self.seen = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            self.seen.set()


class BundleRefusingSwitch:
    """A switch that refuses bundles (an OpenFlow error that names no flow), as a switch
    without bundle support would; flow by flow, it keeps what it is sent."""

    def __init__(self) -> None:
        self.flows: set[Flow] = set()
        self.bundles = 0

    async def wait_connected(self) -> None:
        return None

    async def dump_flows(self) -> list[Flow]:
        return sorted(self.flows, key=str)

    async def apply(self, adds: Iterable[Flow] = (), modifies: Iterable[Flow] = (),
                    deletes: Iterable[Flow] = (), *, atomic: bool = False) -> None:
        if atomic:
            self.bundles += 1
            raise OpenFlowError("bundle 1: OFPBFC_BAD_TYPE")
        self.flows -= {f for f in deletes}
        self.flows |= {*adds, *modifies}


async def test_a_refused_bundle_falls_back_to_flow_by_flow() -> None:
    fake = BundleRefusingSwitch()
    flows: dict[FlowKey, Flow] = {f.key: f for f in (Flow(0, 10, Match(in_port=1), (Output(2),)),)}
    sync = FlowSync("test", cast(Switch, fake), lambda: flows, n_apps=1)
    task = asyncio.create_task(sync.run())
    try:
        sync.mark_dirty()
        async with asyncio.timeout(TIMEOUT):
            await sync.wait_synced()
        assert fake.flows == set(flows.values()) and fake.bundles == 1
    finally:
        task.cancel()
