"""Host-wide kernel settings a lab run may need for a while, put back as they were afterwards.

Expedited RCU: the lab's chassis run OVS's userspace datapath, whose main thread also forwards
every packet. Deleting a port there (Nova's unplug, any VM's) closes the port's AF_PACKET
socket, and the kernel makes that close() wait for an RCU grace period: 5-25 ms on the lab's
busy two cores, during which that chassis forwards nothing. With ``/sys/kernel/rcu_expedited``
set the wait is an expedited grace period instead (tens of microseconds, at the cost of
inter-processor interrupts). A production switch does not close a socket in its forwarding
thread (kernel datapath, or DPDK with vhost-user), so the lab's demo and bench set it: the
stall is the lab's, not a migration's. The setting is the whole host's: two runs that change
it at once restore it in the wrong order, and a run killed with SIGKILL leaves it set.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ferry.lab.lab import LabError

RCU_EXPEDITED = Path("/sys/kernel/rcu_expedited")


@contextmanager
def rcu_expedited(path: Path = RCU_EXPEDITED) -> Iterator[str]:
    """Expedited RCU grace periods for the block; yields the value found before, which is
    written back on the way out (an exception included)."""
    try:
        before = path.read_text().strip()
        path.write_text("1\n")
    except OSError as e:
        raise LabError(f"cannot set {path} to 1 (expedited RCU): {e.strerror or e}") from None
    try:
        yield before
    finally:
        path.write_text(f"{before}\n")
