"""The OVSDB side of a chassis' switch layer, over ovsdbapp's Open_vSwitch schema.

:class:`ChassisOvsdb` keeps one OVSDB connection to the chassis' ``ovsdb-server`` and offers an
asyncio API on top of it:

* :meth:`ChassisOvsdb.ensure_integration_bridge` converges the integration bridge (userspace
  datapath, secure fail mode, in-band control off), its Geneve port and its OpenFlow controller,
  and returns the Geneve port's OpenFlow port number once ovs-vswitchd has assigned it.
* :meth:`ChassisOvsdb.set_chassis_config` / :meth:`ChassisOvsdb.get_chassis_config` write and
  read the chassis' keys in ``Open_vSwitch.external_ids``.
* :meth:`ChassisOvsdb.events` yields :class:`VifOnline` / :class:`VifOffline` for the local
  VIFs of the integration bridge.

Threading. ovsdbapp runs the OVS IDL in a thread of its own. Everything that reads or writes
IDL rows runs in that thread (ovsdbapp commands, and our hook after each ``Idl.run()``) or in
an executor thread holding the connection lock; results reach the event loop only through
``loop.call_soon_threadsafe``. No coroutine here blocks the event loop.

VIF semantics (state-based, which is also what makes reconnects safe):

* A VIF is an ``Interface`` of a ``Port`` of the integration bridge whose ``external_ids``
  has ``iface-id`` and whose ``ofport`` is valid (> 0). Its identity is
  ``(name, ofport, iface_id, mac)``, ``mac`` being ``external_ids:attached-mac`` if set.
* After every IDL update touching ``Bridge``, ``Port`` or ``Interface`` (and after every
  (re)connection's full dump) the set of VIFs is recomputed and compared with the set last
  reported, keyed by interface name. Vanished VIFs are reported ``VifOffline``, new ones
  ``VifOnline``; a VIF whose identity changed (another ofport, iface-id or MAC) is reported
  ``VifOffline`` (old identity) then ``VifOnline`` (new one). All offlines of one update come
  before its onlines. Hence never two ``VifOnline`` for one interface without a ``VifOffline``
  between them. Changes to other ``external_ids`` keys of an online VIF are not reported.
* On start, the first full dump reports every existing VIF ``VifOnline``.
* Reconnect: the IDL reconnects by itself (backoff 1 s up to ``reconnect_max_backoff_ms``).
  While disconnected nothing is reported (the last known state stands). The new connection's
  full dump is diffed against the last reported state: only real differences (VIFs added,
  removed or changed while disconnected) are reported, never the unchanged ones again.
* Two interfaces with the same ``iface-id`` (e.g. both ends of a migration on one chassis) are
  reported independently, each under its own interface name, and a warning is logged.
  ``iface_id`` is therefore not a key: consumers key VIFs by interface name and decide which
  of the two is active (that is policy, above this layer).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import sys
from collections.abc import AsyncIterator, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

# python-ovs imports eventlet, when it is installed (os-ken declares it), only to ask whether
# select() was monkey-patched. Ferry never runs eventlet: make that import fail so the module
# is not even loaded (and does not warn); python-ovs then uses plain select().
if "eventlet" not in sys.modules:
    sys.modules["eventlet"] = None  # type: ignore[assignment]

from ovsdbapp import exceptions as ovsdbapp_exceptions
from ovsdbapp.backend.ovs_idl import command as ovs_command
from ovsdbapp.backend.ovs_idl import connection as ovs_connection
from ovsdbapp.backend.ovs_idl import idlutils
from ovsdbapp.backend.ovs_idl import transaction as ovs_transaction
from ovsdbapp.schema.open_vswitch import impl_idl

LOG = logging.getLogger(__name__)

SCHEMA_NAME = "Open_vSwitch"
SYSTEM_ID_KEY = "system-id"
TUNNEL_IP_KEY = "ferry-tunnel-ip"
BRIDGE_MAPPINGS_KEY = "ferry-bridge-mappings"
IFACE_ID_KEY = "iface-id"
ATTACHED_MAC_KEY = "attached-mac"
GENEVE_OPTIONS: Mapping[str, str] = {"remote_ip": "flow", "key": "flow"}
CONTROLLER_PREFIXES = ("unix:", "tcp:", "ssl:")

# Only the columns we use are replicated: Interface statistics (rewritten every few seconds by
# ovs-vswitchd) would otherwise wake the monitor for nothing.
_COLUMNS: Mapping[str, list[str]] = {
    "Open_vSwitch": ["bridges", "external_ids", "next_cfg", "cur_cfg"],
    "Bridge": [
        "name", "ports", "datapath_type", "fail_mode", "other_config", "controller",
        "external_ids",
    ],
    "Port": ["name", "interfaces", "external_ids"],
    "Interface": ["name", "type", "options", "ofport", "external_ids", "error"],
    "Controller": ["target", "max_backoff", "inactivity_probe", "is_connected"],
}
_VIF_TABLES = frozenset({"Bridge", "Port", "Interface"})

_T = TypeVar("_T")


class OvsdbError(RuntimeError):
    """An OVSDB operation failed; the message names the chassis and what was attempted."""


class OvsdbTimeout(OvsdbError, TimeoutError):
    """An awaited OVSDB condition did not come true in time."""


@dataclass(frozen=True)
class VifOnline:
    """A local VIF is attached: ``name`` has a valid ``ofport`` on the integration bridge.

    ``external_ids`` (the interface's, at the time) is informational: not part of equality.
    """

    iface_id: str
    ofport: int
    name: str
    mac: str | None
    external_ids: Mapping[str, str] = field(default_factory=dict, compare=False, hash=False)


@dataclass(frozen=True)
class VifOffline:
    """A VIF reported online is gone: deleted, ofport lost, or its identity changed."""

    iface_id: str
    ofport: int
    name: str


VifEvent = VifOnline | VifOffline


@dataclass(frozen=True)
class ChassisConfig:
    """The chassis' keys in ``Open_vSwitch.external_ids`` (``None``: key absent)."""

    system_id: str | None
    tunnel_ip: str | None
    bridge_mappings: Mapping[str, str]


# --------------------------------------------------------------------------------------------
# Pure helpers (no IDL): formats and the VIF diff.


def format_bridge_mappings(mappings: Mapping[str, str]) -> str:
    """``{"physnet1": "br-ex"}`` -> ``"physnet1:br-ex"`` (sorted, comma separated)."""
    for physnet, bridge in mappings.items():
        for word in (physnet, bridge):
            if not word or ":" in word or "," in word:
                raise ValueError(f"bad bridge mapping {physnet!r}:{bridge!r}")
    return ",".join(f"{physnet}:{bridge}" for physnet, bridge in sorted(mappings.items()))


def parse_bridge_mappings(text: str) -> dict[str, str]:
    """Inverse of :func:`format_bridge_mappings`; raises ValueError on a malformed entry."""
    mappings: dict[str, str] = {}
    for entry in filter(None, (e.strip() for e in text.split(","))):
        physnet, sep, bridge = entry.partition(":")
        if not sep or not physnet or not bridge:
            raise ValueError(f"bad bridge mapping {entry!r} in {text!r}")
        mappings[physnet] = bridge
    return mappings


def diff_vifs(
    reported: Mapping[str, VifOnline], current: Mapping[str, VifOnline]
) -> list[VifEvent]:
    """Events that take a consumer from ``reported`` to ``current`` (both keyed by name).

    Offlines first (vanished or changed VIFs, with their old identity), then onlines (new or
    changed VIFs). An unchanged VIF (equal identity) yields nothing.
    """
    offline: list[VifEvent] = []
    online: list[VifEvent] = []
    for name, old in reported.items():
        new = current.get(name)
        if new != old:
            offline.append(VifOffline(old.iface_id, old.ofport, old.name))
    for name, new in current.items():
        if reported.get(name) != new:
            online.append(new)
    return offline + online


def duplicate_iface_ids(vifs: Mapping[str, VifOnline]) -> dict[str, list[str]]:
    """iface-id -> sorted interface names, for iface-ids carried by more than one VIF."""
    names: dict[str, list[str]] = {}
    for vif in vifs.values():
        names.setdefault(vif.iface_id, []).append(vif.name)
    return {iid: sorted(n) for iid, n in names.items() if len(n) > 1}


# --------------------------------------------------------------------------------------------
# Row readers (IDL thread, or executor thread holding the connection lock).


def _optional(value: Any) -> Any | None:
    """An optional OVSDB column as python-ovs returns it (a 0/1 element list) -> value/None."""
    return value[0] if value else None


def _find(idl: Any, table: str, name: str) -> Any | None:
    return idlutils.row_by_value(idl, table, "name", name, None)


def _root(idl: Any) -> Any:
    rows = list(idl.tables["Open_vSwitch"].rows.values())
    if not rows:
        raise OvsdbError("the database has no Open_vSwitch row (run `ovs-vsctl init`)")
    return rows[0]


def _valid_ofport(iface: Any) -> int | None:
    ofport = _optional(iface.ofport)
    return int(ofport) if ofport is not None and ofport > 0 else None


def _vswitchd_caught_up(idl: Any) -> bool:
    """ovs-vswitchd has applied every configuration change requested with next_cfg."""
    root = _root(idl)
    return bool(root.cur_cfg >= root.next_cfg)


def _vif_of(iface: Any) -> VifOnline | None:
    external_ids: dict[str, str] = dict(iface.external_ids)
    iface_id = external_ids.get(IFACE_ID_KEY)
    ofport = _valid_ofport(iface)
    if not iface_id or ofport is None:
        return None
    mac = external_ids.get(ATTACHED_MAC_KEY)
    return VifOnline(iface_id, ofport, str(iface.name), mac, external_ids)


def scan_vifs(idl: Any, bridge: str) -> dict[str, VifOnline]:
    """The VIFs of ``bridge`` as the IDL sees them now, keyed by interface name."""
    br = _find(idl, "Bridge", bridge)
    if br is None:
        return {}
    vifs: dict[str, VifOnline] = {}
    for port in br.ports:
        for iface in port.interfaces:
            vif = _vif_of(iface)
            if vif is not None:
                vifs[vif.name] = vif
    return vifs


def _read_chassis_config(idl: Any) -> ChassisConfig:
    external_ids: dict[str, str] = dict(_root(idl).external_ids)
    return ChassisConfig(
        system_id=external_ids.get(SYSTEM_ID_KEY),
        tunnel_ip=external_ids.get(TUNNEL_IP_KEY),
        bridge_mappings=parse_bridge_mappings(external_ids.get(BRIDGE_MAPPINGS_KEY, "")),
    )


# --------------------------------------------------------------------------------------------
# Row writers: run inside an ovsdbapp transaction, in the IDL thread. Each returns the list of
# changes it made (empty: nothing to do, and then the transaction sends nothing).


@dataclass(frozen=True)
class _BridgeSpec:
    bridge: str
    tunnel_port: str
    controller_target: str
    max_backoff_ms: int
    inactivity_probe_ms: int


def _attach_port(br: Any, port: Any) -> None:
    br.verify("ports")
    br.ports = [*br.ports, port]


def _insert_port(txn: Any, idl: Any, br: Any, name: str, **iface_columns: Any) -> Any:
    iface = txn.insert(idl.tables["Interface"])
    iface.name = name
    for column, value in iface_columns.items():
        setattr(iface, column, value)
    port = txn.insert(idl.tables["Port"])
    port.name = name
    port.interfaces = [iface]
    _attach_port(br, port)
    return port


def _ensure_bridge_row(txn: Any, idl: Any, spec: _BridgeSpec, changes: list[str]) -> Any:
    br = _find(idl, "Bridge", spec.bridge)
    if br is None:
        # python-ovs cannot read a column never written in an inserted row: write them all.
        br = txn.insert(idl.tables["Bridge"])
        br.name = spec.bridge
        br.datapath_type = "netdev"
        br.fail_mode = "secure"
        br.other_config = {"disable-in-band": "true"}
        br.controller = []
        br.ports = []
        _insert_port(txn, idl, br, spec.bridge, type="internal")
        _root(idl).addvalue("bridges", br)
        changes.append(f"created bridge {spec.bridge}")
    if br.datapath_type != "netdev":
        br.datapath_type = "netdev"
        changes.append("datapath_type=netdev")
    if _optional(br.fail_mode) != "secure":
        br.fail_mode = "secure"
        changes.append("fail_mode=secure")
    if dict(br.other_config).get("disable-in-band") != "true":
        br.setkey("other_config", "disable-in-band", "true")
        changes.append("other_config:disable-in-band=true")
    return br


def _ensure_port(txn: Any, idl: Any, br: Any, br_name: str, name: str, type_: str,
                 options: Mapping[str, str], changes: list[str]) -> None:
    """Port ``name`` on ``br`` whose interface has type ``type_`` and (at least) ``options``:
    created, or its type and options set right. The same name on another bridge is an error."""
    port = _find(idl, "Port", name)
    if port is None:
        _insert_port(txn, idl, br, name, type=type_, options=dict(options))
        changes.append(f"created {type_} port {name} on {br_name}")
        return
    if port.uuid not in {p.uuid for p in br.ports}:
        raise OvsdbError(f"{type_} port {name} exists but is not on bridge {br_name}")
    iface = _find(idl, "Interface", name)
    if iface is None:
        raise OvsdbError(f"port {name} exists without an interface named {name}")
    if iface.type != type_:
        iface.type = type_
        changes.append(f"{name}: type={type_}")
    current = dict(iface.options)
    for key, value in options.items():
        if current.get(key) != value:
            iface.setkey("options", key, value)
            changes.append(f"{name}: options:{key}={value}")


def _ensure_tunnel_port(
    txn: Any, idl: Any, br: Any, spec: _BridgeSpec, changes: list[str]
) -> None:
    _ensure_port(txn, idl, br, spec.bridge, spec.tunnel_port, "geneve", GENEVE_OPTIONS,
                 changes)


def _ensure_controller(txn: Any, idl: Any, br: Any, spec: _BridgeSpec, changes: list[str]) -> None:
    controllers = list(br.controller)
    if len(controllers) != 1 or controllers[0].target != spec.controller_target:
        ctl = txn.insert(idl.tables["Controller"])
        ctl.target = spec.controller_target
        ctl.max_backoff = spec.max_backoff_ms
        ctl.inactivity_probe = spec.inactivity_probe_ms
        br.controller = [ctl]
        changes.append(
            f"controller {spec.controller_target} max_backoff={spec.max_backoff_ms} "
            f"inactivity_probe={spec.inactivity_probe_ms}"
        )
        return
    ctl = controllers[0]
    if _optional(ctl.max_backoff) != spec.max_backoff_ms:
        ctl.max_backoff = spec.max_backoff_ms
        changes.append(f"controller max_backoff={spec.max_backoff_ms}")
    if _optional(ctl.inactivity_probe) != spec.inactivity_probe_ms:
        ctl.inactivity_probe = spec.inactivity_probe_ms
        changes.append(f"controller inactivity_probe={spec.inactivity_probe_ms}")


def _ensure_integration_bridge(txn: Any, idl: Any, spec: _BridgeSpec) -> list[str]:
    changes: list[str] = []
    br = _ensure_bridge_row(txn, idl, spec, changes)
    _ensure_tunnel_port(txn, idl, br, spec, changes)
    _ensure_controller(txn, idl, br, spec, changes)
    if changes:
        # As ovs-vsctl does: lets waiters tell when ovs-vswitchd has applied this change.
        _root(idl).increment("next_cfg")
    return changes


def patch_port_names(int_bridge: str, bridge: str) -> tuple[str, str]:
    """The patch pair between br-int and a physical bridge, named as OVN names them:
    ``patch-<int>-to-<bridge>`` on br-int, ``patch-<bridge>-to-<int>`` on the bridge."""
    return f"patch-{int_bridge}-to-{bridge}", f"patch-{bridge}-to-{int_bridge}"


def _ensure_patch_pair(txn: Any, idl: Any, int_bridge: str, bridge: str,
                       changes: list[str]) -> None:
    """Both ends of the patch pair between ``int_bridge`` and ``bridge`` (which must exist:
    the operator's physical bridge), each ``type=patch`` with the other as ``options:peer``."""
    ours, theirs = patch_port_names(int_bridge, bridge)
    for br_name, name, peer in ((int_bridge, ours, theirs), (bridge, theirs, ours)):
        br = _find(idl, "Bridge", br_name)
        if br is None:
            raise OvsdbError(f"bridge {br_name} does not exist (bridge mapping to {bridge})")
        _ensure_port(txn, idl, br, br_name, name, "patch", {"peer": peer}, changes)


def _set_external_ids(txn: Any, idl: Any, wanted: Mapping[str, str]) -> list[str]:
    root = _root(idl)
    current = dict(root.external_ids)
    changes: list[str] = []
    for key, value in wanted.items():
        if current.get(key) != value:
            root.setkey("external_ids", key, value)
            changes.append(f"external_ids:{key}={value}")
    return changes


# --------------------------------------------------------------------------------------------
# ovsdbapp plumbing.


class _FnCommand(ovs_command.BaseCommand):  # type: ignore[misc]
    """An ovsdbapp command running ``fn(txn, idl)`` in the IDL thread; result = its return."""

    def __init__(self, api: Any, fn: Callable[[Any, Any], Any]) -> None:
        super().__init__(api)
        self._fn = fn

    def run_idl(self, txn: Any) -> None:
        self.result = self._fn(txn, self.api.idl)


class _Api(impl_idl.OvsdbIdl):  # type: ignore[misc]
    """ovsdbapp's Open_vSwitch API with plain transactions.

    ovsdbapp's default (vsctl-like) transaction bumps ``next_cfg`` on every commit, even one
    that changes nothing; ours must leave the database alone when there is nothing to do.
    ovsdbapp keeps the connection in a class attribute: :func:`_api_class` makes one class per
    :class:`ChassisOvsdb` so that several chassis can live in one process.
    """

    def create_transaction(
        self, check_error: bool = False, log_errors: bool = True, **kwargs: Any
    ) -> Any:
        return ovs_transaction.Transaction(
            self, self.ovsdb_connection, self.ovsdb_connection.timeout, check_error, log_errors
        )


def _api_class(chassis: str) -> type[_Api]:
    return type(f"_Api_{chassis}", (_Api,), {"_ovsdb_connection": None})


class _Waiter(Generic[_T]):
    """A condition over the IDL, polled in the IDL thread, settling an asyncio future."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, probe: Callable[[Any], _T | None]
    ) -> None:
        self.loop = loop
        self.probe = probe
        self.future: asyncio.Future[_T] = loop.create_future()

    def poll(self, idl: Any) -> bool:
        """True once settled (value, or OvsdbError raised by the probe)."""
        try:
            value = self.probe(idl)
        except OvsdbError as exc:
            self.loop.call_soon_threadsafe(self._settle, None, exc)
            return True
        if value is None:
            return False
        self.loop.call_soon_threadsafe(self._settle, value, None)
        return True

    def _settle(self, value: _T | None, exc: BaseException | None) -> None:
        if self.future.done():  # cancelled by a timeout meanwhile
            return
        if exc is not None:
            self.future.set_exception(exc)
        else:
            self.future.set_result(value)  # type: ignore[arg-type]


class _MonitorIdl(ovs_connection.OvsdbIdl):  # type: ignore[misc]
    """The IDL, hooked: after each ``run()`` that saw VIF-relevant changes or a new connection's
    full dump, call ``on_sync(idl, resync)``; then poll the registered waiters.

    ``run()`` is only ever called with the connection lock held (by ovsdbapp's connection
    thread, or before that thread starts), which is what protects ``waiters``.
    """

    def __init__(self, remote: str, helper: Any, on_sync: Callable[[Any, bool], None]) -> None:
        super().__init__(remote, helper)
        self.on_sync = on_sync
        self.waiters: list[_Waiter[Any]] = []
        self._dirty = False
        self._synced_seqno: int | None = None

    def notify(self, event: str, row: Any, updates: Any = None) -> None:
        if row._table.name in _VIF_TABLES:
            self._dirty = True

    def run(self) -> bool:
        changed = bool(super().run())
        if self.state != self.IDL_S_MONITORING or not self._session.is_connected():
            return changed
        seqno = self._session.get_seqno()
        resync = seqno != self._synced_seqno
        if resync or self._dirty:
            self._dirty = False
            self._synced_seqno = seqno
            self.on_sync(self, resync)
        if self.waiters:
            self.waiters = [w for w in self.waiters if not w.poll(self)]
        return changed


class _VifTracker:
    """IDL-thread side of VIF reporting: last reported state, diff, hand-over to the loop."""

    def __init__(
        self, chassis: str, bridge: str, emit: Callable[[list[VifEvent]], None]
    ) -> None:
        self.chassis = chassis
        self.bridge = bridge
        self.emit = emit
        self.reported: dict[str, VifOnline] = {}
        self._duplicates: dict[str, list[str]] = {}
        self.syncs = 0

    def on_sync(self, idl: Any, resync: bool) -> None:
        current = scan_vifs(idl, self.bridge)
        events = diff_vifs(self.reported, current)
        self.reported = current
        self.syncs += 1
        if resync:
            LOG.info(
                "chassis %s: OVSDB (re)synced, %d VIFs on %s, %d change(s) to report",
                self.chassis, len(current), self.bridge, len(events),
            )
        self._check_duplicates(current)
        if events:
            self.emit(events)

    def _check_duplicates(self, current: Mapping[str, VifOnline]) -> None:
        duplicates = duplicate_iface_ids(current)
        if duplicates == self._duplicates:
            return
        self._duplicates = duplicates
        for iface_id, names in duplicates.items():
            LOG.warning(
                "chassis %s: iface-id %s is on several interfaces of %s: %s "
                "(each reported on its own)",
                self.chassis, iface_id, self.bridge, ", ".join(names),
            )


# --------------------------------------------------------------------------------------------
# The asyncio-facing class.


class ChassisOvsdb:
    """One chassis' OVSDB: integration bridge, chassis config and local VIF events.

    Usage::

        ovsdb = ChassisOvsdb("unix:/run/ovs/db.sock", chassis="ch1")
        await ovsdb.start()                      # connects; existing VIFs are queued ONLINE
        ofport = await ovsdb.ensure_integration_bridge("unix:/run/ferry/of.sock")
        async for event in ovsdb.events():       # VifOnline / VifOffline, until close()
            ...
        await ovsdb.close()

    ``bridge`` is the integration bridge both monitored and converged. ``timeout`` (seconds)
    bounds connecting and each transaction. ``reconnect_max_backoff_ms`` caps the IDL's
    reconnect backoff (python-ovs' minimum is 1000 ms).
    """

    def __init__(
        self,
        ovsdb_url: str,
        *,
        chassis: str = "local",
        bridge: str = "br-int",
        timeout: float = 10.0,
        reconnect_max_backoff_ms: int = 1000,
    ) -> None:
        self.ovsdb_url = ovsdb_url
        self.chassis = chassis
        self.bridge = bridge
        self.timeout = timeout
        self.reconnect_max_backoff_ms = reconnect_max_backoff_ms
        self._loop: asyncio.AbstractEventLoop | None = None
        self._executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix=f"ovsdb-{chassis}")
        self._queue: asyncio.Queue[VifEvent | None] = asyncio.Queue()
        self._online: dict[str, VifOnline] = {}
        self._tracker: _VifTracker | None = None
        self._api: _Api | None = None
        self._closed = False

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect and load the database; queues ``VifOnline`` for every existing VIF.

        Raises :class:`OvsdbError` if the server cannot be reached within ``timeout``.
        """
        if self._api is not None or self._closed:
            raise OvsdbError(f"chassis {self.chassis}: start() called twice or after close()")
        self._loop = asyncio.get_running_loop()
        self._tracker = _VifTracker(self.chassis, self.bridge, self._emit_threadsafe)
        self._api = await self._in_executor(self._connect)
        LOG.info("chassis %s: connected to OVSDB %s", self.chassis, self.ovsdb_url)

    async def close(self) -> None:
        """Stop the IDL thread, end :meth:`events`, fail pending waits. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        api, self._api = self._api, None
        try:
            if api is not None:
                await self._in_executor(self._disconnect, api)
        finally:
            self._executor.shutdown(wait=False)
            self._queue.put_nowait(None)
        LOG.info("chassis %s: OVSDB connection closed", self.chassis)

    async def __aenter__(self) -> ChassisOvsdb:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- VIFs -------------------------------------------------------------------------------

    async def events(self) -> AsyncIterator[VifEvent]:
        """The VIF events, in order, from the first full dump on; ends after :meth:`close`.

        Single consumer: events are queued, each delivered once.
        """
        while True:
            event = await self._queue.get()
            if event is None:
                self._queue.put_nowait(None)  # let any later iteration end too
                return
            yield event

    def vifs(self) -> dict[str, VifOnline]:
        """The VIFs currently online (as delivered to the event queue), keyed by name."""
        return dict(self._online)

    @property
    def syncs(self) -> int:
        """How many times the VIF state was recomputed (diagnostics)."""
        return self._tracker.syncs if self._tracker else 0

    # -- integration bridge -----------------------------------------------------------------

    async def ensure_integration_bridge(
        self,
        controller_target: str,
        *,
        tunnel_port: str = "geneve0",
        max_backoff_ms: int = 1000,
        inactivity_probe_ms: int = 5000,
    ) -> int:
        """Converge the integration bridge and return the Geneve port's ofport.

        Creates or fixes, in one transaction and only where the database differs: the bridge
        (``datapath_type=netdev``, ``fail_mode=secure``, ``other_config:disable-in-band=true``),
        the Geneve port ``tunnel_port`` (``type=geneve``, ``options:remote_ip=flow``,
        ``options:key=flow``), and a single Controller row ``controller_target``
        (``unix:PATH`` or ``tcp:IP:PORT``) with ``max_backoff`` and ``inactivity_probe``.
        A transaction that changes something also bumps ``next_cfg`` (as ovs-vsctl does); a
        second call with the same arguments writes nothing at all. Then waits (no polling)
        until ovs-vswitchd has given the Geneve interface a valid ofport: see
        :meth:`wait_ofport` for the errors.

        The bridge is the one given to the constructor (the one whose VIFs are monitored).
        """
        if not controller_target.startswith(CONTROLLER_PREFIXES):
            raise ValueError(f"controller target {controller_target!r}: want unix:, tcp: or ssl:")
        spec = _BridgeSpec(
            self.bridge, tunnel_port, controller_target, max_backoff_ms, inactivity_probe_ms
        )
        changes = await self._transact(
            f"ensure bridge {self.bridge}",
            lambda txn, idl: _ensure_integration_bridge(txn, idl, spec),
        )
        self._log_changes(f"bridge {self.bridge}", changes)
        return await self.wait_ofport(tunnel_port)

    async def ensure_patch_ports(self, bridge_mappings: Mapping[str, str]) -> dict[str, int]:
        """Patch ports between the integration bridge and each mapped physical bridge;
        returns physical network → the br-int side's ofport.

        Idempotent: one transaction, only where the database differs (a second call writes
        nothing). The physical bridges are the operator's (in the lab, ``Lab`` makes br-ex):
        a missing one is an :class:`OvsdbError` naming it. Patch ports of mappings that were
        removed are left alone (they carry no Ferry flows).
        """
        def ensure(txn: Any, idl: Any) -> list[str]:
            changes: list[str] = []
            for bridge in sorted(set(bridge_mappings.values())):
                _ensure_patch_pair(txn, idl, self.bridge, bridge, changes)
            if changes:
                _root(idl).increment("next_cfg")
            return changes

        if not bridge_mappings:
            return {}
        changes = await self._transact("ensure patch ports", ensure)
        self._log_changes("patch ports", changes)
        out: dict[str, int] = {}
        for physnet, bridge in sorted(bridge_mappings.items()):
            out[physnet] = await self.wait_ofport(patch_port_names(self.bridge, bridge)[0])
        return out

    async def wait_ofport(self, iface: str) -> int:
        """The interface's ofport once valid (> 0), awaited without polling.

        Raises :class:`OvsdbError` as soon as ovs-vswitchd, having applied the latest
        configuration (``cur_cfg`` caught up with ``next_cfg``), reports an error on it;
        :class:`OvsdbTimeout` after ``timeout`` (wrap in ``asyncio.timeout`` for less).
        """

        def probe(idl: Any) -> int | None:
            row = _find(idl, "Interface", iface)
            if row is None:
                return None
            ofport = _valid_ofport(row)
            if ofport is not None:
                return ofport
            error = _optional(row.error)
            if error and _vswitchd_caught_up(idl):  # not a stale error from an older config
                raise OvsdbError(f"chassis {self.chassis}: interface {iface}: {error}")
            return None

        return await self._wait_for(f"ofport of {iface}", probe)

    # -- chassis config ---------------------------------------------------------------------

    async def set_chassis_config(
        self,
        *,
        system_id: str | None = None,
        tunnel_ip: str | None = None,
        bridge_mappings: Mapping[str, str] | None = None,
    ) -> None:
        """Set the given keys of ``Open_vSwitch.external_ids`` (``None``: leave unchanged).

        Keys: ``system-id``, ``ferry-tunnel-ip`` (validated IP address) and
        ``ferry-bridge-mappings`` (``physnet:bridge,...``). Other keys are kept. Writes
        nothing if the values are already there.
        """
        wanted: dict[str, str] = {}
        if system_id is not None:
            if not system_id:
                raise ValueError("system_id must not be empty")
            wanted[SYSTEM_ID_KEY] = system_id
        if tunnel_ip is not None:
            wanted[TUNNEL_IP_KEY] = str(ipaddress.ip_address(tunnel_ip))
        if bridge_mappings is not None:
            wanted[BRIDGE_MAPPINGS_KEY] = format_bridge_mappings(bridge_mappings)
        if not wanted:
            return
        changes = await self._transact(
            "set chassis external_ids", lambda txn, idl: _set_external_ids(txn, idl, wanted)
        )
        self._log_changes("Open_vSwitch", changes)

    async def get_chassis_config(self) -> ChassisConfig:
        """Read back the chassis' keys (from the local replica, no round trip)."""
        self._require_api()
        return await self._in_executor(self._read_locked, _read_chassis_config)

    # -- internals: connection (executor threads) -------------------------------------------

    def _connect(self) -> _Api:
        assert self._tracker is not None
        try:
            helper = idlutils.get_schema_helper(self.ovsdb_url, SCHEMA_NAME)
        except Exception as exc:
            raise OvsdbError(
                f"chassis {self.chassis}: cannot fetch the OVSDB schema from {self.ovsdb_url}: "
                f"{exc}"
            ) from exc
        for table, columns in _COLUMNS.items():
            helper.register_columns(table, columns)
        idl = _MonitorIdl(self.ovsdb_url, helper, self._tracker.on_sync)
        # python-ovs has no public knob for the IDL session's backoff (default max 8 s).
        idl._session.reconnect.set_backoff(1000, self.reconnect_max_backoff_ms)
        conn = ovs_connection.Connection(idl, timeout=self.timeout)
        try:
            return _api_class(self.chassis)(conn)
        except ovsdbapp_exceptions.OvsdbConnectionUnavailable as exc:
            raise OvsdbError(
                f"chassis {self.chassis}: cannot load OVSDB {self.ovsdb_url}: {exc}"
            ) from exc

    def _disconnect(self, api: _Api) -> None:
        if not api.ovsdb_connection.stop(timeout=self.timeout):
            raise OvsdbError(f"chassis {self.chassis}: the OVSDB IDL thread did not stop")
        with api.ovsdb_connection.lock:
            waiters, api.idl.waiters = api.idl.waiters, []
        for waiter in waiters:
            exc = OvsdbError(f"chassis {self.chassis}: closed")
            waiter.loop.call_soon_threadsafe(waiter._settle, None, exc)

    def _read_locked(self, reader: Callable[[Any], _T]) -> _T:
        api = self._require_api()
        with api.ovsdb_connection.lock:
            return reader(api.idl)

    def _commit(self, what: str, fn: Callable[[Any, Any], _T]) -> _T:
        api = self._require_api()
        cmd = _FnCommand(api, fn)
        try:
            with api.transaction(check_error=True, log_errors=False) as txn:
                txn.add(cmd)
        except OvsdbError as exc:
            raise OvsdbError(f"chassis {self.chassis}: {what}: {exc}") from exc
        except (ovsdbapp_exceptions.OvsdbAppException, RuntimeError) as exc:
            raise OvsdbError(f"chassis {self.chassis}: {what} failed: {exc}") from exc
        result: _T = cmd.result
        return result

    def _register_waiter(self, waiter: _Waiter[Any]) -> None:
        """Poll once and, if not settled, register: atomic w.r.t. IDL updates (same lock)."""
        api = self._require_api()
        with api.ovsdb_connection.lock:
            if not waiter.poll(api.idl):
                api.idl.waiters.append(waiter)

    def _unregister_waiter(self, waiter: _Waiter[Any]) -> None:
        api = self._api
        if api is None:
            return
        with api.ovsdb_connection.lock:
            if waiter in api.idl.waiters:
                api.idl.waiters.remove(waiter)

    def _require_api(self) -> _Api:
        if self._api is None:
            raise OvsdbError(f"chassis {self.chassis}: not started, or closed")
        return self._api

    # -- internals: event loop side ----------------------------------------------------------

    async def _in_executor(self, fn: Callable[..., _T], *args: Any) -> _T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, fn, *args)

    async def _transact(self, what: str, fn: Callable[[Any, Any], _T]) -> _T:
        self._require_api()
        return await self._in_executor(self._commit, what, fn)

    async def _wait_for(self, what: str, probe: Callable[[Any], _T | None]) -> _T:
        self._require_api()
        waiter: _Waiter[_T] = _Waiter(asyncio.get_running_loop(), probe)
        await self._in_executor(self._register_waiter, waiter)
        try:
            return await asyncio.wait_for(waiter.future, self.timeout)
        except TimeoutError as exc:
            await self._in_executor(self._unregister_waiter, waiter)
            raise OvsdbTimeout(
                f"chassis {self.chassis}: no {what} after {self.timeout:.1f} s"
            ) from exc

    def _emit_threadsafe(self, events: list[VifEvent]) -> None:
        """Called in the IDL thread: hand a batch of events over to the event loop."""
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(self._deliver, events)
        except RuntimeError:
            LOG.error(
                "chassis %s: event loop closed, %d VIF event(s) not delivered",
                self.chassis, len(events),
            )

    def _deliver(self, events: list[VifEvent]) -> None:
        for event in events:
            if isinstance(event, VifOnline):
                self._online[event.name] = event
                LOG.info(
                    "chassis %s: VIF online: %s iface-id=%s ofport=%d mac=%s",
                    self.chassis, event.name, event.iface_id, event.ofport, event.mac,
                )
            else:
                self._online.pop(event.name, None)
                LOG.info(
                    "chassis %s: VIF offline: %s iface-id=%s ofport=%d",
                    self.chassis, event.name, event.iface_id, event.ofport,
                )
            self._queue.put_nowait(event)

    def _log_changes(self, what: str, changes: list[str]) -> None:
        if changes:
            LOG.info("chassis %s: %s: %s", self.chassis, what, "; ".join(changes))
        else:
            LOG.debug("chassis %s: %s: already as wanted", self.chassis, what)
