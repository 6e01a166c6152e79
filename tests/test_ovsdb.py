"""ferry.switch.ovsdb: pure helpers, then against a real private Open vSwitch.

Each OVS test gets its own OvsInstance in tmp_path, with its daemons in a network namespace of
its own (so that the internal ports' tap devices never reach the host or collide between runs);
the fixture stops the daemons by PID and deletes the namespace, even when the test fails.
Conditions are awaited with a timeout, never slept for. "Nothing else happened" is checked by
ordering: a marker VIF is plugged after the action, and the events up to its ONLINE must be
exactly the expected ones.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import statistics
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from ferry.lab.ovs_instance import OvsInstance, kill_pid
from ferry.switch.ovsdb import (
    ChassisOvsdb,
    OvsdbError,
    VifEvent,
    VifOffline,
    VifOnline,
    diff_vifs,
    duplicate_iface_ids,
    format_bridge_mappings,
    parse_bridge_mappings,
)

EVENT_TIMEOUT = 10.0
CTL_TARGET = "tcp:127.0.0.1:6653"

# --------------------------------------------------------------------------------------------
# Pure helpers


def _on(name: str, iface_id: str, ofport: int, mac: str | None = None) -> VifOnline:
    return VifOnline(iface_id, ofport, name, mac, {"iface-id": iface_id})


def test_diff_vifs_reports_only_differences() -> None:
    a, b = _on("a", "P1", 1), _on("b", "P2", 2)
    assert diff_vifs({}, {"a": a}) == [a]
    assert diff_vifs({"a": a}, {"a": a}) == []
    assert diff_vifs({"a": a, "b": b}, {"a": a}) == [VifOffline("P2", 2, "b")]


def test_diff_vifs_identity_change_is_offline_then_online() -> None:
    old = _on("a", "P1", 1, "02:00:00:00:00:01")
    for new in (_on("a", "P1", 7, old.mac), _on("a", "P9", 1, old.mac), _on("a", "P1", 1)):
        assert diff_vifs({"a": old}, {"a": new}) == [VifOffline("P1", 1, "a"), new]


def test_diff_vifs_ignores_other_external_ids() -> None:
    old = _on("a", "P1", 1)
    new = VifOnline("P1", 1, "a", None, {"iface-id": "P1", "vm-id": "x"})
    assert diff_vifs({"a": old}, {"a": new}) == []


def test_diff_vifs_offlines_come_first() -> None:
    events = diff_vifs({"a": _on("a", "P1", 1)}, {"b": _on("b", "P1", 2)})
    assert [type(e) for e in events] == [VifOffline, VifOnline]


def test_duplicate_iface_ids() -> None:
    vifs = {"a": _on("a", "P1", 1), "b": _on("b", "P1", 2), "c": _on("c", "P2", 3)}
    assert duplicate_iface_ids(vifs) == {"P1": ["a", "b"]}


def test_bridge_mappings_round_trip() -> None:
    mappings = {"physnet2": "br-ex2", "physnet1": "br-ex"}
    text = format_bridge_mappings(mappings)
    assert text == "physnet1:br-ex,physnet2:br-ex2"
    assert parse_bridge_mappings(text) == mappings
    assert parse_bridge_mappings("") == {}
    for bad in ({"a:b": "br"}, {"a": "b,c"}, {"": "br"}):
        with pytest.raises(ValueError):
            format_bridge_mappings(bad)
    with pytest.raises(ValueError):
        parse_bridge_mappings("physnet1")


# --------------------------------------------------------------------------------------------
# Fixtures and helpers for the real switch


@contextmanager
def private_ovs(rundir: Path) -> Iterator[OvsInstance]:
    """A started OvsInstance in a fresh network namespace; stopped by PID, namespace deleted."""
    netns = f"fo-{secrets.token_hex(4)}"
    subprocess.run(["ip", "netns", "add", netns], check=True)
    inst = OvsInstance(rundir, netns=netns)
    try:
        inst.start()
        yield inst
    finally:
        inst.stop()
        subprocess.run(["ip", "netns", "del", netns], check=False)


@pytest.fixture
def ovs(tmp_path: Path) -> Iterator[OvsInstance]:
    with private_ovs(tmp_path / "ovs") as inst:
        yield inst


@pytest.fixture
async def ovsdb(ovs: OvsInstance) -> AsyncIterator[ChassisOvsdb]:
    db = ChassisOvsdb(ovs.ovsdb_url, chassis="t1", timeout=EVENT_TIMEOUT)
    await db.start()
    try:
        yield db
    finally:
        await db.close()


@pytest.fixture
async def bridged(ovsdb: ChassisOvsdb) -> ChassisOvsdb:
    await ovsdb.ensure_integration_bridge(CTL_TARGET)
    return ovsdb


class Events:
    """The event stream of a ChassisOvsdb, awaited with a timeout."""

    def __init__(self, db: ChassisOvsdb) -> None:
        self._it = db.events().__aiter__()

    async def next(self) -> VifEvent:
        return await asyncio.wait_for(self._it.__anext__(), EVENT_TIMEOUT)

    async def until_online(self, name: str) -> list[VifEvent]:
        """Events up to and including the VifOnline of interface ``name``."""
        events: list[VifEvent] = []
        while True:
            event = await self.next()
            events.append(event)
            if isinstance(event, VifOnline) and event.name == name:
                return events


def add_vif(ovs: OvsInstance, name: str, *settings: str, bridge: str = "br-int") -> None:
    ovs.vsctl("add-port", bridge, name, "--", "set", "Interface", name, "type=internal",
              *settings)


def ofport_of(ovs: OvsInstance, name: str) -> int:
    return int(ovs.vsctl("get", "Interface", name, "ofport"))


def vget(ovs: OvsInstance, table: str, record: str, column: str) -> str:
    """``ovs-vsctl get``, unquoted (vsctl quotes only the strings that need it)."""
    return ovs.vsctl("get", table, record, column).strip().strip('"')


def controller(ovs: OvsInstance) -> str:
    """The UUID of br-int's single Controller row (vsctl cannot look Controllers up by target)."""
    uuids = vget(ovs, "Bridge", "br-int", "controller").strip("[]").split(", ")
    assert len(uuids) == 1, uuids
    return uuids[0]


