"""The northbound model: the logical topology as typed, validated objects.

Each object checks what it can alone (formats, ranges, an IP inside its own CIDR); invariants
between objects (references, unique IPs and MACs, allocated keys) are checked by
``ferry.model.northbound`` when the object is written. Every object carries an id, a topic (its
project; ``GLOBAL`` for chassis) and the store version it was read at (0 = never stored).
"""

from __future__ import annotations

import ipaddress
import itertools
import re
import uuid
from enum import StrEnum
from typing import Any, ClassVar, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ferry.store.base import GLOBAL

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
_NAME = re.compile(r"^[^/\s][^/]{0,254}$")


class FieldError(ValueError):
    """Raised by a check across fields, naming the field it blames."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(reason)
        self.field = field


def new_id() -> str:
    return str(uuid.uuid4())


def normalize_mac(value: str) -> str:
    """Lower-case colon form; rejects anything else, and multicast or all-zero MACs."""
    mac = value.strip().lower().replace("-", ":")
    if not _MAC.match(mac):
        raise ValueError(f"{value!r} is not a MAC address (expected aa:bb:cc:dd:ee:ff)")
    if int(mac[:2], 16) & 1:
        raise ValueError(f"{value!r} is a multicast MAC; a port needs a unicast MAC")
    if mac == "00:00:00:00:00:00":
        raise ValueError("00:00:00:00:00:00 is not a usable MAC address")
    return mac


class NbObject(BaseModel):
    """Fields every northbound object has."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)
    TABLE: ClassVar[str] = ""

    id: str = Field(default_factory=new_id, description="Unique id (a UUID unless given).")
    topic: str = Field(description="The owning project; GLOBAL for objects every chassis needs.")
    version: int = Field(default=0, ge=0, description="Store revision of the last write.")
    name: str = Field(default="", max_length=255, description="A human-readable name.")

    @field_validator("id", "topic")
    @classmethod
    def _plain_name(cls, v: str) -> str:
        # Ids and topics become store key segments: the store's own rule, checked here so
        # that a bad one is a validation error (a 400), never a store failure.
        if not _NAME.match(v) or v.strip() != v or not v.isprintable():
            raise ValueError(f"{v!r} must be 1-255 printable characters, no '/' and no "
                             "leading or trailing space")
        return v

    def to_doc(self) -> dict[str, Any]:
        """The stored document (version is the store's, not part of the data)."""
        return self.model_dump(mode="json", exclude={"version"})


class Chassis(NbObject):
    """A compute node running a Ferry controller."""

    TABLE: ClassVar[str] = "chassis"
    topic: str = GLOBAL
    tunnel_ip: IPAddress = Field(description="Underlay address other chassis tunnel to.")
    tunnel_types: tuple[Literal["geneve"], ...] = Field(default=("geneve",), min_length=1)
    bridge_mappings: dict[str, str] = Field(
        default_factory=dict, description="Physical network name → OVS bridge (e.g. br-ex)."
    )

    @model_validator(mode="after")
    def _id_is_name(self) -> Self:
        if self.name and self.name != self.id:
            raise FieldError("name", f"chassis name {self.name!r} must equal its id {self.id!r}")
        return self


class NetworkType(StrEnum):
    GENEVE = "geneve"
    FLAT = "flat"


class LogicalSwitch(NbObject):
    """A network (L2 broadcast domain)."""

    TABLE: ClassVar[str] = "network"
    mtu: int = Field(default=1442, ge=68, le=9000, description="MTU offered to ports.")
    network_type: NetworkType = NetworkType.GENEVE
    physical_network: str | None = Field(
        default=None, description="For flat networks: the physical network name."
    )
    external: bool = Field(default=False, description="router:external (floating IPs).")
    admin_state_up: bool = True
    shared: bool = False
    tunnel_key: int = Field(
        default=0, ge=0, lt=2**24, description="Geneve VNI; 0 until the store allocates one."
    )
    description: str = Field(default="", max_length=255)
    port_security_enabled: bool = Field(
        default=True, description="The default of port_security_enabled for new ports."
    )

    @model_validator(mode="after")
    def _flat_needs_physnet(self) -> Self:
        if (self.network_type is NetworkType.FLAT) != (self.physical_network is not None):
            raise FieldError(
                "physical_network",
                "physical_network is required for flat networks and only for them",
            )
        return self


