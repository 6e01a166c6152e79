"""Run a probe in a lab: an echo agent in the target VM, one client agent per client VM.

Sync::

    with Probe(lab, "vm-t", ["vm-a"], out_dir=d) as probe:   # returns once packets flow
        t0 = now_ns(); ...pause...; t1 = now_ns()
        probe.wait_delivered(50, since_ns=t1)                # traffic is back
    report = probe.report(pause=(t0, t1)); probe.plot("timeline.png", pause=(t0, t1))

Async (process start/stop and waits run in threads, the event loop is never blocked long)::

    async with Probe(lab, "vm-t", ["vm-a"], out_dir=d) as probe:
        ...; await probe.await_delivered(50, since_ns=t1)

Processes are started with :meth:`Lab.popen_in_vm` (``ip netns exec`` execs the agent, so the
PID is the agent's) and stopped by that PID: SIGTERM, then SIGKILL after a timeout. Agents also
stop by themselves after ``max_duration_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from ferry.lab import netns as nx
from ferry.lab.lab import Lab
from ferry.probe import records as rc
from ferry.probe.agent import PROBE_RT_PRIORITY
from ferry.probe.records import ProbeData, TailReader
from ferry.probe.report import ProbeReport, build_report

__all__ = ["DEFAULT_PORT", "PROBE_RT_PRIORITY", "Probe", "ProbeError", "link_flap", "now_ns"]

DEFAULT_PORT = 47000
POLL_S = 0.005


def now_ns() -> int:
    """The probe's clock (CLOCK_MONOTONIC, shared by every namespace): mark pauses with it."""
    return time.monotonic_ns()


class ProbeError(RuntimeError):
    """The probe could not start, an agent failed, or a wait timed out."""


def link_flap(lab: Lab, vm: str, down_ms: float, dev: str | None = None,
              python: str = sys.executable) -> tuple[int, int]:
    """Take the VM's interface (default: its active one) down for ``down_ms``, then up again,
    from inside the VM (an emulated migration pause, without touching the lab's state).

    Returns ``(start_ns, end_ns)``: just before the link went down, just after it came up.
    """
    if dev is None:
        vif = lab.vm(vm).active_vif
        if vif is None:
            raise ProbeError(f"VM {vm!r} has no interface")
        dev = vif.guest_if
    out = lab.exec_in_vm(vm, [python, "-m", "ferry.probe.agent", "flap", "--dev", dev,
                              "--down-ms", str(down_ms)])
    if out.returncode != 0:
        raise ProbeError(f"link flap of {dev} in {vm} failed: {out.stderr.strip()}")
    times = json.loads(out.stdout)
    return int(times["start_ns"]), int(times["end_ns"])


class _Agent:
    def __init__(self, name: str, vm: str, proc: subprocess.Popen[Any], log: IO[bytes]) -> None:
        self.name, self.vm, self.proc, self.log = name, vm, proc, log


OUTSIDE = "outside"
"""A client name meaning the lab's outside host (on the external network), not a VM."""


