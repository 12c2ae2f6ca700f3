"""Blocking access to the MLflow model registry: listings, downloads, the webhook.

Every function here blocks on HTTP; async callers run them with ``asyncio.to_thread``.
A registered version's files live under its ``source`` (``<run artifacts>/model``, written by
``rtinfer.registry.register_version``); a download keeps only the files a version directory
may hold (``docs/lifecycle.md``, step 1) and leaves out MLflow's ``MLmodel``.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import mlflow.artifacts
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from gateway.lifecycle.artifacts import DESCRIPTOR_FILES, MODEL_FILES
from gateway.lifecycle.mlflow_hooks import ACTED_EVENTS

log = logging.getLogger(__name__)

#: the files of a version directory, as registered
VERSION_FILES = frozenset({*MODEL_FILES.values(), *DESCRIPTOR_FILES})
WEBHOOK_NAME = "rtinfer-deployer"
#: MLflow's own descriptor of a logged model (not part of a version directory)
MLMODEL_FILE = "MLmodel"


@dataclass(frozen=True)
class VersionInfo:
    """One registered model version."""

    model: str
    version: int
    source: str
    run_id: str | None = None
    tags: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelListing:
    """A registered model's versions and aliases (alias -> version)."""

    model: str
    versions: Mapping[int, VersionInfo] = field(default_factory=dict)
    aliases: Mapping[str, int] = field(default_factory=dict)


def _not_found(exc: MlflowException) -> bool:
    return exc.error_code == "RESOURCE_DOES_NOT_EXIST"


class MlflowRegistry:
    """The registry the rollout follows, at ``tracking_uri`` (also the registry URI)."""

    def __init__(self, tracking_uri: str) -> None:
        self.tracking_uri = tracking_uri
        self._client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)

    def _info(self, mv: object) -> VersionInfo:
        return VersionInfo(
            model=mv.name,  # type: ignore[attr-defined]
            version=int(mv.version),  # type: ignore[attr-defined]
            source=mv.source,  # type: ignore[attr-defined]
            run_id=mv.run_id or None,  # type: ignore[attr-defined]
            tags=dict(mv.tags or {}),  # type: ignore[attr-defined]
        )

    def listing(self, model: str) -> ModelListing:
        """Versions and aliases of ``model``; empty if it is not registered."""
        try:
            registered = self._client.get_registered_model(model)
        except MlflowException as exc:
            if _not_found(exc):
                return ModelListing(model)
            raise
        versions: dict[int, VersionInfo] = {}
        token: str | None = None
        while True:
            page = self._client.search_model_versions(
                f"name = '{model}'", max_results=1000, page_token=token
            )
            for mv in page:
                info = self._info(mv)
                versions[info.version] = info
            token = page.token
            if not token:
                break
        aliases = {str(a): int(v) for a, v in (registered.aliases or {}).items()}
        return ModelListing(model, versions, aliases)

    def version(self, model: str, version: int) -> VersionInfo:
        return self._info(self._client.get_model_version(model, str(version)))

    def download(self, info: VersionInfo, dst: Path) -> Path:
        """The version's files in ``dst/<version>/``, laid out as a version directory."""
        staging = dst / "download"
        staging.mkdir(parents=True)
        local = Path(
            mlflow.artifacts.download_artifacts(
                artifact_uri=info.source,
                dst_path=str(staging),
                tracking_uri=self.tracking_uri,
                registry_uri=self.tracking_uri,
            )
        )
        version_dir = dst / str(info.version)
        version_dir.mkdir()
        for path in sorted(local.iterdir()):
            if path.is_file() and path.name in VERSION_FILES:
                shutil.copyfile(path, version_dir / path.name)
            elif path.name != MLMODEL_FILE:
                log.warning(
                    "%s version %d: not deploying registered file %s",
                    info.model,
                    info.version,
                    path.name,
                )
        shutil.rmtree(staging)
        return version_dir


def ensure_webhook(tracking_uri: str, url: str, secret: str) -> str:
    """Register (once) a webhook sending the acted-on registry events to ``url``.

    A webhook with this ``url`` is updated to the events and secret; otherwise one is created.
    Returns its id.
    """
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    events = sorted(ACTED_EVENTS)
    token: str | None = None
    while True:
        page = client.list_webhooks(max_results=100, page_token=token)
        for hook in page:
            if hook.url == url:
                client.update_webhook(
                    hook.webhook_id,
                    events=events,  # type: ignore[arg-type]
                    secret=secret,
                    status="ACTIVE",
                )
                return str(hook.webhook_id)
        token = page.token
        if not token:
            break
    hook = client.create_webhook(
        WEBHOOK_NAME,
        url,
        events,  # type: ignore[arg-type]
        description="Model rollout: new versions and aliases reach the rtinfer deployer.",
        secret=secret,
    )
    log.info("registered MLflow webhook %s -> %s", hook.webhook_id, url)
    return str(hook.webhook_id)
