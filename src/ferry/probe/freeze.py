"""A paused VM's network, as the guest sees it: frozen on the source, resumed on the destination.

A hypervisor's pause stops the guest, but its taps stay up: the destination's from before the
pause (QEMU opened it), the source's until QEMU exits. Taking veth ends down and up instead
changes the carrier of the chassis' ends, and that costs each chassis' OVS (userspace
datapath) a reconfiguration that stalls its forwarding for several milliseconds: a lab
artifact, not part of the VM's pause. So the links stay up and the lab's VM (a namespace whose
processes keep running) is paused at the IPv4 layer instead (this kernel has no tc classifiers
to drop frames with):

- standby (destination, before the resume): link up, no IPv4 address, IPv6 off (set by the
  lab), so the VM sends nothing through it and accepts nothing from it;
- :func:`freeze` (source, at the pause): strict reverse-path filtering, then the address
  removed; the kernel flushes the routes through it, so nothing leaves by it and whatever
  arrives fails the reverse-path check, ARP requests included. Until the resume the VM has no
  route at all, as a paused guest sends nothing;
- :func:`resume` (destination): the address and the default route, in one netlink message
  batch, right after the caller sent the RARP (QEMU announces, then starts the vCPUs).
"""

from __future__ import annotations

import errno
import fcntl
import ipaddress
import os
import socket
import struct
from pathlib import Path

SIOCSIFADDR = 0x8916
_IFREQ_ADDR = struct.Struct("16sH2s4s8x")
RTM_NEWADDR, RTM_NEWROUTE = 20, 24
NLM_F_REQUEST, NLM_F_ACK, NLM_F_EXCL, NLM_F_CREATE = 0x1, 0x4, 0x200, 0x400
NLMSG_ERROR = 2
IFA_ADDRESS, IFA_LOCAL = 1, 2
RTA_OIF, RTA_GATEWAY = 4, 5
RT_TABLE_MAIN, RTPROT_BOOT, RT_SCOPE_UNIVERSE, RTN_UNICAST = 254, 3, 0, 1
_NLMSGHDR = struct.Struct("=IHHII")
_IFADDRMSG = struct.Struct("=BBBBi")
_RTMSG = struct.Struct("=BBBBBBBBI")


def prepare_freeze(dev: str) -> None:
    """Strict reverse-path filtering on ``dev`` (harmless while the VM's routes use it)."""
    Path(f"/proc/sys/net/ipv4/conf/{dev}/rp_filter").write_text("1\n")


def freeze(sock: socket.socket, dev: str) -> None:
    """Remove ``dev``'s IPv4 address (one ioctl): from now on the VM neither sends nor
    accepts IPv4 or ARP through it. Needs :func:`prepare_freeze` first."""
    req = _IFREQ_ADDR.pack(dev.encode(), socket.AF_INET, b"\0\0", socket.inet_aton("0.0.0.0"))
    fcntl.ioctl(sock, SIOCSIFADDR, req)


def _attr(kind: int, payload: bytes) -> bytes:
    size = 4 + len(payload)
    return struct.pack("=HH", size, kind) + payload + bytes(-size % 4)


class Resumer:
    """Prepared netlink messages that give a standby interface the VM's address (and default
    route): :meth:`resume` is one system call plus the kernel's acks."""

    def __init__(self, dev: str, cidr: str, gateway: str | None) -> None:
        iface = ipaddress.IPv4Interface(cidr)
        index = socket.if_nametoindex(dev)
        self.dev = dev
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
        self.sock.bind((0, 0))
        addr = iface.ip.packed
        body = (_IFADDRMSG.pack(socket.AF_INET, iface.network.prefixlen, 0, 0, index)
                + _attr(IFA_LOCAL, addr) + _attr(IFA_ADDRESS, addr))
        self.messages = [self._msg(RTM_NEWADDR, 1, body)]
        if gateway is not None:
            body = (_RTMSG.pack(socket.AF_INET, 0, 0, 0, RT_TABLE_MAIN, RTPROT_BOOT,
                                RT_SCOPE_UNIVERSE, RTN_UNICAST, 0)
                    + _attr(RTA_GATEWAY, ipaddress.IPv4Address(gateway).packed)
                    + _attr(RTA_OIF, struct.pack("=I", index)))
            self.messages.append(self._msg(RTM_NEWROUTE, 2, body))

    @staticmethod
    def _msg(kind: int, seq: int, body: bytes) -> bytes:
        flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL
        return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), kind, flags, seq, 0) + body

    def resume(self) -> None:
        self.sock.send(b"".join(self.messages))
        pending = len(self.messages)
        while pending:
            data = self.sock.recv(65536)
            offset = 0
            while offset + _NLMSGHDR.size <= len(data):
                length, kind, _, _, _ = _NLMSGHDR.unpack_from(data, offset)
                if kind == NLMSG_ERROR:
                    pending -= 1
                    (code,) = struct.unpack_from("=i", data, offset + _NLMSGHDR.size)
                    if code and -code != errno.EEXIST:
                        raise OSError(-code, f"resuming on {self.dev}: {os.strerror(-code)}")
                offset += max(length + (-length % 4), _NLMSGHDR.size)