def restart_ovsdb_server(ovs: OvsInstance, between: list[str] | None = None) -> float:
    """Stop ovsdb-server by PID, optionally run ``ovsdb-tool transact`` on the stopped database,
    start it again on the same database. Returns the monotonic time it was listening again.

    (Same command line as OvsInstance.start; OvsInstance has no restart of its own yet.)
    """
    kill_pid(ovs.pids.pop("ovsdb-server"))
    db = ovs.rundir / "conf.db"
    for ops in between or []:
        ovs.run("ovsdb-tool", "transact", str(db), ops)
    ovs.run(
        "ovsdb-server", f"--remote=punix:{ovs.db_sock}",
        f"--pidfile={ovs.rundir / 'ovsdb-server.pid'}", "--detach",
        f"--log-file={ovs.rundir / 'ovsdb-server.log'}", str(db),
    )
    restarted = time.monotonic()
    ovs.pids["ovsdb-server"] = int((ovs.rundir / "ovsdb-server.pid").read_text().strip())
    return restarted


# --------------------------------------------------------------------------------------------
# Integration bridge


@pytest.mark.ovs
async def test_ensure_integration_bridge_creates_everything(
    ovs: OvsInstance, ovsdb: ChassisOvsdb
) -> None:
    ofport = await ovsdb.ensure_integration_bridge(CTL_TARGET, max_backoff_ms=1000)

    assert ofport == ofport_of(ovs, "geneve0") and ofport > 0
    assert vget(ovs, "Bridge", "br-int", "datapath_type") == "netdev"
    assert vget(ovs, "Bridge", "br-int", "fail_mode") == "secure"
    assert vget(ovs, "Bridge", "br-int", "other_config:disable-in-band") == "true"
    assert vget(ovs, "Interface", "geneve0", "type") == "geneve"
    assert vget(ovs, "Interface", "geneve0", "options:remote_ip") == "flow"
    assert vget(ovs, "Interface", "geneve0", "options:key") == "flow"
    assert ovs.vsctl("list-ports", "br-int").split() == ["geneve0"]
    assert ovs.vsctl("get-controller", "br-int").strip() == CTL_TARGET
    assert vget(ovs, "Controller", controller(ovs), "max_backoff") == "1000"
    assert vget(ovs, "Controller", controller(ovs), "inactivity_probe") == "5000"
    assert ovs.vsctl("list-br").split() == ["br-int"]


