"""The lab's plumbing: chassis namespaces with private OVS, the underlay, VMs, teardown.

No controller here: flows are written by hand with ``ovs-ofctl`` to prove the wiring.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from ferry.lab.host import RCU_EXPEDITED, rcu_expedited, restore_rcu
from ferry.lab.lab import REVALIDATOR_RT_BOOST, Lab, LabError, destroy_leftovers, leftovers
from ferry.lab.netns import netns_exists, pid_alive, wait_for
from ferry.lab.ovs_instance import OvsError, OvsInstance, thread_name
from tests.labkit import udp_through_vif_churn

pytestmark = [
    pytest.mark.lab,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)"),
    pytest.mark.skipif(
        not all(shutil.which(t) for t in ("ovs-vswitchd", "ethtool", "ping")),
        reason="needs openvswitch-switch, ethtool and iputils-ping",
    ),
]

MAC = "02:00:00:00:00:{:02x}"
VNI = 0x64


@pytest.fixture
def base_dir() -> Iterator[Path]:
    # Short, private directory: unix socket paths must stay under 108 bytes.
    path = Path(tempfile.mkdtemp(prefix="ferry-lab-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _cleanup(lab: Lab, base_dir: Path) -> None:
    report = destroy_leftovers(lab.prefix, base_dir)
    assert report.ok, report.errors
    assert leftovers(lab.prefix, base_dir) == []


@pytest.fixture
def lab2(base_dir: Path) -> Iterator[Lab]:
    lab = Lab.create(2, base_dir=base_dir)
    try:
        yield lab
    finally:
        _cleanup(lab, base_dir)


def ping_ok(lab: Lab, vm: str, ip: str, wait: float = 1.0) -> bool:
    return lab.exec_in_vm(vm, ["ping", "-c1", f"-W{wait}", ip]).returncode == 0


def ping_rtt_ms(lab: Lab, vm: str, ip: str, count: int = 20) -> float:
    """Average RTT of ``count`` pings (after a first one succeeded), in milliseconds."""
    wait_for(lambda: ping_ok(lab, vm, ip), timeout=10, what=f"{vm} -> {ip}")
    out = lab.exec_in_vm(vm, ["ping", "-q", "-c", str(count), "-i", "0.02", ip], check=True)
    assert f"{count} received" in out.stdout, out.stdout
    match = re.search(r"= [\d.]+/([\d.]+)/", out.stdout)
    assert match, out.stdout
    return float(match.group(1))


def tunnel_flows(lab: Lab, chassis: int, port: str, remote_ip: str, geneve: int) -> None:
    """Everything from ``port`` goes to ``remote_ip`` over Geneve; tunnel traffic to ``port``."""
    ofport = lab.ofport(chassis, port)
    lab.add_flows(chassis, [
        f"priority=100,in_port={ofport},"
        f"actions=set_field:{remote_ip}->tun_dst,set_field:{VNI:#x}->tun_id,output:{geneve}",
        f"priority=100,in_port={geneve},tun_id={VNI:#x},actions=output:{ofport}",
    ])


def host_if(lab: Lab, vm: str, chassis: str) -> str:
    vif = lab.vm(vm).vif(chassis)
    assert vif is not None
    return vif.host_if


def geneve_pair(lab: Lab) -> int:
    """VM ``a`` (10.0.0.1) on chassis-1 and ``c`` (10.0.0.3) on chassis-2, all their traffic
    over Geneve by hand-written flows; returns, once a reaches c, chassis-2's Geneve port."""
    lab.add_vm("a", "chassis-1", MAC.format(1), "10.0.0.1/24", "port-a")
    lab.add_vm("c", "chassis-2", MAC.format(3), "10.0.0.3/24", "port-c")
    g1 = lab.add_geneve_port(1)
    g2 = lab.add_geneve_port(2)
    tunnel_flows(lab, 1, host_if(lab, "a", "chassis-1"), "192.168.254.2", g1)
    tunnel_flows(lab, 2, host_if(lab, "c", "chassis-2"), "192.168.254.1", g2)
    wait_for(lambda: ping_ok(lab, "a", "10.0.0.3"), timeout=10, what="ping a -> c")
    return g2


