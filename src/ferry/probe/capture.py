"""Where a migration's first packets wait: probe packets captured on their way into a chassis.

:class:`Capture` runs ``tcpdump`` on the root-namespace ends of the links into one chassis
(its underlay veth: Geneve from the other chassis; its external veth: the floating IP's traffic).
:func:`arrivals` reads the probe's requests back out of the capture, Geneve-encapsulated (only
those addressed to the chassis' tunnel IP) or not, with the time each first reached the chassis.
Requests only ever travel towards the VM, so on the external link every one is on its way in.
:func:`hops` then splits each client's first packet after the resume into the time it took to
reach the chassis and the time the chassis held it before the VM got it, and counts the packets
that reached the chassis after the VM's RARP and were never delivered (dropped there).

Timestamps: tcpdump's are CLOCK_REALTIME; the probe's are CLOCK_MONOTONIC. The capture maps
its times with the offset between the two clocks read when it starts.
"""

from __future__ import annotations

import os
import select
import struct
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from ferry.lab.netns import stop_child
from ferry.probe import records as rc

GENEVE_PORT = 6081
_ETH_IPV4, _ETH_VLAN = 0x0800, 0x8100
_PCAP_NS, _PCAP_US = 0xA1B23C4D, 0xA1B2C3D4
_PCAP_RECORD = struct.Struct("<IIII")
_READY_TIMEOUT_S = 5.0


class CaptureError(RuntimeError):
    pass


def probe_request(frame: bytes, tunnel_ip: str | None = None) -> tuple[int, int] | None:
    """(probe id, sequence number) of a probe request in an Ethernet frame, plain or inside
    Geneve over UDP/IPv4 (then, if ``tunnel_ip`` is given, only if sent to it); None for
    anything else (echo replies included)."""
    for _ in range(2):  # the outer frame, then the frame Geneve carries
        udp = _udp_payload(frame)
        if udp is None:
            return None
        dport, payload, dst = udp
        if dport != GENEVE_PORT:
            break
        if tunnel_ip is not None and dst != tunnel_ip:
            return None
        if len(payload) < 8:
            return None
        opt_len = (payload[0] & 0x3F) * 4
        frame = payload[8 + opt_len:]
    else:
        return None
    if len(payload) < rc.PACKET.size:
        return None
    magic, probe_id, flags, seq, _, _ = rc.PACKET.unpack_from(payload)
    if magic != rc.MAGIC or flags & rc.FLAG_ECHO:
        return None
    return probe_id, seq


def _udp_payload(frame: bytes) -> tuple[int, bytes, str] | None:
    """(destination port, payload, destination IP) of a UDP/IPv4 Ethernet frame (one VLAN tag
    allowed)."""
    if len(frame) < 14:
        return None
    off, ethertype = 14, int.from_bytes(frame[12:14], "big")
    if ethertype == _ETH_VLAN and len(frame) >= 18:
        off, ethertype = 18, int.from_bytes(frame[16:18], "big")
    if ethertype != _ETH_IPV4 or len(frame) < off + 20:
        return None
    ihl = (frame[off] & 0x0F) * 4
    if frame[off + 9] != 17 or len(frame) < off + ihl + 8:  # not UDP
        return None
    udp = off + ihl
    dst = ".".join(str(b) for b in frame[off + 16:off + 20])
    return int.from_bytes(frame[udp + 2:udp + 4], "big"), frame[udp + 8:], dst


def pcap_frames(data: bytes) -> Iterator[tuple[int, bytes]]:
    """(CLOCK_REALTIME ns, frame) of each record of a pcap file (micro- or nanosecond)."""
    if len(data) < 24:
        return
    magic = int.from_bytes(data[:4], "little")
    if magic not in (_PCAP_NS, _PCAP_US):
        raise CaptureError(f"not a little-endian pcap file (magic {magic:#x})")
    scale = 1 if magic == _PCAP_NS else 1000
    off = 24
    while off + _PCAP_RECORD.size <= len(data):
        sec, frac, incl, _ = _PCAP_RECORD.unpack_from(data, off)
        off += _PCAP_RECORD.size
        yield sec * 1_000_000_000 + frac * scale, data[off:off + incl]
        off += incl


