"""A multi-chassis lab on one machine: chassis namespaces with private OVS, an underlay, VMs.

Layout of a lab with prefix ``P`` (all names carry it; interface names fit 15 characters):

- root namespace: Linux bridge ``P-ul`` (the underlay, no address), and per chassis ``N`` the
  veth end ``P-cN`` enslaved to it;
- namespace ``P-chN`` (chassis ``chassis-N``): the veth peer ``P-pN``, a port of the OVS netdev
  bridge ``br-phy`` whose internal interface holds the tunnel IP (``192.168.254.N/24`` by
  default); a private ovsdb-server + ovs-vswitchd (run directory ``<base_dir>/P/chN``); and
  ``br-int`` (netdev, ``fail_mode=secure``) with no flows, no tunnel port and no controller:
  the controller's layers add those (:meth:`Lab.add_geneve_port` exists for plumbing tests);
- the external network (a flat provider network, physical network ``physnet1``): Linux bridge
  ``P-ex`` in the root namespace (no address), per chassis ``N`` a veth ``P-eN`` (root, on
  ``P-ex``) / ``P-xN`` (chassis namespace, a port of the OVS netdev bridge ``br-ex``, in
  NORMAL mode: the operator's physical bridge; the controller adds the patch ports to br-int
  for its bridge mapping ``physnet1:br-ex``); and the ``outside`` host: namespace ``P-out``
  whose ``eth0`` (veth peer ``P-o`` on ``P-ex``) holds ``172.24.4.1/24``, the external
  subnet's gateway as a provider router would be;
- namespace ``P-<vm>`` per VM: the guest side of one veth per chassis the VM is plugged on
  (``eth0``, then ``eth1``... during a migration), all with the VM's MAC, MTU and address; the
  host side (``tap<port id>``) is a port of that chassis' ``br-int`` with
  ``external_ids:iface-id=<port id>`` and ``attached-mac``, as Nova's VIF plug does.

Everything is recorded in ``<base_dir>/P.json`` before it is created, so :meth:`Lab.destroy`
(or :func:`destroy_leftovers`, which needs no state file) can remove it after a crash.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import re
import secrets
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from ferry.lab import netns as nx
from ferry.lab.netns import wait_for
from ferry.lab.ovs_instance import OvsInstance
from ferry.lab.state import (
    DEFAULT_BASE_DIR,
    ChassisState,
    LabState,
    ProcRecord,
    ServiceRecord,
    VifState,
    VmState,
    list_prefixes,
    lock_path,
    locked,
    read_state,
    state_path,
    write_state,
)

__all__ = [
    "DEFAULT_BASE_DIR",
    "DEFAULT_UNDERLAY_CIDR",
    "DEFAULT_VM_MTU",
    "Lab",
    "LabError",
    "TeardownReport",
    "destroy_leftovers",
    "leftovers",
    "list_labs",
    "new_prefix",
]

DEFAULT_UNDERLAY_CIDR = "192.168.254.0/24"
DEFAULT_VM_MTU = 1400  # leaves room for the Geneve encapsulation on a 1500-byte underlay
INT_BRIDGE = "br-int"
PHY_BRIDGE = "br-phy"
EX_BRIDGE = "br-ex"
EXTERNAL_PHYSNET = "physnet1"
BRIDGE_MAPPINGS = {EXTERNAL_PHYSNET: EX_BRIDGE}
"""Every lab chassis maps the external network's physical network to its br-ex."""
OUTSIDE_CIDR = "172.24.4.1/24"
OUTSIDE_MAC = "02:fe:00:00:04:01"
OVS_DAEMONS = ("ovsdb-server", "ovs-vswitchd")

REVALIDATOR_RT_BOOST = 5
"""How far above the rest of ovs-vswitchd :meth:`Lab.set_ovs_realtime` puts its revalidator
threads. At a live activation their round is what replaces the destination's cached drop, and
above the main threads (which poll every port in the userspace datapath) they get a core sooner:
over 100 runs the destination dropped 23/23/37 probe packets after the RARP (L2/L3/FIP)
against 35/37/62 at the same priority (docs/measuring.md, "The cached drop")."""

MAX_SOCKET_PATH = 100  # sun_path is 108 bytes; keep a margin for "<bridge>.mgmt" and clients

_PREFIX_RE = re.compile(r"^[a-z][a-z0-9]{1,7}$")
_VM_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$")
_MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")


# Run inside the VM namespace by Lab.announce: argv = dev mac ip kind count.
_ANNOUNCE = """
import socket, sys
dev, mac, ip, kind, count = sys.argv[1:6]
m = bytes.fromhex(mac.replace(":", ""))
a = socket.inet_aton(ip)
if kind == "rarp":  # ethertype 0x8035, op 3 (reverse request), as QEMU sends
    body = b"\\x80\\x35" + bytes.fromhex("0001080006040003") + m + bytes(4) + m + bytes(4)
else:  # gratuitous ARP request
    body = b"\\x08\\x06" + bytes.fromhex("0001080006040001") + m + a + bytes(6) + a
frame = b"\\xff" * 6 + m + body
frame += bytes(max(0, 60 - len(frame)))
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind((dev, 0))
for _ in range(int(count)):
    s.send(frame)
"""


class LabError(RuntimeError):
    """A lab operation was refused or failed (bad name, unknown VM, missing lab...)."""


