"""One private Open vSwitch instance: its own ovsdb-server and ovs-vswitchd in a run directory.

Used by the lab (one instance per chassis, inside the chassis' network namespace) and by tests
that need a real switch. The kernel datapath is absent here, so bridges must use
``datapath_type=netdev``. Processes are tracked and stopped by PID.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

SCHEMA = Path("/usr/share/openvswitch/vswitch.ovsschema")


class OvsError(RuntimeError):
    """An OVS daemon or tool failed; the message names the command and its stderr."""


@dataclass
class OvsInstance:
    """A private OVS (ovsdb-server + ovs-vswitchd) rooted at ``rundir``.

    ``netns`` (optional) is the network namespace the daemons run in.
    """

    rundir: Path
    netns: str | None = None
    pids: dict[str, int] = field(default_factory=dict)

    @property
    def db_sock(self) -> Path:
        return self.rundir / "db.sock"

    @property
    def ovsdb_url(self) -> str:
        return f"unix:{self.db_sock}"

    def mgmt_sock(self, bridge: str) -> Path:
        return self.rundir / f"{bridge}.mgmt"

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        for var in ("OVS_RUNDIR", "OVS_LOGDIR", "OVS_DBDIR", "OVS_SYSCONFDIR"):
            env[var] = str(self.rundir)
        return env

    def _wrap(self, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.netns, *argv] if self.netns else argv

    def run(self, *argv: str, check: bool = True) -> str:
        """Run an OVS tool (ovs-vsctl, ovs-ofctl, ovs-appctl...) against this instance."""
        proc = subprocess.run(
            self._wrap(list(argv)), env=self._env(), capture_output=True, text=True
        )
        if check and proc.returncode != 0:
            raise OvsError(f"{' '.join(argv)}: exit {proc.returncode}: {proc.stderr.strip()}")
        return proc.stdout

    def vsctl(self, *args: str) -> str:
        return self.run("ovs-vsctl", f"--db={self.ovsdb_url}", "--timeout=10", *args)

    def ofctl(self, command: str, bridge: str, *args: str) -> str:
        """``ovs-ofctl -O OpenFlow13 COMMAND BRIDGE ARGS`` (the bridge's mgmt socket in rundir)."""
        return self.run("ovs-ofctl", "-O", "OpenFlow13", command, bridge, *args)

    def appctl(self, daemon: str, *args: str) -> str:
        target = self.rundir / f"{daemon}.{self.pids[daemon]}.ctl"
        return self.run("ovs-appctl", "-t", str(target), *args)

    def start(self) -> None:
        self.rundir.mkdir(parents=True, exist_ok=True)
        db = self.rundir / "conf.db"
        if not db.exists():
            self.run("ovsdb-tool", "create", str(db), str(SCHEMA))
        self.run(
            "ovsdb-server", f"--remote=punix:{self.db_sock}",
            f"--pidfile={self.rundir / 'ovsdb-server.pid'}", "--detach",
            f"--log-file={self.rundir / 'ovsdb-server.log'}", str(db),
        )
        self.pids["ovsdb-server"] = self._read_pid("ovsdb-server")
        self.vsctl("--no-wait", "init")
        self.run(
            "ovs-vswitchd", self.ovsdb_url,
            f"--pidfile={self.rundir / 'ovs-vswitchd.pid'}", "--detach",
            f"--log-file={self.rundir / 'ovs-vswitchd.log'}",
        )
        self.pids["ovs-vswitchd"] = self._read_pid("ovs-vswitchd")

    def set_realtime(self, priority: int, *, revalidators: int | None = None) -> None:
        """Every thread of ovs-vswitchd at SCHED_FIFO ``priority`` (0: back to normal
        scheduling), its revalidator threads at ``revalidators`` (default: the same). Threads
        it starts later inherit the priority of the thread that starts them."""
        pid = self.pids["ovs-vswitchd"]
        policy = os.SCHED_FIFO if priority else os.SCHED_OTHER
        for tid in os.listdir(f"/proc/{pid}/task"):
            prio = priority
            if priority and revalidators is not None and thread_name(pid, tid).startswith(
                    "revalidator"):
                prio = revalidators
            try:
                os.sched_setscheduler(int(tid), policy, os.sched_param(prio))
            except ProcessLookupError:  # a thread that just ended
                continue
            except OSError as e:  # EPERM without CAP_SYS_NICE, EINVAL out of 1..99
                raise OvsError(f"SCHED_FIFO {prio} for ovs-vswitchd {pid} (thread {tid}): "
                               f"{e} (needs root or CAP_SYS_NICE; 0..99)") from None

    def _read_pid(self, daemon: str) -> int:
        return int((self.rundir / f"{daemon}.pid").read_text().strip())

    def add_bridge(self, name: str, *extra: str) -> None:
        """Add a userspace (netdev) bridge; ``extra`` are further ovs-vsctl words after ``--``."""
        self.vsctl("--may-exist", "add-br", name, "--", "set", "bridge", name,
                   "datapath_type=netdev", *extra)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop both daemons by PID (TERM, then KILL); safe to call twice."""
        for name in ("ovs-vswitchd", "ovsdb-server"):
            pid = self.pids.pop(name, None)
            if pid is not None:
                kill_pid(pid, timeout)


def kill_pid(pid: int, timeout: float = 5.0) -> None:
    """SIGTERM a process, wait for it to go, SIGKILL it if it does not."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            return
        time.sleep(0.01)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie child of ours still answers signal 0; reap it if it is ours.
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == 0
    except ChildProcessError:
        stat = Path(f"/proc/{pid}/stat")
        try:
            return stat.read_text().split()[2] != "Z"
        except (FileNotFoundError, IndexError):
            return False


def thread_name(pid: int, tid: str) -> str:
    """A thread's name (``revalidator12``, ``handler5``, ...); empty once it has ended."""
    try:
        return Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
    except FileNotFoundError:
        return ""
