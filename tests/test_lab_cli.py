"""The lab as an operator drives it: the `ferry` command line, end to end, in subprocesses.

up → status --json → ports through the API → vm create → vm exec ping → lab migrate →
migration list/show → down, and nothing of the lab is left afterwards."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from ferry.lab.lab import destroy_leftovers, leftovers

pytestmark = pytest.mark.lab


def ferry(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([sys.executable, "-m", "ferry", *args], capture_output=True, text=True,
                       timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"ferry {' '.join(args)}: exit {r.returncode}\n{r.stdout}\n{r.stderr}")
    return r


@pytest.fixture
def lab() -> Iterator[dict[str, Any]]:
    out = ferry("lab", "up", "--chassis", "2").stdout
    prefix = out.split("lab ", 1)[1].split()[0]
    try:
        yield {"prefix": prefix, **json.loads(ferry("lab", "status", "--lab", prefix,
                                                   "--json").stdout)}
    finally:
        ferry("lab", "down", "--lab", prefix, check=False)
        destroy_leftovers(prefix)


def test_operator_session(lab: dict[str, Any]) -> None:
    prefix = lab["prefix"]
    assert [c["name"] for c in lab["chassis"]] == ["chassis-1", "chassis-2"]
    assert all(c["controller_alive"] for c in lab["chassis"])
    api = lab["services"]["api"]["url"]
    with httpx.Client(base_url=f"{api}/v2.0", timeout=10) as http:
        net = http.post("/networks", json={"network": {"name": "n"}}).json()["network"]
        http.post("/subnets", json={"subnet": {"network_id": net["id"], "ip_version": 4,
                                               "cidr": "10.50.0.0/24"}}).raise_for_status()
        ports = [http.post("/ports", json={"port": {"network_id": net["id"]}}).json()["port"]
                 for _ in range(2)]
    for i, port in enumerate(ports, 1):
        ferry("lab", "vm", "create", f"v{i}", "--port", port["id"], "--chassis",
              f"chassis-{i}", "--lab", prefix)
    dst = ports[1]["fixed_ips"][0]["ip_address"]
    r = ferry("lab", "vm", "exec", "v1", "--lab", prefix, "--", "ping", "-c", "2", "-W", "2",
              dst)
    assert " 0% packet loss" in r.stdout, r.stdout
    # A failing command's exit status comes back as it is.
    assert ferry("lab", "vm", "exec", "v1", "--lab", prefix, "--", "false",
                 check=False).returncode == 1
    r = ferry("lab", "migrate", "v2", "--to", "chassis-1", "--pause-ms", "20", "--lab", prefix)
    assert "chassis-2 → chassis-1" in r.stdout
    r = ferry("lab", "vm", "exec", "v1", "--lab", prefix, "--", "ping", "-c", "2", "-W", "2",
              dst)
    assert " 0% packet loss" in r.stdout, r.stdout
    listed = ferry("migration", "list", "--api", api).stdout
    assert "done" in listed and "chassis-1" in listed
    shown = ferry("migration", "show", ports[1]["id"], "--api", api).stdout
    for step in ("plugged", "activated", "source_unplugged", "bound"):
        assert step in shown, shown
    words = " ".join(shown.split())  # the title wraps at the pipe's 80 columns
    assert "live mode" in words and "activated by the VM's first frame" in words, shown
    status = json.loads(ferry("lab", "status", "--lab", prefix, "--json").stdout)
    assert {v["name"]: v["chassis"] for v in status["vms"]} == {"v1": "chassis-1",
                                                                "v2": "chassis-1"}
    ferry("lab", "vm", "delete", "v1", "--lab", prefix)
    ferry("lab", "down", "--lab", prefix)
    assert leftovers(prefix) == []


def test_bad_input_is_named(lab: dict[str, Any]) -> None:
    prefix = lab["prefix"]
    r = ferry("lab", "vm", "create", "v9", "--port", "no-such-port", "--chassis", "chassis-1",
              "--lab", prefix, check=False)
    assert r.returncode == 2 and "no-such-port" in r.stdout + r.stderr
    r = ferry("lab", "migrate", "nope", "--to", "chassis-2", "--lab", prefix, check=False)
    assert r.returncode == 2 and "nope" in r.stdout + r.stderr
    r = ferry("lab", "migrate", "v2", "--to", "chassis-2", "--binding-activation", "soon",
              "--lab", prefix, check=False)
    assert r.returncode == 2 and "'soon'" in r.stdout + r.stderr
    r = ferry("lab", "status", "--lab", "zz99", check=False)
    assert r.returncode == 2 and "zz99" in r.stdout + r.stderr
    r = ferry("controller", "--chassis", "x", "--store", "bogus://", "--ovsdb", "unix:/x",
              "--tunnel-ip", "10.0.0.1", check=False)
    assert r.returncode == 2 and "bogus://" in r.stdout + r.stderr
