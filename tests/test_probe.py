"""The migration probe: report arithmetic on synthetic records, the plot, and real runs in a
two-chassis lab with hand-written flows (steady state, a link outage, a move between chassis).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import TypeVar

import pytest

from ferry.lab.lab import Lab, destroy_leftovers, leftovers
from ferry.lab.netns import pid_alive as nx_alive
from ferry.lab.netns import wait_for
from ferry.probe import background, capture
from ferry.probe import records as rc
from ferry.probe.background import background_flows, datapath_flows
from ferry.probe.plot import plot_timeline
from ferry.probe.records import ClientData, ProbeData, load
from ferry.probe.report import build_report
from ferry.probe.report import main as report_main
from ferry.probe.runner import Probe, link_flap, now_ns

MS = 1_000_000
BASE = 1_000_000_000_000  # an arbitrary CLOCK_MONOTONIC origin


# -- synthetic records ---------------------------------------------------------------------------

def synthetic(n: int = 1000, name: str = "a", probe_id: int = 1, latency: int = 100_000,
              drop: range | set[int] = range(0), rate_hz: float = 1000.0) -> ClientData:
    """``n`` packets at ``rate_hz`` from BASE, each delivered ``latency`` ns later unless
    dropped."""
    period = int(1e9 / rate_hz)
    cd = ClientData(name=name, probe_id=probe_id)
    for seq in range(n):
        t = BASE + seq * period
        cd.sent.append((seq, t, 0))
        if seq not in drop:
            cd.delivered.append((seq, t, t + latency))
            cd.echoed.append((seq, t, t + 2 * latency))
    return cd


def data_of(*clients: ClientData) -> ProbeData:
    return ProbeData(target="t", rate_hz=1000.0, clients=list(clients))


def t_of(seq: int) -> int:
    return BASE + seq * MS


def test_report_clean_run() -> None:
    r = build_report(data_of(synthetic()))
    c = r.clients[0]
    assert (c.sent, c.delivered, c.echoed, c.lost, c.duplicated, c.reordered) == (
        1000, 1000, 1000, 0, 0, 0)
    assert c.achieved_rate_hz == pytest.approx(1000.0)
    assert c.latency_p50_us == pytest.approx(100.0) and c.jitter_us == 0.0
    assert c.downtime_ms == pytest.approx(1.0)  # the probe interval
    assert c.downtime_beyond_pause_ms is None
    assert r.total.sent == 1000


def test_packet_delivered_twice_counts_once_delivered_once_duplicate() -> None:
    cd = synthetic(100)
    seq, t_send, t_rx = cd.delivered[5]
    cd.delivered.append((seq, t_send, t_rx + 30 * MS))  # the same packet again, 30 ms later
    c = build_report(data_of(cd)).clients[0]
    assert c.delivered == 100 and c.duplicated == 1
    assert c.lost == 0 and c.reordered == 0  # the late copy is no reordering
    assert c.downtime_ms == pytest.approx(1.0)  # nor does it change delivery gaps


def test_duplicate_arriving_first_out_of_order() -> None:
    # seq 7's copies: one at its time, one earlier than seq 6 (counted: first = the earlier)
    cd = synthetic(20)
    cd.delivered.append((7, t_of(7), t_of(6) - 1))
    c = build_report(data_of(cd)).clients[0]
    assert (c.delivered, c.duplicated, c.reordered, c.lost) == (20, 1, 1, 0)


def test_reordering() -> None:
    cd = synthetic(100)
    d = cd.delivered
    d[10], d[11] = (10, t_of(10), t_of(11) + 200_000), (11, t_of(11), t_of(11) + 100_000)
    d[20] = (20, t_of(20), t_of(25) + 500_000)  # overtaken by 21..25
    c = build_report(data_of(cd)).clients[0]
    assert c.reordered == 2 and c.duplicated == 0 and c.lost == 0 and c.delivered == 100


def test_loss_and_downtime_around_a_pause() -> None:
    cd = synthetic(1000, drop=range(300, 400))  # 100 ms without delivery
    pause = (t_of(300), t_of(400))
    r = build_report(data_of(cd), pause=pause)
    c = r.clients[0]
    assert c.lost == 100 and c.delivered == 900 and c.echoed == 900
    assert c.downtime is not None and c.downtime.recovered and c.downtime.lost == 100
    # from the delivery of 299 to the delivery of 400
    assert c.downtime_ms == pytest.approx(101.0)
    assert c.downtime_beyond_pause_ms == pytest.approx(1.0)
    assert r.pause_ms == pytest.approx(100.0) and r.downtime_ms == pytest.approx(101.0)


def test_a_client_sending_late_in_its_gap_is_reported() -> None:
    """A starved client: after a 50 ms pause its next three sends left 3 ms behind schedule.
    The gap is longer, and the report says how much of it the client itself sent late."""
    cd = synthetic(1000, drop=range(300, 350))
    late = {350: 3 * MS, 351: 2 * MS, 352: MS}
    cd.sent = [(seq, t + late.get(seq, 0), late.get(seq, 0)) for seq, t, _ in cd.sent]
    cd.delivered = [(seq, t + late.get(seq, 0), rx + late.get(seq, 0))
                    for seq, t, rx in cd.delivered]
    r = build_report(data_of(cd, synthetic(1000, name="b", probe_id=2)),
                     pause=(t_of(300), t_of(350)))
    c = r.clients[0]
    assert c.downtime_beyond_pause_ms == pytest.approx(4.0)  # 1 ms spacing + 3 ms late
    assert c.send_late_in_gap_ms == pytest.approx(3.0)
    assert r.clients[1].send_late_in_gap_ms == 0.0
    assert r.total.send_late_in_gap_ms == pytest.approx(3.0)  # the worst client's


def test_downtime_looks_only_around_the_pause() -> None:
    cd = synthetic(3000, drop=set(range(100, 300)) | set(range(2000, 2050)))
    r = build_report(data_of(cd), pause=(t_of(2000), t_of(2050)), around_ms=500)
    assert r.clients[0].downtime_ms == pytest.approx(51.0)
    assert r.clients[0].lost == 250
    assert build_report(data_of(cd)).clients[0].downtime_ms == pytest.approx(201.0)


def test_until_leaves_out_a_later_disturbance() -> None:
    """A 12 ms stall 150 ms after a pause of 0: the downtime unless the window ends first."""
    cd = synthetic(3000, drop=set(range(2150, 2162)))
    pause = (t_of(2000), t_of(2000))
    assert build_report(data_of(cd), pause=pause, around_ms=500).clients[0].downtime_ms == (
        pytest.approx(13.0))
    cut = build_report(data_of(cd), pause=pause, around_ms=500, until_ns=t_of(2100))
    assert cut.clients[0].downtime_ms == pytest.approx(1.0)
    assert cut.clients[0].lost == 12  # loss still counts over the whole run


def test_no_recovery() -> None:
    cd = synthetic(1000, drop=range(900, 1000))
    c = build_report(data_of(cd), pause=(t_of(900), t_of(950))).clients[0]
    assert c.downtime is not None and not c.downtime.recovered
    assert c.downtime.lost == 100  # sent in [delivery of 899, last send]
    assert c.lost == 100
    assert "no recovery" in build_report(data_of(cd), pause=(t_of(900), t_of(950))).to_text()


def test_total_adds_counts_and_takes_the_worst_downtime() -> None:
    a = synthetic(1000, "a", 1, drop=range(500, 550))
    b = synthetic(1000, "b", 2, drop=range(500, 580))
    r = build_report(data_of(a, b), pause=(t_of(500), t_of(550)))
    assert r.total.sent == 2000 and r.total.lost == 130
    assert r.total.downtime_ms == pytest.approx(81.0)
    assert r.total.downtime_beyond_pause_ms == pytest.approx(31.0)
    d = r.to_dict()
    assert d["total"]["lost"] == 130 and d["clients"][1]["name"] == "b"
    assert d["total"]["downtime"]["recovered"] is True
    text = r.to_text()
    assert "total" in text and "81.00" in text


def test_plot_is_a_png(tmp_path: Path) -> None:
    a = synthetic(600, "a", 1, drop=range(200, 300))
    a.delivered.append((150, t_of(150), t_of(170)))  # a duplicate
    a.delivered[50] = (50, t_of(50), t_of(53))  # late
    b = synthetic(600, "b", 2, latency=300_000, drop=range(200, 320))
    out = plot_timeline(data_of(a, b), tmp_path / "timeline.png", pause=(t_of(200), t_of(300)))
    raw = out.read_bytes()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n" and len(raw) > 10_000
    with pytest.raises(ValueError, match="no clients"):
        plot_timeline(data_of(), tmp_path / "empty.png")


# -- the agents on loopback (no lab needed) -------------------------------------------------------

def agent(out: Path, *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "ferry.probe.agent", *args, "--out", str(out),
                             "--bind", "127.0.0.1", "--port", "47999"])


def test_agents_stop_by_themselves_and_on_sigterm(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    echo = agent(tmp_path, "echo", "--duration", "30", "--vm", "t")
    try:
        wait_for(lambda: (tmp_path / "echo.json").exists(), timeout=10, what="echo ready")
        client = agent(tmp_path, "client", "--duration", "0.3", "--id", "1", "--rate", "500",
                       "--target", "127.0.0.1", "--vm", "a", "--rt-prio", "0")
        assert client.wait(timeout=10) == 0  # bounded duration
        echo.send_signal(signal.SIGTERM)
        assert echo.wait(timeout=5) == 0
    finally:
        for proc in (echo,):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    meta = json.loads((tmp_path / "client-1.json").read_text())
    assert meta["state"] == "done" and 140 <= meta["sent"] <= 160
    assert json.loads((tmp_path / "echo.json").read_text())["received"] == meta["sent"]
    r = build_report(load(tmp_path))
    assert r.clients[0].delivered == r.clients[0].echoed == meta["sent"]
    assert r.clients[0].latency_p50_us > 0  # kernel receive times map onto the send clock
    # the command-line report of a run directory
    assert report_main([str(tmp_path), "--json", "--plot", str(tmp_path / "t.png")]) == 0
    assert json.loads(capsys.readouterr().out)["total"]["sent"] == meta["sent"]
    assert (tmp_path / "t.png").stat().st_size > 0


# -- lab runs -----------------------------------------------------------------------------------

F = TypeVar("F", bound=Callable[..., object])


def lab_test(fn: F) -> F:
    for mark in (
        pytest.mark.lab,
        pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)"),
        pytest.mark.skipif(not all(shutil.which(t) for t in ("ovs-vswitchd", "ethtool", "ping")),
                           reason="needs openvswitch-switch, ethtool and iputils-ping"),
    ):
        fn = mark(fn)
    return fn

VNI = 0x65
MAC = {"a": "02:00:00:00:01:01", "b": "02:00:00:00:01:02", "t": "02:00:00:00:01:0a"}
IP = {"a": "10.0.1.1", "b": "10.0.1.2", "t": "10.0.1.10"}
BCAST = "ff:ff:ff:ff:ff:ff"


@pytest.fixture
def lab2() -> Iterator[Lab]:
    base = Path(tempfile.mkdtemp(prefix="ferry-probe-", dir="/tmp"))
    lab = Lab.create(2, base_dir=base)
    try:
        for n in (1, 2):
            lab.add_geneve_port(n)
        yield lab
    finally:
        report = destroy_leftovers(lab.prefix, base)
        shutil.rmtree(base, ignore_errors=True)
        assert report.ok, report.errors
        assert leftovers(lab.prefix, base) == []


def l2_flows(lab: Lab, placement: dict[str, int]) -> None:
    """Hand-written L2 flows, as a controller would write them: unicast by destination MAC to
    the VM's chassis in ``placement`` (local port or Geneve), broadcast to every local VIF and
    the other chassis. Same matches every time, so a rewrite replaces the previous actions."""
    for n in (1, 2):
        ch = lab.chassis(n)
        geneve = lab.ofport(n, "geneve0")
        tunnel = (f"set_field:{lab.chassis(3 - n).tunnel_ip}->tun_dst,"
                  f"set_field:{VNI:#x}->tun_id,output:{geneve}")
        local = [lab.ofport(n, vif.host_if) for vm in lab.state.vms for vif in vm.vifs
                 if vif.chassis == ch.name]
        outs = [f"output:{p}" for p in local]
        flows = [f"priority=90,in_port={geneve},dl_dst={BCAST},actions={','.join(outs) or 'drop'}",
                 f"priority=80,dl_dst={BCAST},actions={','.join([*outs, tunnel])}"]
        for vm in lab.state.vms:
            where = placement[vm.name]
            vif = vm.vif(lab.chassis(where).name)
            assert vif is not None
            action = f"output:{lab.ofport(n, vif.host_if)}" if where == n else tunnel
            flows.append(f"priority=100,dl_dst={vm.mac},actions={action}")
        lab.add_flows(n, flows)


def setup_vms(lab: Lab, placement: dict[str, int]) -> None:
    for vm, n in placement.items():
        lab.add_vm(vm, n, MAC[vm], f"{IP[vm]}/24", f"port-{vm}")
    l2_flows(lab, placement)
    for vm in placement:  # warm up ARP (VMs and the underlay): no loss at probe start
        if vm != "t":
            wait_for(partial(pings, lab, vm, IP["t"]), timeout=10, what=f"ping {vm} -> t")


def pings(lab: Lab, vm: str, ip: str) -> bool:
    return lab.exec_in_vm(vm, ["ping", "-c1", "-W1", ip]).returncode == 0


@lab_test
def test_steady_state(lab2: Lab, tmp_path: Path) -> None:
    rate = 1000.0
    setup_vms(lab2, {"a": 1, "t": 2})
    probe = Probe(lab2, "t", ["a"], rate_hz=rate, out_dir=tmp_path / "run")
    with probe:
        pids = probe.pids
        start = now_ns()
        probe.wait_delivered(int(rate), since_ns=start, timeout=5)
    assert not probe.running
    data = probe.data()
    # `ip netns exec` execs the agent: the PIDs we signal are the agents'
    assert data.echo_meta["pid"] == pids["echo"]
    assert data.clients[0].meta["pid"] == pids["client-1"]
    assert data.echo_meta["state"] == "done" and data.clients[0].meta["state"] == "done"
    r = probe.report()
    c = r.clients[0]
    print("\n" + r.to_text())
    assert c.sent >= rate and c.delivered == c.sent and c.echoed == c.sent
    assert (c.lost, c.duplicated, c.reordered, c.send_errors) == (0, 0, 0, 0)
    assert c.achieved_rate_hz == pytest.approx(rate, rel=0.03)
    assert c.downtime_ms is not None and c.downtime_ms < 20


@lab_test
async def test_link_outage_of_100ms(lab2: Lab, tmp_path: Path) -> None:
    """Also the asyncio API: the event loop keeps running while the probe starts and stops."""
    await asyncio.to_thread(setup_vms, lab2, {"a": 1, "t": 2})
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    task = asyncio.create_task(ticker())
    t_start = now_ns()
    async with Probe(lab2, "t", ["a"], out_dir=tmp_path / "run") as probe:
        await probe.await_delivered(200, since_ns=now_ns())
        pause = await asyncio.to_thread(link_flap, lab2, "t", 100)
        await probe.await_delivered(200, since_ns=pause[1])
    task.cancel()
    assert ticks >= (now_ns() - t_start) / 1e9 / 0.01 * 0.5  # the loop was never blocked long
    r = probe.report(pause=pause)
    probe.plot(tmp_path / "outage.png", pause=pause, xlim_ms=(-50, 150))
    print("\n" + r.to_text())
    c = r.clients[0]
    assert c.downtime is not None and c.downtime.recovered
    assert c.downtime_ms is not None and c.downtime_beyond_pause_ms is not None
    assert 95 <= c.downtime_ms <= 110
    assert 90 <= c.lost <= 110 and c.lost == c.downtime.lost
    # ~2 ms on a quiet machine; a loaded one (2 cores, other labs running) adds scheduling
    # delay to the flap itself: 6.5 ms was seen once under load.
    assert -3 <= c.downtime_beyond_pause_ms <= 10
    assert c.duplicated == 0 and c.reordered == 0


@lab_test
def test_target_moves_between_chassis(lab2: Lab, tmp_path: Path) -> None:
    """The target moves from chassis 1 to chassis 2 (a client on each); flows rewritten by
    hand during the pause. The echo, bound to the address, keeps receiving on eth1."""
    setup_vms(lab2, {"a": 1, "b": 2, "t": 1})
    with Probe(lab2, "t", ["a", "b"], out_dir=tmp_path / "run") as probe:
        new = lab2.plug_vif("t", "chassis-2", link_up=False)
        l2_flows(lab2, {"a": 1, "b": 2, "t": 1})  # broadcast now also reaches the new VIF
        probe.wait_delivered(100, since_ns=now_ns())
        t0 = now_ns()
        lab2.set_link("t", "chassis-1", up=False)
        lab2.set_link("t", "chassis-2", up=True)
        l2_flows(lab2, {"a": 1, "b": 2, "t": 2})
        t1 = now_ns()
        probe.wait_delivered(300, since_ns=t1)
        lab2.unplug_vif("t", "chassis-1")
        probe.wait_delivered(100, since_ns=now_ns())
    pause = (t0, t1)
    r = probe.report(pause=pause)
    probe.plot(tmp_path / "move.png", pause=pause, xlim_ms=(-100, (t1 - t0) / 1e6 + 100))
    print("\n" + r.to_text())
    assert new.guest_if == "eth1"
    for c in r.clients:
        assert c.downtime is not None and c.downtime.recovered, c
        assert c.delivered >= 500 and c.duplicated == 0
        # Losses fall in the downtime gap. Under CPU load (the whole suite on 2 cores) a few
        # packets (5-6 seen, at 1 kHz) were also lost outside it, not reproducible alone;
        # suspected: OVS's userspace datapath stalling while the old port is deleted.
        assert c.downtime.lost <= c.lost <= c.downtime.lost + 10
        assert c.downtime_beyond_pause_ms is not None and c.downtime_beyond_pause_ms < 20
    assert r.pause_ms is not None and r.total.downtime_ms is not None
    assert r.total.downtime_ms < r.pause_ms + 20


@lab_test
def test_background_flows_fill_the_datapath_and_stop(lab2: Lab) -> None:
    """Frames to unknown MACs: one datapath flow each on the sender's chassis; the sender is
    gone once the block is left."""
    setup_vms(lab2, {"a": 1, "t": 2})
    before = datapath_flows(lab2, "chassis-1")
    with background_flows(lab2, "a", 300, period_s=1.0) as proc:
        wait_for(lambda: datapath_flows(lab2, "chassis-1") >= before + 300, timeout=10,
                 what="300 more datapath flows on chassis-1")
        assert proc.poll() is None
    assert proc.poll() is not None


def test_background_frames_are_valid_and_distinct() -> None:
    frames = background.frames("02:00:00:00:01:01", "10.0.1.1", 500)
    assert len({f[:6] for f in frames}) == 500  # one destination MAC each
    for f in frames[:3]:
        assert f[0] & 1 == 0 and f[6:12] == bytes.fromhex("020000000101")
        header = f[14:34]
        assert background._checksum(header) == 0  # a valid IPv4 header sums to 0xffff
    with pytest.raises(ValueError, match="flows must be in"):
        background.frames("02:00:00:00:01:01", "10.0.1.1", 0)


# -- where packets wait: captures at the chassis' edge -------------------------------------------

def udp_frame(payload: bytes, dport: int, src: str = "10.0.1.1", dst: str = "10.0.1.10") -> bytes:
    ip = (bytes([0x45, 0, 0, 0, 0, 0, 0, 0, 64, 17, 0, 0]) + bytes(map(int, src.split("."))) +
          bytes(map(int, dst.split("."))))
    udp = (40000).to_bytes(2, "big") + dport.to_bytes(2, "big") + bytes(4)
    return bytes.fromhex("020000000102" "020000000101" "0800") + ip + udp + payload


def request(seq: int, flags: int = 0) -> bytes:
    return rc.PACKET.pack(rc.MAGIC, 7, flags, seq, 123, 0)


def geneve(inner: bytes) -> bytes:
    option = bytes.fromhex("0102" "80" "01") + bytes(4)  # one 4-byte option: opt_len 2 words
    header = bytes([0x02, 0, 0x65, 0x58, 0, 0, 0x65, 0]) + option
    return udp_frame(header + inner, capture.GENEVE_PORT, "192.168.254.1", "192.168.254.2")


def pcap(records: list[tuple[int, bytes]], nano: bool = True) -> bytes:
    head = struct.pack("<IHHiIII", 0xA1B23C4D if nano else 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1)
    body = b"".join(struct.pack("<IIII", ts // 10**9, ts % 10**9 // (1 if nano else 1000),
                                len(f), len(f)) + f for ts, f in records)
    return head + body


def test_probe_requests_are_found_plain_and_in_geneve() -> None:
    assert capture.probe_request(udp_frame(request(5), 9000)) == (7, 5)
    assert capture.probe_request(geneve(udp_frame(request(6), 9000))) == (7, 6)
    assert capture.probe_request(udp_frame(request(5, rc.FLAG_ECHO), 9000)) is None
    assert capture.probe_request(udp_frame(b"not a probe packet at all!!!!!!", 9000)) is None
    assert capture.probe_request(udp_frame(request(5), 9000)[:40]) is None
    assert capture.probe_request(geneve(geneve(udp_frame(request(6), 9000)))) is None
    # Geneve to another chassis (a sender's own traffic, leaving): not an arrival here
    assert capture.probe_request(geneve(udp_frame(request(6), 9000)), "192.168.254.2") == (7, 6)
    assert capture.probe_request(geneve(udp_frame(request(6), 9000)), "192.168.254.3") is None


def test_arrivals_keep_the_first_sighting_on_the_monotonic_clock(tmp_path: Path) -> None:
    a, b = tmp_path / "a.pcap", tmp_path / "b.pcap"
    a.write_bytes(pcap([(5_000_000_000, udp_frame(request(1), 9000)),
                        (5_000_900_000, geneve(udp_frame(request(2), 9000)))]))
    b.write_bytes(pcap([(5_000_300_000, udp_frame(request(1), 9000))], nano=False))
    seen = capture.arrivals([a, b], realtime_offset_ns=1_000_000_000)
    assert seen == {(7, 1): 4_000_000_000, (7, 2): 4_000_900_000}
    (tmp_path / "c.pcap").write_bytes(b"\x00" * 24)
    with pytest.raises(capture.CaptureError, match="not a little-endian pcap"):
        capture.arrivals([tmp_path / "c.pcap"], 0)


def test_hops_split_the_first_packet_and_count_drops_after_the_rarp() -> None:
    ms = 1_000_000
    resumed, announced = 100 * ms, 100 * ms + 10_000
    sent = [(s, 90 * ms + s * ms, 0 if s != 10 else 300_000) for s in range(1, 16)]
    # seq 2 entered before the RARP and was dropped (the pause); 10, sent at the resume, is
    # the first delivered after it; 11 and 12 entered after the RARP and were dropped (a stale
    # datapath flow); 13 was delivered
    seen = {(7, s): t + 50_000 for s, t, _ in sent}
    delivered = [(s, t, seen[(7, s)] + 100_000) for s, t, _ in sent if s not in (2, 11, 12)]
    h = capture.hops("c1", 7, sent, delivered, seen, resumed, announced, 500 * ms)
    first_after = min(rx for _, _, rx in delivered if rx >= resumed)
    assert first_after == seen[(7, 10)] + 100_000
    assert h == capture.Hops("c1", 0.05, 0.1, 2, sent_late_ms=0.3)
    assert capture.hops("c1", 8, sent, delivered, seen, resumed, announced, 500 * ms) == \
        capture.Hops("c1", None, None, 0, sent_late_ms=0.3)  # the capture saw nothing of 8


@lab_test
def test_capture_sees_every_packet_enter_the_chassis_before_the_vm_gets_it(
        lab2: Lab, tmp_path: Path) -> None:
    setup_vms(lab2, {"a": 1, "t": 2})
    cap = capture.Capture(lab2.ingress_links("chassis-2"), lab2.chassis(2).tunnel_ip,
                          tmp_path / "cap")
    probe = Probe(lab2, "t", ["a"], rate_hz=500.0, out_dir=tmp_path / "run")
    with probe, cap:
        pids = [p.pid for p in cap.procs]
        assert len(pids) == 2
        probe.wait_delivered(300, since_ns=now_ns(), timeout=5)
    assert cap.procs == []
    assert not any(nx_alive(pid) for pid in pids)
    seen = cap.arrivals()
    c = probe.data().clients[0]
    inside = [(seq, ts, rx) for seq, ts, rx in c.delivered if (c.probe_id, seq) in seen]
    assert len(inside) >= 300
    for seq, ts, rx in inside:  # sent, then entered chassis-2, then delivered to t
        assert ts < seen[(c.probe_id, seq)] < rx
    h = capture.hops("a", c.probe_id, c.sent, c.delivered, seen, inside[0][2], inside[0][2],
                     10**9)
    assert h.held_ms is not None and 0 < h.held_ms < 20 and h.dropped == 0


def test_convergence_is_timed_from_the_first_switch_to_each_chassis_first_ack() -> None:
    """With Nova's early activation, the binding's move and the datapath's activation come
    close together; each chassis acks the one it saw first (chassis names may hold dots)."""
    from ferry.demo import convergence_ms
    from ferry.lab.migrate import MigrationRun

    run = MigrationRun("vm", "p", "a.example", "b.example", 0.0)
    run.record = {"timestamps": {
        "plugged": 1.0, "acked.a.example.plugged": 1.5,  # the claim: not a switch
        "activated": 10.0, "bound": 10.02,
        "acked.a.example.activated": 10.004, "acked.a.example.done": 10.05,
        "acked.b.example.done": 10.03, "acked.c.activated": 10.006}}
    assert convergence_ms(run) == pytest.approx(30.0)
    run.record = {"timestamps": {"source_unplugged": 5.0, "acked.a.source_unplugged": 5.01}}
    assert convergence_ms(run) == pytest.approx(10.0)
    run.record = {"timestamps": {"plugged": 1.0, "acked.a.plugged": 1.5}}
    assert convergence_ms(run) is None
