"""Background datapath flows for a benchmark: ``python -m ferry.probe.background ...``, run in a
client VM's namespace.

A busy hypervisor holds thousands of datapath flows, a lab holds a few dozen; and what a change
of the flow tables costs OVS grows with them (each revalidation round retranslates every
datapath flow of the chassis). This sender gives the lab a busy chassis' flow count: from the
VM's own MAC and address (so port security lets it out), one small UDP frame to each of
``--flows`` unicast MACs that nobody has (locally administered), cycling every ``--period-s``.
The network floods frames to unknown MACs, and the destination MAC is part of every datapath
flow's match, so every chassis with a port on the network keeps about ``--flows`` datapath
flows, while the load stays at ``flows / period`` frames per second.
"""

from __future__ import annotations

import argparse
import ipaddress
import re
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import TYPE_CHECKING

from ferry.lab.netns import stop_child

if TYPE_CHECKING:
    from ferry.lab.lab import Lab

SINK_IP = "192.0.2.1"  # TEST-NET-1: the frames' destination address, never anyone's
UDP_SPORT, UDP_DPORT = 40000, 9  # discard
PERIOD_S = 3.0  # well under OVS's default max-idle (10 s): the flows never expire
MAX_BACKGROUND_FLOWS = 10_000
"""What the lab's benchmarks allow: each flow costs a flooded frame every PERIOD_S, and more
than ~3000 frames per second would measure the lab's two cores rather than the controller."""

_stop = False


def _on_signal(signum: int, frame: FrameType | None) -> None:
    global _stop
    _stop = True


def _checksum(header: bytes) -> int:
    total: int = sum(struct.unpack(f"!{len(header) // 2}H", header))
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def frames(src_mac: str, src_ip: str, count: int) -> list[bytes]:
    """One Ethernet/IPv4/UDP frame per unknown destination MAC ``02:42:xx:xx:xx:00``."""
    if not 0 < count <= 1 << 24:
        raise ValueError(f"flows must be in 1..{1 << 24}, got {count}")
    smac = bytes.fromhex(src_mac.replace(":", ""))
    if len(smac) != 6:
        raise ValueError(f"MAC {src_mac!r}: want six bytes")
    payload = bytes(18)
    udp = struct.pack("!HHHH", UDP_SPORT, UDP_DPORT, 8 + len(payload), 0) + payload
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, 17, 0,
                         ipaddress.IPv4Address(src_ip).packed,
                         ipaddress.IPv4Address(SINK_IP).packed)
    ip = header[:10] + struct.pack("!H", _checksum(header)) + header[12:]
    return [bytes((0x02, 0x42, i >> 16 & 0xFF, i >> 8 & 0xFF, i & 0xFF, 0)) + smac
            + b"\x08\x00" + ip + udp for i in range(count)]


def run(dev: str, batch: list[bytes], period_s: float) -> int:
    """Send ``batch`` over and over, once per ``period_s``, evenly paced, until SIGTERM/SIGINT."""
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    sock.bind((dev, 0))
    spacing = period_s / len(batch)
    due = time.monotonic()
    while not _stop:
        for frame in batch:
            if _stop:
                break
            sock.send(frame)
            due += spacing
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
    return 0


@contextmanager
def background_flows(lab: Lab, vm: str, count: int,
                     period_s: float = PERIOD_S) -> Iterator[subprocess.Popen[bytes]]:
    """Run the sender in ``vm`` (one of the lab's VMs) for the duration of the block; stopped
    by PID on the way out, also when the block fails (the lab's teardown would kill it too)."""
    v = lab.vm(vm)
    vif = v.active_vif
    if vif is None:
        raise ValueError(f"VM {vm} runs nowhere: no background flows from it")
    proc = lab.popen_in_vm(vm, [sys.executable, "-m", "ferry.probe.background",
                                "--dev", vif.guest_if, "--mac", v.mac, "--ip", v.ip,
                                "--flows", str(count), "--period-s", str(period_s)])
    try:
        yield proc
    finally:
        stop_child(proc)


def datapath_flows(lab: Lab, chassis: str) -> int:
    """How many flows the chassis' datapath holds now (``ovs-appctl dpctl/show``)."""
    out = lab.ovs(chassis).appctl("ovs-vswitchd", "dpctl/show")
    m = re.search(r"^\s*flows:\s*(\d+)", out, re.MULTILINE)
    if m is None:
        raise RuntimeError(f"no flow count in dpctl/show on {chassis}: {out[:200]!r}")
    return int(m.group(1))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ferry.probe.background", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dev", required=True, help="the VM's interface")
    p.add_argument("--mac", required=True, help="the VM's MAC (the frames' source)")
    p.add_argument("--ip", required=True, help="the VM's IPv4 address (the frames' source)")
    p.add_argument("--flows", type=int, required=True, help="distinct destination MACs")
    p.add_argument("--period-s", type=float, default=PERIOD_S,
                   help="each MAC gets one frame per period")
    a = p.parse_args(argv)
    if not 0 < a.period_s < 10:
        p.error(f"--period-s {a.period_s}: must be in (0, 10) (OVS expires idle flows at 10 s)")
    try:
        batch = frames(a.mac, a.ip, a.flows)
    except ValueError as e:
        p.error(f"--flows {a.flows}, --mac {a.mac}, --ip {a.ip}: {e}")
    return run(a.dev, batch, a.period_s)


if __name__ == "__main__":
    sys.exit(main())
