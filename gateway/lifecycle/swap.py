"""One attempt of the swap procedure (docs/lifecycle.md): materialize, load, smoke, catalog.

:class:`SwapAttempt` runs the steps in order for one :class:`DeployRequest`, under the model's
advisory lock that :class:`gateway.lifecycle.deployer.Deployer` holds. A failure in any step
puts Triton and the repository back as they were (:meth:`SwapAttempt.undo`), leaves the catalog
and ``serving.json`` unchanged and records a ``deploy_failed`` history row.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import filecmp
import logging
import shutil
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from gateway.catalog import swaps
from gateway.catalog.swaps import Row
from gateway.lifecycle.artifacts import (
    ARTIFACT_FILES,
    ArtifactReport,
    copy_artifacts,
    validate_version_dir,
)
from gateway.lifecycle.errors import ArtifactInvalid, CatalogUpdateFailed, LifecycleError
from gateway.lifecycle.materialize import (
    materialize_version,
    remove_version,
    serve_versions,
    version_dir,
)
from gateway.lifecycle.metrics import LifecycleMetrics
from gateway.lifecycle.smoke import smoke_pipeline, smoke_test
from gateway.lifecycle.triton_repo import READY, TritonRepository
from gateway.repository.configs import class_prior_fallback
from gateway.repository.layout import (
    SHELLS_DIR,
    Serving,
    own_pipeline,
    pinned_name,
    place_scorer_shell,
)
from gateway.repository.render import remove_pinned_pipeline, write_pinned_pipeline
from gateway.settings import Settings, Target

log = logging.getLogger(__name__)

Mode = Literal["promote", "canary", "shadow"]


@dataclass(frozen=True)
class DeployRequest:
    model: str
    version: int
    mode: Mode = "promote"
    #: candidate directory to materialize; None: the version directory already in the repository
    source: Path | None = None
    #: canary share (default settings.lifecycle.canary_pct) or shadow sample pct (default 100)
    traffic_pct: float | None = None
    trigger: str = "api"
    actor: str | None = None
    detail: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Outcome:
    model: str
    version: int
    #: promoted | canary | shadow | rolled_back | unchanged
    action: str
    deployment_id: int | None
    previous_version: str | None
    #: unix time after which replaced versions are unloaded
    drain_until: float | None
    timings_ms: Mapping[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "version": self.version,
            "action": self.action,
            "deployment_id": self.deployment_id,
            "previous_version": self.previous_version,
            "drain_until": self.drain_until,
            "timings_ms": dict(self.timings_ms),
        }


@dataclass(frozen=True)
class SwapSite:
    """Where swaps happen: the repository on disk, Triton, the catalog pool, the metrics."""

    settings: Settings
    repository: Path
    target: Target
    triton: TritonRepository
    pool: AsyncConnectionPool
    metrics: LifecycleMetrics

    def timed(self, step: str, started: float) -> float:
        """Observe a step's duration; returns it in milliseconds (for the history row)."""
        elapsed = time.perf_counter() - started
        self.metrics.step_seconds.labels(step).observe(elapsed)
        return round(elapsed * 1e3, 1)


