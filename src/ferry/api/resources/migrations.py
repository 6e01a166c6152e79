"""/v2.0/ferry/migrations: Ferry's own, read-only view of live migrations and their timeline.

A migration is recorded by the chassis controllers (the destination claims the port, the
source reports its VIF gone, the destination completes it; in live mode the destination also
reports the activation its datapath did); its id is the port's id. The
timeline holds wall-clock seconds of each step and of each chassis' flows being acked.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from ferry.api.resources.common import NB, Ctx, load
from ferry.model.objects import Migration

router = APIRouter(tags=["ferry-migrations"])


def render(m: Migration) -> dict[str, Any]:
    return {"id": m.id, "port_id": m.port_id, "project_id": m.topic,
            "source_chassis": m.source_chassis, "dest_chassis": m.dest_chassis,
            "status": m.status.value, "mode": m.mode.value, "fallback": m.fallback.value,
            "activated": m.activated,
            "timestamps": dict(sorted(m.timestamps.items(), key=lambda kv: kv[1])),
            "revision_number": m.version}


@router.get("/v2.0/ferry/migrations")
async def list_migrations(nb: NB, ctx: Ctx) -> dict[str, Any]:
    items = [m for m in await nb.list(Migration) if ctx.owns(m.topic)]
    return {"migrations": [render(m) for m in items]}


@router.get("/v2.0/ferry/migrations/{port_id}")
async def show_migration(port_id: str, nb: NB, ctx: Ctx) -> dict[str, Any]:
    return {"migration": render(await load(nb, Migration, port_id, ctx))}