@dataclass
class TeardownReport:
    """What a teardown removed, and every step that failed (teardown never stops early)."""

    prefix: str
    removed: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.errors

    def step(self, what: str, fn: Callable[[], object]) -> None:
        """Run one teardown step; record ``what`` if it did something, or its failure."""
        try:
            result = fn()
        except Exception as exc:
            self.errors.append(f"{what}: {exc}")
            return
        if result is not False and result is not None and result != []:
            self.removed.append(what if result is True else f"{what}: {result}")

    def merge(self, other: TeardownReport) -> None:
        self.removed += other.removed
        self.errors += other.errors

    def to_dict(self) -> dict[str, Any]:
        return {"prefix": self.prefix, "ok": self.ok, "removed": self.removed,
                "errors": self.errors, "seconds": round(self.seconds, 3)}


def check_prefix(prefix: str) -> str:
    if not _PREFIX_RE.match(prefix):
        raise LabError(f"invalid lab prefix {prefix!r}: want [a-z][a-z0-9]{{1,7}}")
    return prefix


def new_prefix(base_dir: Path = DEFAULT_BASE_DIR) -> str:
    """A fresh prefix ``fy`` + 4 hex digits, used by no state file, namespace or link."""
    for _ in range(100):
        prefix = "fy" + secrets.token_hex(2)
        if not _prefix_in_use(prefix, base_dir):
            return prefix
    raise LabError("could not find an unused lab prefix")


def _prefix_in_use(prefix: str, base_dir: Path) -> bool:
    if state_path(base_dir, prefix).exists():
        return True
    mine = prefix + "-"
    return any(n.startswith(mine) for n in nx.netns_list() + nx.link_names(None))


def list_labs(base_dir: Path = DEFAULT_BASE_DIR) -> list[str]:
    """Prefixes of the labs that have a state file under ``base_dir``."""
    return list_prefixes(base_dir)