def _uuids(ovs: OvsInstance) -> dict[str, str]:
    return {
        table: ovs.vsctl("--columns=_uuid", "--format=json", "list", table)
        for table in ("Bridge", "Port", "Interface", "Controller")
    }


@pytest.mark.ovs
async def test_ensure_integration_bridge_is_idempotent(
    ovs: OvsInstance, ovsdb: ChassisOvsdb, caplog: pytest.LogCaptureFixture
) -> None:
    first = await ovsdb.ensure_integration_bridge(CTL_TARGET)
    before = (_uuids(ovs), ovs.vsctl("show"))

    with caplog.at_level(logging.DEBUG, logger="ferry.switch.ovsdb"):
        second = await ovsdb.ensure_integration_bridge(CTL_TARGET)

    assert second == first
    assert (_uuids(ovs), ovs.vsctl("show")) == before
    assert "bridge br-int: already as wanted" in caplog.text
    assert "created" not in caplog.text


@pytest.mark.ovs
async def test_ensure_integration_bridge_repairs_drift(
    ovs: OvsInstance, ovsdb: ChassisOvsdb, caplog: pytest.LogCaptureFixture
) -> None:
    ofport = await ovsdb.ensure_integration_bridge(CTL_TARGET)
    controller_uuid = controller(ovs)
    ovs.vsctl("set", "Bridge", "br-int", "fail_mode=standalone", "--",
              "remove", "Bridge", "br-int", "other_config", "disable-in-band", "--",
              "remove", "Interface", "geneve0", "options", "key", "--",
              "set", "Controller", controller_uuid, "max_backoff=8000")

    with caplog.at_level(logging.INFO, logger="ferry.switch.ovsdb"):
        assert await ovsdb.ensure_integration_bridge(CTL_TARGET) == ofport

    assert vget(ovs, "Bridge", "br-int", "fail_mode") == "secure"
    assert vget(ovs, "Bridge", "br-int", "other_config:disable-in-band") == "true"
    assert vget(ovs, "Interface", "geneve0", "options:key") == "flow"
    assert vget(ovs, "Controller", controller(ovs), "max_backoff") == "1000"
    assert controller(ovs) == controller_uuid
    assert "fail_mode=secure" in caplog.text and "created" not in caplog.text

    # Another target replaces the controller row.
    await ovsdb.ensure_integration_bridge("unix:/nonexistent/ferry.sock", max_backoff_ms=2000)
    assert ovs.vsctl("get-controller", "br-int").strip() == "unix:/nonexistent/ferry.sock"
    assert ovs.vsctl("--columns=target", "--format=json", "list", "Controller").count(
        "unix:"
    ) == 1


@pytest.mark.ovs
async def test_ensure_integration_bridge_errors(ovs: OvsInstance, ovsdb: ChassisOvsdb) -> None:
    with pytest.raises(ValueError):
        await ovsdb.ensure_integration_bridge("127.0.0.1:6653")
    ovs.add_bridge("br-other")
    ovs.vsctl("add-port", "br-other", "geneve0")
    with pytest.raises(OvsdbError, match="geneve0 exists but is not on bridge br-int"):
        await ovsdb.ensure_integration_bridge(CTL_TARGET)


@pytest.mark.ovs
async def test_ensure_integration_bridge_reports_vswitchd_error(
    ovs: OvsInstance, ovsdb: ChassisOvsdb
) -> None:
    """A second flow-based Geneve port cannot be added: fail fast with ovs-vswitchd's error."""
    ovs.add_bridge("br-int")
    ovs.vsctl("add-port", "br-int", "gen-first", "--", "set", "Interface", "gen-first",
              "type=geneve", "options:remote_ip=flow", "options:key=flow")
    started = time.monotonic()
    with pytest.raises(OvsdbError, match="t1: interface geneve0: could not add network device"):
        await ovsdb.ensure_integration_bridge(CTL_TARGET)
    assert time.monotonic() - started < EVENT_TIMEOUT / 2


# --------------------------------------------------------------------------------------------
# Chassis config


