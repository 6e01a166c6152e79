"""A lab with its control plane up and a client of its API, as one ``async with``.

Everything the lab made (namespaces, links, processes by PID) is removed on the way out,
also when the body fails.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from ferry.lab.lab import Lab, LabError, destroy_leftovers
from ferry.lab.neutron import Neutron
from ferry.lab.services import start_control_plane


@asynccontextmanager
async def lab_session(chassis: int = 3, store: str = "memory", keep_logs_in: str | None = None
                      ) -> AsyncIterator[tuple[Lab, Neutron]]:
    """A new lab of ``chassis`` chassis, its store (memory or etcd), API and controllers.
    ``keep_logs_in``: a directory that gets a copy of the lab's directory (the daemons' and
    controllers' logs, no sockets or databases) before it is removed, for a post-mortem."""
    lab = await asyncio.to_thread(Lab.create, chassis)
    try:
        await asyncio.to_thread(start_control_plane, lab, store)
        api = lab.service("api")
        if api is None or api.url is None:
            raise LabError(f"lab {lab.prefix}: the control plane started without an API")
        async with Neutron(api.url) as client:
            yield lab, client
    finally:
        if keep_logs_in:
            await asyncio.to_thread(
                shutil.copytree, lab.state.lab_dir, f"{keep_logs_in}/{lab.prefix}",
                ignore=shutil.ignore_patterns("*.sock", "*.mgmt", "*.snoop", "*.ofp", "*.ctl",
                                              "conf.db*"), dirs_exist_ok=True)
        await asyncio.to_thread(lab.destroy)
        await asyncio.to_thread(destroy_leftovers, lab.prefix)
