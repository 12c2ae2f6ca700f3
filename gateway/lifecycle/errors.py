"""Typed errors of the model lifecycle; each says what is wrong in its message."""

from __future__ import annotations

from gateway.errors import GatewayError


class LifecycleError(GatewayError):
    """A step of a model version swap failed."""

    status, code = 500, "lifecycle_error"


class ArtifactInvalid(LifecycleError):
    """A candidate version directory must not be served."""

    status, code = 422, "artifact_invalid"


class VersionExists(LifecycleError):
    """The model repository already holds this version; versions are never overwritten."""

    status, code = 409, "version_exists"


class RepositoryUnavailable(LifecycleError):
    """Triton's repository API did not answer."""

    status, code = 503, "repository_unavailable"


class ModelLoadFailed(LifecycleError):
    """Triton refused to load (or unload) a model; the message carries Triton's reason."""

    status, code = 502, "model_load_failed"


class VersionNotReady(LifecycleError):
    """A model version did not become READY before the deadline."""

    status, code = 504, "version_not_ready"


class SmokeTestFailed(LifecycleError):
    """A loaded version answered wrongly or too slowly on its golden examples."""

    status, code = 422, "smoke_test_failed"


class UnknownModel(LifecycleError):
    """The model is not one the lifecycle manages (settings.lifecycle.managed_models)."""

    status, code = 404, "model_not_managed"


class NothingToDo(LifecycleError):
    """The action has nothing to act on (no canary to promote, no earlier version to restore)."""

    status, code = 409, "nothing_to_do"


class CatalogUpdateFailed(LifecycleError):
    """The catalog transaction of a swap failed; nothing was switched."""

    status, code = 503, "catalog_update_failed"
