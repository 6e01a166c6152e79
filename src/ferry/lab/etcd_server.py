"""A private single-member etcd server: its own data directory, loopback ports, one process.

Used by the tests, the benchmarks, ``ferry demo --store etcd`` and the lab. The server runs as a
child process in its own session and is stopped by PID (SIGTERM, then SIGKILL); ``kill()`` is
the abrupt SIGKILL that fault tests use, ``restart()`` brings it back on the same data directory
and ports. Layout under ``data_dir``: ``data/`` (etcd's data directory) and ``etcd.log``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType

log = logging.getLogger(__name__)

ETCD = "etcd"
ETCDCTL = "etcdctl"
_LOG_TAIL = 2000
_START_ATTEMPTS = 3


class EtcdServerError(RuntimeError):
    """The etcd server failed to start, to answer, or a tool against it failed."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now (the kernel picks it; etcd binds it a moment later).

    The gap between closing this socket and etcd binding the port is a race; ``start()`` picks
    new ports and tries again if etcd reports the address in use.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


class EtcdServer:
    """One etcd member on ``host`` (loopback by default) with its own data directory.

    ``client_port``/``peer_port`` default to free ports chosen at ``start()``; once chosen they
    stay fixed for the server's life (``restart()`` reuses them, so clients reconnect).
    """

    def __init__(
        self,
        data_dir: Path | str,
        host: str = "127.0.0.1",
        client_port: int | None = None,
        peer_port: int | None = None,
        name: str = "ferry-etcd",
        start_timeout: float = 15.0,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.host = host
        self.client_port = client_port
        self.peer_port = peer_port
        self.name = name
        self.start_timeout = start_timeout
        self._wanted_ports = (client_port, peer_port)
        self._ports_fixed = client_port is not None and peer_port is not None
        self._proc: subprocess.Popen[bytes] | None = None

    # -- addresses ---------------------------------------------------------------------------

    @property
    def endpoints(self) -> list[tuple[str, int]]:
        return [(self.host, self._port("client"))]

    @property
    def url(self) -> str:
        """The store URL for this server: ``etcd://HOST:PORT``."""
        return f"etcd://{self.host}:{self._port('client')}"

    @property
    def client_url(self) -> str:
        return f"http://{self.host}:{self._port('client')}"

    @property
    def peer_url(self) -> str:
        return f"http://{self.host}:{self._port('peer')}"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "etcd.log"

    @property
    def pid(self) -> int | None:
        """The PID of the running server, None when it is not running."""
        return self._proc.pid if self.running else None  # type: ignore[union-attr]

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _port(self, which: str) -> int:
        port = self.client_port if which == "client" else self.peer_port
        if port is None:
            raise EtcdServerError(f"etcd {self.name}: no {which} port yet (call start() first)")
        return port

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Start the server and wait until it answers its health check."""
        if self.running:
            raise EtcdServerError(f"etcd {self.name} is already running (pid {self.pid})")
        if shutil.which(ETCD) is None:
            raise EtcdServerError(f"{ETCD!r} not found on PATH (Debian package etcd-server)")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        for attempt in range(1, _START_ATTEMPTS + 1):
            if not self._ports_fixed:
                wanted_client, wanted_peer = self._wanted_ports
                self.client_port = wanted_client or free_port(self.host)
                self.peer_port = wanted_peer or free_port(self.host)
            try:
                self._spawn()
                self._wait_healthy()
            except EtcdServerError:
                in_use = "address already in use" in self.log_tail(600).lower()
                self._reap(signal.SIGKILL)
                if not in_use or self._ports_fixed or attempt == _START_ATTEMPTS:
                    raise
                log.warning("etcd %s: a port was taken, retrying with new ports", self.name)
                continue
            # From now on the ports stay: restart() must come back where clients expect it.
            self._ports_fixed = True
            log.info("etcd %s up: pid %s, %s", self.name, self.pid, self.client_url)
            return

    def _spawn(self) -> None:
        argv = [
            ETCD,
            f"--name={self.name}",
            f"--data-dir={self.data_dir / 'data'}",
            f"--listen-client-urls={self.client_url}",
            f"--advertise-client-urls={self.client_url}",
            f"--listen-peer-urls={self.peer_url}",
            f"--initial-advertise-peer-urls={self.peer_url}",
            f"--initial-cluster={self.name}={self.peer_url}",
            "--initial-cluster-state=new",
            f"--initial-cluster-token={self.name}",
        ]
        with open(self.log_path, "ab") as logf:
            logf.write(f"\n=== {time.strftime('%F %T')} starting: {' '.join(argv)}\n".encode())
            logf.flush()
            # Own session: terminal signals to the test runner do not reach etcd; we stop it.
            self._proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        last_error = "no answer yet"
        while time.monotonic() < deadline:
            assert self._proc is not None
            code = self._proc.poll()
            if code is not None:
                raise EtcdServerError(
                    f"etcd {self.name} exited with code {code} while starting; "
                    f"log {self.log_path} ends with:\n{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(f"{self.client_url}/health", timeout=1) as resp:
                    body = resp.read().decode()
                if '"health":"true"' in body.replace(" ", ""):
                    return
                last_error = f"health says {body.strip()}"
            except (OSError, urllib.error.URLError) as exc:
                last_error = str(exc)
            time.sleep(0.02)
        raise EtcdServerError(
            f"etcd {self.name} did not become healthy on {self.client_url} within "
            f"{self.start_timeout:.0f}s ({last_error}); log {self.log_path} ends with:\n"
            f"{self.log_tail()}"
        )

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, wait up to ``timeout``, then SIGKILL. Safe to call twice or when not started."""
        self._reap(signal.SIGTERM, timeout)

    def kill(self) -> None:
        """SIGKILL the server at once (a crash, for fault tests). ``restart()`` brings it back."""
        self._reap(signal.SIGKILL)

    def restart(self) -> None:
        """Stop the server if it runs, start it again with the same data directory and ports."""
        self.stop()
        self.start()

    def _reap(self, sig: signal.Signals, timeout: float = 10.0) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("etcd %s (pid %d) ignored %s; killing it", self.name, proc.pid, sig.name)
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()

    def __enter__(self) -> EtcdServer:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- tools -------------------------------------------------------------------------------

    def etcdctl(self, *args: str, timeout: float = 30.0) -> str:
        """Run ``etcdctl`` (API v3) against this server; returns its stdout."""
        argv = [ETCDCTL, f"--endpoints={self.client_url}", *args]
        env = dict(os.environ, ETCDCTL_API="3")
        proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise EtcdServerError(
                f"{' '.join(argv)}: exit {proc.returncode}: {proc.stderr.strip()}"
            )
        return proc.stdout

    def compact(self, revision: int, physical: bool = True) -> None:
        """Compact the history up to ``revision`` (watches from before it get ``Compacted``)."""
        self.etcdctl("compact", str(revision), *(["--physical"] if physical else []))

    def log_tail(self, chars: int = _LOG_TAIL) -> str:
        try:
            data = self.log_path.read_bytes()
        except FileNotFoundError:
            return "(no log)"
        return data[-chars:].decode(errors="replace")

    def __repr__(self) -> str:
        ports = f"{self.client_port}/{self.peer_port}"
        return f"EtcdServer({self.name!r}, {self.host}:{ports}, pid={self.pid})"
