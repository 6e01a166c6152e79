"""ferry.switch.flow value types and ferry.switch.openflow against a real Open vSwitch."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from ferry.lab.ovs_instance import OvsInstance
from ferry.switch.flow import (
    OFPP_IN_PORT,
    OFPP_LOCAL,
    OFPP_TABLE,
    Controller,
    Ct,
    DecTtl,
    Flow,
    FlowError,
    GotoTable,
    Learn,
    LearnLoad,
    LearnLoadValue,
    LearnMatch,
    LearnMatchValue,
    LearnOutput,
    Match,
    Nat,
    Output,
    RegMove,
    Resubmit,
    SetField,
)
from ferry.switch.openflow import (
    Command,
    ConnectionLost,
    FlowModError,
    NotConnected,
    PacketIn,
    Switch,
    controller_vsctl_args,
    encode_bundle_add,
    encode_flow_mod,
    reference_flow_mod,
)

BRIDGE = "br-int"
TIMEOUT = 5.0

# ---------------------------------------------------------------------------------------------
# Pure value types


def test_match_is_canonical_and_hashable() -> None:
    a = Match(reg6=5, in_port=3, eth_dst="AA:BB:CC:00:00:01")
    b = Match.of({"eth_dst": "aa:bb:cc:00:00:01", "in_port": 3, "reg6": 5})
    assert a == b and hash(a) == hash(b)
    assert list(a) == ["eth_dst", "in_port", "reg6"]
    assert Match(tun_id=7) == Match(tunnel_id=7)
    assert Match(ipv4_dst="10.0.0.7/24")["ipv4_dst"] == ("10.0.0.0", "255.255.255.0")
    assert Match(reg0=(0x1234, 0xFFFFFFFF))["reg0"] == 0x1234  # full mask dropped
    assert Match(reg0=(0x1234, 0xFF))["reg0"] == (0x34, 0xFF)
    assert Match(ipv6_dst="FE80:0:0::1")["ipv6_dst"] == "fe80::1"


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: Match(nope=1), "unknown field"),
        (lambda: Match(eth_type=0x10000), "does not fit"),
        (lambda: Match(eth_dst="zz:00:00:00:00:00"), "bad mac"),
        (lambda: Match(tun_id=1, tunnel_id=1), "given twice"),
        (lambda: Output(0), "Output port"),
        (lambda: Output(0xFFFFFFFD), "Controller"),
        (lambda: SetField("reg0", 1 << 32), "does not fit"),
        (lambda: RegMove("reg0", "reg1", 33), "bit count"),
        (lambda: Learn(table=1, specs=()), "at least one spec"),
        (lambda: LearnLoadValue("reg0", 256, n_bits=8), "learn value"),
        (lambda: Nat(ip_max="10.0.0.1"), "kind"),
        (lambda: Ct(zone=70000), "Ct zone"),
        (lambda: Flow(3, 1, Match(), (GotoTable(2),)), "later table"),
        (lambda: Flow(0, 1, Match(), (GotoTable(2), Output(1))), "last action"),
        (lambda: Flow(0, 1 << 16, Match()), "priority"),
    ],
)
def test_invalid_values_are_rejected_clearly(make: Callable[[], object], message: str) -> None:
    with pytest.raises(FlowError, match=message):
        make()


def test_flow_identity() -> None:
    f1 = Flow(0, 10, Match(in_port=1), (Output(2),), cookie=1)
    f2 = Flow(0, 10, Match(in_port=1), [Output(2)], cookie=1)  # type: ignore[arg-type]
    assert f1 == f2 and hash(f1) == hash(f2) and f1.key == (0, 10, Match(in_port=1))
    assert f1 != Flow(0, 10, Match(in_port=1), (Output(3),), cookie=1)
    assert "in_port=1" in str(f1) and "output:2" in str(f1)


@pytest.mark.parametrize("command", list(Command))
def test_flow_mod_bytes_equal_os_ken(command: Command) -> None:
    for flow in sample_flows():
        assert encode_flow_mod(flow, command) == reference_flow_mod(flow, command), str(flow)


def test_bundle_add_matches_os_ken_encoding() -> None:
    from os_ken.ofproto import ofproto_v1_3 as ofp
    from os_ken.ofproto import ofproto_v1_3_parser as parser

    from ferry.switch.openflow import _DP

    flow = Flow(0, 10, Match(in_port=1), (Output(2),))
    inner = encode_flow_mod(flow, Command.ADD)
    ours = encode_bundle_add(7, inner, xid=42)
    inner_msg = parser.OFPFlowMod(
        _DP, table_id=0, priority=10, match=parser.OFPMatch(in_port=1), out_port=ofp.OFPP_ANY,
        out_group=ofp.OFPG_ANY,
        instructions=[parser.OFPInstructionActions(
            ofp.OFPIT_APPLY_ACTIONS, [parser.OFPActionOutput(2, max_len=0)])])
    msg = parser.ONFBundleAddMsg(_DP, 7, ofp.ONF_BF_ATOMIC | ofp.ONF_BF_ORDERED, inner_msg, [])
    msg.set_xid(42)
    msg.serialize()
    assert ours == bytes(msg.buf)


# ---------------------------------------------------------------------------------------------
# Real OVS fixtures


@pytest.fixture
def ovs() -> Iterator[OvsInstance]:
    # A short path: unix socket paths are limited to 108 bytes.
    rundir = Path(tempfile.mkdtemp(prefix="fof", dir="/tmp"))
    inst = OvsInstance(rundir)
    try:
        inst.start()
        inst.add_bridge(BRIDGE)
        yield inst
    finally:
        inst.stop()
        shutil.rmtree(rundir, ignore_errors=True)


class Events:
    """What the switch callbacks saw, with awaitable conditions."""

    def __init__(self) -> None:
        self.connected = asyncio.Event()
        self.disconnected = asyncio.Event()
        self.packet_ins: asyncio.Queue[PacketIn] = asyncio.Queue()

    def on_connected(self, _switch: Switch) -> None:
        self.disconnected.clear()
        self.connected.set()

    def on_disconnected(self, _switch: Switch) -> None:
        self.connected.clear()
        self.disconnected.set()


@pytest.fixture
def events() -> Events:
    return Events()


def controller_target(ovs: OvsInstance) -> str:
    return f"unix:{ovs.rundir / 'ctl.sock'}"


@pytest.fixture
async def switch(ovs: OvsInstance, events: Events) -> AsyncIterator[Switch]:
    sw = Switch("test", on_connected=events.on_connected,
                on_disconnected=events.on_disconnected, on_packet_in=events.packet_ins.put_nowait)
    await sw.listen(controller_target(ovs))
    try:
        ovs.vsctl(*controller_vsctl_args(BRIDGE, controller_target(ovs)))
        async with asyncio.timeout(TIMEOUT):
            await sw.wait_connected()
        yield sw
    finally:
        await sw.close()


def ofctl_flows(ovs: OvsInstance) -> list[str]:
    """ovs-ofctl dump-flows lines, without counters, sorted."""
    out = ovs.ofctl("dump-flows", BRIDGE, "--no-stats")
    return sorted(line.strip() for line in out.splitlines() if line.strip())


def restart_vswitchd(ovs: OvsInstance) -> None:
    """Start ovs-vswitchd again (OvsInstance has no restart; same arguments as its start())."""
    ovs.run("ovs-vswitchd", ovs.ovsdb_url, f"--pidfile={ovs.rundir / 'ovs-vswitchd.pid'}",
            "--detach", f"--log-file={ovs.rundir / 'ovs-vswitchd.log'}")
    ovs.pids["ovs-vswitchd"] = int((ovs.rundir / "ovs-vswitchd.pid").read_text().strip())


def sample_flows() -> list[Flow]:
    """One flow per kind of thing flow.py can express."""
    learn = Learn(table=5, priority=200, idle_timeout=30, cookie=9, specs=(
        LearnMatch("eth_dst", src="eth_src"), LearnMatchValue("reg6", 7),
        LearnLoadValue("reg7", 3, n_bits=8), LearnLoad("reg5", "reg0"),
        LearnOutput("in_port_nxm")))
    return [
        Flow(0, 100, Match(in_port=1), (Output(2),), cookie=1),
        Flow(0, 95, Match(in_port=2), (Output(OFPP_IN_PORT), Output(OFPP_LOCAL)), cookie=1),
        Flow(0, 90, Match(in_port=2, eth_dst="AA:bb:cc:dd:ee:ff"),
             (SetField("reg6", 5), SetField("eth_src", "02:00:00:00:00:01"), GotoTable(3)),
             cookie=1),
        Flow(0, 80, Match(eth_type=0x800, ipv4_dst="10.0.0.0/24"),
             (DecTtl(), Resubmit(4), Resubmit(6, in_port=3), Controller(100)), cookie=1),
        Flow(0, 70, Match(reg0=(4, 0xFF), eth_src=("00:11:22:00:00:00", "ff:ff:ff:00:00:00")),
             (RegMove("reg0", "reg1", 16, src_ofs=8, dst_ofs=4), Controller(200, reason=0)),
             cookie=2),
        Flow(1, 70, Match(tun_id=5, tun_ipv4_dst="1.2.3.4", metadata=7),
             (SetField("tunnel_id", 99), Controller(200, userdata=b"hello")), cookie=2),
        Flow(1, 60, Match(tun_id=6), (Controller(0, controller_id=0xFFFF),), cookie=2),
        Flow(2, 70, Match(in_port=5), (learn,), cookie=2),
        Flow(2, 65, Match(in_port=6), (dataclasses.replace(learn, limit=64),), cookie=2),
        Flow(2, 60, Match(eth_type=0x806, arp_op=1, arp_tpa="10.0.0.1", arp_spa="10.0.0.2",
                          arp_sha="02:00:00:00:00:02"), (), cookie=2),
        Flow(3, 70, Match(eth_type=0x800, ct_state=(0x21, 0x21)),
             (Ct(commit=True, zone=5, table=4, nat=Nat("src", "10.0.0.1", "10.0.0.9", 100, 200)),),
             cookie=3),
        Flow(3, 60, Match(eth_type=0x800), (Ct(zone=5, table=4, nat=Nat()),), cookie=3),
        Flow(3, 55, Match(eth_type=0x800, ip_proto=17, udp_dst=53), (Ct(),), cookie=3),
        Flow(3, 50, Match(eth_type=0x86DD, ipv6_dst="fe80::1"), (), cookie=3),
        Flow(4, 40, Match(eth_type=0x800, ip_proto=6, tcp_dst=80, ct_zone=3, reg3=1),
             (Output(7),), cookie=4),
    ]


# ---------------------------------------------------------------------------------------------
# Tests against OVS


@pytest.mark.ovs
async def test_handshake_features_and_ports(ovs: OvsInstance, switch: Switch) -> None:
    dpid = ovs.vsctl("get", "bridge", BRIDGE, "datapath_id").strip().strip('"')
    assert switch.datapath_id == int(dpid, 16)
    ports = await switch.port_desc()
    assert [(p.port_no, p.name) for p in ports] == [(OFPP_LOCAL, BRIDGE)]
    assert await switch.echo() > 0


@pytest.mark.ovs
async def test_roundtrip_is_exact(ovs: OvsInstance, switch: Switch) -> None:
    flows = sample_flows()
    await switch.apply(flows)
    assert len(ofctl_flows(ovs)) == len(flows)
    dumped = await switch.dump_flows()
    assert sorted(dumped, key=str) == sorted(flows, key=str)
    assert await switch.dump_flows(table=3) == [f for f in flows if f.table == 3]
    assert sorted(await switch.dump_flows(cookie=2), key=str) == sorted(
        (f for f in flows if f.cookie == 2), key=str)


@pytest.mark.ovs
async def test_add_modify_delete(ovs: OvsInstance, switch: Switch) -> None:
    a = Flow(0, 10, Match(in_port=1), (Output(2),), cookie=1)
    b = Flow(0, 10, Match(in_port=2), (Output(1),), cookie=1)
    await switch.apply(adds=[a, b])
    a2 = Flow(0, 10, Match(in_port=1), (Output(3),), cookie=1)
    await switch.apply(modifies=[a2], deletes=[b])
    assert ofctl_flows(ovs) == ["cookie=0x1, priority=10,in_port=1 actions=output:3"]
    assert await switch.dump_flows() == [a2]


@pytest.mark.ovs
async def test_many_flows_multipart_reassembly(switch: Switch) -> None:
    flows = [Flow(1, 100, Match(reg0=i), (Output(i % 100 + 1),), cookie=5) for i in range(3000)]
    await switch.apply(flows, chunk=500)
    dumped = await switch.dump_flows()
    assert len(dumped) == 3000 and set(dumped) == set(flows)
    await switch.apply(deletes=flows)
    assert await switch.dump_flows() == []


@pytest.mark.ovs
async def test_strict_delete_and_modify_respect_cookie_and_priority(switch: Switch) -> None:
    mine = Flow(0, 10, Match(in_port=1), (Output(2),), cookie=1)
    other_priority = Flow(0, 20, Match(in_port=1), (Output(3),), cookie=1)
    theirs = Flow(0, 30, Match(in_port=1), (Output(4),), cookie=2)
    await switch.apply([mine, other_priority, theirs])
    # Same key as `theirs` but our cookie: neither modified nor deleted.
    impostor = Flow(0, 30, Match(in_port=1), (Output(9),), cookie=1)
    await switch.apply(modifies=[impostor])
    await switch.apply(deletes=[impostor])
    assert set(await switch.dump_flows()) == {mine, other_priority, theirs}
    await switch.apply(deletes=[mine])
    assert set(await switch.dump_flows()) == {other_priority, theirs}


@pytest.mark.ovs
async def test_rejected_flow_is_named_and_rest_applied(ovs: OvsInstance, switch: Switch) -> None:
    good1 = Flow(0, 10, Match(in_port=1), (Output(2),))
    no_prereq = Flow(0, 11, Match(ipv4_dst="10.0.0.1"), (Output(2),))  # needs eth_type=ip
    bad_port = Flow(0, 12, Match(in_port=3), (Output(0x10000),))  # beyond OVS's port range
    good2 = Flow(0, 13, Match(in_port=4), (Output(2),))
    with pytest.raises(FlowModError) as info:
        await switch.apply([good1, no_prereq, bad_port, good2])
    err = info.value
    assert [f.flow for f in err.failures] == [no_prereq, bad_port]
    assert "OFPBMC_BAD_PREREQ" in str(err) and "ipv4_dst=10.0.0.1" in str(err)
    assert "OFPBAC_BAD_OUT_PORT" in str(err) and not err.atomic
    assert set(await switch.dump_flows()) == {good1, good2}
    assert len(ofctl_flows(ovs)) == 2


@pytest.mark.ovs
async def test_bundle_is_atomic(switch: Switch) -> None:
    base = Flow(0, 5, Match(in_port=9), (Output(1),), cookie=7)
    await switch.apply([base])
    good = [Flow(0, 10 + i, Match(in_port=i + 1), (Output(2),), cookie=7) for i in range(5)]
    bad = Flow(0, 99, Match(ipv4_src="10.0.0.1"), (Output(2),), cookie=7)
    with pytest.raises(FlowModError) as info:
        await switch.apply([*good[:2], bad, *good[2:]], deletes=[base], atomic=True)
    assert info.value.atomic and [f.flow for f in info.value.failures] == [bad]
    assert await switch.dump_flows() == [base]  # nothing of the bundle happened
    await switch.apply(good, deletes=[base], atomic=True)
    assert set(await switch.dump_flows()) == set(good)


@pytest.mark.ovs
async def test_reconnect_after_controller_reset(ovs: OvsInstance, switch: Switch,
                                                events: Events) -> None:
    assert switch.connections == 1
    ovs.vsctl("del-controller", BRIDGE)
    async with asyncio.timeout(TIMEOUT):
        await events.disconnected.wait()
    with pytest.raises(NotConnected):
        await switch.apply([Flow(0, 1, Match())])
    ovs.vsctl(*controller_vsctl_args(BRIDGE, controller_target(ovs)))
    async with asyncio.timeout(TIMEOUT):
        await events.connected.wait()
    assert switch.connections == 2
    flow = Flow(0, 1, Match(in_port=1), (Output(2),))
    await switch.apply([flow])
    assert await switch.dump_flows() == [flow]


@pytest.mark.ovs
async def test_vswitchd_restart_fails_pending_then_reconnects(
        ovs: OvsInstance, switch: Switch, events: Events) -> None:
    pid = ovs.pids["ovs-vswitchd"]
    os.kill(pid, signal.SIGSTOP)  # the barrier can then not be answered
    pending = asyncio.ensure_future(switch.apply([Flow(0, 1, Match(in_port=1), (Output(2),))]))
    await asyncio.sleep(0)  # let apply() write its batch
    assert not pending.done()
    os.kill(ovs.pids.pop("ovs-vswitchd"), signal.SIGKILL)  # a stopped process ignores TERM
    with pytest.raises(ConnectionLost):
        async with asyncio.timeout(TIMEOUT + 1):
            await pending
    restart_vswitchd(ovs)
    async with asyncio.timeout(TIMEOUT):
        await events.connected.wait()
    assert switch.connections == 2
    assert await switch.dump_flows() == []  # a restarted vswitchd has no flows: reconcile


@pytest.mark.ovs
async def test_echo_liveness_closes_a_hung_connection(ovs: OvsInstance) -> None:
    events = Events()
    sw = Switch("live", echo_interval=0.2, echo_timeout=0.3,
                on_connected=events.on_connected, on_disconnected=events.on_disconnected)
    await sw.listen(controller_target(ovs))
    pid = ovs.pids["ovs-vswitchd"]
    try:
        ovs.vsctl(*controller_vsctl_args(BRIDGE, controller_target(ovs)))
        async with asyncio.timeout(TIMEOUT):
            await events.connected.wait()
        os.kill(pid, signal.SIGSTOP)
        async with asyncio.timeout(TIMEOUT):
            await events.disconnected.wait()
        with pytest.raises(NotConnected):
            await sw.echo()
    finally:
        os.kill(pid, signal.SIGCONT)
        await sw.close()


@pytest.mark.ovs
async def test_packet_in_delivered(ovs: OvsInstance, switch: Switch, events: Events) -> None:
    flow = Flow(0, 10, Match(eth_type=0x88B5), (Controller(),), cookie=0x42)
    await switch.apply([flow])
    frame = bytes.fromhex("ffffffffffff" "020000000001" "88b5") + b"ferry-probe".ljust(46, b"\0")
    # From outside (as a tool would), through the pipeline: ovs-ofctl on the mgmt socket.
    ovs.ofctl("packet-out", BRIDGE, "CONTROLLER", "table", frame.hex())
    async with asyncio.timeout(TIMEOUT):
        first = await events.packet_ins.get()
    assert first.data == frame and first.cookie == 0x42 and first.table_id == 0
    assert first.datapath_id == switch.datapath_id
    # And from ourselves.
    await switch.packet_out(frame, [Output(OFPP_TABLE)])
    async with asyncio.timeout(TIMEOUT):
        second = await events.packet_ins.get()
    assert second.data == frame


@pytest.mark.ovs
async def test_a_controller_action_for_another_connection_id_reaches_no_one(
        ovs: OvsInstance, switch: Switch, events: Events) -> None:
    """A controller action names the connection id it is for: of the two here (one for an id
    nobody has, one for ours, 0), only ours arrives."""
    nobody = Controller(max_len=0, controller_id=0xFFFF)
    flow = Flow(0, 10, Match(eth_type=0x88B6), (nobody, Controller()), cookie=0x43)
    await switch.apply([flow])
    frame = bytes.fromhex("ffffffffffff" "020000000001" "88b6") + b"ferry-slow".ljust(46, b"\0")
    await switch.packet_out(frame, [Output(OFPP_TABLE)])
    async with asyncio.timeout(TIMEOUT):
        first = await events.packet_ins.get()
    assert first.data == frame and first.cookie == 0x43
    await switch.echo()
    await switch.packet_out(frame, [Output(OFPP_TABLE)])
    async with asyncio.timeout(TIMEOUT):
        second = await events.packet_ins.get()
    assert second.data == frame  # the same single packet-in per packet, nothing in between
    await switch.echo()
    assert events.packet_ins.empty()


@pytest.mark.ovs
async def test_service_connection_to_mgmt_socket(ovs: OvsInstance) -> None:
    sw = Switch("tool")
    try:
        async with asyncio.timeout(TIMEOUT):
            await sw.connect(f"unix:{ovs.mgmt_sock(BRIDGE)}")
        flows = sample_flows()[:3]
        await sw.apply(flows)
        # Without a controller the bridge (fail_mode unset) keeps its default NORMAL flow.
        assert set(await sw.dump_flows(cookie=1)) == set(flows)
    finally:
        await sw.close()
    with pytest.raises(NotConnected):
        await sw.dump_flows()


@pytest.mark.ovs
def test_no_eventlet_at_run_time(ovs: OvsInstance) -> None:
    """Importing and using the module (against OVS) must not load eventlet."""
    script = f"""