class AllocationPool(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    start: IPAddress
    end: IPAddress

    @model_validator(mode="after")
    def _ordered(self) -> Self:
        if self.start.version != self.end.version or int(self.start) > int(self.end):
            raise FieldError(
                "start", f"allocation pool {self.start}-{self.end}: start must be <= end"
            )
        return self


class HostRoute(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    destination: IPNetwork
    nexthop: IPAddress


class Subnet(NbObject):
    """An IP range on a network."""

    TABLE: ClassVar[str] = "subnet"
    network_id: str
    cidr: IPNetwork
    gateway_ip: IPAddress | None = None
    allocation_pools: tuple[AllocationPool, ...] = ()
    enable_dhcp: bool = True
    host_routes: tuple[HostRoute, ...] = ()
    dns_nameservers: tuple[IPAddress, ...] = ()
    description: str = Field(default="", max_length=255)

    @field_validator("cidr", mode="before")
    @classmethod
    def _strict_cidr(cls, v: Any) -> Any:
        if isinstance(v, str):
            try:
                ipaddress.ip_network(v, strict=True)
            except ValueError as e:
                raise ValueError(f"{v!r} is not a valid CIDR (host bits set?): {e}") from None
        return v

    @model_validator(mode="after")
    def _inside(self) -> Self:
        net = self.cidr
        if self.gateway_ip is not None:
            if self.gateway_ip not in net:
                raise FieldError("gateway_ip", f"gateway_ip {self.gateway_ip} is outside {net}")
            if net.version == 4 and net.prefixlen < 31 and self.gateway_ip in (
                net.network_address, net.broadcast_address
            ):
                raise FieldError(
                    "gateway_ip",
                    f"gateway_ip {self.gateway_ip} is the network or broadcast address",
                )
        for pool in self.allocation_pools:
            if pool.start not in net or pool.end not in net:
                raise FieldError(
                    "allocation_pools", f"allocation pool {pool.start}-{pool.end} is outside {net}"
                )
            if self.gateway_ip is not None and int(pool.start) <= int(self.gateway_ip) <= int(
                pool.end
            ):
                raise FieldError(
                    "allocation_pools",
                    f"allocation pool {pool.start}-{pool.end} contains gateway_ip "
                    f"{self.gateway_ip}",
                )
        ranges = sorted((int(p.start), int(p.end)) for p in self.allocation_pools)
        for (_, end), (start, _) in itertools.pairwise(ranges):
            if start <= end:
                raise FieldError("allocation_pools", "allocation pools overlap")
        for route in self.host_routes:
            if route.destination.version != net.version:
                raise FieldError(
                    "host_routes", f"host route {route.destination}: IP version differs from {net}"
                )
        return self


class FixedIP(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    subnet_id: str
    ip_address: IPAddress


class AddressPair(BaseModel):
    """An extra address a port may send from (VRRP, a VIP...)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    ip_address: IPNetwork = Field(description="An address or CIDR the port may use.")
    mac_address: str | None = Field(default=None, description="The MAC with it (port's if None).")

    @field_validator("ip_address", mode="before")
    @classmethod
    def _loose_cidr(cls, v: Any) -> Any:
        return ipaddress.ip_network(v, strict=False) if isinstance(v, str) else v

    @field_validator("mac_address")
    @classmethod
    def _mac(cls, v: str | None) -> str | None:
        return None if v is None else normalize_mac(v)


class VnicType(StrEnum):
    NORMAL = "normal"
    DIRECT = "direct"
    MACVTAP = "macvtap"
    VHOST_USER = "vhost-user"


class BindingStatus(StrEnum):
    ACTIVE = "ACTIVE"
    INACTIVE = "INACTIVE"


class PortBinding(BaseModel):
    """A port's binding to a host (Neutron's port binding; one per host, one active)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    host: str = Field(description="The host (chassis name) the port is bound to.")
    vnic_type: VnicType = VnicType.NORMAL
    profile: dict[str, Any] = Field(default_factory=dict)
    vif_type: str = "ovs"
    status: BindingStatus = BindingStatus.ACTIVE

    @model_validator(mode="after")
    def _profile(self) -> Self:
        check_profile(self.profile, "profile")
        return self


class LogicalPort(NbObject):
    """A port of a network: a VM's NIC, a router interface, a floating IP's port..."""

    TABLE: ClassVar[str] = "port"
    network_id: str
    mac: str
    fixed_ips: tuple[FixedIP, ...] = ()
    device_owner: str = ""
    device_id: str = ""
    admin_state_up: bool = True
    port_security_enabled: bool = True
    security_groups: tuple[str, ...] = ()
    allowed_address_pairs: tuple[AddressPair, ...] = ()
    bindings: tuple[PortBinding, ...] = Field(
        default=(), description="Per-host bindings; at most one ACTIVE (where the VM runs)."
    )
    tunnel_key: int = Field(default=0, ge=0, lt=2**31, description="0 until allocated.")
    status: Literal["ACTIVE", "DOWN", "BUILD"] = "DOWN"
    description: str = Field(default="", max_length=255)
    vnic_type: VnicType = Field(
        default=VnicType.NORMAL,
        description="Requested vnic_type while the port has no active binding.",
    )
    binding_profile: dict[str, Any] = Field(
        default_factory=dict,
        description="Requested binding:profile while the port has no active binding.",
    )

    @field_validator("mac")
    @classmethod
    def _mac(cls, v: str) -> str:
        return normalize_mac(v)

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        check_profile(self.binding_profile, "binding_profile")
        hosts = [b.host for b in self.bindings]
        if len(hosts) != len(set(hosts)):
            raise FieldError("bindings", "one binding per host")
        if sum(b.status is BindingStatus.ACTIVE for b in self.bindings) > 1:
            raise FieldError("bindings", "at most one binding may be ACTIVE")
        ips = [f.ip_address for f in self.fixed_ips]
        if len(ips) != len(set(ips)):
            raise FieldError("fixed_ips", "the same IP address is listed twice")
        if self.security_groups and not self.port_security_enabled:
            raise FieldError("security_groups", "security groups need port_security_enabled")
        if self.allowed_address_pairs and not self.port_security_enabled:
            raise FieldError(
                "allowed_address_pairs", "allowed address pairs need port_security_enabled"
            )
        return self

    @property
    def active_binding(self) -> PortBinding | None:
        return next((b for b in self.bindings if b.status is BindingStatus.ACTIVE), None)

    @property
    def host(self) -> str | None:
        """binding:host_id: the host of the active binding."""
        b = self.active_binding
        return b.host if b else None

    def binding_for(self, host: str) -> PortBinding | None:
        return next((b for b in self.bindings if b.host == host), None)


class RouterPort(BaseModel):
    """A router's interface on a subnet (its port is a LogicalPort on that network)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    port_id: str
    subnet_id: str


class ExtraRoute(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    destination: IPNetwork
    nexthop: IPAddress


class ExternalGateway(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    network_id: str
    port_id: str | None = None
    enable_snat: bool = True


class LogicalRouter(NbObject):
    TABLE: ClassVar[str] = "router"
    admin_state_up: bool = True
    ports: tuple[RouterPort, ...] = ()
    routes: tuple[ExtraRoute, ...] = ()
    gateway: ExternalGateway | None = None
    description: str = Field(default="", max_length=255)

    @model_validator(mode="after")
    def _one_port_per_subnet(self) -> Self:
        subnets = [p.subnet_id for p in self.ports]
        if len(subnets) != len(set(subnets)):
            raise FieldError("ports", "a router has at most one interface per subnet")
        return self


class FloatingIP(NbObject):
    TABLE: ClassVar[str] = "floatingip"
    floating_network_id: str
    floating_ip_address: IPAddress
    port_id: str | None = None
    fixed_ip_address: IPAddress | None = None
    router_id: str | None = None
    description: str = Field(default="", max_length=255)

    @model_validator(mode="after")
    def _association(self) -> Self:
        if self.fixed_ip_address is not None and self.port_id is None:
            raise FieldError("fixed_ip_address", "fixed_ip_address needs port_id")
        return self


class SecurityGroup(NbObject):
    TABLE: ClassVar[str] = "secgroup"
    description: str = Field(default="", max_length=255)


class Direction(StrEnum):
    INGRESS = "ingress"
    EGRESS = "egress"


_PROTOCOLS = {"tcp": 6, "udp": 17, "icmp": 1, "icmpv6": 58, "sctp": 132}


class SecurityGroupRule(NbObject):
    TABLE: ClassVar[str] = "secgrouprule"
    security_group_id: str
    direction: Direction
    ethertype: Literal["IPv4", "IPv6"] = "IPv4"
    protocol: str | None = Field(default=None, description="tcp, udp, icmp... or a number.")
    port_range_min: int | None = Field(default=None, ge=0, le=65535)
    port_range_max: int | None = Field(default=None, ge=0, le=65535)
    remote_ip_prefix: IPNetwork | None = None
    remote_group_id: str | None = None
    description: str = Field(default="", max_length=255)

    @field_validator("protocol")
    @classmethod
    def _protocol(cls, v: str | None) -> str | None:
        if v is None or v.lower() in _PROTOCOLS:
            return None if v is None else v.lower()
        if v.isdigit() and 0 <= int(v) <= 255:
            return v
        raise ValueError(f"{v!r} is not a protocol name ({', '.join(_PROTOCOLS)}) or 0-255")

    @field_validator("remote_ip_prefix", mode="before")
    @classmethod
    def _loose_prefix(cls, v: Any) -> Any:
        return ipaddress.ip_network(v, strict=False) if isinstance(v, str) else v

    @property
    def ip_proto(self) -> int | None:
        if self.protocol is None:
            return None
        return _PROTOCOLS.get(self.protocol) or int(self.protocol)

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        lo, hi = self.port_range_min, self.port_range_max
        if (lo is not None or hi is not None) and self.protocol not in ("tcp", "udp", "sctp",
                                                                         "icmp", "icmpv6"):
            raise FieldError("protocol", "port_range_min/max need protocol tcp, udp, sctp or icmp")
        if lo is not None and hi is not None and lo > hi and self.protocol in ("tcp", "udp",
                                                                               "sctp"):
            raise FieldError(
                "port_range_min", f"port_range_min {lo} is greater than port_range_max {hi}"
            )
        if self.remote_ip_prefix is not None and self.remote_group_id is not None:
            raise FieldError(
                "remote_ip_prefix", "remote_ip_prefix and remote_group_id are mutually exclusive"
            )
        family = 4 if self.ethertype == "IPv4" else 6
        if self.remote_ip_prefix is not None and self.remote_ip_prefix.version != family:
            raise FieldError(
                "remote_ip_prefix",
                f"remote_ip_prefix {self.remote_ip_prefix} is not {self.ethertype}",
            )
        return self


class MigrationStatus(StrEnum):
    PLUGGED = "plugged"  # step 1: destination VIF up, binding authorized
    SOURCE_UNPLUGGED = "source_unplugged"  # step 2
    DONE = "done"  # step 3: binding moved, every chassis converged
    ROLLED_BACK = "rolled_back"


class MigrationMode(StrEnum):
    SPEC = "spec"  # the spec's three steps: flows switch when the source VIF goes away
    LIVE = "live"  # bound to both chassis from step 1, activated in the datapath on resume


MIGRATION_MODE_KEY = "ferry_migration_mode"
"""binding:profile key that overrides the deployment's migration mode for one port."""


class LiveFallback(StrEnum):
    """Live mode: what switches the port to its destination when the VM sends nothing there
    on resume (no RARP, as with vhost-user), so the datapath never activates it."""

    SOURCE_UNPLUG = "source-unplug"  # the source VIF going away (the spec's step 2)
    BINDING = "binding"  # only the destination binding becoming active (step 3)


LIVE_FALLBACK_KEY = "ferry_live_fallback"
"""binding:profile key that overrides the deployment's live-mode fallback for one port."""

PROFILE_CHOICES: dict[str, type[StrEnum]] = {MIGRATION_MODE_KEY: MigrationMode,
                                             LIVE_FALLBACK_KEY: LiveFallback}
"""Ferry's own binding:profile keys and the values each may take."""


def check_profile(profile: dict[str, Any], field: str) -> None:
    """Ferry's keys in a binding:profile must hold one of their values."""
    for key, choices in PROFILE_CHOICES.items():
        if key in profile and profile[key] not in {c.value for c in choices}:
            raise FieldError(field, f"{key} must be one of "
                             f"{', '.join(c.value for c in choices)}, not {profile[key]!r}")


class Migration(NbObject):
    """A port moving between chassis; its id is the port id (one migration per port)."""

    TABLE: ClassVar[str] = "migration"
    port_id: str
    source_chassis: str
    dest_chassis: str
    status: MigrationStatus = MigrationStatus.PLUGGED
    mode: MigrationMode = Field(
        default=MigrationMode.SPEC,
        description="How every chassis forwards during the migration (decided at the claim).")
    fallback: LiveFallback = Field(
        default=LiveFallback.SOURCE_UNPLUG,
        description="Live mode: what switches the port if the datapath never activates it.")
    activated: bool = Field(
        default=False,
        description="Live mode: the VM's first frame on the destination activated the port "
        "there (reported by the destination after its datapath did it).")
    timestamps: dict[str, float] = Field(
        default_factory=dict, description="Event name → wall-clock time it was seen."
    )

    @property
    def in_progress(self) -> bool:
        """Between the claim (step 1) and its end (done or rolled back)."""
        return self.status in (MigrationStatus.PLUGGED, MigrationStatus.SOURCE_UNPLUGGED)

    @property
    def phase(self) -> str:
        """The status, or ``activated`` while in progress once the VM's first frame on the
        destination activated the port: what a chassis' flow ack is recorded under."""
        return "activated" if self.activated and self.in_progress else self.status.value

    @model_validator(mode="after")
    def _two_chassis(self) -> Self:
        if self.source_chassis == self.dest_chassis:
            raise FieldError("dest_chassis", "source_chassis and dest_chassis must differ")
        return self


ALL_TYPES: tuple[type[NbObject], ...] = (
    Chassis, LogicalSwitch, Subnet, LogicalPort, LogicalRouter, FloatingIP, SecurityGroup,
    SecurityGroupRule, Migration,
)
BY_TABLE: dict[str, type[NbObject]] = {t.TABLE: t for t in ALL_TYPES}