@pytest.mark.ovs
async def test_chassis_config_round_trip(
    ovs: OvsInstance, ovsdb: ChassisOvsdb, caplog: pytest.LogCaptureFixture
) -> None:
    ovs.vsctl("set", "Open_vSwitch", ".", "external_ids:foreign=kept")
    empty = await ovsdb.get_chassis_config()
    assert (empty.system_id, empty.tunnel_ip, dict(empty.bridge_mappings)) == (None, None, {})

    await ovsdb.set_chassis_config(
        system_id="chassis-1", tunnel_ip="192.168.254.1", bridge_mappings={"physnet1": "br-ex"}
    )
    config = await ovsdb.get_chassis_config()
    assert config.system_id == "chassis-1"
    assert config.tunnel_ip == "192.168.254.1"
    assert config.bridge_mappings == {"physnet1": "br-ex"}
    assert vget(ovs, "Open_vSwitch", ".", "external_ids:system-id") == "chassis-1"
    assert vget(ovs, "Open_vSwitch", ".", "external_ids:ferry-tunnel-ip") == "192.168.254.1"
    assert vget(ovs, "Open_vSwitch", ".", "external_ids:ferry-bridge-mappings") == "physnet1:br-ex"
    assert vget(ovs, "Open_vSwitch", ".", "external_ids:foreign") == "kept"

    # Partial update keeps the other keys; same values write nothing.
    await ovsdb.set_chassis_config(tunnel_ip="192.168.254.9")
    assert (await ovsdb.get_chassis_config()).system_id == "chassis-1"
    with caplog.at_level(logging.DEBUG, logger="ferry.switch.ovsdb"):
        await ovsdb.set_chassis_config(system_id="chassis-1", tunnel_ip="192.168.254.9")
    assert "Open_vSwitch: already as wanted" in caplog.text

    with pytest.raises(ValueError):
        await ovsdb.set_chassis_config(tunnel_ip="not-an-ip")
    with pytest.raises(ValueError):
        await ovsdb.set_chassis_config(bridge_mappings={"bad:name": "br-ex"})


# --------------------------------------------------------------------------------------------
# VIF events


@pytest.mark.ovs
async def test_vif_online_then_offline(ovs: OvsInstance, bridged: ChassisOvsdb) -> None:
    events = Events(bridged)
    add_vif(ovs, "vif1", "external_ids:iface-id=P1",
            "external_ids:attached-mac=\"02:00:00:00:00:01\"")

    online = await events.next()
    assert isinstance(online, VifOnline)
    assert (online.iface_id, online.name, online.mac) == ("P1", "vif1", "02:00:00:00:00:01")
    assert online.ofport == ofport_of(ovs, "vif1") > 0
    assert online.external_ids == {"iface-id": "P1", "attached-mac": "02:00:00:00:00:01"}
    assert bridged.vifs() == {"vif1": online}

    ovs.vsctl("del-port", "br-int", "vif1")
    assert await events.next() == VifOffline("P1", online.ofport, "vif1")
    assert bridged.vifs() == {}


@pytest.mark.ovs
async def test_vif_needs_iface_id_and_valid_ofport(
    ovs: OvsInstance, bridged: ChassisOvsdb
) -> None:
    events = Events(bridged)
    add_vif(ovs, "plain")  # no iface-id: not a VIF
    add_vif(ovs, "vif2", "external_ids:iface-id=P2")
    assert await events.until_online("vif2") == [
        VifOnline("P2", ofport_of(ovs, "vif2"), "vif2", None)
    ]

    # iface-id set later: online then; removed: offline.
    ovs.vsctl("set", "Interface", "plain", "external_ids:iface-id=P3")
    ofport = ofport_of(ovs, "plain")
    assert await events.next() == VifOnline("P3", ofport, "plain", None)
    ovs.vsctl("remove", "Interface", "plain", "external_ids", "iface-id")
    assert await events.next() == VifOffline("P3", ofport, "plain")

    # ofport lost (-1: the device cannot be opened any more) is offline.
    vif2 = ofport_of(ovs, "vif2")
    ovs.vsctl("set", "Interface", "vif2", "type=system")
    assert await events.next() == VifOffline("P2", vif2, "vif2")
    assert ofport_of(ovs, "vif2") == -1


