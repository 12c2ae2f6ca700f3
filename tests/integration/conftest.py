"""The real local stack (Redis, Postgres, Kafka, MLflow, Triton, gateway) on free loopback ports.

Started once per session by the project's own tooling (``rtinfer.stack.up``).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from pydantic import SecretStr

from gateway.config import GatewaySettings
from gateway.lifecycle.config import LifecycleSettings
from gateway.settings import (
    FeatureSettings,
    KafkaSettings,
    MlflowSettings,
    PostgresSettings,
    RedisSettings,
    Settings,
    TritonSettings,
)
from gateway.store.config import StoreSettings
from rtinfer import stack
from rtinfer.client import FraudClient

#: the lifecycle stack's configured webhook secret (the session stack generates its own)
LIFECYCLE_WEBHOOK_SECRET = "lifecycle-test-webhook-secret"


@pytest.fixture(scope="session")
def stack_settings(built_repository: Path) -> Iterator[Settings]:
    # not pytest's tmp_path: its 0700 root is not reachable by the postgres server user
    with tempfile.TemporaryDirectory(prefix="rtinfer-stack-") as state_dir:
        os.chmod(state_dir, 0o755)
        yield _settings(Path(state_dir), built_repository)


def _settings(state_dir: Path, repository: Path) -> Settings:
    return Settings(
        state_dir=state_dir,
        triton=TritonSettings(
            http_port=0, grpc_port=0, metrics_port=0, model_repository=repository
        ),
        redis=RedisSettings(port=0),
        postgres=PostgresSettings(port=0),
        kafka=KafkaSettings(port=0, controller_port=0),
        mlflow=MlflowSettings(port=0),
        gateway=GatewaySettings(port=0),
        # no repository watcher: test_lifecycle places version directories by hand
        lifecycle=LifecycleSettings(deployer_port=0, watch=False),
        # short breaker reset so recovery tests stay quick
        features=FeatureSettings(breaker_reset_timeout_s=0.5),
        store=StoreSettings(port=0),
    )


@pytest.fixture(scope="session")
def make_stack_settings() -> Callable[[Path, Path], Settings]:
    """Settings of another private stack: (state dir, model repository) -> free ports."""
    return _settings


@pytest.fixture(scope="session")
def running_stack(stack_settings: Settings) -> Iterator[stack.StackState]:
    state = stack.up(stack_settings)
    yield state
    stack.down(stack_settings)


@pytest.fixture(scope="session")
def live_settings(running_stack: stack.StackState, stack_settings: Settings) -> Settings:
    """``stack_settings`` with the running stack's resolved ports (what its processes got)."""
    return running_stack.apply(stack_settings)


@pytest.fixture(scope="session")
def redis_client(running_stack: stack.StackState) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(running_stack.redis_url)
    yield client
    client.close()


@pytest.fixture(params=["http", "grpc"], scope="session")
def protocol(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="session")
def clients(running_stack: stack.StackState) -> Iterator[dict[str, FraudClient]]:
    ports = running_stack.triton_ports
    made = {
        "http": FraudClient(ports.http_url, "http"),
        "grpc": FraudClient(ports.grpc_url, "grpc"),
    }
    yield made
    for c in made.values():
        c.close()


@pytest.fixture()
def client(clients: dict[str, FraudClient], protocol: str) -> FraudClient:
    return clients[protocol]


@pytest.fixture(scope="session")
def lifecycle_settings(built_repository: Path) -> Iterator[Settings]:
    """A second stack whose model versions the lifecycle tests swap, promote and roll back
    (Redis, Postgres, MLflow, Triton on its own copy of the repository), so the session stack
    keeps serving version 1 to every other test."""
    with tempfile.TemporaryDirectory(prefix="rtinfer-lifecycle-") as state_dir:
        os.chmod(state_dir, 0o755)
        repository = Path(state_dir) / "model_repository"
        shutil.copytree(built_repository, repository, ignore=shutil.ignore_patterns("__pycache__"))
        base = _settings(Path(state_dir) / "state", repository)
        yield base.model_copy(
            update={
                "services": ["redis", "postgres", "mlflow", "triton"],
                "lifecycle": LifecycleSettings(
                    drain_s=1.0,
                    watch_settle_s=1.0,
                    deployer_port=0,
                    webhook_secret=SecretStr(LIFECYCLE_WEBHOOK_SECRET),
                ),
            }
        )


@pytest.fixture(scope="session")
def lifecycle_stack(lifecycle_settings: Settings) -> Iterator[stack.StackState]:
    lifecycle_settings.state_dir.mkdir(mode=0o755, exist_ok=True)
    state = stack.up(lifecycle_settings)
    yield state
    stack.down(lifecycle_settings)