def test_create_layout(lab2: Lab) -> None:
    st = lab2.status()
    assert st["phase"] == "ready" and st["underlay"]["exists"]
    assert len(lab2.prefix) <= 8
    for n, ch in enumerate(st["chassis"], start=1):
        assert ch["name"] == f"chassis-{n}" and ch["netns_exists"] and ch["ovs_alive"]
        assert ch["tunnel_ip"] == f"192.168.254.{n}"
        assert Path(ch["ovsdb_socket"]).is_socket() and Path(ch["mgmt_socket"]).is_socket()
        ovs = lab2.ovs(n)
        assert ovs.vsctl("get", "Bridge", "br-int", "fail_mode").strip() == "secure"
        assert ovs.vsctl("get", "Bridge", "br-int", "datapath_type").strip() == "netdev"
        assert ovs.vsctl("list-ports", "br-int").split() == []  # no tunnel, no controller
        assert ovs.vsctl("get-controller", "br-int").strip() == ""
        out = lab2.exec_in_chassis(n, ["ip", "-4", "-o", "addr", "show", "br-phy"], check=True)
        assert ch["tunnel_cidr"] in out.stdout
    # the underlay bridge has no address
    out = subprocess.run(["ip", "-o", "addr", "show", "dev", st["underlay"]["bridge"]],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
    # chassis can reach each other over the underlay (from inside their namespaces)
    lab2.exec_in_chassis(1, ["ping", "-c1", "-W2", "192.168.254.2"], check=True)


def test_same_chassis_ping_with_normal_flow(lab2: Lab) -> None:
    lab2.add_vm("a", "chassis-1", MAC.format(1), "10.0.0.1/24", "port-a")
    lab2.add_vm("b", "chassis-1", MAC.format(2), "10.0.0.2/24", "port-b")
    ovs = lab2.ovs(1)
    for vm, port in (("a", "port-a"), ("b", "port-b")):
        tap = host_if(lab2, vm, "chassis-1")
        assert ovs.vsctl("get", "Interface", tap, "external_ids:iface-id").strip('"\n') == port
        assert lab2.ofport(1, tap) > 0
    # fail_mode=secure and no flows: nothing passes
    assert not ping_ok(lab2, "a", "10.0.0.2", wait=0.3)
    lab2.add_flows(1, ["actions=NORMAL"])
    rtt = ping_rtt_ms(lab2, "a", "10.0.0.2")
    print(f"same-chassis RTT {rtt:.3f} ms")


def test_cross_chassis_ping_over_geneve(lab2: Lab) -> None:
    g2 = geneve_pair(lab2)
    rtt = ping_rtt_ms(lab2, "a", "10.0.0.3")
    print(f"cross-chassis Geneve RTT {rtt:.3f} ms")
    # the packets really went through the tunnel port
    stats = lab2.ovs(2).ofctl("dump-flows", "br-int", f"in_port={g2}")
    assert re.search(r"n_packets=[1-9]", stats), stats


UDP_ECHO = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[1])))
while True:
    data, peer = s.recvfrom(65535)
    s.sendto(data, peer)
"""

UDP_CLIENT = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(0.2)
payload = b"x" * int(sys.argv[3])
for _ in range(50):
    s.sendto(payload, (sys.argv[1], int(sys.argv[2])))
    try:
        data, _ = s.recvfrom(65535)
    except TimeoutError:
        continue
    if data == payload:
        print("ok")
        break
"""

TCP_ECHO = """
import socket, sys
s = socket.create_server(("0.0.0.0", int(sys.argv[1])))
while True:
    c, _ = s.accept()
    with c:
        while data := c.recv(65536):
            c.sendall(data)
"""

TCP_CLIENT = """
import socket, sys
payload = bytes(range(256)) * 1024
with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5) as c:
    c.sendall(payload)
    c.shutdown(socket.SHUT_WR)
    got = b""
    while data := c.recv(65536):
        got += data
print("ok" if got == payload else f"bad {len(got)}")
"""


def test_udp_and_tcp_between_vms_across_chassis(lab2: Lab) -> None:
    geneve_pair(lab2)
    servers = [
        lab2.popen_in_vm("c", [sys.executable, "-c", UDP_ECHO, "9999"]),
        lab2.popen_in_vm("c", [sys.executable, "-c", TCP_ECHO, "9998"]),
    ]
    try:
        for size in (10, 1300):  # 1300 bytes: close to the VM MTU of 1400
            out = lab2.exec_in_vm(
                "a", [sys.executable, "-c", UDP_CLIENT, "10.0.0.3", "9999", str(size)])
            assert out.stdout.strip() == "ok", (out.stdout, out.stderr)

        def tcp_ok() -> bool:
            out = lab2.exec_in_vm("a", [sys.executable, "-c", TCP_CLIENT, "10.0.0.3", "9998"])
            return out.stdout.strip() == "ok"

        wait_for(tcp_ok, timeout=10, what="TCP echo a -> c")
    finally:
        for proc in servers:
            proc.kill()
            proc.wait()