class SwapAttempt:
    """One swap of ``req.version`` into the role ``req.mode`` at ``pct``."""

    def __init__(
        self, site: SwapSite, conn: AsyncConnection, req: DeployRequest, rows: list[Row], pct: float
    ) -> None:
        self.site, self.conn, self.req, self.pct = site, conn, req, pct
        self.base = {
            "version": req.version,
            "mode": req.mode,
            "trigger": req.trigger,
            "actor": req.actor,
            **dict(req.detail),
        }
        main = swaps.prod(rows)
        self.previous = main.version if main is not None else None
        self.timings: dict[str, float] = {}
        self.step = "materialize"
        # what undo must take back
        self.created = self.loaded_scorer = False
        self.pinned_loaded: list[str] = []
        self.saved_config = b""

    @property
    def _config_file(self) -> Path:
        return self.site.repository / self.req.model / "config.pbtxt"

    async def run(self) -> Outcome:
        req, site = self.req, self.site
        serving = Serving.load(site.repository, req.model)
        await self._check_present(serving)
        await swaps.record(self.conn, req.model, "deploy_started", self.base)
        self.saved_config = self._config_file.read_bytes()
        try:
            if req.version not in serving.pinned:
                await self._prepare_version(serving)
            self.step = "catalog"
            action, dep_id = await self._switch_catalog()
        except Exception as exc:
            error = exc if isinstance(exc, LifecycleError) else self._step_error(exc)
            await self.undo()
            await record_failure(site, self.conn, req.model, self.step, error, self.base)
            raise error from exc
        site.metrics.changes.labels(req.model, action).inc()
        log.info(
            "%s version %d %s (was %s) by %s in %s",
            req.model, req.version, action, self.previous, req.trigger, self.timings,
        )  # fmt: skip
        drain_until = time.time() + site.settings.lifecycle.drain_s
        return Outcome(
            req.model, req.version, action, dep_id, self.previous, drain_until, self.timings
        )

    def _step_error(self, exc: Exception) -> LifecycleError:
        return LifecycleError(
            f"{self.req.model} version {self.req.version}: {self.step} failed: "
            f"{type(exc).__name__}: {exc}"
        )

    async def _check_present(self, serving: Serving) -> None:
        """Nothing to deploy yet is not an attempt: a directory dropped later still counts."""
        req = self.req
        final = version_dir(self.site.repository, req.model, req.version)
        if req.source is None and req.version not in serving.pinned and not final.is_dir():
            error = ArtifactInvalid(f"{req.model} version {req.version}: no directory {final}")
            await record_failure(self.site, self.conn, req.model, "materialize", error, self.base)
            raise error

    async def _prepare_version(self, serving: Serving) -> None:
        """Steps materialize, load and smoke; the version is then pinned in ``serving.json``."""
        req, site = self.req, self.site
        started = time.perf_counter()
        report, self.created = await materialize_candidate(site, req, serving)
        self.timings["materialize"] = site.timed("materialize", started)
        self.step, started = "load", time.perf_counter()
        versions = sorted({*serving.versions, req.version})
        names = await self._load(versions)
        self.timings["load"] = site.timed("load", started)
        self.step, started = "smoke", time.perf_counter()
        p50_bound_ms = site.settings.lifecycle.smoke_p50_bound_ms
        await smoke_test(
            site.triton, req.model, req.version, report.metadata, p50_bound_ms=p50_bound_ms
        )
        await smoke_pipeline(site.triton, names[-1], report.metadata.class_names)
        self.timings["smoke"] = site.timed("smoke", started)
        pinned = tuple(sorted({*serving.pinned, req.version}))
        Serving(serving.champion, tuple(versions), pinned).save(site.repository, req.model)

    async def _load(self, versions: list[int]) -> list[str]:
        """Serve ``versions`` of the scorer and load the pipeline pinned to the new one."""
        req, site = self.req, self.site
        await asyncio.to_thread(
            serve_versions, site.repository, req.model, versions, site.settings, site.target
        )
        self.loaded_scorer = True
        await site.triton.load_versions(req.model, versions)
        names = await asyncio.to_thread(
            write_pinned_pipeline, site.repository, req.model, req.version, site.settings
        )
        for name in names:
            self.pinned_loaded.append(name)
            await site.triton.load(name)
        return names

    async def _switch_catalog(self) -> tuple[str, int]:
        """Step catalog: the version's deployment row takes its traffic, in one transaction."""
        req, site = self.req, self.site
        started = time.perf_counter()
        endpoint = pinned_name(own_pipeline(req.model).ensemble, req.version)
        fallback = class_prior_fallback(site.repository, endpoint, site.settings)
        detail = {
            **self.base,
            "previous_version": self.previous,
            "endpoint": endpoint,
            "timings_ms": dict(self.timings),
        }
        args = (self.conn, req.model, req.version, endpoint)
        try:
            if req.mode == "promote":
                action = "rolled_back" if "rollback_from" in req.detail else "promoted"
                dep_id = await swaps.switch_to(*args, action, detail, fallback)
            elif req.mode == "canary":
                action = "canary"
                canary_detail = {**detail, "traffic_pct": self.pct}
                dep_id = await swaps.start_canary(*args, self.pct, canary_detail, fallback)
            else:
                action = "shadow"
                shadow_detail = {**detail, "sample_pct": self.pct}
                dep_id = await swaps.start_shadow(*args, self.pct, shadow_detail, fallback)
        except Exception as exc:  # any database error: nothing was switched
            raise CatalogUpdateFailed(
                f"{req.model} version {req.version}: catalog update failed: {exc}"
            ) from exc
        self.timings["catalog"] = site.timed("catalog", started)
        return action, dep_id

    async def undo(self) -> None:
        """Put Triton and the repository back as they were before the failed swap."""
        req, site = self.req, self.site
        model, version = req.model, req.version
        serving = Serving.load(site.repository, model)
        for name in reversed(self.pinned_loaded):
            with contextlib.suppress(LifecycleError):
                await site.triton.unload(name)
        remove_pinned_pipeline(site.repository, model, version)
        if self.loaded_scorer:
            self._config_file.write_bytes(self.saved_config)
            await self._unload_candidate(serving)
        if self.created:
            remove_version(site.repository, model, version)

    async def _unload_candidate(self, serving: Serving) -> None:
        req, triton = self.req, self.site.triton
        try:
            state = (await triton.versions(req.model)).get(req.version)
            failed = state is not None and state.state != READY and state.reason != "unloaded"
            if failed:
                await heal_version(self.site, req.model, req.version, serving, req.source is None)
            await triton.load_versions(req.model, serving.versions)
            await triton.wait_unloaded(req.model, req.version, timeout_s=30)
        except LifecycleError as exc:  # Triton still serves the old versions (loads are atomic)
            log.error(
                "%s: could not unload version %d after a failed swap: %s",
                req.model,
                req.version,
                exc.message,
            )


