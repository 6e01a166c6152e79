"""A tunnel frame of a network with no port here is dropped, and OVS caches that drop per
destination MAC, never as one datapath flow for the whole network (Classifier.static_flows)."""

from __future__ import annotations

import asyncio
import re

import pytest

from ferry.agent.flowsync import FlowSync
from ferry.core.apps import ALL_APPS
from ferry.core.chassis import ChassisCore
from ferry.lab.ovs_instance import OvsInstance
from ferry.switch.openflow import Switch
from tests.test_openflow import BRIDGE, TIMEOUT, events, ovs, switch  # noqa: F401 (fixtures)

UNKNOWN_VNI = 0x99


def megaflow(trace: str) -> str:
    found = re.search(r"^Megaflow: (.*)$", trace, re.MULTILINE)
    assert found, trace
    return found.group(1)


@pytest.mark.ovs
async def test_an_unknown_networks_tunnel_frame_is_dropped_per_destination(
        ovs: OvsInstance, switch: Switch) -> None:  # noqa: F811
    ovs.vsctl("add-port", BRIDGE, "gnv0", "--", "set", "interface", "gnv0", "type=geneve",
              "options:remote_ip=flow", "options:key=flow")
    ofport = int(ovs.vsctl("get", "interface", "gnv0", "ofport").strip())
    core = ChassisCore("ch1", tunnel_ofport=ofport)
    sync = FlowSync("ch1", switch, core.desired, n_apps=len(ALL_APPS))
    task = asyncio.create_task(sync.run())
    try:
        sync.mark_dirty()
        async with asyncio.timeout(TIMEOUT):
            await sync.wait_synced()
    finally:
        task.cancel()
    for dst in ("fa:16:3e:00:00:01", "02:42:00:00:cc:00"):
        trace = ovs.appctl("ovs-vswitchd", "ofproto/trace", BRIDGE,
                           f"in_port={ofport},tun_id={UNKNOWN_VNI:#x},tun_src=192.168.254.2,"
                           f"tun_dst=192.168.254.1,dl_src=fa:16:3e:00:00:02,dl_dst={dst},"
                           "ip,nw_src=10.0.0.2,nw_dst=10.0.0.1")
        assert "Datapath actions: drop" in trace, trace
        assert f"dl_dst={dst}" in megaflow(trace), trace