@pytest.mark.ovs
async def test_vif_identity_change_is_offline_then_online(
    ovs: OvsInstance, bridged: ChassisOvsdb
) -> None:
    events = Events(bridged)
    add_vif(ovs, "vif1", "external_ids:iface-id=P1")
    first = await events.next()
    assert isinstance(first, VifOnline)

    ovs.vsctl("set", "Interface", "vif1", "external_ids:iface-id=P9")
    assert await events.next() == VifOffline("P1", first.ofport, "vif1")
    assert await events.next() == VifOnline("P9", first.ofport, "vif1", None)

    # Other external_ids keys are not reported: the next event is the marker's.
    ovs.vsctl("set", "Interface", "vif1", "external_ids:vm-id=vm1")
    add_vif(ovs, "marker", "external_ids:iface-id=M")
    assert [e.name for e in await events.until_online("marker")] == ["marker"]


@pytest.mark.ovs
async def test_vif_on_another_bridge_is_ignored(ovs: OvsInstance, bridged: ChassisOvsdb) -> None:
    events = Events(bridged)
    ovs.add_bridge("br-ex")
    add_vif(ovs, "ext1", "external_ids:iface-id=X1", bridge="br-ex")
    add_vif(ovs, "marker", "external_ids:iface-id=M")
    assert [e.name for e in await events.until_online("marker")] == ["marker"]


@pytest.mark.ovs
async def test_same_iface_id_on_two_interfaces(
    ovs: OvsInstance, bridged: ChassisOvsdb, caplog: pytest.LogCaptureFixture
) -> None:
    events = Events(bridged)
    add_vif(ovs, "src", "external_ids:iface-id=P1")
    await events.until_online("src")
    with caplog.at_level(logging.WARNING, logger="ferry.switch.ovsdb"):
        add_vif(ovs, "dst", "external_ids:iface-id=P1")
        dst = await events.next()
    assert isinstance(dst, VifOnline) and dst.name == "dst" and dst.iface_id == "P1"
    assert "iface-id P1 is on several interfaces of br-int: dst, src" in caplog.text
    assert set(bridged.vifs()) == {"src", "dst"}

    src_ofport = bridged.vifs()["src"].ofport
    ovs.vsctl("del-port", "br-int", "src")
    assert await events.next() == VifOffline("P1", src_ofport, "src")
    assert set(bridged.vifs()) == {"dst"}


@pytest.mark.ovs
async def test_existing_vifs_reported_at_start(ovs: OvsInstance) -> None:
    ovs.add_bridge("br-int")
    add_vif(ovs, "old1", "external_ids:iface-id=P1")
    add_vif(ovs, "old2", "external_ids:iface-id=P2")
    add_vif(ovs, "plain")
    expected = {
        VifOnline("P1", ofport_of(ovs, "old1"), "old1", None),
        VifOnline("P2", ofport_of(ovs, "old2"), "old2", None),
    }
    async with ChassisOvsdb(ovs.ovsdb_url, chassis="t2") as db:
        events = Events(db)
        add_vif(ovs, "marker", "external_ids:iface-id=M")
        seen = await events.until_online("marker")
        assert set(seen[:-1]) == expected and len(seen) == 3
        # ensure on an existing bridge keeps its ports.
        await db.ensure_integration_bridge(CTL_TARGET)
        assert set(ovs.vsctl("list-ports", "br-int").split()) == {
            "old1", "old2", "plain", "marker", "geneve0"
        }


# --------------------------------------------------------------------------------------------
# Reconnect and close


def _remove_port_ops(ovs: OvsInstance, port: str) -> str:
    """An ovsdb-tool transaction that unplugs ``port`` from br-int (the Port and its Interface
    are garbage-collected), as if it had been deleted while we were disconnected."""
    port_uuid = vget(ovs, "Port", port, "_uuid")
    return json.dumps([
        "Open_vSwitch",
        {"op": "mutate", "table": "Bridge", "where": [["name", "==", "br-int"]],
         "mutations": [["ports", "delete", ["uuid", port_uuid]]]},
    ])