import asyncio, sys
from ferry.switch.flow import Flow, Match, Output
from ferry.switch.openflow import Switch

async def main():
    sw = Switch("noeventlet")
    await sw.connect("unix:{ovs.mgmt_sock(BRIDGE)}")
    flow = Flow(0, 10, Match(in_port=1), (Output(2),), cookie=3)
    await sw.apply([flow])
    assert await sw.dump_flows(cookie=3) == [flow]
    await sw.close()

asyncio.run(main())
bad = sorted(m for m in sys.modules if m.split(".")[0] in ("eventlet", "greenlet"))
assert not bad, bad
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


async def test_answers_switch_echo_requests(tmp_path: Path) -> None:
    """OVS probes only after >= 5 s idle, so a scripted peer plays the switch here."""
    header = struct.Struct("!BBHI")
    replies: asyncio.Queue[bytes] = asyncio.Queue()

    async def read_msg(reader: asyncio.StreamReader) -> bytes:
        head = await reader.readexactly(8)
        return head + await reader.readexactly(header.unpack(head)[2] - 8)

    async def fake_switch(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(header.pack(4, 0, 8, 1))  # HELLO, OpenFlow 1.3
        assert (await read_msg(reader))[1] == 0  # their HELLO
        features_req = await read_msg(reader)
        assert features_req[1] == 5
        body = struct.pack("!QIBB2xII", 0xABC, 0, 254, 0, 0, 0)
        writer.write(header.pack(4, 6, 8 + len(body), header.unpack(features_req)[3]) + body)
        writer.write(header.pack(4, 2, 12, 77) + b"ping")  # ECHO_REQUEST
        await replies.put(await read_msg(reader))
        writer.close()

    path = str(tmp_path / "fake.sock")
    server = await asyncio.start_unix_server(fake_switch, path)
    sw = Switch("echo")
    try:
        async with asyncio.timeout(TIMEOUT):
            await sw.connect(f"unix:{path}")
            assert sw.datapath_id == 0xABC
            reply = await replies.get()
        assert header.unpack_from(reply) == (4, 3, 12, 77) and reply[8:] == b"ping"
        assert sw.echo_requests == 1
    finally:
        await sw.close()
        server.close()
        await server.wait_closed()
