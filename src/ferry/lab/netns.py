"""Low-level plumbing helpers for the lab: commands, namespaces, links, processes, waiting.

Every command goes through :func:`run`, which raises :class:`CommandError` naming the command,
its exit status and its stderr. Nothing here chooses names: callers pass names that carry
their lab's prefix.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

NETNS_DIR = Path("/run/netns")
SYS_NET = Path("/sys/class/net")
IFNAMSIZ = 15  # usable characters of a Linux interface name

T = TypeVar("T")


class CommandError(RuntimeError):
    """A command failed; ``argv``, ``returncode`` and ``stderr`` say which and why."""

    def __init__(self, argv: Sequence[str], returncode: int, stderr: str) -> None:
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr = stderr.strip()
        super().__init__(f"`{' '.join(self.argv)}` failed (exit {returncode}): {self.stderr}")


class WaitTimeout(TimeoutError):
    """:func:`wait_for` gave up."""


def run(
    argv: Sequence[str],
    *,
    check: bool = True,
    timeout: float | None = 30.0,
    input: str | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` and capture its output as text; raise :class:`CommandError` if ``check``."""
    try:
        proc = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=timeout, input=input, env=env
        )
    except FileNotFoundError as exc:
        raise CommandError(argv, 127, f"command not found: {argv[0]}") from exc
    except subprocess.TimeoutExpired as exc:
        raise CommandError(argv, -1, f"timed out after {timeout} s") from exc
    if check and proc.returncode != 0:
        raise CommandError(argv, proc.returncode, proc.stderr)
    return proc


def in_netns(netns: str | None, argv: Sequence[str]) -> list[str]:
    """``argv`` prefixed with ``ip netns exec NETNS`` (unchanged if ``netns`` is None)."""
    return ["ip", "netns", "exec", netns, *argv] if netns else list(argv)


def wait_for(
    predicate: Callable[[], T], timeout: float = 10.0, interval: float = 0.02, what: str = ""
) -> T:
    """Call ``predicate`` until it returns a truthy value and return that value.

    Exceptions from ``predicate`` count as "not yet"; the last one is chained to the
    :class:`WaitTimeout` raised after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while True:
        try:
            value = predicate()
            if value:
                return value
            last_exc = None
        except Exception as exc:
            last_exc = exc
        if time.monotonic() >= deadline:
            label = what or getattr(predicate, "__name__", "condition")
            raise WaitTimeout(f"timed out after {timeout} s waiting for {label}") from last_exc
        time.sleep(interval)


# -- namespaces -------------------------------------------------------------------------------


def netns_exists(name: str) -> bool:
    return (NETNS_DIR / name).exists()


def netns_list() -> list[str]:
    try:
        return sorted(p.name for p in NETNS_DIR.iterdir())
    except FileNotFoundError:
        return []


def netns_add(name: str, *, disable_ipv6: bool = True) -> None:
    """Create a namespace with loopback up (and IPv6 off, so interfaces stay quiet)."""
    run(["ip", "netns", "add", name])
    if disable_ipv6:
        for scope in ("all", "default"):
            sysctl(name, f"net.ipv6.conf.{scope}.disable_ipv6", "1")
    run(["ip", "-n", name, "link", "set", "lo", "up"])


def netns_delete(name: str) -> bool:
    """Delete a namespace; False if it did not exist."""
    if not netns_exists(name):
        return False
    try:
        run(["ip", "netns", "delete", name])
    except CommandError:
        if netns_exists(name):
            raise
        return False
    return True


def netns_pids(name: str) -> list[int]:
    """PIDs of the processes whose network namespace is ``name``."""
    if not netns_exists(name):
        return []
    out = run(["ip", "netns", "pids", name]).stdout
    return [int(word) for word in out.split()]


def sysctl(netns: str | None, key: str, value: str) -> None:
    run(in_netns(netns, ["sysctl", "-q", "-w", f"{key}={value}"]))


# -- links ------------------------------------------------------------------------------------


def check_ifname(name: str) -> str:
    if not name or len(name) > IFNAMSIZ or "/" in name or any(c.isspace() for c in name):
        raise ValueError(f"invalid interface name {name!r} (at most {IFNAMSIZ} characters)")
    return name


def ip(netns: str | None, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """``ip [-n NETNS] ARGS``."""
    argv = ["ip", *(["-n", netns] if netns else []), *args]
    return run(argv, check=check)


def link_mac(netns: str | None, name: str) -> str:
    """The link-layer address of a link."""
    argv = in_netns(netns, ["cat", f"/sys/class/net/{name}/address"])
    out = run(argv).stdout.strip()
    if not out:
        raise CommandError(argv, 0, f"no MAC address for {name}")
    return out


def link_exists(netns: str | None, name: str) -> bool:
    if netns is None:
        return (SYS_NET / name).exists()
    if not netns_exists(netns):
        return False
    return ip(netns, "link", "show", "dev", name, check=False).returncode == 0


def link_names(netns: str | None) -> list[str]:
    """Interface names in ``netns`` (root namespace if None)."""
    if netns is None:
        return sorted(p.name for p in SYS_NET.iterdir())
    out = ip(netns, "-o", "link", "show").stdout
    names = []
    for line in out.splitlines():
        # "3: name@peer: <FLAGS> ..." -> name
        field = line.split(":", 2)[1].strip()
        names.append(field.split("@", 1)[0])
    return sorted(names)


def veth_add(a: str, a_netns: str | None, b: str, b_netns: str | None) -> None:
    """Create a veth pair with end ``a`` in ``a_netns`` and end ``b`` in ``b_netns``."""
    check_ifname(a)
    check_ifname(b)
    argv = ["ip", "link", "add", a]
    if a_netns:
        argv += ["netns", a_netns]
    argv += ["type", "veth", "peer", "name", b]
    if b_netns:
        argv += ["netns", b_netns]
    run(argv)


def link_delete(netns: str | None, name: str) -> bool:
    """Delete a link; False if it did not exist."""
    if not link_exists(netns, name):
        return False
    try:
        ip(netns, "link", "delete", "dev", name)
    except CommandError:
        if link_exists(netns, name):
            raise
        return False  # went away meanwhile (e.g. its peer's namespace was deleted)
    return True


def link_set(netns: str | None, name: str, *args: str) -> None:
    ip(netns, "link", "set", "dev", name, *args)


def offloads_off(netns: str | None, dev: str) -> None:
    """Turn off checksum and segmentation offloads (the userspace datapath needs it)."""
    run(in_netns(netns, ["ethtool", "-K", dev, "tx", "off", "tso", "off", "gso", "off"]))


# -- processes --------------------------------------------------------------------------------


def pid_starttime(pid: int) -> int | None:
    """The start time of ``pid`` (clock ticks since boot), or None if there is no such process.

    Recorded with a PID so that a later kill can tell the process from a reused PID.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # Field 2 (comm) may contain spaces and parentheses: split after the last ")".
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] == "Z":
        return None
    return int(fields[19])