def test_vif_churn_loses_no_tunnelled_packet(lab2: Lab) -> None:
    """VIFs plugged and unplugged on a chassis cost its other VMs' Geneve traffic nothing.
    (OVS re-reads its copy of the kernel's routes at every link change; the lab pins the
    underlay route so that a tunnelled flow never meets the empty table.)"""
    geneve_pair(lab2)
    sent = 6000  # 1 kHz for 6 s, with the churn on the sender's chassis
    received, highest, cycles = udp_through_vif_churn(
        lab2, "a", "c", "10.0.0.3", "chassis-1", MAC.format(9), "10.0.0.9/24", sent)
    print(f"{cycles} VIF plug/unplug cycles; {received} of {sent} packets received")
    assert cycles >= 10 and highest == sent
    assert received == sent


def test_migration_building_blocks(lab2: Lab) -> None:
    """A VM plugged on two chassis at once; the link moves from one to the other."""
    lab2.add_vm("a", "chassis-1", MAC.format(1), "10.0.0.1/24", "port-a")
    lab2.add_vm("c", "chassis-2", MAC.format(3), "10.0.0.3/24", "port-c")
    for n in (1, 2):
        lab2.add_flows(n, ["actions=NORMAL"])
    assert not ping_ok(lab2, "a", "10.0.0.3", wait=0.3)  # different chassis, no tunnel
    dst = lab2.plug_vif("a", "chassis-2", link_up=False)
    assert dst.guest_if == "eth1"
    ovs2 = lab2.ovs(2)
    assert ovs2.vsctl("get", "Interface", dst.host_if, "external_ids:iface-id").strip('"\n') == (
        "port-a")
    wait_for(lambda: ovs2.vsctl("get", "Interface", dst.host_if, "link_state").strip() == "down",
             timeout=5)
    lab2.set_link("a", "chassis-1", up=False)
    lab2.set_link("a", "chassis-2", up=True)
    wait_for(lambda: ovs2.vsctl("get", "Interface", dst.host_if, "link_state").strip() == "up",
             timeout=5)
    wait_for(lambda: ping_ok(lab2, "a", "10.0.0.3"), timeout=10, what="ping after the move")
    ofport = lab2.ofport(2, dst.host_if)

    def rx_packets() -> int:
        out = ovs2.ofctl("dump-ports", "br-int", str(ofport))
        match = re.search(r"rx pkts=(\d+)", out)
        assert match, out
        return int(match.group(1))

    before = rx_packets()
    lab2.announce("a", "chassis-2", "rarp", count=3)
    lab2.announce("a", "chassis-2", "garp")
    wait_for(lambda: rx_packets() >= before + 4, timeout=5, what="announcements on the port")
    lab2.unplug_vif("a", "chassis-1")
    assert host_if(lab2, "a", "chassis-2") == dst.host_if
    vm = Lab.load(lab2.prefix, lab2.base_dir).status()["vms"][0]
    assert vm["chassis"] == "chassis-2" and vm["interface"] == "eth1"
    assert [v["chassis"] for v in vm["vifs"]] == ["chassis-2"]
    assert lab2.ovs(1).vsctl("list-ports", "br-int").split() == []
    lab2.delete_vm("a")
    assert not netns_exists(f"{lab2.prefix}-a")
    assert ovs2.vsctl("list-ports", "br-int").split() == [host_if(lab2, "c", "chassis-2")]


