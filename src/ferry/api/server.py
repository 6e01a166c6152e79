"""Run the API under uvicorn: in the foreground (``ferry api``) or in a thread (tests, bench)."""

from __future__ import annotations

import logging
import socket
import threading

import uvicorn
from fastapi import FastAPI

log = logging.getLogger(__name__)


class ApiServerError(RuntimeError):
    """The server did not start."""


def parse_listen(listen: str, default_port: int = 9696) -> tuple[str, int]:
    """``HOST:PORT``, ``[V6]:PORT``, ``HOST`` or ``:PORT`` → (host, port)."""
    host, port = listen, default_port
    if listen.startswith("["):
        end = listen.find("]")
        if end < 0:
            raise ValueError(f"{listen!r}: unclosed '[' in an IPv6 address")
        host, rest = listen[1:end], listen[end + 1:]
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"{listen!r}: expected [ADDRESS]:PORT")
            port = _port(listen, rest[1:])
    elif listen.count(":") == 1:
        host, _, p = listen.partition(":")
        port = _port(listen, p)
    return host or "0.0.0.0", port


def _port(listen: str, text: str) -> int:
    if not text.isdigit() or not 0 <= int(text) < 65536:
        raise ValueError(f"{listen!r}: port {text!r} is not 0-65535")
    return int(text)


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, ready: threading.Event) -> None:
        super().__init__(config)
        self.ready = ready

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        self.ready.set()


class ThreadedServer:
    """The API served by uvicorn on a background thread (port 0 = a free port)."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0,
                 log_level: str = "warning") -> None:
        self._ready = threading.Event()
        config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                lifespan="on", access_log=False)
        self._server = _Server(config, self._ready)
        self._thread = threading.Thread(target=self._server.run, name="ferry-api",
                                        daemon=True)
        self.host, self.port = host, port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 20.0) -> ThreadedServer:
        self._thread.start()
        waited = 0.0
        while not self._ready.wait(0.05):
            waited += 0.05
            if not self._thread.is_alive() or waited > timeout:
                raise ApiServerError(f"the API server did not start within {timeout}s")
        sock = self._server.servers[0].sockets[0]
        self.port = sock.getsockname()[1]
        log.info("API serving on %s", self.url)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._server.should_exit = True
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise ApiServerError(f"the API server did not stop within {timeout}s")

    def __enter__(self) -> ThreadedServer:
        return self if self._thread.is_alive() else self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
