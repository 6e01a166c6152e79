"""Keeps a switch's flows equal to the core's desired flows, sending only the difference.

``installed`` is what OVS acknowledged (a barrier after the flow-mods). After every
(re)connection the switch's flows are dumped and become ``installed``: a restarted controller
or a reconnected switch is reconciled without touching flows that are still right. Only flows
with a Ferry cookie are managed; anything else on the bridge is left alone.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from ferry.core.chassis import FlowDiff, FlowKey, app_index_of, diff_flows
from ferry.switch.flow import Flow
from ferry.switch.openflow import (
    ConnectionLost,
    FlowModError,
    OpenFlowError,
    Switch,
    UnsupportedFlow,
)

log = logging.getLogger(__name__)


def is_ferry_cookie(cookie: int, n_apps: int) -> bool:
    return 0 <= app_index_of(cookie) < n_apps


class FlowSync:
    def __init__(self, chassis: str, switch: Switch, desired: Callable[[], dict[FlowKey, Flow]],
                 n_apps: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.chassis = chassis
        self.switch = switch
        self.desired = desired
        self.n_apps = n_apps
        self.clock = clock
        self.installed: dict[FlowKey, Flow] = {}
        self._dirty = asyncio.Event()
        self._synced = asyncio.Condition()
        self._generation = 0  # bumped by every mark_dirty
        self._acked_generation = -1
        self._needs_dump = True
        self.last_ack: float | None = None
        self.on_reconciled: Callable[[], None] | None = None
        """Called after the first sync that follows a dump (a (re)connect or a reconcile)."""

    def mark_dirty(self) -> None:
        self._generation += 1
        self._dirty.set()

    def request_reconcile(self) -> None:
        """Dump the switch's flows before the next sync (the datapath may have learned some)."""
        self._needs_dump = True
        self.mark_dirty()

    def on_connected(self, _switch: Switch) -> None:
        self._needs_dump = True
        self.mark_dirty()

    async def wait_synced(self, generation: int | None = None) -> float:
        """Wait until flows of ``generation`` (default: now) are acked; returns the ack time."""
        target = self._generation if generation is None else generation
        async with self._synced:
            await self._synced.wait_for(lambda: self._acked_generation >= target)
        assert self.last_ack is not None
        return self.last_ack

    @property
    def generation(self) -> int:
        return self._generation

    async def run(self) -> None:
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            generation = self._generation
            try:
                await self.switch.wait_connected()
                dumped = self._needs_dump
                if dumped:
                    await self._dump()
                diff = diff_flows(self.desired(), self.installed)
                if diff:
                    await self._send(diff)
                self.last_ack = self.clock()
                if dumped and self.on_reconciled is not None:
                    self.on_reconciled()
                async with self._synced:
                    self._acked_generation = generation
                    self._synced.notify_all()
            except ConnectionLost as e:
                log.warning("chassis %s: switch connection lost during flow sync: %s; "
                            "resyncing after reconnect", self.chassis, e)
                self._needs_dump = True
                self._dirty.set()
            except FlowModError as e:
                # The switch refused flows: a bug in an app. Log what it refused, resync from
                # what is really installed, and do not retry the same flows in a tight loop.
                log.error("chassis %s: switch rejected flows: %s", self.chassis, e)
                self._needs_dump = True

    async def _dump(self) -> None:
        try:
            flows = await self.switch.dump_flows()
        except UnsupportedFlow as e:
            # A flow on the bridge we cannot read back: keep working from what we know we
            # installed rather than stop programming the switch.
            log.error("chassis %s: cannot reconcile, the switch holds a flow Ferry cannot "
                      "express: %s", self.chassis, e)
            self._needs_dump = False
            return
        self.installed = {f.key: f for f in flows if is_ferry_cookie(f.cookie, self.n_apps)}
        self._needs_dump = False
        log.info("chassis %s: reconciling against %d installed flows", self.chassis,
                 len(self.installed))

    async def _send(self, diff: FlowDiff) -> None:
        t0 = self.clock()
        try:
            # One bundle: OVS moves to the whole new flow set in one table version. Sent as
            # separate flow-mods, packets meet the sets in between (a port's conntrack flow
            # without the rules after it, the rules gone before the conntrack flow), and the
            # datapath caches what they met until a revalidation round
            # (tests/test_flowsync.py traces such drops with flow-by-flow syncs).
            await self.switch.apply(diff.adds, diff.modifies, diff.deletes, atomic=True)
        except ConnectionLost:
            raise
        except OpenFlowError as e:
            # Nothing was applied: a flow was refused, or the bundle itself. Install what the
            # switch accepts, flow by flow, so that one bad flow does not hold back the others
            # (a refused flow then raises its FlowModError again).
            log.error("chassis %s: switch rejected the flow bundle (%s); applying the diff "
                      "flow by flow", self.chassis, e)
            await self.switch.apply(diff.adds, diff.modifies, diff.deletes)
        for f in diff.deletes:
            if self.installed.get(f.key) == f:
                del self.installed[f.key]
        for f in [*diff.adds, *diff.modifies]:
            self.installed[f.key] = f
        log.info("chassis %s: flows +%d ~%d -%d acked in %.1f ms", self.chassis, len(diff.adds),
                 len(diff.modifies), len(diff.deletes), (self.clock() - t0) * 1000)
