"""Tells the agent when the kernel's routes change where ovs-vswitchd reads them.

The tunnel-route pins (:mod:`ferry.agent.tunnel_routes`) are copies of kernel routes, and a /32
pin outranks the kernel route it copies: when the underlay's route to a chassis changes (a new
gateway, a failover to another device), OVS keeps tunnelling along the old pin until the agent
copies the new route. So the agent listens to the kernel's route notifications (rtnetlink
``RTMGRP_IPV4_ROUTE`` and ``RTMGRP_IPV6_ROUTE``) instead of waiting for its periodic check.

They are read in ovs-vswitchd's own network namespace (``/proc/PID/ns/net`` of the pid in its
pidfile), which need not be the agent's: in the lab every chassis' OVS runs in a namespace of
its own and the controllers do not. A netlink socket stays in the namespace it was created in,
so a short-lived thread enters that namespace, opens the socket and exits.

The notifications are only a signal: what changed is read from OVS (``ovs/route/show``), which
hears of the change by the same notifications and re-reads its copy of the routes.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import logging
import os
import socket
import threading
from collections.abc import Callable
from pathlib import Path

from ferry.agent.datapath import DatapathSettingError, vswitchd_pid

log = logging.getLogger(__name__)

CLONE_NEWNET = 0x40000000
RTMGRP_IPV4_ROUTE = 0x40
RTMGRP_IPV6_ROUTE = 0x400


class RouteEventsError(RuntimeError):
    """The route notifications cannot be had; the message says where and why."""


def vswitchd_netns(ovs_rundir: Path) -> Path:
    """ovs-vswitchd's network namespace, from the pidfile in its run directory."""
    try:
        return Path(f"/proc/{vswitchd_pid(ovs_rundir)}/ns/net")
    except DatapathSettingError as e:
        raise RouteEventsError(str(e)) from e


def _same_netns(path: Path) -> bool:
    try:
        theirs, ours = os.stat(path), os.stat("/proc/thread-self/ns/net")
    except OSError as e:
        raise RouteEventsError(f"cannot read the network namespace {path}: {e}") from e
    return (theirs.st_dev, theirs.st_ino) == (ours.st_dev, ours.st_ino)


def _route_socket() -> socket.socket:
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK
                         | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE)
    try:
        sock.bind((0, RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_ROUTE))
    except OSError:
        sock.close()
        raise
    return sock


def open_route_socket(netns: Path) -> socket.socket:
    """A non-blocking rtnetlink socket subscribed to route changes in ``netns``."""
    if _same_netns(netns):
        return _route_socket()
    result: list[socket.socket] = []
    failure: list[str] = []

    def enter_and_open() -> None:
        # This thread alone changes namespace, and ends right after: whatever happens, no
        # other thread of the agent ever runs in the other namespace.
        libc = ctypes.CDLL(None, use_errno=True)
        try:
            fd = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            failure.append(f"cannot open {netns}: {e}")
            return
        try:
            if libc.setns(fd, CLONE_NEWNET) != 0:
                failure.append(f"cannot enter {netns}: {os.strerror(ctypes.get_errno())}")
                return
            result.append(_route_socket())
        except OSError as e:
            failure.append(f"cannot open a route socket in {netns}: {e}")
        finally:
            os.close(fd)

    thread = threading.Thread(target=enter_and_open, name="route-socket", daemon=True)
    thread.start()
    thread.join()
    if not result:
        raise RouteEventsError(failure[0] if failure else f"no route socket in {netns}")
    return result[0]


class RouteEvents:
    """Calls ``on_change`` (in the event loop) whenever routes change in ``netns``; also when
    notifications were lost (the socket's buffer overflowed), since something changed then."""

    def __init__(self, netns: Path, on_change: Callable[[], None]) -> None:
        self.netns = netns
        self.on_change = on_change
        self._sock: socket.socket | None = None

    def start(self) -> None:
        self._sock = open_route_socket(self.netns)
        asyncio.get_running_loop().add_reader(self._sock.fileno(), self._readable)

    def _readable(self) -> None:
        assert self._sock is not None
        changed = False
        while True:
            try:
                if not self._sock.recv(65536):
                    break
                changed = True
            except BlockingIOError:
                break
            except OSError as e:
                if e.errno != errno.ENOBUFS:
                    log.warning("route notifications from %s: %s", self.netns, e)
                changed = True  # ENOBUFS: notifications were dropped; read the routes again
                break
        if changed:
            self.on_change()

    def close(self) -> None:
        if self._sock is None:
            return
        with contextlib.suppress(Exception):
            asyncio.get_running_loop().remove_reader(self._sock.fileno())
        self._sock.close()
        self._sock = None
