"""After a swap's drain: unload what no deployment routes to; pipelines follow the champion."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from psycopg import AsyncConnection

from gateway.catalog import swaps
from gateway.catalog.swaps import Row
from gateway.lifecycle.errors import LifecycleError
from gateway.lifecycle.materialize import serve_versions
from gateway.lifecycle.swap import SwapSite
from gateway.repository.layout import Serving, own_pipeline, pinned_name
from gateway.repository.render import remove_pinned_pipeline, write_pipelines

log = logging.getLogger(__name__)


def _champion(model: str, rows: list[Row], serving: Serving) -> int:
    """The version the unversioned pipeline serves: the one routed through it, else the
    production arm, else the current champion."""
    on_base = next((r for r in rows if r.endpoint == own_pipeline(model).ensemble), None)
    if on_base is not None:
        return int(on_base.version)
    main = swaps.prod(rows)
    return int(main.version) if main is not None else serving.champion


async def _unload_pinned(site: SwapSite, model: str, versions: list[int]) -> None:
    pipe = own_pipeline(model)
    for version in versions:
        for name in (pinned_name(pipe.ensemble, version), pinned_name(pipe.postprocess, version)):
            with contextlib.suppress(LifecycleError):
                await site.triton.unload(name)
                await site.triton.wait_unloaded(name, 1, timeout_s=60)
        remove_pinned_pipeline(site.repository, model, version)


async def retire(site: SwapSite, model: str, conn: AsyncConnection) -> None:
    """Unload what no active deployment routes to; unversioned pipelines follow the champion."""
    rows = await swaps.active_rows(conn, model)
    serving = Serving.load(site.repository, model)
    pipe = own_pipeline(model)
    champion = _champion(model, rows, serving)
    routed = {int(r.version) for r in rows if r.version.isdigit()}
    pinned_keep = {
        v for v in serving.pinned if any(r.endpoint == pinned_name(pipe.ensemble, v) for r in rows)
    }
    keep = sorted(routed | {champion})
    if champion != serving.champion:
        Serving(champion, serving.versions, serving.pinned).save(site.repository, model)
        names = await asyncio.to_thread(
            write_pipelines, site.repository, site.settings, None, model
        )
        for name in names:
            await site.triton.load(name)
    await _unload_pinned(site, model, sorted(set(serving.pinned) - pinned_keep))
    dropped = sorted(set(serving.versions) - set(keep))
    if dropped:
        await asyncio.to_thread(
            serve_versions, site.repository, model, keep, site.settings, site.target
        )
        await site.triton.load_versions(model, keep)
        for version in dropped:
            await site.triton.wait_unloaded(model, version, timeout_s=60)
    Serving(champion, tuple(keep), tuple(sorted(pinned_keep))).save(site.repository, model)
    if dropped or champion != serving.champion:
        site.metrics.changes.labels(model, "retired").inc()
        detail = {"unloaded": dropped, "champion": champion, "previous_champion": serving.champion}
        await swaps.record(conn, model, "retired", detail)
        log.info("%s: unloaded versions %s; champion %d", model, dropped, champion)