def test_status_round_trips_through_load(lab2: Lab) -> None:
    lab2.add_vm("a", "chassis-1", MAC.format(1), "10.0.0.1/24", "port-a", gateway="10.0.0.254")
    fake_controller = subprocess.Popen(["sleep", "300"])
    try:
        lab2.set_controller_pid("chassis-2", fake_controller.pid)
        status = lab2.status()
        other = Lab.load(lab2.prefix, lab2.base_dir)
        assert other.status() == status
        ch2 = status["chassis"][1]
        assert ch2["controller_pid"] == fake_controller.pid and ch2["controller_alive"]
        vm = status["vms"][0]
        assert vm == vm | {"name": "a", "netns": f"{lab2.prefix}-a", "interface": "eth0",
                           "port_id": "port-a", "chassis": "chassis-1", "mac": MAC.format(1),
                           "ip": "10.0.0.1", "gateway": "10.0.0.254"}
        routes = lab2.exec_in_vm("a", ["ip", "route"], check=True).stdout
        assert "default via 10.0.0.254 dev eth0" in routes
        # a change made through one handle is seen by the other
        other.delete_vm("a")
        lab2.reload()
        assert lab2.status()["vms"] == []
        # destroy (from the other handle) stops the recorded controller by PID
        report = other.destroy()
        assert report.ok, report.errors
        assert fake_controller.wait(timeout=5) == -signal.SIGTERM
    finally:
        fake_controller.kill()
        fake_controller.wait()


def test_ovs_realtime_reaches_every_thread_and_goes_back(lab2: Lab) -> None:
    def policies() -> set[int]:
        out = set()
        for ch in lab2.state.chassis:
            pid = ch.ovs_pids["ovs-vswitchd"].pid
            out |= {os.sched_getscheduler(int(t)) for t in os.listdir(f"/proc/{pid}/task")}
        return out

    assert policies() == {os.SCHED_OTHER}
    lab2.set_ovs_realtime(20)
    assert policies() == {os.SCHED_FIFO}
    pid = lab2.state.chassis[0].ovs_pids["ovs-vswitchd"].pid
    assert os.sched_getparam(pid).sched_priority == 20
    names = {int(t): thread_name(pid, t) for t in os.listdir(f"/proc/{pid}/task")}
    revalidators = [tid for tid, name in names.items() if name.startswith("revalidator")]
    assert revalidators, f"no revalidator thread among {sorted(names.values())}"
    assert {os.sched_getparam(t).sched_priority for t in revalidators} == {
        20 + REVALIDATOR_RT_BOOST}
    lab2.set_ovs_realtime(0)
    assert policies() == {os.SCHED_OTHER}
    with pytest.raises(OvsError, match="SCHED_FIFO 100 for ovs-vswitchd"):
        lab2.set_ovs_realtime(100)  # SCHED_FIFO priorities end at 99
    assert policies() == {os.SCHED_OTHER}


def _lab_pids(lab: Lab) -> list[int]:
    return [rec.pid for ch in lab.state.chassis for rec in ch.ovs_pids.values()]


def test_destroy_leaves_nothing(base_dir: Path) -> None:
    lab = Lab.create(2, base_dir=base_dir)
    try:
        lab.add_vm("a", "chassis-1", MAC.format(1), "10.0.0.1/24", "port-a")
        lab.add_vm("b", "chassis-2", MAC.format(2), "10.0.0.2/24", "port-b")
        sleeper = lab.popen_in_vm("a", ["sleep", "300"])
        pids = _lab_pids(lab)
        assert all(pid_alive(p) for p in pids)
        report = lab.destroy()
        assert report.ok, report.errors
        print(f"destroy of 2 chassis + 2 VMs: {report.seconds:.3f} s")
        assert sleeper.wait(timeout=5) is not None
        assert not any(pid_alive(p) for p in pids)
        assert leftovers(lab.prefix, base_dir) == []
        _assert_no_trace(lab.prefix)
        assert not lab.state_file.exists()
    finally:
        _cleanup(lab, base_dir)


def test_destroy_after_ovs_crash(base_dir: Path) -> None:
    lab = Lab.create(2, base_dir=base_dir)
    try:
        lab.add_vm("a", "chassis-1", MAC.format(1), "10.0.0.1/24", "port-a")
        pids = _lab_pids(lab)
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not any(pid_alive(p) for p in pids), timeout=5)
        # a fresh process (as `ferry lab down` would be) tears it down from the state file
        report = Lab.load(lab.prefix, base_dir).destroy()
        assert report.ok, report.errors
        assert leftovers(lab.prefix, base_dir) == []
        _assert_no_trace(lab.prefix)
    finally:
        _cleanup(lab, base_dir)


