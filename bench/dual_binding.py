"""What holding a port on two chassis costs while a live migration runs (live mode).

From the claim until the VM runs there, the destination gets a copy of every packet sent to the
VM from other chassis and drops it. This bench floods the VM with UDP from a client on another
chassis at several rates and prints, per rate: packets sent and received by the VM per second,
the CPU (percent of one core) of the source's and the destination's ovs-vswitchd, and the
destination's OpenFlow translations per second (0: its datapath caches the drop), in two
phases: ``before`` (no migration: the destination sees none of the flood) and ``dual`` (the
destination plugged and claimed, its flows as Ferry installs them).

    .venv/bin/python bench/dual_binding.py [--rates 2000,10000,30000] [--seconds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from ferry.lab.lab import Lab
from ferry.lab.migrate import pre_migration
from ferry.lab.nova import boot
from ferry.lab.session import lab_session

FLOOD = """
import socket, sys, time
ip, rate, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
payload, n, t0 = b"x" * 64, 0, time.monotonic()
while (now := time.monotonic() - t0) < seconds:
    due = int(now * rate)
    while n < due:
        s.sendto(payload, (ip, 9))
        n += 1
    time.sleep(0.001)
print(n)
"""


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rx_packets(lab: Lab, vm: str) -> int:
    vif = lab.vm(vm).active_vif
    assert vif is not None
    r = lab.exec_in_vm(vm, ["cat", f"/sys/class/net/{vif.guest_if}/statistics/rx_packets"])
    return int(r.stdout)


def upcalls(lab: Lab, chassis: str) -> int:
    """OpenFlow translations the chassis' ovs-vswitchd made so far: one per packet that
    goes to the slow path (a datapath miss, or a cached flow that sends to userspace)."""
    out = lab.ovs(chassis).appctl("ovs-vswitchd", "coverage/show")
    m = re.search(r"^xlate_actions\s.*total: (\d+)", out, re.MULTILINE)
    return int(m.group(1)) if m else 0


def flood(lab: Lab, client: str, ip: str, rate: int, seconds: float,
          chassis: dict[str, int]) -> dict[str, float]:
    """Flood ``ip`` from ``client``; per-second figures, each chassis' vswitchd CPU % and
    the destination's upcalls."""
    cpu0 = {name: cpu_seconds(pid) for name, pid in chassis.items()}
    up0 = upcalls(lab, "chassis-3")
    rx0, t0 = rx_packets(lab, "vm"), time.monotonic()
    r = lab.exec_in_vm(client, [sys.executable, "-c", FLOOD, ip, str(rate), str(seconds)])
    elapsed = time.monotonic() - t0
    rx = rx_packets(lab, "vm") - rx0
    out = {"sent_pps": int(r.stdout) / seconds, "received_pps": rx / elapsed,
           "dest_upcalls_ps": (upcalls(lab, "chassis-3") - up0) / elapsed}
    for name, pid in chassis.items():
        out[f"cpu_{name}"] = 100 * (cpu_seconds(pid) - cpu0[name]) / elapsed
    return out


async def run(rates: list[int], seconds: float) -> list[tuple[int, str, dict[str, float]]]:
    rows = []
    async with lab_session(3) as (lab, api):
        net = await api.create("network", name="flood")
        await api.create("subnet", network_id=net["id"], cidr="10.70.0.0/24", ip_version=4)
        for name, ch in {"vm": "chassis-1", "client": "chassis-2"}.items():
            port = await api.create("port", network_id=net["id"], name=name)
            await boot(lab, api, name, port["id"], ch)
        ip = lab.vm("vm").ip_cidr.split("/")[0]
        pids = {"source": lab.chassis("chassis-1").ovs_pids["ovs-vswitchd"].pid,
                "dest": lab.chassis("chassis-3").ovs_pids["ovs-vswitchd"].pid}
        for rate in rates:
            rows.append((rate, "before", await asyncio.to_thread(
                flood, lab, "client", ip, rate, seconds, pids)))
        await pre_migration(lab, api, "vm", "chassis-3", mode="live")
        for rate in rates:
            rows.append((rate, "dual", await asyncio.to_thread(
                flood, lab, "client", ip, rate, seconds, pids)))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rates", default="2000,10000,30000", help="packets per second, comma "
                    "separated")
    ap.add_argument("--seconds", type=float, default=3.0)
    a = ap.parse_args()
    rates = [int(r) for r in a.rates.split(",")]
    rows = asyncio.run(run(rates, a.seconds))
    table = Table(title=f"UDP flood to a VM, {a.seconds:g} s per row: vswitchd CPU (% of one "
                        "core) on the source and on a live migration's destination")
    for col in ("rate pps", "phase", "sent pps", "VM received pps", "source CPU %",
                "dest CPU %", "dest xlates/s"):
        table.add_column(col, justify="right")
    for rate, phase, f in sorted(rows, key=lambda r: r[0]):
        table.add_row(str(rate), phase, f"{f['sent_pps']:.0f}", f"{f['received_pps']:.0f}",
                      f"{f['cpu_source']:.1f}", f"{f['cpu_dest']:.1f}",
                      f"{f['dest_upcalls_ps']:.0f}")
    Console(width=120).print(table)


if __name__ == "__main__":
    main()
