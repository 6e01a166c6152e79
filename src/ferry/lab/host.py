"""Host-wide kernel settings a lab run may need for a while, put back as they were afterwards.

Expedited RCU: the lab's chassis run OVS's userspace datapath, whose main thread also forwards
every packet. Deleting a port there (Nova's unplug, any VM's) closes the port's AF_PACKET
socket, and the kernel makes that close() wait for an RCU grace period: 5-25 ms on the lab's
busy two cores, during which that chassis forwards nothing. With ``/sys/kernel/rcu_expedited``
set the wait is an expedited grace period instead (tens of microseconds, at the cost of
inter-processor interrupts). A production switch does not close a socket in its forwarding
thread (kernel datapath, or DPDK with vhost-user), so the lab's demo and bench set it: the
stall is the lab's, not a migration's.

The setting is the whole host's, so the value found is saved with the setter's PID (in the
labs' base directory) until it is put back: a run that finds a live holder leaves the setting
to it; one that finds a dead holder's record (a run killed by SIGKILL) puts that value back
at its end, as ``ferry lab down --all`` does at once (:func:`restore_rcu`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ferry.lab.lab import LabError
from ferry.lab.netns import pid_alive, pid_starttime
from ferry.lab.state import DEFAULT_BASE_DIR

RCU_EXPEDITED = Path("/sys/kernel/rcu_expedited")
RCU_SAVED = DEFAULT_BASE_DIR / "rcu_expedited.saved"


def _holder(saved: Path) -> dict[str, Any] | None:
    try:
        found: dict[str, Any] = json.loads(saved.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise LabError(f"{saved}: unreadable record of the host's RCU setting: {e}") from None
    return found


def _alive(holder: dict[str, Any]) -> bool:
    return pid_alive(int(holder["pid"]), holder.get("starttime"))


def _write(path: Path, value: str) -> None:
    try:
        path.write_text(f"{value}\n")
    except OSError as e:
        raise LabError(f"cannot set {path} to {value} (expedited RCU): "
                       f"{e.strerror or e}") from None


@contextmanager
def rcu_expedited(path: Path = RCU_EXPEDITED, saved: Path = RCU_SAVED) -> Iterator[str]:
    """Expedited RCU grace periods for the block; yields the host's own value, which is
    written back on the way out (an exception included) unless another live run holds the
    setting (then it does)."""
    holder = _holder(saved)
    if holder is not None and _alive(holder):
        _write(path, "1")
        yield str(holder["value"])
        return
    try:  # a dead holder's record has the host's value; the file now has ours
        original = str(holder["value"]) if holder else path.read_text().strip()
    except OSError as e:
        raise LabError(f"cannot read {path} (expedited RCU): {e.strerror or e}") from None
    saved.parent.mkdir(parents=True, exist_ok=True)
    saved.write_text(json.dumps({"value": original, "pid": os.getpid(),
                                 "starttime": pid_starttime(os.getpid())}))
    try:
        _write(path, "1")
        yield original
    finally:
        _write(path, original)
        saved.unlink(missing_ok=True)


def restore_rcu(path: Path = RCU_EXPEDITED, saved: Path = RCU_SAVED) -> str | None:
    """Put back the value a run that died holding the setting had found; that value, or None
    when there was nothing to do (no record, or its run is alive)."""
    holder = _holder(saved)
    if holder is None or _alive(holder):
        return None
    _write(path, str(holder["value"]))
    saved.unlink(missing_ok=True)
    return str(holder["value"])
