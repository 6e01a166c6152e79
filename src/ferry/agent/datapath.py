"""Datapath settings the agent needs that OVS keeps outside OVSDB (ovs-appctl only).

Connection tracking and live migration: the destination of a migration picks up TCP
connections mid-stream, from segments it sees before the VM runs there. Userspace OVS then
judges later segments by windows it never saw and marks them invalid; the kernel datapath is
liberal on committed entries, userspace has only the datapath-wide switch
``dpctl/ct-disable-tcp-seq-chk``. The agent sets it at start and whenever ovs-vswitchd
(re)connects, since a restarted ovs-vswitchd forgets it.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

log = logging.getLogger(__name__)


class DatapathSettingError(RuntimeError):
    """ovs-appctl failed; the message says which command and why."""


def vswitchd_pid(ovs_rundir: Path) -> int:
    """ovs-vswitchd's pid, from the pidfile in its run directory."""
    pidfile = ovs_rundir / "ovs-vswitchd.pid"
    try:
        return int(pidfile.read_text().strip())
    except (OSError, ValueError) as e:
        raise DatapathSettingError(f"cannot read ovs-vswitchd's pid from {pidfile}: {e}") from e


def vswitchd_target(ovs_rundir: Path) -> Path:
    """ovs-vswitchd's control socket in its run directory."""
    return ovs_rundir / f"ovs-vswitchd.{vswitchd_pid(ovs_rundir)}.ctl"


async def appctl(ovs_rundir: Path, *args: str, within: float = 10.0) -> str:
    target = vswitchd_target(ovs_rundir)
    proc = await asyncio.create_subprocess_exec(
        "ovs-appctl", "-t", str(target), *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), within)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise DatapathSettingError(f"ovs-appctl {' '.join(args)}: no answer in {within}s") \
            from None
    if proc.returncode != 0:
        raise DatapathSettingError(
            f"ovs-appctl -t {target} {' '.join(args)}: exit {proc.returncode}: "
            f"{err.decode(errors='replace').strip()}")
    return out.decode(errors="replace")


async def apply_conntrack_settings(chassis: str, ovs_rundir: Path) -> None:
    """Mid-stream TCP pickup for migrations (see the module docstring)."""
    try:
        await appctl(ovs_rundir, "dpctl/ct-disable-tcp-seq-chk")
    except DatapathSettingError as e:
        log.error("chassis %s: could not turn TCP sequence checking off; TCP connections may "
                  "not survive live migrations to this chassis: %s", chassis, e)
    else:
        log.info("chassis %s: conntrack TCP sequence checking off (migrations pick up "
                 "connections mid-stream)", chassis)