@pytest.mark.ovs
async def test_reconnect_resyncs_without_duplicates(
    ovs: OvsInstance, bridged: ChassisOvsdb
) -> None:
    events = Events(bridged)
    for name in ("vifA", "vifB"):
        add_vif(ovs, name, f"external_ids:iface-id={name}")
        await events.until_online(name)
    b_ofport = bridged.vifs()["vifB"].ofport
    syncs = bridged.syncs

    # Server down; vifB is removed from the database meanwhile; server up on the same db.
    restarted = restart_ovsdb_server(ovs, between=[_remove_port_ops(ovs, "vifB")])

    # The resync reports exactly what changed: vifB offline, and nothing for vifA.
    assert await events.next() == VifOffline("vifB", b_ofport, "vifB")
    resynced_after = time.monotonic() - restarted
    assert bridged.syncs > syncs

    # A VIF plugged after the reconnect is reported; nothing else came before it.
    add_vif(ovs, "vifC", "external_ids:iface-id=vifC")
    assert [e.name for e in await events.until_online("vifC")] == ["vifC"]
    assert set(bridged.vifs()) == {"vifA", "vifC"}

    # A restart with no change in between reports nothing at all.
    restart_ovsdb_server(ovs)
    add_vif(ovs, "vifD", "external_ids:iface-id=vifD")  # vsctl waits for the server itself
    assert [e.name for e in await events.until_online("vifD")] == ["vifD"]
    print(f"\nresync after ovsdb-server restart: {resynced_after * 1000:.0f} ms")


@pytest.mark.ovs
async def test_close_stops_idl_thread_and_ends_events(ovs: OvsInstance) -> None:
    db = ChassisOvsdb(ovs.ovsdb_url, chassis="t3")
    await db.start()
    api = db._api
    assert api is not None
    thread = api.ovsdb_connection.thread
    assert thread.is_alive()
    await db.close()
    assert not thread.is_alive()
    assert [e async for e in db.events()] == []
    with pytest.raises(OvsdbError, match="not started, or closed"):
        await db.get_chassis_config()
    await db.close()  # twice is fine


@pytest.mark.ovs
async def test_two_chassis_in_one_process(ovs: OvsInstance, tmp_path: Path) -> None:
    """ovsdbapp keeps its connection in a class attribute; each ChassisOvsdb must have its own."""
    with private_ovs(tmp_path / "ovs2") as other:
        async with (
            ChassisOvsdb(ovs.ovsdb_url, chassis="c1") as db1,
            ChassisOvsdb(other.ovsdb_url, chassis="c2") as db2,
        ):
            await db1.ensure_integration_bridge(CTL_TARGET)
            await db2.ensure_integration_bridge(CTL_TARGET)
            await db1.set_chassis_config(system_id="c1")
            await db2.set_chassis_config(system_id="c2")
            add_vif(other, "vif2", "external_ids:iface-id=P2")
            add_vif(ovs, "vif1", "external_ids:iface-id=P1")
            assert [e.name for e in await Events(db1).until_online("vif1")] == ["vif1"]
            assert [e.name for e in await Events(db2).until_online("vif2")] == ["vif2"]
            assert (await db1.get_chassis_config()).system_id == "c1"
            assert (await db2.get_chassis_config()).system_id == "c2"


@pytest.mark.ovs
async def test_start_fails_clearly_without_server(tmp_path: Path) -> None:
    db = ChassisOvsdb(f"unix:{tmp_path}/missing.sock", chassis="t4", timeout=2)
    with pytest.raises(OvsdbError, match="t4: cannot fetch the OVSDB schema"):
        await db.start()
    await db.close()


# --------------------------------------------------------------------------------------------
# Latency


@pytest.mark.ovs
async def test_add_port_to_online_latency(ovs: OvsInstance, bridged: ChassisOvsdb) -> None:
    """add-port -> VifOnline, over 20 ports (printed; run with -s to see the figures)."""
    events = Events(bridged)
    total, after_vsctl, vsctl = [], [], []
    for i in range(int(os.environ.get("FERRY_LATENCY_PORTS", "20"))):
        name = f"lat{i}"
        t0 = time.monotonic()
        add_vif(ovs, name, f"external_ids:iface-id=L{i}")
        t1 = time.monotonic()
        await events.until_online(name)
        t2 = time.monotonic()
        total.append((t2 - t0) * 1000)
        after_vsctl.append((t2 - t1) * 1000)
        vsctl.append((t1 - t0) * 1000)

    def fmt(xs: list[float]) -> str:
        qs = statistics.quantiles(xs, n=10)
        return f"p50 {statistics.median(xs):.1f} ms, p90 {qs[-1]:.1f} ms, max {max(xs):.1f} ms"

    print(f"\nadd-port -> ONLINE ({len(total)} ports): {fmt(total)}")
    print(f"ovs-vsctl add-port alone (waits for vswitchd): {fmt(vsctl)}")
    print(f"ONLINE after ovs-vsctl returned: {fmt(after_vsctl)}")
    assert statistics.median(total) < 500
