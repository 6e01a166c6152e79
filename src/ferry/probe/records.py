"""Wire format of probe packets, and the record files the agents write.

A probe packet (UDP payload, network byte order, padded to the configured size)::

    magic u32 | probe id u16 | flags u16 | seq u32 | t_send i64 | t_target i64

``t_send`` is the client's CLOCK_MONOTONIC send time in ns; the echo sets ``FLAG_ECHO`` and
fills ``t_target`` with its receive time. All VM namespaces share the host's monotonic clock,
so times from different VMs are comparable.

Record files (``*.rec``) are a sequence of fixed 24-byte little-endian records
``kind u8 | pad | probe id u16 | seq u32 | t1 i64 | t2 i64``:

- ``SENT`` (client file): ``t1`` = send time, ``t2`` = lateness against the pacing schedule;
- ``DELIVERED`` (echo file): ``t1`` = send time (from the packet), ``t2`` = receive time;
- ``ECHOED`` (client file): ``t1`` = send time, ``t2`` = time the echo came back.

Each agent also writes ``<name>.json`` (written once it is ready, rewritten with its final
counters when it exits).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MAGIC = 0x46525950  # "FRYP"
FLAG_ECHO = 0x1
PACKET = struct.Struct("!IHHIqq")
MIN_PAYLOAD = PACKET.size

RECORD = struct.Struct("<BxHIqq")
SENT, DELIVERED, ECHOED = 1, 2, 3

ECHO_NAME = "echo"


def client_name(probe_id: int) -> str:
    return f"client-{probe_id}"


def rec_path(out_dir: Path, name: str) -> Path:
    return out_dir / f"{name}.rec"


def meta_path(out_dir: Path, name: str) -> Path:
    return out_dir / f"{name}.json"


def log_path(out_dir: Path, name: str) -> Path:
    return out_dir / f"{name}.log"


def write_meta(out_dir: Path, name: str, meta: dict[str, Any]) -> None:
    """Write ``<name>.json`` atomically (readers never see a partial file)."""
    path = meta_path(out_dir, name)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(meta, indent=1, sort_keys=True))
    tmp.replace(path)


def read_meta(out_dir: Path, name: str) -> dict[str, Any] | None:
    try:
        data: dict[str, Any] = json.loads(meta_path(out_dir, name).read_text())
    except FileNotFoundError:
        return None
    return data


def iter_records(data: bytes) -> Iterator[tuple[int, int, int, int, int]]:
    """Records in ``data`` (a trailing partial record is ignored)."""
    usable = len(data) - len(data) % RECORD.size
    yield from RECORD.iter_unpack(memoryview(data)[:usable])


class TailReader:
    """Reads the records appended to a file since the last call (a live view of a run)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0

    def read(self) -> list[tuple[int, int, int, int, int]]:
        try:
            with self.path.open("rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return []
        usable = len(data) - len(data) % RECORD.size
        self._offset += usable
        return list(iter_records(data[:usable]))


@dataclass
class ClientData:
    """What one client sent and got back, plus what the target received from it."""

    name: str  # the client VM's name
    probe_id: int
    sent: list[tuple[int, int, int]] = field(default_factory=list)  # (seq, t_send, lateness)
    echoed: list[tuple[int, int, int]] = field(default_factory=list)  # (seq, t_send, t_back)
    # (seq, t_send, t_rx) in the order the target received them, duplicates included
    delivered: list[tuple[int, int, int]] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class ProbeData:
    """All records of one probe run, per client."""

    target: str
    rate_hz: float
    clients: list[ClientData]
    echo_meta: dict[str, Any] = field(default_factory=dict)


def load(out_dir: Path | str) -> ProbeData:
    """Read a probe run's directory (as written by the agents)."""
    out = Path(out_dir)
    echo_meta = read_meta(out, ECHO_NAME)
    if echo_meta is None:
        raise FileNotFoundError(f"no probe run in {out}: {meta_path(out, ECHO_NAME)} missing")
    clients: dict[int, ClientData] = {}
    for path in sorted(out.glob("client-*.json")):
        meta = json.loads(path.read_text())
        pid = int(meta["probe_id"])
        cd = ClientData(name=str(meta.get("vm") or path.stem), probe_id=pid, meta=meta)
        for kind, _, seq, t1, t2 in iter_records(rec_path(out, path.stem).read_bytes()):
            if kind == SENT:
                cd.sent.append((seq, t1, t2))
            elif kind == ECHOED:
                cd.echoed.append((seq, t1, t2))
        clients[pid] = cd
    echo_rec = rec_path(out, ECHO_NAME)
    if echo_rec.exists():
        for kind, pid, seq, t1, t2 in iter_records(echo_rec.read_bytes()):
            if kind == DELIVERED and pid in clients:
                clients[pid].delivered.append((seq, t1, t2))
    rates = {float(c.meta.get("rate_hz", 0.0)) for c in clients.values()}
    return ProbeData(target=str(echo_meta.get("vm", "")), rate_hz=max(rates, default=0.0),
                     clients=[clients[k] for k in sorted(clients)], echo_meta=echo_meta)
