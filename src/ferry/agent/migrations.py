"""Publishes a chassis' migration intents as the port's ``Migration`` record, and its timeline.

Every write is a compare-and-swap (``Northbound.modify``) re-checked against the record as it
is now, so repeated or late intents are harmless. Timestamps are wall-clock seconds
(``time.time``, passed in) keyed by what happened: ``plugged``, ``activated`` (live mode: when
the destination's datapath reported the VM's first frame; published a little later, see the
agent, and recorded even if Nova moved the binding meanwhile), ``source_unplugged``, ``bound``,
``rolled_back``, and ``acked.<chassis>.<phase>`` once a chassis' flows for the port's new
location were acknowledged by its switch (phase: the status, or ``activated``, as that
chassis saw it when it moved the port; ``done`` when it followed the binding itself).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from ferry.core.migration import (
    Abandon,
    Activated,
    Claim,
    ClaimRefused,
    Complete,
    Intent,
    SourceGone,
)
from ferry.model.northbound import InvalidObject, Northbound
from ferry.model.objects import LogicalPort, Migration, MigrationStatus
from ferry.store.base import NotFound, StoreError

log = logging.getLogger(__name__)


class MigrationPublisher:
    def __init__(self, chassis: str, nb: Northbound, wall: Callable[[], float]) -> None:
        self.chassis = chassis
        self.nb = nb
        self.wall = wall
        self._lock = asyncio.Lock()  # one write at a time: intents arrive in order

    async def publish(self, intent: Intent) -> None:
        async with self._lock:
            try:
                await self._publish(intent)
            except (StoreError, InvalidObject) as e:
                log.error("chassis %s: port %s: could not publish %s: %s", self.chassis,
                          intent.port_id, type(intent).__name__, e)

    async def _publish(self, intent: Intent) -> None:
        now = self.wall()
        if isinstance(intent, ClaimRefused):
            log.warning("chassis %s: port %s: refusing a VIF for a port bound to %s: the API "
                        "gave this chassis no binding for it", self.chassis, intent.port_id,
                        intent.bound_to)
        elif isinstance(intent, Claim):
            await self._claim(intent, now)
        elif isinstance(intent, Activated):
            await self._activated(intent.port_id, intent.at or now)
        elif isinstance(intent, SourceGone):
            await self._advance(intent.port_id, MigrationStatus.PLUGGED,
                                MigrationStatus.SOURCE_UNPLUGGED, "source_unplugged", now)
        elif isinstance(intent, Complete):
            await self._advance(intent.port_id, None, MigrationStatus.DONE, "bound", now)
        elif isinstance(intent, Abandon):
            log.warning("chassis %s: port %s: abandoning the migration: %s", self.chassis,
                        intent.port_id, intent.reason)
            await self._advance(intent.port_id, None, MigrationStatus.ROLLED_BACK,
                                "rolled_back", now)

    async def _claim(self, c: Claim, now: float) -> None:
        port = await self.nb.get(LogicalPort, c.port_id)
        if port is None:
            return
        new = Migration(id=c.port_id, topic=port.topic, port_id=c.port_id,
                        source_chassis=c.source, dest_chassis=c.dest, mode=c.mode,
                        fallback=c.fallback, timestamps={"plugged": now})
        old = await self.nb.get(Migration, c.port_id)
        if old is None:
            await self.nb.create(new)
        elif old.in_progress and (old.source_chassis, old.dest_chassis) == (c.source, c.dest):
            return
        else:  # a finished migration of this port: the new one replaces it
            await self.nb.update(new.model_copy(update={"version": old.version}))
        log.info("chassis %s: port %s: migration %s → %s claimed (step 1, %s mode)",
                 self.chassis, c.port_id, c.source, c.dest, c.mode.value)

    async def _activated(self, port_id: str, now: float) -> None:
        # Recorded even if the migration has ended meanwhile: Nova may move the binding
        # between the datapath's activation and this report (held by the agent), and the
        # record then still says when the datapath switched. Never for a migration claimed
        # after that moment, nor for one rolled back.
        def change(m: Migration) -> Migration:
            if (m.activated or m.dest_chassis != self.chassis
                    or m.status is MigrationStatus.ROLLED_BACK
                    or m.timestamps.get("plugged", now) > now):
                return m
            return m.model_copy(update={"activated": True,
                                        "timestamps": {**m.timestamps, "activated": now}})

        try:
            m = await self.nb.modify(Migration, port_id, change)
        except NotFound:
            return
        if m.activated:
            log.info("chassis %s: port %s: migration %s → %s: activated by the VM's first "
                     "frame here", self.chassis, port_id, m.source_chassis, m.dest_chassis)

    async def _advance(self, port_id: str, only_from: MigrationStatus | None,
                       to: MigrationStatus, stamp: str, now: float) -> None:
        def change(m: Migration) -> Migration:
            if m.status in (MigrationStatus.DONE, MigrationStatus.ROLLED_BACK) or (
                only_from is not None and m.status is not only_from
            ):
                return m
            return m.model_copy(update={"status": to,
                                        "timestamps": {**m.timestamps, stamp: now}})

        try:
            m = await self.nb.modify(Migration, port_id, change)
        except NotFound:
            return
        if m.status is to:
            log.info("chassis %s: port %s: migration %s → %s: %s", self.chassis, port_id,
                     m.source_chassis, m.dest_chassis, to.value)

    async def acked(self, port_id: str, phase: str, at: float) -> None:
        """Record when this chassis' flows for the port's location in ``phase`` (as this
        chassis saw it when it moved the port: ``ferry.core.migration.ack_phase``) were
        acked. Keyed by that phase, not the record's status now, which may have moved on."""
        async with self._lock:
            def change(m: Migration) -> Migration:
                key = f"acked.{self.chassis}.{phase}"
                if key in m.timestamps:
                    return m
                return m.model_copy(update={"timestamps": {**m.timestamps, key: at}})

            try:
                await self.nb.modify(Migration, port_id, change)
            except NotFound:
                return
            except (StoreError, InvalidObject) as e:
                log.error("chassis %s: port %s: could not record flow ack: %s", self.chassis,
                          port_id, e)
