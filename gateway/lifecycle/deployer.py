"""The one swap procedure every trigger runs (admin API, CLI, MLflow webhook and reconcile,
dropped version directories).

For version N of scoring model M (served by pipeline ``M_pipeline``):

1. **materialize** - validate the candidate and place it as ``model_repository/M/N/``
   atomically (or validate a directory already there);
2. **load** - reload M serving ``[old..., N]`` and load the pipeline pinned to N
   (``M_postprocess__vN`` with N's threshold, ``M_pipeline__vN``);
3. **smoke** - golden examples through M version N, a few rows through ``M_pipeline__vN``;
4. **catalog** - one transaction: N's deployment row takes the traffic (all of it, a canary
   share, or none as a shadow); the gateways switch on NOTIFY;
5. **drain** - in the background, ``drain_s`` later, versions no deployment routes to are
   unloaded and the unversioned pipelines follow the new champion.

A failure in steps 1-4 undoes what was loaded, leaves the catalog and ``serving.json`` as they
were, and records a ``deploy_failed`` history row, a log line and a metric. One Postgres
advisory lock per model serialises every change across processes; it is held until the drain
is over, so the next change of that model starts from a settled state.
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
from gateway.catalog.swaps import HistoryEntry, Row
from gateway.lifecycle.artifacts import (
    ARTIFACT_FILES,
    ArtifactReport,
    copy_artifacts,
    validate_version_dir,
)
from gateway.lifecycle.errors import (
    ArtifactInvalid,
    CatalogUpdateFailed,
    LifecycleError,
    NothingToDo,
    UnknownModel,
)
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
from gateway.repository.render import remove_pinned_pipeline, write_pinned_pipeline, write_pipelines
from gateway.settings import Settings, Target

__all__ = ["DeployRequest", "Deployer", "HistoryEntry", "Mode", "Outcome"]

log = logging.getLogger(__name__)

Mode = Literal["promote", "canary", "shadow"]
#: first key of the per-model advisory lock (the second is hashtext(model))
LOCK_CLASS = 0x5254


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


class Deployer:
    """Runs swaps, promotions, canaries and rollbacks of the managed models."""

    def __init__(
        self,
        settings: Settings,
        *,
        pool: AsyncConnectionPool,
        triton: TritonRepository,
        metrics: LifecycleMetrics | None = None,
    ) -> None:
        self.settings = settings
        self.lc = settings.lifecycle
        self.managed_models = tuple(self.lc.managed_models)
        self.repository = settings.triton.model_repository.resolve()
        self.target = settings.triton.target
        self._pool = pool
        self._triton = triton
        self.metrics = metrics if metrics is not None else LifecycleMetrics()
        self._background: set[asyncio.Task[None]] = set()

    @property
    def pool(self) -> AsyncConnectionPool:
        """The catalog pool the deployer uses (for stores that share its database)."""
        return self._pool

    # ------------------------------------------------------------------ public actions

    async def deploy(self, req: DeployRequest) -> Outcome:
        """Swap ``req.version`` in (promote), beside the champion (canary) or as a shadow."""
        self._check_model(req.model)
        if req.version < 1:
            raise ArtifactInvalid(f"{req.model}: version must be >= 1, got {req.version}")
        pct = self._pct(req)
        conn = await self._lock(req.model)
        handed_off = False
        try:
            rows = await swaps.active_rows(conn, req.model)
            if _serves_as(rows, req.version, req.mode, pct):
                return Outcome(req.model, req.version, "unchanged", None, None, None)
            main = swaps.prod(rows)
            if req.mode != "promote" and main is not None and main.version == str(req.version):
                raise NothingToDo(
                    f"{req.model} version {req.version} already serves production traffic; "
                    f"a {req.mode} needs another version"
                )
            outcome = await self._swap(conn, req, rows, pct)
            self._drain_later(req.model, conn)
            handed_off = True
            return outcome
        finally:
            if not handed_off:
                await self._unlock(req.model, conn)

    async def promote(
        self, model: str, version: int | None = None, *, trigger: str, actor: str | None = None
    ) -> Outcome:
        """``version`` (default: the active canary) takes all traffic."""
        self._check_model(model)
        if version is None:
            async with self._pool.connection() as conn:
                rows = await swaps.active_rows(conn, model)
            main = swaps.prod(rows)
            trials = [r for r in swaps.arms(rows) if main is None or r is not main]
            if not trials:
                raise NothingToDo(f"{model} has no canary to promote; name a version")
            version = int(max(trials, key=lambda r: r.deployment_id).version)
        return await self.deploy(
            DeployRequest(model, version, "promote", trigger=trigger, actor=actor)
        )

    async def canary(
        self,
        model: str,
        version: int,
        traffic_pct: float,
        *,
        trigger: str,
        actor: str | None = None,
    ) -> Outcome:
        return await self.deploy(
            DeployRequest(
                model, version, "canary", traffic_pct=traffic_pct, trigger=trigger, actor=actor
            )
        )

    async def rollback(self, model: str, *, trigger: str, actor: str | None = None) -> Outcome:
        """End an active canary or shadow; without one, return to the previous champion."""
        self._check_model(model)
        conn = await self._lock(model)
        target: int | None = None
        current: Row | None = None
        try:
            rows = await swaps.active_rows(conn, model)
            current = swaps.prod(rows)
            if current is not None and len(rows) > 1:
                retired = await swaps.end_trials(
                    conn, model, {"trigger": trigger, "actor": actor, "version": current.version}
                )
                self.metrics.changes.labels(model, "rolled_back").inc()
                log.info("%s: ended %s, %s serves alone", model, retired, current.version)
                self._drain_later(model, conn)
                conn = None
                return Outcome(
                    model,
                    int(current.version),
                    "rolled_back",
                    current.deployment_id,
                    ",".join(r.version for r in retired),
                    time.time() + self.lc.drain_s,
                )
            if current is None:
                raise NothingToDo(f"{model} has no deployment serving traffic")
            previous = await swaps.previous_champion(conn, model, current.version)
            if previous is None:
                raise NothingToDo(
                    f"{model} version {current.version} has no earlier version to roll back to"
                )
            target = int(previous)
        finally:
            if conn is not None:
                await self._unlock(model, conn)
        if not version_dir(self.repository, model, target).is_dir():
            raise NothingToDo(f"{model} version {target} is no longer in the model repository")
        outcome = await self.deploy(
            DeployRequest(
                model,
                target,
                "promote",
                trigger=trigger,
                actor=actor,
                detail={"rollback_from": current.version},
            )
        )
        return Outcome(
            outcome.model,
            outcome.version,
            "rolled_back",
            outcome.deployment_id,
            current.version,
            outcome.drain_until,
            outcome.timings_ms,
        )

    async def history(self, model: str, limit: int = 20) -> list[HistoryEntry]:
        async with self._pool.connection() as conn:
            return await swaps.history(conn, model, limit)

    async def attempted(self, model: str, version: int) -> bool:
        async with self._pool.connection() as conn:
            return await swaps.attempted(conn, model, version)

    async def wait_settled(self, timeout_s: float | None = None) -> None:
        """Wait for the drains and unloads this deployer started."""
        tasks = set(self._background)
        if tasks:
            await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), timeout_s)

    async def close(self) -> None:
        """Cancel pending drains: their locks are released; versions stay loaded until the
        next change of the model retires them."""
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)

    # ------------------------------------------------------------------ the procedure

    async def _swap(
        self, conn: AsyncConnection, req: DeployRequest, rows: list[Row], pct: float
    ) -> Outcome:
        model, version = req.model, req.version
        base = {
            "version": version,
            "mode": req.mode,
            "trigger": req.trigger,
            "actor": req.actor,
            **dict(req.detail),
        }
        serving = Serving.load(self.repository, model)
        final = version_dir(self.repository, model, version)
        if req.source is None and version not in serving.pinned and not final.is_dir():
            # nothing to deploy yet: not an attempt, so a directory dropped later still counts
            error = ArtifactInvalid(f"{model} version {version}: no directory {final}")
            await self._record_failure(conn, model, "materialize", error, base)
            raise error
        await swaps.record(conn, model, "deploy_started", base)
        config_file = self.repository / model / "config.pbtxt"
        saved_config = config_file.read_bytes()
        main = swaps.prod(rows)
        previous = main.version if main is not None else None
        timings: dict[str, float] = {}
        created = loaded_scorer = False
        pinned_loaded: list[str] = []
        step = "materialize"
        try:
            started = time.perf_counter()
            ready = version in serving.pinned
            if not ready:
                report, created = await self._materialize(req, serving)
                timings[step] = self._timed(step, started)

                step, started = "load", time.perf_counter()
                versions = sorted({*serving.versions, version})
                await asyncio.to_thread(
                    serve_versions, self.repository, model, versions, self.settings, self.target
                )
                loaded_scorer = True
                await self._triton.load_versions(model, versions)
                names = await asyncio.to_thread(
                    write_pinned_pipeline, self.repository, model, version, self.settings
                )
                for name in names:
                    pinned_loaded.append(name)
                    await self._triton.load(name)
                timings[step] = self._timed(step, started)

                step, started = "smoke", time.perf_counter()
                await smoke_test(
                    self._triton,
                    model,
                    version,
                    report.metadata,
                    p50_bound_ms=self.lc.smoke_p50_bound_ms,
                )
                await smoke_pipeline(self._triton, names[-1], report.metadata.class_names)
                timings[step] = self._timed(step, started)
                serving = Serving(
                    serving.champion,
                    tuple(versions),
                    tuple(sorted({*serving.pinned, version})),
                )
                serving.save(self.repository, model)

            step, started = "catalog", time.perf_counter()
            endpoint = pinned_name(own_pipeline(model).ensemble, version)
            fallback = class_prior_fallback(self.repository, endpoint, self.settings)
            detail = {
                **base,
                "previous_version": previous,
                "endpoint": endpoint,
                "timings_ms": dict(timings),
            }
            try:
                if req.mode == "promote":
                    action = "rolled_back" if "rollback_from" in req.detail else "promoted"
                    dep_id = await swaps.switch_to(
                        conn, model, version, endpoint, action, detail, fallback
                    )
                elif req.mode == "canary":
                    action = "canary"
                    dep_id = await swaps.start_canary(
                        conn,
                        model,
                        version,
                        endpoint,
                        pct,
                        {**detail, "traffic_pct": pct},
                        fallback,
                    )
                else:
                    action = "shadow"
                    dep_id = await swaps.start_shadow(
                        conn,
                        model,
                        version,
                        endpoint,
                        pct,
                        {**detail, "sample_pct": pct},
                        fallback,
                    )
            except Exception as exc:  # any database error: nothing was switched
                raise CatalogUpdateFailed(
                    f"{model} version {version}: catalog update failed: {exc}"
                ) from exc
            timings[step] = self._timed(step, started)
        except Exception as exc:
            error = (
                exc
                if isinstance(exc, LifecycleError)
                else LifecycleError(
                    f"{model} version {version}: {step} failed: {type(exc).__name__}: {exc}"
                )
            )
            await self._undo(
                model, version, req, saved_config, created, loaded_scorer, pinned_loaded
            )
            await self._record_failure(conn, model, step, error, base)
            raise error from exc
        self.metrics.changes.labels(model, action).inc()
        log.info(
            "%s version %d %s (was %s) by %s in %s",
            model, version, action, previous, req.trigger, timings,
        )  # fmt: skip
        return Outcome(
            model,
            version,
            action,
            dep_id,
            previous,
            time.time() + self.lc.drain_s,
            timings,
        )

    async def _materialize(
        self, req: DeployRequest, serving: Serving
    ) -> tuple[ArtifactReport, bool]:
        """Validate and place the candidate; returns (report, whether this call created it)."""
        model, version = req.model, req.version
        reference = serving.champion if serving.champion != version else None
        final = version_dir(self.repository, model, version)
        if req.source is not None and not (final.exists() and _same_files(req.source, final)):
            report = await asyncio.to_thread(
                materialize_version,
                req.source,
                self.repository,
                model,
                version,
                self.target,
                reference,
            )
            return report, True
        if not final.is_dir():
            raise ArtifactInvalid(f"{model} version {version}: no directory {final}")
        ref_dir = version_dir(self.repository, model, reference) if reference else None
        report = await asyncio.to_thread(_validate_in_place, final, model, ref_dir, self.target)
        return report, False

    async def _undo(
        self,
        model: str,
        version: int,
        req: DeployRequest,
        saved_config: bytes,
        created: bool,
        loaded_scorer: bool,
        pinned_loaded: list[str],
    ) -> None:
        """Put Triton and the repository back as they were before a failed swap."""
        serving = Serving.load(self.repository, model)
        for name in reversed(pinned_loaded):
            with contextlib.suppress(LifecycleError):
                await self._triton.unload(name)
        remove_pinned_pipeline(self.repository, model, version)
        if not loaded_scorer:
            if created:
                remove_version(self.repository, model, version)
            return
        (self.repository / model / "config.pbtxt").write_bytes(saved_config)
        try:
            state = (await self._triton.versions(model)).get(version)
            failed = state is not None and state.state != READY and state.reason != "unloaded"
            if failed:
                await self._heal(model, version, serving, req.source is None)
            await self._triton.load_versions(model, serving.versions)
            await self._triton.wait_unloaded(model, version, timeout_s=30)
        except LifecycleError as exc:  # Triton still serves the old versions (loads are atomic)
            log.error(
                "%s: could not unload version %d after a failed swap: %s",
                model,
                version,
                exc.message,
            )
        if created:
            remove_version(self.repository, model, version)

    async def _heal(self, model: str, version: int, serving: Serving, dropped: bool) -> None:
        """Clear the load error Triton keeps for ``version``.

        With ``--strict-readiness`` a version that failed to load keeps the server not ready
        until that version number loads successfully. Load a good copy (the champion's files)
        under the number, then drop it with the caller's reload. A dropped directory is moved
        aside to ``.failed-<N>-<time>`` first, for inspection.
        """
        final = version_dir(self.repository, model, version)
        if dropped and final.exists():
            aside = final.parent / f".failed-{version}-{int(time.time())}"
            final.rename(aside)
            log.warning("%s: failed version directory moved to %s", model, aside)
        elif final.exists():
            remove_version(self.repository, model, version)
        good = copy_artifacts(version_dir(self.repository, model, serving.champion), final)
        place_scorer_shell(good, self.target)
        try:
            await self._triton.load_versions(model, [*serving.versions, version])
        finally:
            await self._triton.load_versions(model, serving.versions)
            shutil.rmtree(final, ignore_errors=True)

    async def _record_failure(
        self,
        conn: AsyncConnection,
        model: str,
        step: str,
        error: LifecycleError,
        base: Mapping[str, Any],
    ) -> None:
        self.metrics.failures.labels(model, step).inc()
        log.error(
            "%s version %s: swap failed at %s: %s", model, base["version"], step, error.message
        )
        detail = {**base, "step": step, "error": error.message, "code": error.code}
        try:
            await swaps.record(conn, model, "deploy_failed", detail)
        except Exception:  # the catalog may be what failed; a fresh connection may work
            try:
                async with self._pool.connection() as fresh:
                    await swaps.record(fresh, model, "deploy_failed", detail)
            except Exception as exc:
                log.error("%s: could not record the failure in the history: %s", model, exc)

    # ------------------------------------------------------------------ drain and retire

    def _drain_later(self, model: str, conn: AsyncConnection) -> None:
        task = asyncio.create_task(self._drain(model, conn), name=f"drain-{model}")
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _drain(self, model: str, conn: AsyncConnection) -> None:
        try:
            await asyncio.sleep(self.lc.drain_s)
            started = time.perf_counter()
            await self._retire(model, conn)
            self._timed("retire", started)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("%s: retiring replaced versions failed; the next change retries", model)
        finally:
            await self._unlock(model, conn)

    async def _retire(self, model: str, conn: AsyncConnection) -> None:
        """Unload what no active deployment routes to; unversioned pipelines follow the champion."""
        rows = await swaps.active_rows(conn, model)
        serving = Serving.load(self.repository, model)
        pipe = own_pipeline(model)
        main = swaps.prod(rows)
        on_base = next((r for r in rows if r.endpoint == pipe.ensemble), None)
        if on_base is not None:
            champion = int(on_base.version)
        elif main is not None:
            champion = int(main.version)
        else:
            champion = serving.champion
        routed = {int(r.version) for r in rows if r.version.isdigit()}
        pinned_keep = {
            v
            for v in serving.pinned
            if any(r.endpoint == pinned_name(pipe.ensemble, v) for r in rows)
        }
        keep = sorted(routed | {champion})
        if champion != serving.champion:
            Serving(champion, serving.versions, serving.pinned).save(self.repository, model)
            names = await asyncio.to_thread(
                write_pipelines, self.repository, self.settings, None, model
            )
            for name in names:
                await self._triton.load(name)
        for version in sorted(set(serving.pinned) - pinned_keep):
            for name in (
                pinned_name(pipe.ensemble, version),
                pinned_name(pipe.postprocess, version),
            ):
                with contextlib.suppress(LifecycleError):
                    await self._triton.unload(name)
                    await self._triton.wait_unloaded(name, 1, timeout_s=60)
            remove_pinned_pipeline(self.repository, model, version)
        dropped = sorted(set(serving.versions) - set(keep))
        if dropped:
            await asyncio.to_thread(
                serve_versions, self.repository, model, keep, self.settings, self.target
            )
            await self._triton.load_versions(model, keep)
            for version in dropped:
                await self._triton.wait_unloaded(model, version, timeout_s=60)
        Serving(champion, tuple(keep), tuple(sorted(pinned_keep))).save(self.repository, model)
        if dropped or champion != serving.champion:
            self.metrics.changes.labels(model, "retired").inc()
            await swaps.record(
                conn,
                model,
                "retired",
                {"unloaded": dropped, "champion": champion, "previous_champion": serving.champion},
            )
            log.info("%s: unloaded versions %s; champion %d", model, dropped, champion)

    # ------------------------------------------------------------------ helpers

    def _check_model(self, model: str) -> None:
        if model not in self.managed_models:
            raise UnknownModel(
                f"model {model!r} is not managed by the lifecycle; managed: "
                f"{list(self.managed_models)}"
            )

    def _pct(self, req: DeployRequest) -> float:
        if req.mode == "promote":
            return 100.0
        default = self.lc.canary_pct if req.mode == "canary" else 100.0
        pct = req.traffic_pct if req.traffic_pct is not None else default
        upper_ok = pct < 100 if req.mode == "canary" else pct <= 100
        if not (pct > 0 and upper_ok):
            bound = "0 < traffic_pct < 100" if req.mode == "canary" else "0 < sample_pct <= 100"
            raise ArtifactInvalid(f"{req.model}: {req.mode} needs {bound}, got {pct:g}")
        return float(pct)

    def _timed(self, step: str, started: float) -> float:
        elapsed = time.perf_counter() - started
        self.metrics.step_seconds.labels(step).observe(elapsed)
        return round(elapsed * 1e3, 1)

    async def _lock(self, model: str) -> AsyncConnection:
        conn = await self._pool.getconn()
        try:
            await conn.execute("SELECT pg_advisory_lock(%s, hashtext(%s))", (LOCK_CLASS, model))
        except BaseException:
            await self._pool.putconn(conn)
            raise
        return conn

    async def _unlock(self, model: str, conn: AsyncConnection) -> None:
        try:
            await conn.execute("SELECT pg_advisory_unlock(%s, hashtext(%s))", (LOCK_CLASS, model))
        except Exception as exc:  # a broken connection releases its locks when it closes
            log.warning("%s: releasing the lifecycle lock failed: %s", model, exc)
        finally:
            await self._pool.putconn(conn)


def _serves_as(rows: list[Row], version: int, mode: Mode, pct: float) -> bool:
    """Whether ``version`` already serves in the role ``mode`` asks for."""
    mine = [r for r in rows if r.version == str(version)]
    if mode == "shadow":
        return any(r.is_shadow for r in mine)
    arms = [r for r in mine if not r.is_shadow]
    if mode == "promote":
        return any(r.traffic_pct >= 100 for r in arms) and len(swaps.arms(rows)) == 1
    return any(abs(r.traffic_pct - pct) < 1e-6 for r in arms)


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