def arrivals(paths: Sequence[Path], realtime_offset_ns: int,
             tunnel_ip: str | None = None) -> dict[tuple[int, int], int]:
    """(probe id, seq) → CLOCK_MONOTONIC ns when the request was first seen in any of the
    captures (Geneve: only to ``tunnel_ip``, if given); ``realtime_offset_ns`` =
    CLOCK_REALTIME minus CLOCK_MONOTONIC."""
    first: dict[tuple[int, int], int] = {}
    for path in paths:
        for ts, frame in pcap_frames(path.read_bytes()):
            key = probe_request(frame, tunnel_ip)
            if key is not None:
                t = ts - realtime_offset_ns
                if key not in first or t < first[key]:
                    first[key] = t
    return first


class Capture:
    """tcpdump on root-namespace ``links`` (those into the chassis whose tunnel IP is
    ``tunnel_ip``), one pcap per link in ``out_dir``; a context manager that stops every
    tcpdump by PID on exit, even when the block fails."""

    def __init__(self, links: Sequence[str], tunnel_ip: str, out_dir: Path) -> None:
        self.links = list(links)
        self.tunnel_ip = tunnel_ip
        self.out_dir = out_dir
        self.paths = [out_dir / f"{link}.pcap" for link in self.links]
        self.procs: list[subprocess.Popen[bytes]] = []
        self.realtime_offset_ns = 0

    def __enter__(self) -> Capture:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        """Start every tcpdump and wait until each listens (tcpdump says so on stderr)."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.realtime_offset_ns = time.time_ns() - time.monotonic_ns()
        try:
            for link, path in zip(self.links, self.paths, strict=True):
                # --immediate-mode: else frames wait in the kernel's ring for up to a second
                # and a short capture stopped by SIGTERM loses them.
                proc = subprocess.Popen(
                    ["tcpdump", "-i", link, "-n", "-s", "256", "-U", "--immediate-mode",
                     "--time-stamp-precision=nano", "-w", str(path), "udp"],
                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                self.procs.append(proc)
                _await_listening(proc, link)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        for proc in self.procs:
            stop_child(proc)
            if proc.stderr is not None:
                proc.stderr.close()
        self.procs = []

    def arrivals(self) -> dict[tuple[int, int], int]:
        """What the capture saw (see :func:`arrivals`); read after the block."""
        return arrivals([p for p in self.paths if p.exists()], self.realtime_offset_ns,
                        self.tunnel_ip)


def _await_listening(proc: subprocess.Popen[bytes], link: str) -> None:
    """tcpdump prints "listening on ..." once its socket is open: until then it misses frames."""
    assert proc.stderr is not None
    fd = proc.stderr.fileno()
    seen = b""
    deadline = time.monotonic() + _READY_TIMEOUT_S
    while b"listening on" not in seen:
        left = deadline - time.monotonic()
        if left <= 0 or proc.poll() is not None:
            raise CaptureError(f"tcpdump on {link} did not start: "
                               f"{seen.decode(errors='replace').strip() or 'no output'}")
        ready, _, _ = select.select([fd], [], [], left)
        if ready:  # at EOF (tcpdump exited) the check above ends the loop
            seen += os.read(fd, 4096)


@dataclass(frozen=True)
class Hops:
    """One client's first packet delivered after the resume, split at the chassis' edge."""

    client: str
    to_chassis_ms: float | None  # sent → first seen entering the VM's chassis
    held_ms: float | None  # entering the chassis → delivered to the VM
    dropped: int  # entered the chassis after the RARP, never delivered
    sent_late_ms: float | None = None  # how far behind its schedule the client sent it


def hops(client: str, probe_id: int, sent: Sequence[tuple[int, int, int]],
         delivered: Sequence[tuple[int, int, int]], seen: dict[tuple[int, int], int],
         resumed_ns: int, announced_ns: int, window_ns: int) -> Hops:
    """``sent``/``delivered``: the probe's records for this client ((seq, t_send, late) and
    (seq, t_send, t_rx)); ``seen``: :func:`arrivals` at the chassis the VM resumed on. Packets
    counted as dropped entered that chassis within ``window_ns`` after the RARP."""
    got = {seq for seq, _, _ in delivered}
    first = min(((rx, seq, ts) for seq, ts, rx in delivered if rx >= resumed_ns), default=None)
    to_chassis = held = late = None
    if first is not None:
        rx, seq, ts = first
        late = next((lt / 1e6 for s, _, lt in sent if s == seq), None)
        entered = seen.get((probe_id, seq))
        if entered is not None:
            to_chassis, held = (entered - ts) / 1e6, (rx - entered) / 1e6
    dropped = sum(1 for seq, _, _ in sent if seq not in got and
                  announced_ns <= seen.get((probe_id, seq), -1) <= announced_ns + window_ns)
    return Hops(client, to_chassis, held, dropped, late)