def pid_alive(pid: int, starttime: int | None = None) -> bool:
    """True if ``pid`` runs (not a zombie) and, if given, started at ``starttime``."""
    now = pid_starttime(pid)
    if now is None:
        return False
    return starttime is None or now == starttime


def stop_child(proc: subprocess.Popen[Any], timeout: float = 5.0) -> None:
    """SIGTERM a child process of ours, SIGKILL it if still there after ``timeout``; reaped."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout)


def kill_pids(pids: dict[int, int | None], timeout: float = 5.0) -> list[int]:
    """SIGTERM each live PID (``{pid: starttime or None}``), SIGKILL those left at the timeout.

    A PID whose start time no longer matches is left alone (it was reused). Returns the PIDs
    signalled. A zombie counts as gone (it is not reaped: its parent may want its status).
    """
    targets = [pid for pid, start in pids.items() if pid_alive(pid, start)]
    for pid in targets:
        _signal(pid, signal.SIGTERM)

    def gone() -> bool:
        return not any(pid_alive(pid, pids[pid]) for pid in targets)

    try:
        wait_for(gone, timeout, interval=0.005)
    except WaitTimeout:
        for pid in targets:
            if pid_alive(pid, pids[pid]):
                _signal(pid, signal.SIGKILL)
        wait_for(gone, timeout, interval=0.005, what=f"PIDs {targets} to exit after SIGKILL")
    return targets


def _signal(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def pids_with_cmdline(fragment: str, programs: Sequence[str] = ()) -> list[int]:
    """PIDs whose command line contains ``fragment`` (e.g. a lab's run directory).

    With ``programs``, only processes whose ``argv[0]`` base name is one of them.
    """
    needle = fragment.encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if programs and os.path.basename(argv[0].decode(errors="replace")) not in programs:
            continue
        if any(needle in arg for arg in argv):
            found.append(int(entry.name))
    return sorted(found)