def test_destroy_leftovers_without_state_file(base_dir: Path) -> None:
    lab = Lab.create(2, base_dir=base_dir)
    try:
        lab.add_vm("a", "chassis-2", MAC.format(1), "10.0.0.1/24", "port-a")
        pids = _lab_pids(lab)
        lab.state_file.unlink()  # the state is lost: only the prefix is known
        report = destroy_leftovers(lab.prefix, base_dir)
        assert report.ok, report.errors
        assert not any(pid_alive(p) for p in pids)
        assert leftovers(lab.prefix, base_dir) == []
        _assert_no_trace(lab.prefix)
    finally:
        _cleanup(lab, base_dir)


def _assert_no_trace(prefix: str) -> None:
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert f"{prefix}-" not in netns
    assert f"{prefix}-" not in links


def test_failed_create_cleans_up(base_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_start = OvsInstance.start
    calls: list[str | None] = []

    def start_then_fail(self: OvsInstance) -> None:
        calls.append(self.netns)
        real_start(self)
        if len(calls) == 2:  # chassis 2's daemons run, then the build fails
            raise RuntimeError("injected failure")

    monkeypatch.setattr(OvsInstance, "start", start_then_fail)
    with pytest.raises(RuntimeError, match="injected failure"):
        Lab.create(3, prefix="fyt" + os.urandom(2).hex(), base_dir=base_dir)
    prefix = str(calls[0]).split("-", 1)[0]
    assert leftovers(prefix, base_dir) == []
    _assert_no_trace(prefix)


def test_expedited_rcu_is_put_back_as_found_even_after_an_error(tmp_path: Path) -> None:
    knob, saved = tmp_path / "rcu_expedited", tmp_path / "labs" / "rcu.saved"
    knob.write_text("0\n")
    with pytest.raises(RuntimeError, match="inside"), rcu_expedited(knob, saved) as before:
        assert before == "0" and knob.read_text() == "1\n"
        assert json.loads(saved.read_text())["pid"] == os.getpid()
        raise RuntimeError("inside")
    assert knob.read_text() == "0\n" and not saved.exists()


def test_expedited_rcu_held_by_a_live_run_is_left_to_it(tmp_path: Path) -> None:
    knob, saved = tmp_path / "rcu_expedited", tmp_path / "rcu.saved"
    knob.write_text("1\n")
    holder = {"value": "0", "pid": os.getppid(), "starttime": None}
    saved.write_text(json.dumps(holder))
    with rcu_expedited(knob, saved) as before:
        assert before == "0"
    assert knob.read_text() == "1\n" and json.loads(saved.read_text()) == holder
    assert restore_rcu(knob, saved) is None  # its run is alive: not ours to put back


def test_expedited_rcu_left_by_a_killed_run_is_put_back(tmp_path: Path) -> None:
    knob, saved = tmp_path / "rcu_expedited", tmp_path / "rcu.saved"
    gone = subprocess.Popen(["true"])  # its PID no longer runs once waited for
    gone.wait()
    knob.write_text("1\n")
    saved.write_text(json.dumps({"value": "0", "pid": gone.pid, "starttime": None}))
    # The next run adopts the host's value from the record and puts it back at its end...
    with rcu_expedited(knob, saved) as before:
        assert before == "0" and knob.read_text() == "1\n"
    assert knob.read_text() == "0\n" and not saved.exists()
    # ...and `ferry lab down --all` does it at once.
    knob.write_text("1\n")
    saved.write_text(json.dumps({"value": "0", "pid": gone.pid, "starttime": None}))
    assert restore_rcu(knob, saved) == "0"
    assert knob.read_text() == "0\n" and not saved.exists()
    assert restore_rcu(knob, saved) is None


def test_expedited_rcu_refused_names_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "no" / "rcu_expedited"
    with pytest.raises(LabError, match=f"cannot read {missing}"), \
            rcu_expedited(missing, tmp_path / "rcu.saved"):
        pass
    assert not (tmp_path / "rcu.saved").exists()


@pytest.mark.skipif(not os.access(RCU_EXPEDITED, os.W_OK), reason="needs a writable sysfs")
def test_expedited_rcu_on_this_host(tmp_path: Path) -> None:
    found = RCU_EXPEDITED.read_text()
    with rcu_expedited(saved=tmp_path / "rcu.saved"):
        assert RCU_EXPEDITED.read_text().strip() == "1"
    assert RCU_EXPEDITED.read_text() == found