async def heal_version(
    site: SwapSite, model: str, version: int, serving: Serving, dropped: bool
) -> None:
    """Clear the load error Triton keeps for ``version``.

    With ``--strict-readiness`` a version that failed to load keeps the server not ready
    until that version number loads successfully. Load a good copy (the champion's files)
    under the number, then drop it with the caller's reload. A dropped directory is moved
    aside to ``.failed-<N>-<time>`` first, for inspection.
    """
    final = version_dir(site.repository, model, version)
    if dropped and final.exists():
        aside = final.parent / f".failed-{version}-{int(time.time())}"
        final.rename(aside)
        log.warning("%s: failed version directory moved to %s", model, aside)
    elif final.exists():
        remove_version(site.repository, model, version)
    good = copy_artifacts(version_dir(site.repository, model, serving.champion), final)
    place_scorer_shell(good, site.target)
    try:
        await site.triton.load_versions(model, [*serving.versions, version])
    finally:
        await site.triton.load_versions(model, serving.versions)
        shutil.rmtree(final, ignore_errors=True)


async def record_failure(
    site: SwapSite,
    conn: AsyncConnection,
    model: str,
    step: str,
    error: LifecycleError,
    base: Mapping[str, Any],
) -> None:
    """Count, log and record (history row ``deploy_failed``) a failed swap."""
    site.metrics.failures.labels(model, step).inc()
    log.error("%s version %s: swap failed at %s: %s", model, base["version"], step, error.message)
    detail = {**base, "step": step, "error": error.message, "code": error.code}
    try:
        await swaps.record(conn, model, "deploy_failed", detail)
    except Exception:  # the catalog may be what failed; a fresh connection may work
        try:
            async with site.pool.connection() as fresh:
                await swaps.record(fresh, model, "deploy_failed", detail)
        except Exception as exc:
            log.error("%s: could not record the failure in the history: %s", model, exc)


async def materialize_candidate(
    site: SwapSite, req: DeployRequest, serving: Serving
) -> tuple[ArtifactReport, bool]:
    """Validate and place the candidate; returns (report, whether this call created it)."""
    model, version = req.model, req.version
    reference = serving.champion if serving.champion != version else None
    final = version_dir(site.repository, model, version)
    if req.source is not None and not (final.exists() and _same_files(req.source, final)):
        report = await asyncio.to_thread(
            materialize_version, req.source, site.repository, model, version, site.target, reference
        )
        return report, True
    if not final.is_dir():
        raise ArtifactInvalid(f"{model} version {version}: no directory {final}")
    ref_dir = version_dir(site.repository, model, reference) if reference else None
    report = await asyncio.to_thread(_validate_in_place, final, model, ref_dir, site.target)
    return report, False


def _same_files(source: Path, final: Path) -> bool:
    """Whether ``final`` holds exactly ``source``'s artifact files (a retried materialize)."""
    names = sorted(p.name for p in source.iterdir() if p.name in ARTIFACT_FILES)
    if not names:
        return False
    return all(
        (final / n).is_file() and filecmp.cmp(source / n, final / n, shallow=False) for n in names
    )


def _validate_in_place(
    final: Path, model: str, reference: Path | None, target: Target
) -> ArtifactReport:
    """Validate a version directory already in the repository, then place the shell.

    A directory rendering already prepared (its ``model.py`` is this project's shell, as for a
    version that served before) is validated through a copy of its data files; anything else,
    such as a directory dropped by hand, must hold data files only.
    """
    shell = final / "model.py"
    if shell.is_file() and filecmp.cmp(shell, SHELLS_DIR / "onnx_runner" / "model.py", False):
        with tempfile.TemporaryDirectory(prefix=f".check-{model}-", dir=final.parent) as tmp:
            copy = copy_artifacts(final, Path(tmp) / "v")
            report = validate_version_dir(copy, model, reference)
        report = dataclasses.replace(report, path=final)
    else:
        report = validate_version_dir(final, model, reference)
    place_scorer_shell(final, target)
    return report
