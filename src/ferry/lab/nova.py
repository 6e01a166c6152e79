"""What Nova does for a VM's port in the lab: bind it to the host, plug the VIF, wait for it."""

from __future__ import annotations

import asyncio
import ipaddress
import uuid

from ferry.lab.lab import Lab, LabError
from ferry.lab.neutron import Neutron
from ferry.lab.state import VmState


async def boot(lab: Lab, api: Neutron, name: str, port_id: str, chassis: str,
               wait_s: float = 10.0) -> VmState:
    """Bind ``port_id`` to ``chassis`` (device_owner compute:nova), create the VM with the
    port's MAC and first fixed IP, and wait until the controller reports the port ACTIVE
    (as Nova waits for network-vif-plugged). ``wait_s`` 0: don't wait."""
    host = lab.chassis(chassis).name
    p = await api.get("port", port_id)
    want = {"binding:host_id": host, "device_owner": "compute:nova",
            "device_id": p["device_id"] or str(uuid.uuid5(uuid.NAMESPACE_URL,
                                                          f"ferry-lab-vm/{name}"))}
    if any(p.get(k) != v for k, v in want.items()):
        p = await api.update("port", port_id, **want)
    if not p["fixed_ips"]:
        raise LabError(f"port {port_id} has no fixed IP")
    fip = p["fixed_ips"][0]
    sub = await api.get("subnet", fip["subnet_id"])
    plen = ipaddress.ip_network(sub["cidr"]).prefixlen
    vm = await asyncio.to_thread(lab.add_vm, name, host, p["mac_address"],
                                 f"{fip['ip_address']}/{plen}", port_id,
                                 sub.get("gateway_ip"))
    if wait_s > 0:
        try:
            await wait_active(api, port_id, wait_s)
        except TimeoutError:
            raise LabError(f"port {port_id} did not become ACTIVE within {wait_s}s: is "
                           f"{host}'s controller running?") from None
    return vm


async def wait_active(api: Neutron, port_id: str, within: float) -> None:
    async with asyncio.timeout(within):
        while True:  # the API has no push channel: poll, as Nova waits for an event
            if (await api.get("port", port_id))["status"] == "ACTIVE":
                return
            await asyncio.sleep(0.02)
