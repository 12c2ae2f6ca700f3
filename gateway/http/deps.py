"""What the app factory takes from outside: the prediction log, the authentication hook and
the model deployer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from gateway.auth.guards import Authenticate
from python_backend.predlog.sink import PredictionLog

if TYPE_CHECKING:
    from gateway.lifecycle.deployer import Deployer


@dataclass(frozen=True)
class GatewayDeps:
    """Collaborators injected into ``create_app``; ``None`` means the built-in default."""

    prediction_log: PredictionLog | None = None
    #: no authentication when absent
    authenticate: Authenticate | None = None
    #: runs the lifecycle admin routes; built from the settings when absent
    #: (``gateway.lifecycle.deployer.open_deployer``)
    deployer: Deployer | None = None