class Probe:
    """A probe from ``clients`` (VM names) to ``target`` (VM name) in ``lab``.

    ``rate_hz`` packets per second per client, ``size`` bytes of UDP payload (>= 28), sent to
    ``port`` on the target's address. Records go to ``out_dir`` (created; must not already hold
    a run).
    """

    def __init__(self, lab: Lab, target: str, clients: Sequence[str], *, out_dir: Path | str,
                 rate_hz: float = 1000.0, port: int = DEFAULT_PORT, size: int = 64,
                 max_duration_s: float = 60.0, spin_us: float = 0.0,
                 rt_prio: int = PROBE_RT_PRIORITY, python: str = sys.executable,
                 targets: dict[str, str] | None = None) -> None:
        if not clients:
            raise ProbeError("a probe needs at least one client VM")
        self.targets = dict(targets or {})
        """Per client, the address it sends to (default: the target VM's IP); e.g. the
        target's floating IP for the ``OUTSIDE`` client."""
        if target in clients or len(set(clients)) != len(clients):
            raise ProbeError(f"clients must be distinct and not the target: {list(clients)}")
        if size < rc.MIN_PAYLOAD or not 0 < rate_hz <= 100_000:
            raise ProbeError(f"size must be >= {rc.MIN_PAYLOAD} and rate_hz in (0, 100000]")
        self.lab = lab
        self.target = target
        self.clients = list(clients)
        self.out_dir = Path(out_dir)
        self.rate_hz = rate_hz
        self.port = port
        self.size = size
        self.max_duration_s = max_duration_s
        self.spin_us = spin_us
        self.rt_prio = rt_prio
        self.python = python
        self._echo: _Agent | None = None
        self._clients: list[_Agent] = []
        self._tail = TailReader(rc.rec_path(self.out_dir, rc.ECHO_NAME))
        self._rx: dict[int, list[int]] = {i: [] for i in range(1, len(self.clients) + 1)}
        self._seqs: dict[int, set[int]] = {i: set() for i in self._rx}
        self._last_seq: dict[int, int] = {}

    # -- start / stop -----------------------------------------------------------------------

    def start(self, timeout: float = 10.0, wait_flowing: bool = True) -> None:
        """Start the echo, then the clients; with ``wait_flowing``, return once the target
        has received packets from every client (first ARP resolved)."""
        if self._echo is not None:
            raise ProbeError("probe already started")
        if rc.meta_path(self.out_dir, rc.ECHO_NAME).exists():
            raise ProbeError(f"{self.out_dir} already holds a probe run")
        self.out_dir.mkdir(parents=True, exist_ok=True)
        target_ip = self.lab.vm(self.target).ip
        common = ["--port", str(self.port), "--out", str(self.out_dir.absolute())]
        try:
            self._echo = self._spawn(rc.ECHO_NAME, self.target, [
                "echo", "--bind", target_ip, *common, "--vm", self.target,
                "--duration", str(self.max_duration_s + 5)])
            self._wait_ready(self._echo, timeout)
            for i, vm in enumerate(self.clients, start=1):
                bind = self.lab.outside_ip if vm == OUTSIDE else self.lab.vm(vm).ip
                self._clients.append(self._spawn(rc.client_name(i), vm, [
                    "client", "--bind", bind, "--target", self.targets.get(vm, target_ip),
                    *common,
                    "--vm", vm, "--id", str(i), "--rate", str(self.rate_hz),
                    "--size", str(self.size), "--spin-us", str(self.spin_us),
                    "--rt-prio", str(self.rt_prio),
                    "--duration", str(self.max_duration_s)]))
            for agent in self._clients:
                self._wait_ready(agent, timeout)
            if wait_flowing:
                self.wait_delivered(1, timeout=timeout)
        except BaseException:
            self.stop()
            raise

    def _spawn(self, name: str, vm: str, args: list[str]) -> _Agent:
        log = rc.log_path(self.out_dir, name).open("wb")
        try:
            argv = [self.python, "-m", "ferry.probe.agent", *args]
            kw: dict[str, Any] = {"stdin": subprocess.DEVNULL, "stdout": log,
                                  "stderr": subprocess.STDOUT}
            proc = (self.lab.popen_outside(argv, **kw) if vm == OUTSIDE
                    else self.lab.popen_in_vm(vm, argv, **kw))
        except BaseException:
            log.close()
            raise
        return _Agent(name, vm, proc, log)

    def _wait_ready(self, agent: _Agent, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while rc.read_meta(self.out_dir, agent.name) is None:
            if agent.proc.poll() is not None:
                raise ProbeError(f"probe {agent.name} in VM {agent.vm} exited with "
                                 f"{agent.proc.returncode}: {self._log_tail(agent)}")
            if time.monotonic() > deadline:
                raise ProbeError(f"probe {agent.name} in VM {agent.vm} not ready after "
                                 f"{timeout} s: {self._log_tail(agent)}")
            time.sleep(POLL_S)

    def _log_tail(self, agent: _Agent) -> str:
        with contextlib.suppress(OSError):
            agent.log.flush()
            return rc.log_path(self.out_dir, agent.name).read_text(errors="replace")[-2000:]
        return ""

    def stop(self, timeout: float = 5.0, settle_s: float = 0.2) -> None:
        """Stop the clients, wait (at most ``settle_s``) for their last packets to reach the
        target, stop the echo. Each by PID: SIGTERM, SIGKILL after ``timeout``."""
        for agent in self._clients:
            _terminate(agent, timeout)
        if self._echo is not None and self._echo.proc.poll() is None:
            for i, agent in enumerate(self._clients, start=1):
                meta = rc.read_meta(self.out_dir, agent.name) or {}
                if meta.get("state") == "done" and meta.get("sent"):
                    self._last_seq[i] = int(meta["last_seq"])
            deadline = time.monotonic() + settle_s
            while not self._all_last_delivered() and time.monotonic() < deadline:
                time.sleep(POLL_S)
        if self._echo is not None:
            _terminate(self._echo, timeout)

    def _all_last_delivered(self) -> bool:
        self._poll()
        return all(seq in self._seqs[pid] for pid, seq in self._last_seq.items())

    @property
    def pids(self) -> dict[str, int]:
        """PIDs of the agents (``echo``, ``client-1``...), as started."""
        agents = [*([self._echo] if self._echo else []), *self._clients]
        return {a.name: a.proc.pid for a in agents}

    @property
    def running(self) -> bool:
        agents = [*self._clients, *([self._echo] if self._echo else [])]
        return bool(agents) and all(a.proc.poll() is None for a in agents)

    # -- live view ----------------------------------------------------------------------------

    def _poll(self) -> None:
        for kind, pid, seq, _, t_rx in self._tail.read():
            if kind == rc.DELIVERED and pid in self._rx:
                self._rx[pid].append(t_rx)
                self._seqs[pid].add(seq)

    def delivered_counts(self, since_ns: int = 0) -> dict[str, int]:
        """Packets the target received so far per client VM (duplicates included), counting
        only those received at or after ``since_ns``."""
        self._poll()
        return {vm: sum(1 for t in self._rx[i] if t >= since_ns)
                for i, vm in enumerate(self.clients, start=1)}

    def wait_delivered(self, count: int, since_ns: int = 0, timeout: float = 10.0) -> None:
        """Wait until the target has received ``count`` packets from every client at or after
        ``since_ns``."""
        deadline = time.monotonic() + timeout
        while True:
            counts = self.delivered_counts(since_ns)
            if all(n >= count for n in counts.values()):
                return
            failed = [a for a in [*self._clients, *([self._echo] if self._echo else [])]
                      if a.proc.poll() is not None]
            if failed or time.monotonic() > deadline:
                why = (f"{failed[0].name} exited: {self._log_tail(failed[0])}" if failed
                       else f"timed out after {timeout} s")
                raise ProbeError(f"waiting for {count} deliveries per client to "
                                 f"{self.target}: {counts}; {why}")
            time.sleep(POLL_S)

    # -- results ------------------------------------------------------------------------------

    def data(self) -> ProbeData:
        return rc.load(self.out_dir)

    def report(self, pause: tuple[int, int] | None = None,
               around_ms: float = 1000.0, until_ns: int | None = None) -> ProbeReport:
        """See :func:`ferry.probe.report.build_report` (call after :meth:`stop`)."""
        return build_report(self.data(), pause, around_ms, until_ns)

    def plot(self, path: Path | str | None = None, pause: tuple[int, int] | None = None,
             **kwargs: Any) -> Path:
        """Write the timeline PNG (default ``out_dir/timeline.png``)."""
        from ferry.probe.plot import plot_timeline

        return plot_timeline(self.data(), path or self.out_dir / "timeline.png", pause,
                             **kwargs)

    # -- context managers and async -----------------------------------------------------------

    def __enter__(self) -> Probe:
        self.start()
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    async def astart(self, within_s: float = 10.0, wait_flowing: bool = True) -> None:
        await asyncio.to_thread(self.start, within_s, wait_flowing)

    async def astop(self, within_s: float = 5.0) -> None:
        await asyncio.to_thread(self.stop, within_s)

    async def await_delivered(self, count: int, since_ns: int = 0,
                              within_s: float = 10.0) -> None:
        await asyncio.to_thread(self.wait_delivered, count, since_ns, within_s)

    async def __aenter__(self) -> Probe:
        await self.astart()
        return self

    async def __aexit__(self, et: type[BaseException] | None, ev: BaseException | None,
                        tb: TracebackType | None) -> None:
        # shield: a cancelled task must still stop the agents
        await asyncio.shield(self.astop())


def _terminate(agent: _Agent, timeout: float) -> None:
    try:
        nx.stop_child(agent.proc, timeout)
    finally:
        agent.log.close()
