"""Place a validated model version into the Triton model repository, atomically.

Files are copied into ``<repository>/<model>/.tmp-<version>-<random>`` (Triton ignores names
that are not numbers), validated there, flushed to disk, and the directory is renamed to
``<version>``: Triton - or anyone listing the repository - sees either no version directory or a
complete one. An existing version is never overwritten, and the temporary directory is removed
on any failure. Materializing does not change what Triton serves: the model's ``config.pbtxt``
is rewritten (:func:`serve_versions`) with the versions the next load must keep.

These functions block on disk and ONNX Runtime: call them through ``asyncio.to_thread`` from
the serving loop.
"""

from __future__ import annotations

import dataclasses
import fcntl
import logging
import os
import secrets
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from tritonclient.grpc import model_config_pb2 as mc

from gateway.lifecycle.artifacts import ArtifactReport, check_files, validate_version_dir
from gateway.lifecycle.errors import ArtifactInvalid, LifecycleError, VersionExists
from gateway.repository.layout import RenderError, place_scorer_shell
from gateway.repository.render import render_scorer_versions
from gateway.settings import Settings, Target

log = logging.getLogger(__name__)

TMP_PREFIX = ".tmp-"
LOCK_FILE = ".lifecycle.lock"


def version_dir(repository: Path, model: str, version: int) -> Path:
    if version < 1:
        raise LifecycleError(f"{model}: version must be >= 1, got {version}")
    return repository / model / str(version)


def materialize_version(
    source: Path,
    repository: Path,
    model: str,
    version: int,
    target: Target,
    reference_version: int | None = None,
) -> ArtifactReport:
    """Copy the candidate ``source`` to ``<repository>/<model>/<version>`` once it validates.

    ``reference_version`` is the version currently served: the candidate must keep its tensor
    interface and feature order. Returns the validation report (``path`` is the new version
    directory). Raises :class:`VersionExists` if the version directory is already there and
    :class:`ArtifactInvalid` if the candidate is unfit.
    """
    final = version_dir(repository, model, version)
    model_dir = final.parent
    if not model_dir.is_dir():
        raise LifecycleError(f"model {model} is not in the repository {repository}")
    reference = (
        version_dir(repository, model, reference_version) if reference_version is not None else None
    )
    with _model_lock(model_dir):
        _refuse_existing(final)
        if not source.is_dir():
            raise ArtifactInvalid(f"{source} is not a directory")
        check_files(source)  # refuse symlinks, code and stray files before copying anything
        tmp = model_dir / f"{TMP_PREFIX}{version}-{secrets.token_hex(4)}"
        tmp.mkdir()
        try:
            for file in sorted(source.iterdir()):
                _copy_synced(file, tmp / file.name)
            report = validate_version_dir(tmp, model, reference=reference)
            place_scorer_shell(tmp, target)
            for file in tmp.iterdir():
                _fsync(file)  # the shell placed above; copied files are already synced
            _fsync(tmp)
            _refuse_existing(final)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _fsync(model_dir)
    log.info("materialized %s version %d from %s", model, version, source)
    return dataclasses.replace(report, path=final)


def serve_versions(
    repository: Path, model: str, versions: Iterable[int], settings: Settings, target: Target
) -> mc.ModelConfig:
    """Rewrite ``<model>/config.pbtxt`` so that its next load serves exactly ``versions``."""
    wanted = sorted(set(versions))
    missing = [v for v in wanted if not version_dir(repository, model, v).is_dir()]
    if missing:
        raise LifecycleError(f"{model}: versions {missing} are not in the repository")
    try:
        return render_scorer_versions(repository, model, wanted, settings, target)
    except RenderError as exc:
        raise LifecycleError(f"{model}: cannot render its config: {exc}") from None


def remove_version(repository: Path, model: str, version: int) -> None:
    """Delete a version directory; it disappears at once (renamed away, then deleted)."""
    final = version_dir(repository, model, version)
    with _model_lock(final.parent):
        if not final.exists():
            return
        trash = final.parent / f"{TMP_PREFIX}removed-{version}-{secrets.token_hex(4)}"
        os.rename(final, trash)
        _fsync(final.parent)
    shutil.rmtree(trash)
    log.info("removed %s version %d", model, version)


def _refuse_existing(final: Path) -> None:
    if final.exists():
        raise VersionExists(f"{final} already exists; a version is never overwritten")


def _copy_synced(src: Path, dst: Path) -> None:
    with open(src, "rb") as fin, open(dst, "xb") as fout:
        shutil.copyfileobj(fin, fout)
        fout.flush()
        os.fsync(fout.fileno())


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def _model_lock(model_dir: Path) -> Iterator[None]:
    """One lifecycle change of a model's directory at a time (across processes)."""
    with open(model_dir / LOCK_FILE, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
