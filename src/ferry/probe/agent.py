"""The probe's processes, run inside VM namespaces: ``python -m ferry.probe.agent ROLE ...``.

``echo``: bound to the target VM's address (not to a device, so it keeps working when the VM's
interface changes during a migration), records every probe packet it receives and sends it
back. ``client``: sends sequence-numbered packets at a fixed rate to the echo and records what
it sent and what came back.

Both stop by themselves after ``--duration`` seconds, or on SIGTERM/SIGINT, and then rewrite
their ``<name>.json`` with final counters. Receive times are the kernel's socket timestamps
(``SO_TIMESTAMPNS``, CLOCK_REALTIME) mapped onto CLOCK_MONOTONIC, so a process that was not
scheduled at once still records when the packet really arrived.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import select
import signal
import socket
import struct
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any, BinaryIO

from ferry.probe import records as rc
from ferry.probe.freeze import Resumer, freeze, prepare_freeze

FLUSH_NS = 20_000_000  # record files are flushed at least every 20 ms (live view)
_TIMESPEC = struct.Struct("@ll")
_CMSG_SPACE = socket.CMSG_SPACE(_TIMESPEC.size)
PR_SET_TIMERSLACK = 29
# Linux (asm-generic; x86, arm): SO_TIMESTAMPNS == SCM_TIMESTAMPNS; Python < 3.12 lacks it
SO_TIMESTAMPNS: int = getattr(socket, "SO_TIMESTAMPNS", 35)

PROBE_RT_PRIORITY = 30
"""The probe agents' SCHED_FIFO priority: above the lab's ovs-vswitchd (``OVS_RT_PRIORITY`` in
:mod:`ferry.demo`), below its hypervisor. A client stands for a VM on another host, whose
sends no chassis of the lab may delay; it sleeps to each slot (no spinning, 1 µs timer
slack), so it holds a core a few µs per packet and takes next to nothing from OVS."""


class _Stop:
    requested = False


def _on_signal(signum: int, frame: FrameType | None) -> None:
    _Stop.requested = True


class MonoClock:
    """Maps CLOCK_REALTIME (kernel packet timestamps) onto CLOCK_MONOTONIC."""

    def __init__(self) -> None:
        self.offset = 0
        self._at = 0
        self.resync()

    def resync(self) -> None:
        best: tuple[int, int] | None = None
        for _ in range(5):  # keep the tightest bracket
            m1 = time.monotonic_ns()
            r = time.clock_gettime_ns(time.CLOCK_REALTIME)
            m2 = time.monotonic_ns()
            if best is None or m2 - m1 < best[0]:
                best = (m2 - m1, r - (m1 + m2) // 2)
        assert best is not None
        self.offset = best[1]
        self._at = time.monotonic_ns()

    def maybe_resync(self, now: int) -> None:
        if now - self._at > 500_000_000:
            self.resync()

    def rx_time(self, ancdata: list[tuple[int, int, bytes]]) -> int:
        for level, kind, data in ancdata:
            if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                sec, nsec = _TIMESPEC.unpack(data[: _TIMESPEC.size])
                return int(sec) * 1_000_000_000 + int(nsec) - self.offset
        return time.monotonic_ns()


def _udp_socket(bind_ip: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.bind((bind_ip, port))
    return sock


def _realtime(prio: int) -> str:
    """SCHED_FIFO at ``prio`` (0: leave the default policy); the policy in effect."""
    if prio > 0:
        try:
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(prio))
        except (OSError, AttributeError) as exc:
            return f"other (SCHED_FIFO refused: {exc})"
        return f"fifo:{prio}"
    return "other"


def _drop_realtime() -> None:
    """Back to normal scheduling once the timed part is done. What a process still does
    after it (a report, the interpreter's exit: 5-10 ms of CPU) would otherwise hold a core
    above everything below its priority: for the hypervisor, the probe's clients and OVS
    right when the VM's first packets after the resume are sent."""
    with contextlib.suppress(OSError, AttributeError):
        os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))


