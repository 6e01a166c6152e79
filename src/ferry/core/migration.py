"""What a chassis must say about a migrating port: the spec's three steps, made correct.

Pure decisions from the local view; the agent writes them to the store as the port's
``Migration`` record. Forwarding never depends on who wrote what in which order: every chassis
derives a port's location from its binding plus a *valid* migration record
(``Topology.effective_host``), so a lost, duplicated or late step-2 event cannot leave two
chassis disagreeing once step 3 (the binding moved) has arrived.

1. Destination: a VIF for a port bound to another chassis appears here. If the API gave this
   chassis the port (a binding for it or ``migrating_to`` it) → ``Claim``; else
   ``ClaimRefused`` (logged, nothing else happens).
2. Source: the port's VIF goes away here while a claim is pending → ``SourceGone``; every
   chassis then forwards to the destination.
3. Destination: the binding now names this chassis → ``Complete``.
A destination whose VIF goes away before the source's, or that lost its authorization,
``Abandon``s: the source kept the port all along.

Live mode adds one report: the destination's datapath activated the port on the VM's first
frame there and told this chassis (a packet-in) → ``Activated``; every chassis then forwards
to the destination, as the datapaths already do.
"""

from __future__ import annotations

from dataclasses import dataclass

from ferry.core.topology import Topology, authorized
from ferry.model.objects import (
    LIVE_FALLBACK_KEY,
    MIGRATION_MODE_KEY,
    LiveFallback,
    LogicalPort,
    Migration,
    MigrationMode,
    MigrationStatus,
)


@dataclass(frozen=True)
class Claim:
    port_id: str
    source: str
    dest: str
    mode: MigrationMode = MigrationMode.LIVE
    fallback: LiveFallback = LiveFallback.SOURCE_UNPLUG


@dataclass(frozen=True)
class Activated:
    """Live mode, destination: the VM's first frame here activated the port (in the
    datapath, which reported it afterwards)."""

    port_id: str
    dest: str
    at: float = 0.0
    """Wall-clock time the datapath's report arrived (the agent's clock; 0: unknown)."""


@dataclass(frozen=True)
class ClaimRefused:
    port_id: str
    chassis: str
    bound_to: str | None


@dataclass(frozen=True)
class SourceGone:
    port_id: str
    source: str
    dest: str


@dataclass(frozen=True)
class Complete:
    port_id: str
    dest: str


@dataclass(frozen=True)
class Abandon:
    port_id: str
    dest: str
    reason: str


Intent = Claim | ClaimRefused | Activated | SourceGone | Complete | Abandon


def _record(topo: Topology, port_id: str) -> Migration | None:
    m = topo.get(Migration, port_id)
    return m if m is not None and m.in_progress else None


def on_vif_online(topo: Topology, port: LogicalPort) -> list[Intent]:
    me = topo.chassis
    host = port.host
    topo.home_vifs.discard(port.id)
    if host == me:
        topo.home_vifs.add(port.id)
    if host is None or host == me:
        return _level(topo, port)
    if not authorized(port, me):
        return [ClaimRefused(port.id, me, host)]
    return _level(topo, port)


def on_vif_offline(topo: Topology, port: LogicalPort) -> list[Intent]:
    me = topo.chassis
    topo.home_vifs.discard(port.id)
    m = _record(topo, port.id)
    if m is None:
        return []
    if m.source_chassis == me and port.host == me and m.status is MigrationStatus.PLUGGED:
        return [SourceGone(port.id, me, m.dest_chassis)]
    if (m.dest_chassis == me and m.status is MigrationStatus.PLUGGED and port.host != me
            and not m.activated):
        return [Abandon(port.id, me, "the destination VIF went away before the source's")]
    return []


def on_activated(topo: Topology, port: LogicalPort) -> list[Intent]:
    """The datapath here reports the port activated by the VM's first frame."""
    m = topo.live_migration(port)
    if m is None or m.dest_chassis != topo.chassis or port.id not in topo.vifs:
        return []  # a late or repeated report: the migration moved on
    return [Activated(port.id, topo.chassis)]


def ack_phase(topo: Topology, port_id: str) -> str | None:
    """Which switch a chassis' flows for a migrating port follow, as this chassis sees it
    now: the phase its flow ack is recorded under. ``done`` once the binding names the
    destination (Nova's step 3, which can come first: the record may still say ``plugged``
    when this chassis moves), else the record's phase. None: no migration to ack for."""
    m, port = topo.get(Migration, port_id), topo.get(LogicalPort, port_id)
    if m is None or port is None or m.status is MigrationStatus.ROLLED_BACK:
        return None
    if port.host == m.dest_chassis:
        return MigrationStatus.DONE.value
    return m.phase


def on_port_changed(topo: Topology, port: LogicalPort) -> list[Intent]:
    return _level(topo, port)


def _level(topo: Topology, port: LogicalPort) -> list[Intent]:
    """Decisions that depend only on the current state (safe to repeat)."""
    me, host = topo.chassis, port.host
    here = port.id in topo.vifs
    m = _record(topo, port.id)
    if m is not None and m.dest_chassis == me:
        if host == me:
            return [Complete(port.id, me)]
        if m.source_chassis == host and not authorized(port, me):
            return [Abandon(port.id, me, "the port's binding for this chassis was removed")]
        if m.source_chassis != host:
            return [Abandon(port.id, me, f"the port is now bound to {host}")]
        return []
    if here and host == me:
        topo.home_vifs.add(port.id)
    # A VIF that served the port while it was bound here is the source side of a migration
    # (e.g. the binding moved before Nova unplugged it): it never claims the port back.
    claimable = (here and host is not None and host != me and authorized(port, me)
                 and port.id not in topo.home_vifs)
    if claimable and host is not None and (m is None or m.source_chassis != host):
        return [Claim(port.id, host, me, mode_for(topo, port), fallback_for(topo, port))]
    return []


def mode_for(topo: Topology, port: LogicalPort) -> MigrationMode:
    """The deployment's mode, unless the port's binding profile overrides it."""
    return MigrationMode(_profile_value(topo, port, MIGRATION_MODE_KEY, topo.migration_mode))


def fallback_for(topo: Topology, port: LogicalPort) -> LiveFallback:
    """The deployment's live-mode fallback, unless the port's binding profile overrides it."""
    return LiveFallback(_profile_value(topo, port, LIVE_FALLBACK_KEY, topo.live_fallback))


def _profile_value(topo: Topology, port: LogicalPort, key: str, default: str) -> str:
    """The destination binding's profile, else the active one's, else the port's requested
    one (the model checks the values); else the deployment's ``default``."""
    for binding in (port.binding_for(topo.chassis), port.active_binding):
        if binding is not None and key in binding.profile:
            return str(binding.profile[key])
    return str(port.binding_profile.get(key, default))
