"""Deploy version directories dropped into the model repository, once each is complete.

Every ``watch_interval_s`` the watcher lists ``<model_repository>/<model>/`` of each managed
model (Triton's own POLL mode is never used: Triton would load a half-copied directory). A
numeric directory is a *candidate* when its number is above every version the model serves
(``<model>/serving.json``, written by the deployer: ``{"champion": N, "versions": [...]}``).
Without that file - no deploy has run yet - the newest version directory present when the
watcher first listed the model is taken as served, so directories dropped while no watcher ran
and no deploy has written ``serving.json`` are not noticed. Lower numbers are retired versions
or rollback targets, never new drops. Names starting with ``.`` (materialize's
``.tmp-*`` directories) are ignored.

A candidate is *ready* once

* its fingerprint - the sorted relative names, sizes and ``mtime_ns`` of all its files - has
  not changed for ``watch_settle_s``, and
* its ``metadata.json`` parses and every artifact it declares exists.

A ready version is handed to :meth:`Deployer.deploy` (mode ``lifecycle.on_drop``, trigger
``watcher``, the fingerprint in the history detail) unless ``Deployer.attempted`` says a deploy
of that version already ran. The watcher acts once per fingerprint: a failed deploy is logged
and not retried (the deployer has recorded it, so ``attempted`` is true from then on). If the
directory's contents change afterwards, the new fingerprint is considered again when it has
settled, and deployed only if the deployer still reports the version as not attempted; to
retry a refused version, drop it under a new number.

:meth:`VersionWatcher.scan` is the synchronous core (file system only, no deployer call);
:meth:`VersionWatcher.tick` adds the deployer calls; :meth:`start` runs ticks periodically.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from gateway.lifecycle.deployer import Deployer, DeployRequest, Outcome
from gateway.lifecycle.errors import LifecycleError
from gateway.repository.layout import SERVING_FILE
from gateway.settings import Settings
from python_backend.feature_spec import METADATA_FILE, ModelMetadata

log = logging.getLogger(__name__)

TRIGGER = "watcher"


@dataclass(frozen=True)
class ReadyVersion:
    """A dropped version directory that is complete and not yet handed to the deployer."""

    model: str
    version: int
    path: Path
    fingerprint: str


@dataclass
class _Pending:
    fingerprint: str
    #: clock time the directory was first seen with this fingerprint
    since: float


class VersionWatcher:
    """Scans the model repository for new version directories and deploys each once."""

    def __init__(
        self,
        settings: Settings,
        deployer: Deployer,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.deployer = deployer
        self.clock = clock
        self.repository = settings.triton.model_repository
        self._pending: dict[tuple[str, int], _Pending] = {}
        #: fingerprint last handed to the deployer (or found attempted) per version
        self._handled: dict[tuple[str, int], str] = {}
        #: last "incomplete"/"unreadable" message logged per key, so each is logged once
        self._reported: dict[object, str] = {}
        #: per model: the newest version directory at the first scan (used without serving.json)
        self._baseline: dict[str, int] = {}
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    # -- synchronous core ------------------------------------------------------------------

    def scan(self, now: float) -> list[ReadyVersion]:
        """Candidates of every managed model that are ready at clock time ``now``."""
        ready: list[ReadyVersion] = []
        present: set[tuple[str, int]] = set()
        for model in self.settings.lifecycle.managed_models:
            model_dir = self.repository / model
            versions = _version_dirs(model_dir)
            self._baseline.setdefault(model, max(versions, default=0))
            served = self._served(model_dir, self._baseline[model])
            if served is None:
                continue
            floor = max(served, default=0)
            for version in sorted(v for v in versions if v > floor):
                key = (model, version)
                present.add(key)
                found = self._ready(key, model_dir / str(version), now)
                if found is not None:
                    ready.append(found)
        for key in set(self._pending) - present:
            del self._pending[key]
        for key in set(self._handled) - present:
            del self._handled[key]
        for key in [k for k in self._reported if isinstance(k, tuple) and k not in present]:
            del self._reported[key]
        return ready

    def _ready(self, key: tuple[str, int], path: Path, now: float) -> ReadyVersion | None:
        fp = fingerprint(path)
        if fp is None:  # vanished or changing while listed
            self._pending.pop(key, None)
            return None
        pending = self._pending.get(key)
        if pending is None or pending.fingerprint != fp:
            pending = self._pending[key] = _Pending(fp, now)
        if now - pending.since < self.settings.lifecycle.watch_settle_s:
            return None
        if self._handled.get(key) == fp:
            return None
        problem = incomplete(path)
        if problem is not None:
            self._report(key, f"{path} is not complete yet: {problem}", fp)
            return None
        return ReadyVersion(key[0], key[1], path, fp)

    def _served(self, model_dir: Path, baseline: int) -> set[int] | None:
        """Versions the model serves; ``None`` when ``serving.json`` cannot be read (the model
        is skipped until it can)."""
        file = model_dir / SERVING_FILE
        try:
            doc = json.loads(file.read_bytes())
        except FileNotFoundError:
            return {baseline}
        except (OSError, ValueError) as exc:
            self._report(file, f"{file} cannot be read, {model_dir.name} is not watched: {exc}")
            return None
        try:
            served = {int(v) for v in doc.get("versions", [])}
            if doc.get("champion") is not None:
                served.add(int(doc["champion"]))
        except (AttributeError, TypeError, ValueError) as exc:
            self._report(file, f"{file} is malformed, {model_dir.name} is not watched: {exc!r}")
            return None
        self._reported.pop(file, None)
        return served

    def _report(self, key: object, message: str, variant: str = "") -> None:
        if self._reported.get(key) != message + variant:
            self._reported[key] = message + variant
            log.warning(message)

    # -- deployer calls --------------------------------------------------------------------

    async def tick(self) -> list[Outcome]:
        """One scan; deploy what is ready. The outcomes of the deploys that succeeded."""
        outcomes: list[Outcome] = []
        for found in await asyncio.to_thread(self.scan, self.clock()):
            key = (found.model, found.version)
            try:
                attempted = await self.deployer.attempted(found.model, found.version)
            except Exception as exc:  # the catalog is unreachable: ask again next tick
                log.warning(
                    "cannot tell whether %s version %d was deployed: %s: %s",
                    found.model,
                    found.version,
                    type(exc).__name__,
                    exc,
                )
                continue
            self._handled[key] = found.fingerprint
            if attempted:
                log.info(
                    "%s version %d was already deployed (or refused); not deploying %s again",
                    found.model,
                    found.version,
                    found.path,
                )
                continue
            request = DeployRequest(
                model=found.model,
                version=found.version,
                mode=self.settings.lifecycle.on_drop,
                source=None,
                trigger=TRIGGER,
                detail={"fingerprint": found.fingerprint, "path": str(found.path)},
            )
            log.info("deploying dropped %s version %d", found.model, found.version)
            try:
                outcomes.append(await self.deployer.deploy(request))
            except LifecycleError as exc:
                log.warning(
                    "dropped %s version %d was not deployed (%s): %s",
                    found.model,
                    found.version,
                    exc.code,
                    exc.message,
                )
            except Exception:
                log.exception("deploying dropped %s version %d failed", found.model, found.version)
        return outcomes

    async def start(self) -> None:
        """Scan every ``watch_interval_s`` in a background task (if ``lifecycle.watch``)."""
        if not self.settings.lifecycle.watch or self._task is not None:
            return
        self._stop.clear()
        self._task = asyncio.create_task(self._run(), name="version-watcher")
        log.info(
            "watching %s for new versions of %s",
            self.repository,
            ", ".join(self.settings.lifecycle.managed_models),
        )

    async def close(self) -> None:
        """Stop scanning; a deploy in progress is allowed to finish (it must not stop midway)."""
        self._stop.set()
        task, self._task = self._task, None
        if task is not None:
            await task

    async def _run(self) -> None:
        interval = self.settings.lifecycle.watch_interval_s
        while not self._stop.is_set():
            try:
                await self.tick()
            except Exception:
                log.exception("repository scan failed")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stop.wait(), interval)


def _version_dirs(model_dir: Path) -> set[int]:
    try:
        entries = list(os.scandir(model_dir))
    except OSError:
        return set()
    return {
        int(e.name)
        for e in entries
        if not e.name.startswith(".") and e.name.isdigit() and e.is_dir(follow_symlinks=False)
    }


def fingerprint(path: Path) -> str | None:
    """Digest of the sorted relative names, sizes and ``mtime_ns`` of every file under ``path``;
    ``None`` if it cannot be listed (removed, or a file vanished while listing)."""
    entries: list[tuple[str, int, int]] = []
    try:
        for root, dirs, files in os.walk(path, onerror=_raise):
            dirs.sort()
            for name in files:
                st = os.lstat(os.path.join(root, name))
                rel = os.path.relpath(os.path.join(root, name), path)
                entries.append((rel, st.st_size, st.st_mtime_ns))
    except OSError:
        return None
    entries.sort()
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()[:16]


def _raise(exc: OSError) -> None:
    raise exc


def incomplete(path: Path) -> str | None:
    """Why ``path`` is not a complete version yet: ``metadata.json`` missing or unparsable, or
    a file it declares missing; ``None`` when complete."""
    try:
        metadata = ModelMetadata.load(path / METADATA_FILE)
    except FileNotFoundError:
        return f"no {METADATA_FILE}"
    except (OSError, ValueError, ValidationError) as exc:
        return f"{METADATA_FILE} does not parse: {str(exc).splitlines()[0]}"
    missing = sorted(name for name in metadata.artifacts.values() if not (path / name).is_file())
    if missing:
        return f"declared in {METADATA_FILE} but missing: {', '.join(missing)}"
    return None