def tight_timers() -> None:
    """Ask for 1 µs timer slack (the default 50 µs makes sleeps overshoot)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_TIMERSLACK, 1000, 0, 0, 0)


class RecordFile:
    def __init__(self, path: Path) -> None:
        self._f: BinaryIO = path.open("ab")
        self._flushed = time.monotonic_ns()

    def add(self, kind: int, probe_id: int, seq: int, t1: int, t2: int) -> None:
        self._f.write(rc.RECORD.pack(kind, probe_id, seq & 0xFFFFFFFF, t1, t2))

    def maybe_flush(self, now: int) -> None:
        if now - self._flushed >= FLUSH_NS:
            self._f.flush()
            self._flushed = now

    def close(self) -> None:
        self._f.close()


def run_echo(args: argparse.Namespace) -> int:
    out = Path(args.out)
    sock = _udp_socket(args.bind, args.port)
    sock.settimeout(0.01)
    clock = MonoClock()
    recs = RecordFile(rc.rec_path(out, rc.ECHO_NAME))
    started = time.monotonic_ns()
    deadline = started + int(args.duration * 1e9)
    meta: dict[str, Any] = {"role": "echo", "vm": args.vm, "bind": args.bind, "port": args.port,
                            "pid": os.getpid(), "started_ns": started, "state": "running"}
    rc.write_meta(out, rc.ECHO_NAME, meta)
    received = bad = reply_errors = 0
    last_error = ""
    while not _Stop.requested:
        now = time.monotonic_ns()
        if now >= deadline:
            break
        recs.maybe_flush(now)
        clock.maybe_resync(now)
        try:
            data, anc, _, peer = sock.recvmsg(2048, _CMSG_SPACE)
        except TimeoutError:
            continue
        t_rx = clock.rx_time(anc)
        if len(data) < rc.PACKET.size:
            bad += 1
            continue
        magic, pid, flags, seq, t_send, _ = rc.PACKET.unpack_from(data)
        if magic != rc.MAGIC or flags & rc.FLAG_ECHO:
            bad += 1
            continue
        received += 1
        recs.add(rc.DELIVERED, pid, seq, t_send, t_rx)
        reply = rc.PACKET.pack(magic, pid, flags | rc.FLAG_ECHO, seq, t_send, t_rx)
        try:
            sock.sendto(reply + data[rc.PACKET.size:], peer)
        except OSError as exc:  # e.g. no route while the interface changes
            reply_errors += 1
            last_error = str(exc)
    recs.close()
    meta.update(state="done", stopped_ns=time.monotonic_ns(), received=received, bad=bad,
                reply_errors=reply_errors, last_error=last_error)
    rc.write_meta(out, rc.ECHO_NAME, meta)
    return 0


class Client:
    """Paced sender: sleeps in ``select`` (serving echo replies) until ``spin`` ns before the
    next slot, then spins. A slot missed by more than one period is skipped (and counted),
    never sent in a burst."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.out = Path(args.out)
        self.name = rc.client_name(args.id)
        self.sock = _udp_socket(args.bind, 0)
        self.sock.setblocking(False)
        self.dest = (args.target, args.port)
        self.clock = MonoClock()
        self.recs = RecordFile(rc.rec_path(self.out, self.name))
        self.period = 1e9 / args.rate
        self.spin = int(args.spin_us * 1000)
        self.pad = bytes(max(0, args.size - rc.PACKET.size))
        self.sent = self.echoed = self.send_errors = self.skipped = self.bad = 0
        self.last_error = ""
        self.late_max = 0

    def drain(self) -> None:
        while True:
            try:
                data, anc, _, _ = self.sock.recvmsg(2048, _CMSG_SPACE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # ICMP errors surface here (e.g. port unreachable)
                continue
            t_back = self.clock.rx_time(anc)
            if len(data) < rc.PACKET.size:
                self.bad += 1
                continue
            magic, pid, flags, seq, t_send, _ = rc.PACKET.unpack_from(data)
            if magic != rc.MAGIC or pid != self.args.id or not flags & rc.FLAG_ECHO:
                self.bad += 1
                continue
            self.echoed += 1
            self.recs.add(rc.ECHOED, pid, seq, t_send, t_back)

    def wait_until(self, due: int) -> None:
        while True:
            remaining = due - time.monotonic_ns()
            if remaining <= 0 or _Stop.requested:
                return
            if remaining > self.spin:
                ready, _, _ = select.select([self.sock], [], [], (remaining - self.spin) / 1e9)
                if ready:
                    self.drain()
            else:
                while time.monotonic_ns() < due:
                    pass
                return

    def run(self) -> int:
        args = self.args
        start = time.monotonic_ns() + 1_000_000
        deadline = start + int(args.duration * 1e9)
        meta: dict[str, Any] = {
            "role": "client", "vm": args.vm, "probe_id": args.id, "bind": args.bind,
            "target": args.target, "port": args.port, "rate_hz": args.rate, "size": args.size,
            "pid": os.getpid(), "started_ns": start, "state": "running",
            "sched": _realtime(args.rt_prio)}
        rc.write_meta(self.out, self.name, meta)
        slot = seq = 0
        first = last = 0
        while not _Stop.requested:
            due = start + int(slot * self.period)
            if due >= deadline:
                break
            self.wait_until(due)
            if _Stop.requested:
                break
            now = time.monotonic_ns()
            packet = rc.PACKET.pack(rc.MAGIC, args.id, 0, seq & 0xFFFFFFFF, now, 0)
            try:
                self.sock.sendto(packet + self.pad, self.dest)
            except OSError as exc:
                self.send_errors += 1
                self.last_error = str(exc)
            else:
                self.recs.add(rc.SENT, args.id, seq, now, now - due)
                self.sent += 1
                first = first or now
                last = now
                self.late_max = max(self.late_max, now - due)
            seq += 1
            slot += 1
            behind = int((time.monotonic_ns() - start) // self.period) + 1 - slot
            if behind > 1:
                self.skipped += behind - 1
                slot += behind - 1
            self.drain()
            self.recs.maybe_flush(now)
            self.clock.maybe_resync(now)
        # The pacing is over: what is left (late echoes, the records, the interpreter's exit,
        # 6-10 ms of CPU) need not outrank anything.
        _drop_realtime()
        # collect late echoes for a moment (bounded), then stop
        grace = time.monotonic_ns() + int(args.linger_ms * 1e6)
        while time.monotonic_ns() < grace:  # also after SIGTERM: bounded
            ready, _, _ = select.select([self.sock], [], [], 0.005)
            if ready:
                self.drain()
        self.drain()
        self.recs.close()
        span = (last - first) / 1e9
        meta.update(
            state="done", stopped_ns=time.monotonic_ns(), sent=self.sent, last_seq=seq - 1,
            first_send_ns=first, last_send_ns=last, echoed=self.echoed, bad=self.bad,
            send_errors=self.send_errors, skipped_slots=self.skipped, last_error=self.last_error,
            late_max_ns=self.late_max,
            achieved_rate_hz=(self.sent - 1) / span if span > 0 else 0.0)
        rc.write_meta(self.out, self.name, meta)
        return 0


SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1
_IFREQ = struct.Struct("16sH22x")


def _set_up(sock: socket.socket, dev: str, up: bool) -> None:
    import fcntl

    name = dev.encode()
    (_, flags) = _IFREQ.unpack(fcntl.ioctl(sock, SIOCGIFFLAGS, _IFREQ.pack(name, 0)))
    flags = flags | IFF_UP if up else flags & ~IFF_UP
    fcntl.ioctl(sock, SIOCSIFFLAGS, _IFREQ.pack(name, flags))


def sleep_until(due_ns: int) -> int:
    """Sleep until CLOCK_MONOTONIC reaches ``due_ns`` (again if woken early); how late the
    wake-up was (ns). No spinning: the hypervisor runs at real-time priority, where a spin
    would hold a core at the very moment measured, and its timer wake-up is prompt."""
    while (left := due_ns - time.monotonic_ns()) > 0:
        time.sleep(left / 1e9)
    return time.monotonic_ns() - due_ns


def run_flap(args: argparse.Namespace) -> int:
    """Take ``--dev`` down for ``--down-ms`` and up again (one ioctl each, so the printed
    times bracket the outage within microseconds); print them as JSON."""
    import json

    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    t0 = time.monotonic_ns()
    _set_up(sock, args.dev, False)
    t_down = time.monotonic_ns()
    sleep_until(t0 + int(args.down_ms * 1e6))
    t_up0 = time.monotonic_ns()
    _set_up(sock, args.dev, True)
    t1 = time.monotonic_ns()
    print(json.dumps({"start_ns": t0, "down_ns": t_down, "up_ns": t_up0, "end_ns": t1}))
    return 0


def rarp_frame(mac: str) -> bytes:
    """QEMU's self-announcement: a broadcast RARP (op 3) carrying the VM's MAC."""
    m = bytes.fromhex(mac.replace(":", ""))
    body = b"\x80\x35" + bytes.fromhex("0001080006040003") + m + bytes(4) + m + bytes(4)
    frame = b"\xff" * 6 + m + body
    return frame + bytes(max(0, 60 - len(frame)))


def _send_rarps(raw: socket.socket, frame: bytes, count: int) -> int:
    for _ in range(count):
        raw.send(frame)
    return count


def run_move(args: argparse.Namespace) -> int:
    """A hypervisor's stop and resume of a migrating VM, timed to the microsecond: stop using
    ``--down`` (the source VIF), wait ``--pause-ms``, resume on ``--up`` (the destination
    VIF), announcing the VM with RARPs from it. ``--stop freeze`` (steady links, see
    :mod:`ferry.probe.freeze`): the source is frozen; the RARPs leave the destination's
    VIF just before the VM resumes there, as QEMU orders them, and the resume gives it
    ``--address`` and ``--gateway``. ``--stop down``: the source link goes down, the
    destination's comes up, then the RARPs. Prints the times as JSON; with ``--tell-pause``,
    first a line with the moment the VM stopped, as it happens."""
    import json

    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    raw = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    raw.bind((args.up, 0))
    frame = rarp_frame(args.mac)
    steady = args.stop == "freeze"
    resumer = Resumer(args.up, args.address, args.gateway) if steady else None
    if steady:
        prepare_freeze(args.down)
    sched = _realtime(args.rt_prio)
    # Let this interpreter's start-up burst of CPU pass first: on a small machine it would
    # otherwise delay the packets of the very moment being measured.
    time.sleep(args.settle_ms / 1000)
    t0 = time.monotonic_ns()
    if steady:
        freeze(sock, args.down)
    else:
        _set_up(sock, args.down, False)
    t_down = time.monotonic_ns()
    if args.tell_pause:  # a libvirt event on the source: Nova may act on it (the lab listens)
        print(json.dumps({"paused_ns": t_down}), flush=True)
    sleep_until(t0 + int(args.pause_ms * 1e6))
    if resumer is not None:
        # QEMU announces before it starts the vCPUs (process_incoming_migration_bh calls
        # qemu_announce_self, then vm_start): the RARP leaves before the guest runs.
        sent = _send_rarps(raw, frame, args.rarp)
        t_rarp = t_up0 = time.monotonic_ns()
        resumer.resume()
        t_up = time.monotonic_ns()
    else:  # a link that was down can carry the RARP only once it is up
        t_up0 = time.monotonic_ns()
        _set_up(sock, args.up, True)
        t_up = time.monotonic_ns()
        sent = _send_rarps(raw, frame, args.rarp)
        t_rarp = time.monotonic_ns()
    _drop_realtime()
    print(json.dumps({"start_ns": t0, "down_ns": t_down, "up_start_ns": t_up0, "up_ns": t_up,
                      "rarp_ns": t_rarp, "rarps": sent, "sched": sched}))
    return 0


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m ferry.probe.agent", description=__doc__)
    sub = p.add_subparsers(dest="role", required=True)
    for role in ("echo", "client"):  # "flap" below
        s = sub.add_parser(role)
        s.add_argument("--bind", required=True, help="the VM's IP address")
        s.add_argument("--port", type=int, required=True, help="the echo's UDP port")
        s.add_argument("--out", required=True, help="directory for records")
        s.add_argument("--duration", type=float, required=True, help="stop after (s)")
        s.add_argument("--vm", default="", help="the VM's name (for the records)")
    c = sub.choices["client"]
    c.add_argument("--target", required=True)
    c.add_argument("--id", type=int, required=True, help="probe id (1..65535)")
    c.add_argument("--rate", type=float, default=1000.0, help="packets per second")
    c.add_argument("--size", type=int, default=64, help="UDP payload bytes")
    c.add_argument("--spin-us", type=float, default=0.0, help="busy-wait before a slot (µs)")
    c.add_argument("--rt-prio", type=int, default=PROBE_RT_PRIORITY,
                   help="SCHED_FIFO priority for precise pacing (0: normal scheduling)")
    c.add_argument("--linger-ms", type=float, default=50.0, help="wait for echoes at the end")
    f = sub.add_parser("flap", help="take a device down and up again (an emulated pause)")
    f.add_argument("--dev", required=True)
    f.add_argument("--down-ms", type=float, required=True)
    mv = sub.add_parser("move", help="stop on one VIF, resume on another (a migration)")
    mv.add_argument("--down", required=True, help="the source VIF's guest interface")
    mv.add_argument("--up", required=True, help="the destination VIF's guest interface")
    mv.add_argument("--pause-ms", type=float, required=True)
    mv.add_argument("--mac", required=True, help="the VM's MAC (for the RARP)")
    mv.add_argument("--rarp", type=int, default=1, help="RARPs to send on resume (0: none)")
    mv.add_argument("--settle-ms", type=float, default=50.0,
                    help="idle time between the start of this process and the stop")
    mv.add_argument("--stop", choices=("freeze", "down"), default="freeze",
                    help="freeze: links stay up (the source frozen, the destination on "
                         "standby gets --address at the resume); down: links go down and up")
    mv.add_argument("--rt-prio", type=int, default=0,
                    help="SCHED_FIFO priority of this hypervisor (0: normal scheduling)")
    mv.add_argument("--tell-pause", action="store_true",
                    help="print a JSON line with paused_ns as soon as the VM is stopped")
    mv.add_argument("--address", help="the VM's address/prefix (with --stop freeze)")
    mv.add_argument("--gateway", help="the VM's default gateway (with --stop freeze)")
    args = p.parse_args(argv)
    if args.role == "move" and args.stop == "freeze" and not args.address:
        p.error("--stop freeze needs --address")
    if args.role == "client" and not (1 <= args.id <= 0xFFFF and 0 < args.rate <= 100_000):
        p.error("--id must be in 1..65535 and --rate in (0, 100000]")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    tight_timers()
    if args.role == "flap":
        return run_flap(args)
    if args.role == "move":
        return run_move(args)
    if args.role == "echo":
        return run_echo(args)
    return Client(args).run()


if __name__ == "__main__":
    sys.exit(main())
