"""Flow installation rate and barrier latency against a real Open vSwitch.

Starts a private OVS (own run dir, removed after), listens as the bridge's controller, then
installs N distinct flows (cold: serialized by os-ken; cached: the same flows again after a
delete, served from the encode cache), each run ending when OVS acked the last barrier.
Also measures plain barrier round trips and the atomic (bundle) path.

    .venv/bin/python bench/openflow.py [--flows 10000] [--chunk 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from ferry.lab.ovs_instance import OvsInstance
from ferry.switch.flow import Flow, GotoTable, Match, Output, SetField
from ferry.switch.openflow import Switch, clear_encode_cache, controller_vsctl_args

BRIDGE = "br-int"


def make_flows(count: int) -> list[Flow]:
    """Distinct flows of a realistic shape: match port + MAC, set a register, go on."""
    flows = []
    for i in range(count):
        mac = f"02:00:{i >> 24 & 0xFF:02x}:{i >> 16 & 0xFF:02x}:{i >> 8 & 0xFF:02x}:{i & 0xFF:02x}"
        flows.append(Flow(table=10, priority=100, cookie=0xBE,
                          match=Match(in_port=i % 1000 + 1, eth_dst=mac),
                          actions=(SetField("reg6", i), Output(i % 1000 + 1), GotoTable(20))))
    return flows


async def timed_apply(sw: Switch, flows: list[Flow], chunk: int, atomic: bool = False) -> float:
    start = time.perf_counter()
    await sw.apply(flows, chunk=chunk, atomic=atomic)
    return time.perf_counter() - start


async def clear(sw: Switch, flows: list[Flow]) -> None:
    await sw.apply(deletes=flows)
    assert await sw.dump_flows(cookie=0xBE) == []


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def run(count: int, chunk: int, rundir: Path) -> None:
    ovs = OvsInstance(rundir)
    ovs.start()
    sw = Switch("bench")
    try:
        ovs.add_bridge(BRIDGE)
        target = f"unix:{rundir / 'ctl.sock'}"
        await sw.listen(target)
        ovs.vsctl(*controller_vsctl_args(BRIDGE, target))
        async with asyncio.timeout(10):
            await sw.wait_connected()
        flows = make_flows(count)

        clear_encode_cache()
        cold = await timed_apply(sw, flows, chunk)
        dumped = await sw.dump_flows(cookie=0xBE)
        assert len(dumped) == count and set(dumped) == set(flows), "dump differs from install"
        await clear(sw, flows)
        cached = await timed_apply(sw, flows, chunk)
        assert set(await sw.dump_flows(cookie=0xBE)) == set(flows)
        await clear(sw, flows)
        bundled = await timed_apply(sw, flows, chunk, atomic=True)
        assert len(await sw.dump_flows(cookie=0xBE)) == count

        start = time.perf_counter()
        for flow in flows:
            hash(flow)
        hash_s = time.perf_counter() - start

        barriers = []
        for _ in range(1000):
            t0 = time.perf_counter()
            await sw.barrier()
            barriers.append(time.perf_counter() - t0)

        singles = []
        for flow in flows[:1000]:
            t0 = time.perf_counter()
            await sw.apply(modifies=[flow])
            singles.append(time.perf_counter() - t0)

        print(f"flows: {count}, chunk: {chunk} flow-mods per barrier")
        print(f"(a) cold   (os-ken serialize + install + barrier ack): {count / cold:9.0f} flows/s"
              f"  ({cold * 1000:.0f} ms)")
        print(f"(b) cached (encode cache hit + install + barrier ack):  {count / cached:9.0f}"
              f" flows/s  ({cached * 1000:.0f} ms)")
        print(f"(c) cached, atomic bundle (open/add/barrier/commit):    {count / bundled:9.0f}"
              f" flows/s  ({bundled * 1000:.0f} ms)")
        print(f"    hashing {count} flows: {hash_s * 1e6 / count:.2f} us/flow")
        print(f"barrier round trip (idle, n=1000): p50 {percentile(barriers, 0.5) * 1e6:.0f} us,"
              f" p99 {percentile(barriers, 0.99) * 1e6:.0f} us,"
              f" mean {statistics.fmean(barriers) * 1e6:.0f} us")
        print(f"apply() of one cached flow-mod + barrier (n=1000):"
              f" p50 {percentile(singles, 0.5) * 1e6:.0f} us,"
              f" p99 {percentile(singles, 0.99) * 1e6:.0f} us")
    finally:
        await sw.close()
        ovs.stop()


def main() -> None:
    args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args.add_argument("--flows", type=int, default=10_000)
    args.add_argument("--chunk", type=int, default=2000)
    opts = args.parse_args()
    rundir = Path(tempfile.mkdtemp(prefix="fob", dir="/tmp"))
    try:
        asyncio.run(run(opts.flows, opts.chunk, rundir))
    finally:
        shutil.rmtree(rundir, ignore_errors=True)


if __name__ == "__main__":
    main()
