"""Runs the control plane of a lab: the store, the API and one controller per chassis.

Two shapes, as in production:
- embedded store (``memory://``): one process, ``ferry lab serve``, holds the store, the API
  and every chassis' controller (they share the in-process store);
- etcd: a real etcd server started for the lab, a ``ferry api`` process and one
  ``ferry controller`` process per chassis; ``--store etcd://...`` uses an existing etcd.
Every process is recorded in the lab's state with its PID, so ``ferry lab down`` (or a test's
teardown) stops it by PID.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from ferry.lab import netns as nx
from ferry.lab.etcd_server import EtcdServer, free_port
from ferry.lab.lab import BRIDGE_MAPPINGS, Lab, LabError
from ferry.switch.ovsdb import format_bridge_mappings

READY_TIMEOUT = 30.0


def ferry_argv(*args: str) -> list[str]:
    """Run this same Ferry (same interpreter and venv) as a subprocess."""
    return [sys.executable, "-m", "ferry", *args]


def _spawn(argv: list[str], log: Path) -> int:
    with log.open("ab") as out:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    return proc.pid


def wait_api(url: str, pid: int, log: Path, timeout: float = READY_TIMEOUT) -> None:
    """Wait until the API answers; fail early, with its log, if its process died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/v2.0/extensions", timeout=1.0).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        if not nx.pid_alive(pid):
            raise LabError(f"the API process {pid} died: {_tail(log)}")
        time.sleep(0.05)
    raise LabError(f"the API at {url} did not answer within {timeout}s: {_tail(log)}")


def _tail(log: Path, chars: int = 2000) -> str:
    try:
        return log.read_text(errors="replace")[-chars:]
    except OSError:
        return "(no log)"


def start_control_plane(lab: Lab, store: str = "memory") -> None:
    """Start the store, the API and the controllers of ``lab`` and wait until they answer.

    ``store``: ``memory`` (one ``ferry lab serve`` process), ``etcd`` (a new etcd server for
    the lab) or an ``etcd://`` URL (an existing server or cluster).
    """
    lab_dir = Path(lab.state.lab_dir)
    if store in ("memory", "memory://"):
        log = lab_dir / "serve.log"
        pid = _spawn(ferry_argv("lab", "serve", "--lab", lab.prefix), log)
        lab.set_service("serve", None, pid)
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            lab.reload()
            api = lab.service("api")
            if api is not None and api.url:
                break
            if not nx.pid_alive(pid) or time.monotonic() > deadline:
                raise LabError(f"ferry lab serve did not start: {_tail(log)}")
            time.sleep(0.05)
        wait_api(api.url, pid, log)
        return
    if store == "etcd":
        etcd = EtcdServer(lab_dir / "etcd")
        etcd.start()
        assert etcd.pid is not None
        lab.set_service("etcd", etcd.url, etcd.pid)
        store = etcd.url
    elif not store.startswith("etcd://"):
        raise LabError(f"unknown store {store!r}: memory, etcd or etcd://host:port[,...]")
    lab.set_service("store", store, None)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = lab_dir / "api.log"
    pid = _spawn(ferry_argv("api", "--store", store, "--listen", f"127.0.0.1:{port}",
                            "--noauth"), log)
    lab.set_service("api", url, pid)
    for ch in lab.state.chassis:
        spawn_controller(lab, ch.name, wait=False)
    wait_api(url, lab.state.services["api"].proc.pid, log)  # type: ignore[union-attr]
    wait_controllers(lab)


def wait_controllers(lab: Lab, timeout: float = READY_TIMEOUT,
                     only: list[str] | None = None) -> None:
    """Every chassis' controller (the process recorded for it) has connected its switch and
    reconciled its flows."""
    deadline = time.monotonic() + timeout
    lab.reload()
    for ch in lab.state.chassis:
        if only is not None and ch.name not in only:
            continue
        synced = Path(ch.rundir) / f"ferry-{ch.name}.synced"
        while True:
            try:
                pid = int(synced.read_text())
            except (OSError, ValueError):
                pid = None
            if ch.controller is not None and pid == ch.controller.pid:
                break
            if ch.controller and not nx.pid_alive(ch.controller.pid):
                raise LabError(f"controller of {ch.name} died: "
                               f"{_tail(Path(ch.rundir) / 'controller.log')}")
            if time.monotonic() > deadline:
                raise LabError(f"controller of {ch.name} did not connect within {timeout}s")
            time.sleep(0.05)


async def serve(lab: Lab) -> None:
    """The embedded-store lab server: store, API and every chassis' controller, one loop."""
    import uvicorn

    from ferry.agent.agent import AgentConfig, ChassisAgent
    from ferry.api.app import create_app
    from ferry.store.memory import MemoryStore

    class Server(uvicorn.Server):
        started_event = asyncio.Event()

        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets)
            self.started_event.set()

    store = MemoryStore()
    port = free_port()
    server = Server(uvicorn.Config(create_app(store, noauth=True), host="127.0.0.1",
                                   port=port, log_level="warning", access_log=False))
    api = asyncio.create_task(server.serve(), name="api")
    agents = [ChassisAgent(AgentConfig(chassis=ch.name, tunnel_ip=ch.tunnel_ip,
                                       ovsdb_url=ch.ovsdb_url, rundir=Path(ch.rundir),
                                       bridge_mappings=dict(BRIDGE_MAPPINGS)), store)
              for ch in lab.state.chassis]
    await asyncio.gather(*(a.start() for a in agents))
    await server.started_event.wait()
    for ch in lab.state.chassis:
        lab.set_controller_pid(ch.name, os.getpid())
    lab.set_service("api", f"http://127.0.0.1:{port}", os.getpid())
    try:
        await asyncio.gather(api, *(a.wait() for a in agents))
    finally:
        for a in agents:
            await a.stop()
        server.should_exit = True


def spawn_controller(lab: Lab, chassis: str, wait: bool = True) -> int:
    """Start the chassis' controller process (etcd-backed labs), record its PID and, with
    ``wait``, wait until it has reconciled its switch."""
    store = lab.service("store")
    if store is None or not store.url:
        raise LabError(f"lab {lab.prefix} has no external store: its controllers live in "
                       "the serve process")
    ch = lab.chassis(chassis)
    pid = _spawn(ferry_argv("controller", "--chassis", ch.name, "--store", store.url,
                            "--ovsdb", ch.ovsdb_url, "--tunnel-ip", ch.tunnel_ip,
                            "--rundir", ch.rundir,
                            "--bridge-mappings", format_bridge_mappings(BRIDGE_MAPPINGS)),
                   Path(ch.rundir) / "controller.log")
    lab.set_controller_pid(ch.name, pid)
    if wait:
        wait_controllers(lab, only=[ch.name])
    return pid


def stop_controller(lab: Lab, chassis: str, sig: int = 9) -> None:
    """Signal the chassis' controller (default SIGKILL: a crash) and wait until it is gone."""
    ch = lab.chassis(chassis)
    if ch.controller is None:
        return
    pid = ch.controller.pid
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
    deadline = time.monotonic() + 10
    while nx.pid_alive(pid):
        if time.monotonic() > deadline:
            raise LabError(f"controller {pid} of {ch.name} did not stop")
        time.sleep(0.01)
    lab.set_controller_pid(ch.name, None)
