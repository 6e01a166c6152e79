"""Ports as Neutron sees them, and the mapping of Neutron's binding attributes onto the model.

The binding mapping (the chassis controllers read ``LogicalPort.bindings``; keep it exact):

- ``LogicalPort.bindings`` holds at most one binding per host and at most one ACTIVE binding.
- ``binding:host_id`` is the host of the ACTIVE binding ("" when there is none).
- ``binding:vnic_type``, ``binding:profile`` and ``binding:vif_type`` are the ACTIVE binding's
  ``vnic_type``, ``profile`` and ``vif_type``. A port without an active binding shows the
  requested ``LogicalPort.vnic_type`` and ``LogicalPort.binding_profile`` and vif_type
  ``unbound``; those two fields are used only while there is no active binding.
- Setting ``binding:host_id`` to a host moves the active binding there: it is replaced by an
  ACTIVE binding on the new host that keeps its vnic_type and profile (409 if that host already
  has an INACTIVE binding: activate that one instead). Setting it to "" removes the active
  binding and keeps its vnic_type and profile as the port's requested ones. INACTIVE bindings
  (Nova's live-migration targets) are not touched.
- Updating ``binding:profile`` (e.g. ``{"migrating_to": "host2"}``) or ``binding:vnic_type``
  changes the active binding, or the requested values when there is none.
- ``/ports/{id}/bindings`` (binding-extended): POST adds a binding for a host that has none
  (409 otherwise); it is ACTIVE if the port has no active binding, else INACTIVE. PUT
  ``.../bindings/{host}/activate`` makes that INACTIVE binding the ACTIVE one and the previous
  active one INACTIVE (409 if it is already active, 404 if absent). DELETE removes an INACTIVE
  binding (the active one is not found, as in Neutron).
"""

from __future__ import annotations

import ipaddress
from typing import Any, Literal

from pydantic import Field

from ferry.api.errors import bad_request, conflict
from ferry.api.resources.common import Body, common_fields
from ferry.model.objects import BindingStatus, LogicalPort, PortBinding, VnicType

VIF_DETAILS = {"port_filter": True, "ovs_hybrid_plug": False, "bridge_name": "br-int",
               "datapath_type": "system", "connectivity": "l2"}
VnicName = Literal["normal", "direct", "macvtap", "vhost-user"]


class FixedIPReq(Body):
    subnet_id: str | None = Field(default=None, min_length=1, max_length=255)
    ip_address: str | None = Field(default=None, max_length=64)


class PairReq(Body):
    ip_address: str = Field(max_length=64)
    mac_address: str | None = Field(default=None, max_length=32)


def render_binding(b: PortBinding) -> dict[str, Any]:
    return {"host": b.host, "vnic_type": b.vnic_type.value, "profile": b.profile,
            "vif_type": b.vif_type, "vif_details": VIF_DETAILS, "status": b.status.value}


def _pair(p: Any, mac: str) -> dict[str, Any]:
    net = p.ip_address
    ip = str(net.network_address) if net.prefixlen == net.max_prefixlen else str(net)
    return {"ip_address": ip, "mac_address": p.mac_address or mac}


def render(p: LogicalPort) -> dict[str, Any]:
    b = p.active_binding
    return {
        **common_fields(p),
        "network_id": p.network_id,
        "mac_address": p.mac,
        "fixed_ips": [{"subnet_id": f.subnet_id, "ip_address": str(f.ip_address)}
                      for f in p.fixed_ips],
        "device_owner": p.device_owner,
        "device_id": p.device_id,
        "admin_state_up": p.admin_state_up,
        "status": p.status,
        "port_security_enabled": p.port_security_enabled,
        "security_groups": list(p.security_groups),
        "allowed_address_pairs": [_pair(a, p.mac) for a in p.allowed_address_pairs],
        "binding:host_id": b.host if b else "",
        "binding:profile": b.profile if b else p.binding_profile,
        "binding:vnic_type": (b.vnic_type if b else p.vnic_type).value,
        "binding:vif_type": b.vif_type if b else "unbound",
        "binding:vif_details": VIF_DETAILS if b else {},
        "extra_dhcp_opts": [],
        "ip_allocation": "immediate",
        "dns_name": "",
        "qos_policy_id": None,
        "propagate_uplink_status": False,
    }


def move_binding(p: LogicalPort, host: str | None) -> dict[str, Any]:
    """The model changes for ``binding:host_id = host`` (None or "" unbinds)."""
    active = p.active_binding
    if (active.host if active else "") == (host or ""):
        return {}
    others = [b for b in p.bindings if b.status is not BindingStatus.ACTIVE]
    vnic = active.vnic_type if active else p.vnic_type
    profile = active.profile if active else p.binding_profile
    if not host:
        return {"bindings": tuple(others), "vnic_type": vnic, "binding_profile": profile}
    if any(b.host == host for b in others):
        raise conflict("PortBindingAlreadyExists", f"Binding for port {p.id} on host {host} "
                       "already exists (inactive); activate it instead.")
    new = PortBinding(host=host, vnic_type=vnic, profile=profile,
                      vif_type=active.vif_type if active else "ovs")
    return {"bindings": (*others, new)}


def set_binding_attrs(p: LogicalPort, changes: dict[str, Any],
                      vnic: VnicType | None, profile: dict[str, Any] | None) -> None:
    """Apply binding:vnic_type/profile to the (possibly just moved) active binding."""
    if vnic is None and profile is None:
        return
    bindings: tuple[PortBinding, ...] = changes.get("bindings", p.bindings)
    active = next((b for b in bindings if b.status is BindingStatus.ACTIVE), None)
    if active is None:
        if vnic is not None:
            changes["vnic_type"] = vnic
        if profile is not None:
            changes["binding_profile"] = profile
        return
    upd: dict[str, Any] = {}
    if vnic is not None:
        upd["vnic_type"] = vnic
    if profile is not None:
        upd["profile"] = profile
    changes["bindings"] = tuple(
        PortBinding.model_validate({**b.model_dump(), **upd}) if b is active else b
        for b in bindings)


def pairs_doc(pairs: list[PairReq]) -> list[dict[str, Any]]:
    out = []
    for p in pairs:
        try:
            ipaddress.ip_network(p.ip_address, strict=False)
        except ValueError:
            raise bad_request(f"allowed_address_pairs: {p.ip_address!r} is not an IP address "
                              "or CIDR") from None
        out.append(p.model_dump())
    return out