class Lab:
    """A lab, backed by its state file. Build with :meth:`create`, attach with :meth:`load`.

    Chassis arguments (``chassis=``) accept the chassis name (``"chassis-2"``), its 1-based
    index (``2``) or its namespace name. Every mutating method re-reads the state file under
    the lab's lock and writes it back, so several processes can drive one lab.
    """

    def __init__(self, state: LabState) -> None:
        self.state = state
        self._thread_lock = threading.RLock()
        self._txn_depth = 0
        self._gone = False
        self._owns_state = False  # this object wrote the state file (create)

    # -- construction -----------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        n_chassis: int,
        prefix: str | None = None,
        base_dir: Path | str = DEFAULT_BASE_DIR,
        underlay_cidr: str = DEFAULT_UNDERLAY_CIDR,
        keep_on_error: bool = False,
    ) -> Lab:
        """Build a lab of ``n_chassis`` chassis (see the module docstring for the layout).

        On failure everything built so far is destroyed (unless ``keep_on_error``) and the
        original error is raised.
        """
        base = Path(base_dir).absolute()
        net = ipaddress.ip_network(underlay_cidr)
        if not 1 <= n_chassis <= min(999, net.num_addresses - 2):
            raise LabError(f"n_chassis must be between 1 and {min(999, net.num_addresses - 2)}")
        if prefix is None:
            prefix = new_prefix(base)
        check_prefix(prefix)
        if _prefix_in_use(prefix, base):
            raise LabError(f"prefix {prefix!r} is in use (state file, namespace or link); "
                           f"destroy_leftovers({prefix!r}) removes leftovers")
        lab_dir = base / prefix
        probe = lab_dir / f"ch{n_chassis}" / f"{INT_BRIDGE}.mgmt"
        if len(str(probe)) > MAX_SOCKET_PATH:
            raise LabError(f"base_dir too long for unix sockets: {probe}")
        state = LabState(
            prefix=prefix, base_dir=str(base), lab_dir=str(lab_dir),
            underlay_bridge=f"{prefix}-ul", underlay_cidr=str(net), created_at=time.time(),
        )
        lab = cls(state)
        try:
            with lab._txn(new=True):
                lab._build(n_chassis, net)
                lab.state.phase = "ready"
        except BaseException:
            if lab._owns_state and not keep_on_error:
                lab.destroy()
            raise
        return lab

    @classmethod
    def load(cls, prefix: str, base_dir: Path | str = DEFAULT_BASE_DIR) -> Lab:
        """Attach to an existing lab through its state file."""
        base = Path(base_dir).absolute()
        check_prefix(prefix)
        try:
            return cls(read_state(base, prefix))
        except FileNotFoundError:
            raise LabError(f"no lab {prefix!r}: {state_path(base, prefix)} not found") from None

    def reload(self) -> None:
        """Re-read the state file (another process may have changed it)."""
        self.state = read_state(self.base_dir, self.prefix)

    @property
    def prefix(self) -> str:
        return self.state.prefix

    @property
    def base_dir(self) -> Path:
        return Path(self.state.base_dir)

    @property
    def state_file(self) -> Path:
        return state_path(self.base_dir, self.prefix)

    @contextmanager
    def _txn(self, new: bool = False) -> Iterator[None]:
        """Hold the lab lock, work on fresh state, write it back (also if the block fails).

        The file lock serializes processes; ``_thread_lock`` serializes this object's threads
        (it is re-entrant, so nested transactions of one thread go through)."""
        with self._thread_lock:
            yield from self._txn_locked(new)

    def _txn_locked(self, new: bool) -> Iterator[None]:
        if self._txn_depth:
            self._txn_depth += 1
            try:
                yield
            finally:
                self._txn_depth -= 1
            return
        with locked(self.base_dir, self.prefix):
            if new:
                if self.state_file.exists():
                    raise LabError(f"lab {self.prefix!r} exists: {self.state_file}")
                write_state(self.state)
                self._owns_state = True
            elif self.state_file.exists():
                self.reload()
            else:
                raise LabError(f"lab {self.prefix!r} is gone: {self.state_file} not found")
            self._txn_depth = 1
            try:
                yield
            finally:
                self._txn_depth = 0
                if not self._gone:
                    write_state(self.state)

    def _build(self, n_chassis: int, net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> None:
        st = self.state
        Path(st.lab_dir).mkdir(parents=True, exist_ok=True)
        # Underlay bridge in the root namespace: no address, IPv6 off so it stays silent.
        nx.ip(None, "link", "add", st.underlay_bridge, "type", "bridge", "stp_state", "0")
        nx.sysctl(None, f"net.ipv6.conf.{st.underlay_bridge}.disable_ipv6", "1")
        nx.link_set(None, st.underlay_bridge, "up")
        hosts = net.hosts()
        for index in range(1, n_chassis + 1):
            addr = next(hosts)
            ch = ChassisState(
                name=f"chassis-{index}", index=index, netns=f"{self.prefix}-ch{index}",
                tunnel_ip=str(addr), tunnel_cidr=f"{addr}/{net.prefixlen}",
                rundir=str(Path(st.lab_dir) / f"ch{index}"),
                ovsdb_socket=str(Path(st.lab_dir) / f"ch{index}" / "db.sock"),
                bridge=INT_BRIDGE, phy_bridge=PHY_BRIDGE,
                underlay_link=f"{self.prefix}-c{index}", underlay_peer=f"{self.prefix}-p{index}",
            )
            st.chassis.append(ch)
            write_state(st)  # recorded before it exists
            self._build_chassis(ch)
            write_state(st)
        self._warm_underlay()
        self._build_external()

    # -- the external network ---------------------------------------------------------------

    @property
    def external_bridge(self) -> str:
        return f"{self.prefix}-ex"

    @property
    def outside_netns(self) -> str:
        return f"{self.prefix}-out"

    @property
    def outside_ip(self) -> str:
        return str(ipaddress.ip_interface(OUTSIDE_CIDR).ip)

    def set_ovs_realtime(self, priority: int) -> None:
        """Every chassis' ovs-vswitchd at SCHED_FIFO ``priority`` (0: normal scheduling, as
        ``ovs-ctl`` starts it), its revalidators ``REVALIDATOR_RT_BOOST`` above (at most 99)."""
        revalidators = min(99, priority + REVALIDATOR_RT_BOOST)
        for ch in self.state.chassis:
            self.ovs(ch.name).set_realtime(priority, revalidators=revalidators)

    def ingress_links(self, chassis: str) -> list[str]:
        """The root-namespace ends of the links into ``chassis``: its underlay veth (Geneve
        from the other chassis) and its external network veth."""
        ch = self.chassis(chassis)
        return [ch.underlay_link, self._external_link(ch)]

    def _external_link(self, ch: ChassisState) -> str:
        """The root-namespace end of the chassis' veth on the external network's wire."""
        return f"{self.prefix}-e{ch.index}"

    def _build_external(self) -> None:
        """The external network's wire (``P-ex``), br-ex on every chassis, the outside host.
        Every root-namespace link is recorded (``extra_links``) before it exists."""
        st = self.state
        ex = self.external_bridge
        outer = f"{self.prefix}-o"
        links = [self._external_link(ch) for ch in st.chassis] + [outer, ex]
        st.extra_links += [link for link in links if link not in st.extra_links]
        write_state(st)
        nx.ip(None, "link", "add", ex, "type", "bridge", "stp_state", "0")
        nx.sysctl(None, f"net.ipv6.conf.{ex}.disable_ipv6", "1")
        nx.link_set(None, ex, "up")
        for ch in st.chassis:
            root, inner = self._external_link(ch), f"{self.prefix}-x{ch.index}"
            nx.veth_add(root, None, inner, ch.netns)
            nx.sysctl(None, f"net.ipv6.conf.{root}.disable_ipv6", "1")
            nx.link_set(None, root, "master", ex)
            for ns, dev in ((None, root), (ch.netns, inner)):
                nx.offloads_off(ns, dev)
                nx.link_set(ns, dev, "up")
            ovs = self.ovs(ch.name)
            ovs.add_bridge(EX_BRIDGE)
            ovs.vsctl("add-port", EX_BRIDGE, inner)
        nx.netns_add(self.outside_netns)
        nx.veth_add(outer, None, "eth0", self.outside_netns)
        nx.sysctl(None, f"net.ipv6.conf.{outer}.disable_ipv6", "1")
        nx.link_set(None, outer, "master", ex)
        nx.link_set(self.outside_netns, "eth0", "address", OUTSIDE_MAC)
        nx.ip(self.outside_netns, "addr", "add", OUTSIDE_CIDR, "dev", "eth0")
        for ns, dev in ((None, outer), (self.outside_netns, "eth0")):
            nx.offloads_off(ns, dev)
            nx.link_set(ns, dev, "up")

    def exec_outside(
        self, argv: Sequence[str], *, check: bool = False, timeout: float | None = 30.0,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` on the outside host (its namespace); output captured as text."""
        return nx.run(nx.in_netns(self.outside_netns, argv), check=check, timeout=timeout,
                      input=input)

    def popen_outside(self, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` on the outside host in the background (:meth:`destroy` kills
        whatever still runs there)."""
        return subprocess.Popen(nx.in_netns(self.outside_netns, argv), **kwargs)

    def _warm_underlay(self) -> None:
        """Give every chassis' OVS its underlay neighbours now. OVS's userspace tunnelling
        resolves a tunnel destination with its own ARP on first use and drops the packet that
        needed it (seen: the first Geneve packet to each chassis lost); static entries avoid
        that, as a real deployment's warm neighbour tables do.

        And pin the underlay's route in OVS's own routing table. OVS copies the kernel's
        routes and, on any link change in the namespace (a VIF plugged or unplugged), empties
        that copy and reads it again; a revalidator translating a tunnelled flow meanwhile
        finds no route, and the datapath drops that flow's packets until the next round.
        Measured: 20 port additions and deletions on a chassis lost 5-25 packets of each
        probe client there whose traffic is tunnelled (5 runs), none with the route pinned
        (2 runs); the plumbing test's 76-80 VIF plug/unplug cycles under a 1 kHz Geneve
        sender lost 35-65 of 6000 packets without it (3 runs), none with it. A route added
        with ``ovs/route/add`` is OVS's own and survives the re-reads. Ferry's agents pin a
        /32 per other chassis themselves (:mod:`ferry.agent.tunnel_routes`); this subnet pin
        serves the labs that run no controller (the plumbing tests)."""
        macs = {ch.name: nx.link_mac(ch.netns, PHY_BRIDGE) for ch in self.state.chassis}
        for ch in self.state.chassis:
            ovs = self.ovs(ch.name)
            underlay = ipaddress.ip_interface(ch.tunnel_cidr).network
            ovs.appctl("ovs-vswitchd", "ovs/route/add", str(underlay), PHY_BRIDGE)
            for other in self.state.chassis:
                if other is not ch:
                    ovs.appctl("ovs-vswitchd", "tnl/neigh/set", PHY_BRIDGE, other.tunnel_ip,
                               macs[other.name])

    def _build_chassis(self, ch: ChassisState) -> None:
        nx.netns_add(ch.netns)
        nx.veth_add(ch.underlay_link, None, ch.underlay_peer, ch.netns)
        nx.sysctl(None, f"net.ipv6.conf.{ch.underlay_link}.disable_ipv6", "1")
        nx.link_set(None, ch.underlay_link, "master", self.state.underlay_bridge)
        for ns, dev in ((None, ch.underlay_link), (ch.netns, ch.underlay_peer)):
            nx.offloads_off(ns, dev)
            nx.link_set(ns, dev, "up")
        # The inner end is an OVS port: the chassis' kernel must not answer ARP on it too
        # (two answers, two MACs, for the tunnel address).
        nx.sysctl(ch.netns, f"net.ipv4.conf.{ch.underlay_peer}.arp_ignore", "1")
        ovs = OvsInstance(Path(ch.rundir), ch.netns)
        try:
            ovs.start()
        finally:  # record whatever started, even if the rest failed
            for daemon, pid in ovs.pids.items():
                ch.ovs_pids[daemon] = ProcRecord(pid, nx.pid_starttime(pid))
        ovs.vsctl("set", "Open_vSwitch", ".", f"external_ids:system-id={ch.name}",
                  f"external_ids:hostname={ch.name}",
                  f"external_ids:ferry-tunnel-ip={ch.tunnel_ip}")
        ovs.add_bridge(PHY_BRIDGE)
        ovs.vsctl("add-port", PHY_BRIDGE, ch.underlay_peer)
        nx.ip(ch.netns, "addr", "add", ch.tunnel_cidr, "dev", PHY_BRIDGE)
        nx.link_set(ch.netns, PHY_BRIDGE, "up")
        ovs.add_bridge(INT_BRIDGE, "fail_mode=secure", "other_config:disable-in-band=true")

    # -- lookups ----------------------------------------------------------------------------

    def chassis(self, ref: str | int) -> ChassisState:
        for ch in self.state.chassis:
            if ref in (ch.name, ch.index, ch.netns) or str(ref) == str(ch.index):
                return ch
        raise LabError(f"lab {self.prefix}: no chassis {ref!r}")

    def vm(self, name: str) -> VmState:
        for vm in self.state.vms:
            if vm.name == name:
                return vm
        raise LabError(f"lab {self.prefix}: no VM {name!r}")

    def ovs(self, chassis: str | int) -> OvsInstance:
        """The chassis' OVS instance (for ``vsctl``/``ofctl``/``appctl``)."""
        ch = self.chassis(chassis)
        pids = {name: rec.pid for name, rec in ch.ovs_pids.items()}
        return OvsInstance(Path(ch.rundir), ch.netns, pids)

    def ofport(self, chassis: str | int, port: str, timeout: float = 10.0) -> int:
        """The OpenFlow port number of interface ``port`` on the chassis (waits until valid)."""
        ovs = self.ovs(chassis)

        def valid() -> int:
            value = int(ovs.vsctl("get", "Interface", port, "ofport").strip())
            return value if value > 0 else 0

        return wait_for(valid, timeout, what=f"ofport of {port} on {chassis}")

    # -- status -----------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """A JSON-able description of the lab, with liveness of its namespaces and processes."""
        st = self.state
        chassis = []
        for ch in st.chassis:
            ctl = ch.controller
            chassis.append({
                "name": ch.name, "netns": ch.netns, "netns_exists": nx.netns_exists(ch.netns),
                "tunnel_ip": ch.tunnel_ip, "tunnel_cidr": ch.tunnel_cidr,
                "ovsdb_socket": ch.ovsdb_socket, "ovsdb_url": ch.ovsdb_url,
                "rundir": ch.rundir, "bridge": ch.bridge, "mgmt_socket": ch.mgmt_socket(),
                "phy_bridge": ch.phy_bridge, "underlay_link": ch.underlay_link,
                "ovs_pids": {k: v.pid for k, v in ch.ovs_pids.items()},
                "ovs_alive": bool(ch.ovs_pids) and all(
                    nx.pid_alive(v.pid, v.starttime) for v in ch.ovs_pids.values()),
                "controller_pid": ctl.pid if ctl else None,
                "controller_alive": nx.pid_alive(ctl.pid, ctl.starttime) if ctl else None,
            })
        vms = []
        for vm in st.vms:
            active = vm.active_vif
            vms.append({
                "name": vm.name, "netns": vm.netns,
                "interface": active.guest_if if active else None,
                "host_interface": active.host_if if active else None,
                "chassis": active.chassis if active else None,
                "port_id": vm.port_id, "mac": vm.mac, "ip": vm.ip, "ip_cidr": vm.ip_cidr,
                "gateway": vm.gateway, "mtu": vm.mtu,
                "vifs": [{"chassis": v.chassis, "guest_if": v.guest_if, "host_if": v.host_if,
                          "link_up": v.link_up, "standby": v.standby} for v in vm.vifs],
            })
        return {
            "prefix": st.prefix, "phase": st.phase, "state_file": str(self.state_file),
            "lab_dir": st.lab_dir, "created_at": st.created_at,
            "underlay": {"bridge": st.underlay_bridge, "cidr": st.underlay_cidr,
                         "exists": nx.link_exists(None, st.underlay_bridge)},
            "chassis": chassis, "vms": vms,
            "external": {
                "bridge": self.external_bridge, "physical_network": EXTERNAL_PHYSNET,
                "chassis_bridge": EX_BRIDGE,
                "exists": nx.link_exists(None, self.external_bridge),
                "outside": {"netns": self.outside_netns, "interface": "eth0",
                            "ip_cidr": OUTSIDE_CIDR, "ip": self.outside_ip, "mac": OUTSIDE_MAC,
                            "netns_exists": nx.netns_exists(self.outside_netns)},
            },
            "services": {
                name: {"url": svc.url, "pid": svc.proc.pid if svc.proc else None,
                       "alive": nx.pid_alive(svc.proc.pid, svc.proc.starttime)
                       if svc.proc else None}
                for name, svc in st.services.items()
            },
        }

    def set_controller_pid(self, chassis: str | int, pid: int | None) -> None:
        """Record (or clear) the PID of the controller serving a chassis.

        :meth:`destroy` stops it (by PID, and only if its start time still matches).
        """
        with self._txn():
            ch = self.chassis(chassis)
            if pid is None:
                ch.controller = None
                return
            start = nx.pid_starttime(pid)
            if start is None:
                raise LabError(f"no process {pid}")
            ch.controller = ProcRecord(pid, start)

    def set_service(self, name: str, url: str | None, pid: int | None) -> None:
        """Record a service of the lab (store, API...); :meth:`destroy` stops it by PID."""
        with self._txn():
            proc = None
            if pid is not None:
                start = nx.pid_starttime(pid)
                if start is None:
                    raise LabError(f"no process {pid}")
                proc = ProcRecord(pid, start)
            self.state.services[name] = ServiceRecord(url, proc)

    def service(self, name: str) -> ServiceRecord | None:
        return self.state.services.get(name)

    # -- running things ---------------------------------------------------------------------

    def exec_in_vm(
        self, name: str, argv: Sequence[str], *, check: bool = False,
        timeout: float | None = 30.0, input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` in the VM's namespace; output captured as text."""
        return nx.run(nx.in_netns(self.vm(name).netns, argv), check=check, timeout=timeout,
                      input=input)

    def popen_in_vm(self, name: str, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` in the VM's namespace in the background (stop it yourself;
        :meth:`delete_vm` and :meth:`destroy` kill whatever still runs there)."""
        return subprocess.Popen(nx.in_netns(self.vm(name).netns, argv), **kwargs)

    def exec_in_chassis(
        self, chassis: str | int, argv: Sequence[str], *, check: bool = False,
        timeout: float | None = 30.0, input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` in the chassis namespace (with OVS_RUNDIR etc. set for OVS tools)."""
        ch = self.chassis(chassis)
        env = dict(os.environ)
        for var in ("OVS_RUNDIR", "OVS_LOGDIR", "OVS_DBDIR", "OVS_SYSCONFDIR"):
            env[var] = ch.rundir
        return nx.run(nx.in_netns(ch.netns, argv), check=check, timeout=timeout, input=input,
                      env=env)

    def add_flows(self, chassis: str | int, flows: Sequence[str], bridge: str = INT_BRIDGE,
                  protocol: str = "OpenFlow13") -> None:
        """Add flows with one ``ovs-ofctl add-flows`` (for plumbing tests; not the controller)."""
        self.exec_in_chassis(chassis, ["ovs-ofctl", "-O", protocol, "add-flows", bridge, "-"],
                             check=True, input="\n".join(flows) + "\n")

    def add_geneve_port(self, chassis: str | int, name: str = "geneve0") -> int:
        """Add a flow-based Geneve port (``remote_ip=flow,key=flow``) to br-int; its ofport.

        Normally the controller's OVSDB layer does this; this is for plumbing tests.
        """
        nx.check_ifname(name)
        self.ovs(chassis).vsctl(
            "--may-exist", "add-port", INT_BRIDGE, name, "--", "set", "Interface", name,
            "type=geneve", "options:remote_ip=flow", "options:key=flow")
        return self.ofport(chassis, name)

    # -- VMs ---------------------------------------------------------------------------------

    def add_vm(
        self, name: str, chassis: str | int, mac: str, ip_cidr: str, port_id: str,
        gateway: str | None = None, mtu: int = DEFAULT_VM_MTU,
    ) -> VmState:
        """Create VM ``name``: namespace ``<prefix>-<name>`` with ``eth0`` (MAC, MTU, address,
        up, offloads off), plugged into the chassis' br-int with ``iface-id=port_id``.

        Returns once OVS has attached the port. On failure the VM is removed again.
        """
        if not _VM_NAME_RE.match(name) or re.fullmatch(r"ch\d+|ul|ex|out", name):
            raise LabError(f"invalid VM name {name!r}")
        mac = mac.lower()
        if not _MAC_RE.match(mac):
            raise LabError(f"invalid MAC {mac!r}")
        iface = ipaddress.ip_interface(ip_cidr)
        if iface.network.prefixlen == iface.max_prefixlen and "/" not in ip_cidr:
            raise LabError(f"ip_cidr needs a prefix length: {ip_cidr!r}")
        if gateway is not None:
            ipaddress.ip_address(gateway)
        if not 68 <= mtu <= 9000:
            raise LabError(f"invalid MTU {mtu}")
        with self._txn():
            self.chassis(chassis)
            if any(v.name == name for v in self.state.vms):
                raise LabError(f"lab {self.prefix}: VM {name!r} exists")
            if any(v.port_id == port_id for v in self.state.vms):
                raise LabError(f"lab {self.prefix}: port id {port_id!r} is used by another VM")
            vm = VmState(name=name, netns=f"{self.prefix}-{name}", mac=mac, ip_cidr=str(iface),
                         port_id=port_id, mtu=mtu, gateway=gateway)
            self.state.vms.append(vm)
            write_state(self.state)
            try:
                nx.netns_add(vm.netns)
                self.plug_vif(name, chassis, link_up=True)
            except BaseException:
                self.delete_vm(name)
                raise
            return vm

    def plug_vif(self, vm: str, chassis: str | int, link_up: bool = False,
                 standby: bool = False) -> VifState:
        """Plug VM ``vm`` into another (or its first) chassis: a new veth whose guest side
        (``ethN``, same MAC/MTU/address) is in the VM namespace and whose host side
        (``tap...``) becomes a br-int port with the VM's iface-id and attached-mac.

        With ``link_up=False`` the guest side stays down (a paused migration target): OVS sees
        the port with its link down until :meth:`set_link` brings it up.

        ``standby=True`` is a live migration's destination as a hypervisor prepares it: QEMU
        has opened its tap, so the link is up at once, but the VM does not run there yet and
        sends nothing through it: no IPv4 address (the resume adds it, see
        :mod:`ferry.probe.freeze`) and IPv6 off. The first frame from it is the one sent on
        resume. IPv4 only.
        """
        if standby and link_up:
            raise LabError("a VIF is either up (the VM runs there) or on standby, not both")
        with self._txn():
            v = self.vm(vm)
            ch = self.chassis(chassis)
            if v.vif(ch.name):
                raise LabError(f"VM {vm!r} is already plugged on {ch.name}")
            used = {x.guest_if for x in v.vifs}
            guest_if = next(f"eth{i}" for i in range(100) if f"eth{i}" not in used)
            host_if = self._host_ifname(v, ch)
            vif = VifState(chassis=ch.name, guest_if=guest_if, host_if=host_if, link_up=link_up)
            v.vifs.append(vif)
            write_state(self.state)
            try:
                nx.veth_add(host_if, ch.netns, guest_if, v.netns)
                nx.link_set(v.netns, guest_if, "address", v.mac, "mtu", str(v.mtu))
                if not standby:  # a standby VIF gets its address at the resume
                    nx.ip(v.netns, "addr", "add", v.ip_cidr, "dev", guest_if)
                nx.offloads_off(v.netns, guest_if)
                nx.link_set(ch.netns, host_if, "mtu", str(v.mtu), "up")
                nx.offloads_off(ch.netns, host_if)
                if link_up:
                    self._guest_up(v, vif)
                elif standby:
                    self._guest_standby(v, vif)
                self.ovs(ch.name).vsctl(
                    "--may-exist", "add-port", INT_BRIDGE, host_if, "--", "set", "Interface",
                    host_if, f"external_ids:iface-id={v.port_id}",
                    f"external_ids:attached-mac={v.mac}", "external_ids:iface-status=active",
                    f"external_ids:vm-id={v.name}")
            except BaseException:
                self._unplug(v, vif, force=True)
                raise
            return vif

    def _host_ifname(self, vm: VmState, ch: ChassisState) -> str:
        taken = {x.host_if for other in self.state.vms for x in other.vifs
                 if x.chassis == ch.name}
        name = "tap" + re.sub(r"[^A-Za-z0-9_.-]", "", vm.port_id)[:11]
        if name == "tap" or name in taken:
            name = "tap" + hashlib.sha1(f"{vm.name}/{vm.port_id}".encode()).hexdigest()[:11]
        if name in taken:
            raise LabError(f"no free host interface name for VM {vm.name!r} on {ch.name}")
        return name

    def _guest_standby(self, vm: VmState, vif: VifState) -> None:
        if ipaddress.ip_interface(vm.ip_cidr).version != 4:
            raise LabError(f"VM {vm.name}: a standby VIF needs an IPv4 address")
        # No router solicitation, DAD or MLD report from the standby link: the first frame
        # the VM sends through it must be the one sent on resume.
        nx.sysctl(vm.netns, f"net.ipv6.conf.{vif.guest_if}.disable_ipv6", "1")
        nx.link_set(vm.netns, vif.guest_if, "up")

    def _guest_up(self, vm: VmState, vif: VifState) -> None:
        nx.link_set(vm.netns, vif.guest_if, "up")
        if vm.gateway:
            nx.ip(vm.netns, "route", "replace", "default", "via", vm.gateway,
                  "dev", vif.guest_if)

    def set_link(self, vm: str, chassis: str | int, up: bool) -> None:
        """Bring the guest side of the VM's VIF on ``chassis`` up or down (OVS sees the
        carrier change on its port). Going up re-adds the default route via that VIF."""
        with self._txn():
            v = self.vm(vm)
            vif = v.vif(self.chassis(chassis).name)
            if vif is None:
                raise LabError(f"VM {vm!r} is not plugged on {chassis}")
            if up:
                if vif.standby:  # standby or frozen: no address (the move's resume adds it)
                    nx.ip(v.netns, "addr", "replace", v.ip_cidr, "dev", vif.guest_if)
                self._guest_up(v, vif)
            else:
                nx.link_set(v.netns, vif.guest_if, "down")
            vif.link_up, vif.standby = up, False

    def stop_on(self, vm: str, chassis: str | int, frozen: bool) -> None:
        """Record that the VM no longer runs on its VIF on ``chassis``: frozen (the link stays
        up until the VIF is unplugged) or with the link taken down."""
        if not frozen:
            self.set_link(vm, chassis, False)
            return
        with self._txn():
            vif = self.vm(vm).vif(self.chassis(chassis).name)
            if vif is None:
                raise LabError(f"VM {vm!r} is not plugged on {chassis}")
            vif.standby = True

    def announce(self, vm: str, chassis: str | int, kind: str = "rarp", count: int = 1) -> None:
        """Send what a hypervisor sends after a migration, from the VM's VIF on ``chassis``:
        ``rarp`` (QEMU's self-announce: broadcast RARP with the VM's MAC) or ``garp``
        (gratuitous ARP for the VM's address). The VIF's link must be up."""
        v = self.vm(vm)
        vif = v.vif(self.chassis(chassis).name)
        if vif is None:
            raise LabError(f"VM {vm!r} is not plugged on {chassis}")
        if kind not in ("rarp", "garp"):
            raise LabError(f"unknown announcement {kind!r}: want 'rarp' or 'garp'")
        argv = [sys.executable, "-c", _ANNOUNCE, vif.guest_if, v.mac, v.ip, kind, str(count)]
        nx.run(nx.in_netns(v.netns, argv))

    def unplug_vif(self, vm: str, chassis: str | int, force: bool = False) -> None:
        """Delete the VM's port on the chassis' br-int and its veth (both ends).

        With ``force``, failures (e.g. OVS already dead) are ignored.
        """
        with self._txn():
            v = self.vm(vm)
            vif = v.vif(self.chassis(chassis).name)
            if vif is None:
                raise LabError(f"VM {vm!r} is not plugged on {chassis}")
            self._unplug(v, vif, force)

    def _unplug(self, vm: VmState, vif: VifState, force: bool) -> None:
        ch = self.chassis(vif.chassis)
        errors: list[str] = []
        try:
            self.ovs(ch.name).vsctl("--if-exists", "del-port", INT_BRIDGE, vif.host_if)
        except Exception as exc:
            errors.append(str(exc))
        try:
            nx.link_delete(ch.netns, vif.host_if)
        except Exception as exc:
            errors.append(str(exc))
        if vif in vm.vifs:
            vm.vifs.remove(vif)
        if errors and not force:
            raise LabError(f"unplugging {vm.name} from {ch.name}: " + "; ".join(errors))

    def delete_vm(self, name: str) -> None:
        """Unplug all the VM's VIFs, stop whatever runs in its namespace, delete it."""
        with self._txn():
            vm = self.vm(name)
            for vif in list(vm.vifs):
                self._unplug(vm, vif, force=True)
            nx.kill_pids({pid: None for pid in nx.netns_pids(vm.netns)})
            nx.netns_delete(vm.netns)
            self.state.vms.remove(vm)

    # -- teardown ---------------------------------------------------------------------------

    def destroy(self, timeout: float = 5.0) -> TeardownReport:
        """Remove every process, namespace, link, directory and the state file of the lab.

        Works on a lab whose processes died or whose creation crashed. Every step runs even
        if an earlier one failed; failures are collected in the report. Processes are stopped
        by PID (SIGTERM, then SIGKILL after ``timeout``): the recorded controller and OVS
        daemons (only if their start time still matches), then anything left in the lab's
        namespaces. A final scan for the prefix reports anything that survived.
        """
        t0 = time.monotonic()
        report = TeardownReport(self.prefix)
        base = self.base_dir
        with locked(base, self.prefix):
            if self.state_file.exists():
                report.step("read state file", self.reload)
            st = self.state
            st.phase = "destroying"
            if self.state_file.exists():
                report.step("mark state file", lambda: write_state(st))
            procs: dict[int, int | None] = {}
            for svc in st.services.values():
                if svc.proc is not None:
                    procs[svc.proc.pid] = svc.proc.starttime
            for ch in st.chassis:
                for rec in [*ch.ovs_pids.values(), *([ch.controller] if ch.controller else [])]:
                    procs[rec.pid] = rec.starttime
            report.step("stop recorded processes", lambda: nx.kill_pids(procs, timeout))
            namespaces = [vm.netns for vm in st.vms] + [ch.netns for ch in st.chassis]
            namespaces.append(self.outside_netns)
            _teardown_namespaces(namespaces, report, timeout)
            links = [ch.underlay_link for ch in st.chassis] + st.extra_links
            links.append(st.underlay_bridge)
            for link in links:
                if link.startswith(self.prefix + "-"):
                    report.step(f"delete link {link}", partial(nx.link_delete, None, link))
            report.step(f"remove {st.lab_dir}", lambda: _rmtree(Path(st.lab_dir)))
            report.step(f"remove {self.state_file}", lambda: _unlink(self.state_file))
            self._gone = True
            report.merge(_scan(self.prefix, base, timeout))
        _unlink(lock_path(base, self.prefix))
        report.seconds = time.monotonic() - t0
        return report


def _teardown_namespaces(namespaces: Sequence[str], report: TeardownReport,
                         timeout: float) -> None:
    """Kill everything in the namespaces (all at once), then delete them."""
    procs: dict[int, int | None] = {}
    for ns in namespaces:
        try:
            for pid in nx.netns_pids(ns):
                procs[pid] = nx.pid_starttime(pid)
        except Exception as exc:
            report.errors.append(f"list processes in {ns}: {exc}")
    report.step("stop processes in the namespaces", lambda: nx.kill_pids(procs, timeout))
    for ns in namespaces:
        report.step(f"delete netns {ns}", partial(nx.netns_delete, ns))


def _scan(prefix: str, base_dir: Path, timeout: float) -> TeardownReport:
    """Remove whatever carries the prefix: namespaces (and their processes), root-namespace
    links, OVS daemons running from the lab's directory, the lab's files."""
    report = TeardownReport(prefix)
    mine = prefix + "-"
    _teardown_namespaces([n for n in nx.netns_list() if n.startswith(mine)], report, timeout)
    lab_dir = base_dir / prefix
    try:
        daemons = nx.pids_with_cmdline(f"{lab_dir}/", OVS_DAEMONS)
        report.step("stop OVS daemons of the lab",
                    lambda: nx.kill_pids({p: nx.pid_starttime(p) for p in daemons}, timeout))
    except Exception as exc:
        report.errors.append(f"scan processes: {exc}")
    try:
        links = [n for n in nx.link_names(None) if n.startswith(mine)]
    except Exception as exc:
        report.errors.append(f"list links: {exc}")
        links = []
    # veth ends first (deleting one also deletes its peer), the bridges last
    for link in sorted(links, key=lambda n: n.endswith(("-ul", "-ex"))):
        report.step(f"delete link {link}", partial(nx.link_delete, None, link))
    report.step(f"remove {lab_dir}", lambda: _rmtree(lab_dir))
    report.step("remove state file", lambda: _unlink(state_path(base_dir, prefix)))
    return report


def destroy_leftovers(prefix: str, base_dir: Path | str = DEFAULT_BASE_DIR,
                      timeout: float = 5.0) -> TeardownReport:
    """Remove everything of lab ``prefix``, with or without its state file: the state file's
    records (if readable), then every namespace and root-namespace link named ``prefix-*``,
    the processes in those namespaces, and OVS daemons started from ``base_dir/prefix``."""
    t0 = time.monotonic()
    check_prefix(prefix)
    base = Path(base_dir).absolute()
    report = TeardownReport(prefix)
    if state_path(base, prefix).exists():
        try:
            report.merge(Lab.load(prefix, base).destroy(timeout))
        except Exception as exc:
            report.errors.append(f"destroy from state file: {exc}")
    with locked(base, prefix):
        report.merge(_scan(prefix, base, timeout))
    _unlink(lock_path(base, prefix))
    report.seconds = time.monotonic() - t0
    return report


def leftovers(prefix: str, base_dir: Path | str = DEFAULT_BASE_DIR) -> list[str]:
    """What of lab ``prefix`` still exists: namespaces, root links, OVS daemons, files."""
    check_prefix(prefix)
    base = Path(base_dir).absolute()
    mine = prefix + "-"
    found = [f"netns {n}" for n in nx.netns_list() if n.startswith(mine)]
    found += [f"link {n}" for n in nx.link_names(None) if n.startswith(mine)]
    found += [f"pid {p}" for p in nx.pids_with_cmdline(f"{base / prefix}/", OVS_DAEMONS)]
    found += [f"file {p}" for p in (base / prefix, state_path(base, prefix)) if p.exists()]
    return found


def _rmtree(path: Path) -> bool:
    if not path.exists():
        return False
    shutil.rmtree(path)
    return True


def _unlink(path: Path) -> bool:
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    return True
