"""The deployer as a stack service: ``python -m gateway.lifecycle`` with the stack's settings.

It receives MLflow's registry webhooks on ``/hooks/mlflow``, reconciles with the registry
periodically and watches the model repository (``docs/lifecycle.md``, "MLflow rollout").
"""

from __future__ import annotations

import logging

from gateway.lifecycle.mlflow_registry import ensure_webhook
from gateway.lifecycle.service import webhook_secret
from gateway.settings import Settings
from rtinfer.gateway_server import gateway_url, spawn_settled
from rtinfer.procs import Launch, Process, spawn_program

log = logging.getLogger(__name__)

WEBHOOK_PATH = "/hooks/mlflow"


def deployer_url(host: str, port: int) -> str:
    return gateway_url(host, port)


def start_deployer(
    settings: Settings,
    triton_grpc_url: str,
    *,
    startup_timeout_s: float = 60.0,
    launch: Launch = spawn_program,
) -> Process:
    """Start the deployer on ``lifecycle.deployer_host:deployer_port``; wait for ``/readyz``.

    ``settings`` must already hold the stack's resolved ports.
    """
    gw = settings.gateway.model_copy(update={"triton_grpc_url": triton_grpc_url})
    settings = settings.model_copy(update={"gateway": gw})
    lc = settings.lifecycle
    return spawn_settled(
        "deployer",
        "gateway.lifecycle",
        settings,
        settings.state_dir / "deployer" / "deployer.log",
        f"{deployer_url(lc.deployer_host, lc.deployer_port)}/readyz",
        startup_timeout_s=startup_timeout_s,
        launch=launch,
    )


def register_webhook(settings: Settings, tracking_uri: str) -> str:
    """Point MLflow's registry webhook at the deployer (idempotent); return the webhook id."""
    lc = settings.lifecycle
    url = f"{deployer_url(lc.deployer_host, lc.deployer_port)}{WEBHOOK_PATH}"
    hook_id = ensure_webhook(tracking_uri, url, webhook_secret(lc))
    log.info("MLflow webhook %s delivers registry events to %s", hook_id, url)
    return hook_id
