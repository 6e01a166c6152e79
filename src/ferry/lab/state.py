"""The lab's state file: a JSON record of everything a lab created.

One file per lab, ``<base_dir>/<prefix>.json``, written atomically (temporary file + rename)
under an ``flock`` on ``<base_dir>/<prefix>.lock``, so that several processes (the test that
built the lab, ``ferry lab status``, whoever starts a controller) can read and update it.
Resources are recorded *before* they are created, so a crash leaves a record that teardown
can follow.
"""

from __future__ import annotations

import fcntl
import json
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_BASE_DIR = Path("/run/ferry/labs")
STATE_VERSION = 1


@dataclass
class ProcRecord:
    """A process the lab knows about: its PID and start time (to detect PID reuse)."""

    pid: int
    starttime: int | None = None


@dataclass
class ServiceRecord:
    """A service the lab runs besides the chassis: the store, the API, the lab server."""

    url: str | None = None
    proc: ProcRecord | None = None


@dataclass
class ChassisState:
    name: str  # logical chassis name, e.g. "chassis-1" (also OVS external_ids:system-id)
    index: int  # 1-based
    netns: str
    tunnel_ip: str  # address only, e.g. "192.168.254.1"
    tunnel_cidr: str  # e.g. "192.168.254.1/24", on br-phy's internal interface
    rundir: str
    ovsdb_socket: str
    bridge: str  # the integration bridge, "br-int"
    phy_bridge: str  # "br-phy"
    underlay_link: str  # veth end in the root namespace (port of the underlay bridge)
    underlay_peer: str  # veth end in the chassis namespace (port of br-phy)
    ovs_pids: dict[str, ProcRecord] = field(default_factory=dict)
    controller: ProcRecord | None = None

    @property
    def ovsdb_url(self) -> str:
        return f"unix:{self.ovsdb_socket}"

    def mgmt_socket(self, bridge: str | None = None) -> str:
        return str(Path(self.rundir) / f"{bridge or self.bridge}.mgmt")


@dataclass
class VifState:
    """One veth between a VM namespace and a chassis' br-int."""

    chassis: str
    guest_if: str  # in the VM namespace
    host_if: str  # in the chassis namespace, a port of br-int
    link_up: bool = True
    standby: bool = False  # link up, but the VM does not run here (yet)


@dataclass
class VmState:
    name: str
    netns: str
    mac: str
    ip_cidr: str
    port_id: str
    mtu: int
    gateway: str | None = None
    vifs: list[VifState] = field(default_factory=list)

    @property
    def ip(self) -> str:
        return self.ip_cidr.split("/", 1)[0]

    def vif(self, chassis: str) -> VifState | None:
        return next((v for v in self.vifs if v.chassis == chassis), None)

    @property
    def active_vif(self) -> VifState | None:
        """The VIF the VM runs on: link up and not on standby (the first one if none or
        several are)."""
        up = [v for v in self.vifs if v.link_up and not v.standby]
        if len(up) == 1:
            return up[0]
        return self.vifs[0] if self.vifs else None


@dataclass
class LabState:
    prefix: str
    base_dir: str
    lab_dir: str  # run directories of the chassis live under it
    underlay_bridge: str
    underlay_cidr: str
    phase: str = "creating"  # "creating", "ready", "destroying"
    created_at: float = 0.0
    chassis: list[ChassisState] = field(default_factory=list)
    vms: list[VmState] = field(default_factory=list)
    extra_links: list[str] = field(default_factory=list)  # root-namespace links we made
    services: dict[str, ServiceRecord] = field(default_factory=dict)
    version: int = STATE_VERSION

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LabState:
        chassis = [_chassis_from_dict(c) for c in data.get("chassis", [])]
        vms = [
            VmState(**{**v, "vifs": [VifState(**x) for x in v.get("vifs", [])]})
            for v in data.get("vms", [])
        ]
        services = {
            name: ServiceRecord(url=svc.get("url"),
                                proc=ProcRecord(**svc["proc"]) if svc.get("proc") else None)
            for name, svc in data.get("services", {}).items()
        }
        plain = {k: v for k, v in data.items() if k not in ("chassis", "vms", "services")}
        return cls(**plain, chassis=chassis, vms=vms, services=services)


def _chassis_from_dict(data: dict[str, Any]) -> ChassisState:
    pids = {k: ProcRecord(**v) for k, v in data.get("ovs_pids", {}).items()}
    ctl = data.get("controller")
    rest = {k: v for k, v in data.items() if k not in ("ovs_pids", "controller")}
    return ChassisState(**rest, ovs_pids=pids, controller=ProcRecord(**ctl) if ctl else None)


def state_path(base_dir: Path, prefix: str) -> Path:
    return base_dir / f"{prefix}.json"


def lock_path(base_dir: Path, prefix: str) -> Path:
    return base_dir / f"{prefix}.lock"


def read_state(base_dir: Path, prefix: str) -> LabState:
    """Read a lab's state file (FileNotFoundError if there is none)."""
    data = json.loads(state_path(base_dir, prefix).read_text())
    return LabState.from_dict(data)


def write_state(state: LabState) -> None:
    """Write the state file atomically."""
    path = state_path(Path(state.base_dir), state.prefix)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(json.dumps(state.to_dict(), indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


@contextmanager
def locked(base_dir: Path, prefix: str) -> Iterator[None]:
    """Hold the lab's lock file (exclusive ``flock``) for the duration of the block."""
    base_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path(base_dir, prefix), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def list_prefixes(base_dir: Path = DEFAULT_BASE_DIR) -> list[str]:
    """Prefixes of the labs that have a state file under ``base_dir``."""
    try:
        return sorted(p.stem for p in base_dir.glob("*.json"))
    except FileNotFoundError:
        return []
