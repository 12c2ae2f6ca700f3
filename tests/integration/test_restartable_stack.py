"""A stack that comes back: ``up`` -> ``down`` -> ``up`` on the same state directory serves the
same models, API keys and async results, and README command 1 (``tools/quickstart``) works
twice in a row on one checkout."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from mlflow import MlflowClient

from gateway.auth.key_store import create_api_key
from gateway.catalog.dsn import dsn
from gateway.settings import REPO_ROOT, Settings
from rtinfer import stack
from rtinfer.stack_status import status

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

BODY = {
    "entity_ids": {"user_id": "u_000042", "merchant_id": "m_00007"},
    "context": {"amount": 129.99, "hour_of_day": 3},
}


@pytest.fixture()
def scratch(built_repository: Path) -> Iterator[tuple[Path, Path]]:
    """(state dir, model repository copy) reachable by the postgres OS user."""
    with tempfile.TemporaryDirectory(prefix="rtinfer-restart-") as tmp:
        os.chmod(tmp, 0o755)
        repository = Path(tmp) / "model_repository"
        shutil.copytree(built_repository, repository, ignore=shutil.ignore_patterns("__pycache__"))
        state = Path(tmp) / "state"
        state.mkdir(mode=0o755)
        yield state, repository


def _predict(url: str, token: str) -> dict[str, object]:
    r = httpx.post(
        f"{url}/predict/fraud_xgb",
        json=BODY,
        headers={"Authorization": f"Bearer {token}"},
        timeout=10,
    )
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def _async_done(url: str, token: str, job: str, timeout_s: float = 30.0) -> bytes:
    deadline = time.monotonic() + timeout_s
    headers = {"Authorization": f"Bearer {token}"}
    while True:
        r = httpx.get(f"{url}/predict/fraud_xgb/async/{job}", headers=headers, timeout=10)
        assert r.status_code == 200, r.text
        if r.json()["status"] == "done":
            return r.content
        assert time.monotonic() < deadline, r.text
        time.sleep(0.2)


def test_up_down_up_serves_the_same_models_keys_and_results(
    scratch: tuple[Path, Path], make_stack_settings: Callable[[Path, Path], Settings]
) -> None:
    state_dir, repository = scratch
    settings = make_stack_settings(state_dir, repository)
    first = stack.up(settings)
    try:
        assert first.postgres is not None and first.gateway_url is not None
        conninfo = dsn(state_dir / "postgres", first.postgres.port).conninfo
        _, token = create_api_key(conninfo, "restart-test", rate_limit_per_s=None)
        before = _predict(first.gateway_url, token)
        r = httpx.post(
            f"{first.gateway_url}/predict/fraud_xgb/async",
            json=BODY,
            headers={"Authorization": f"Bearer {token}"},
            timeout=10,
        )
        assert r.status_code == 202, r.text
        job = r.json()["token"]
        result = _async_done(first.gateway_url, token, job)
    finally:
        stopped = stack.down(settings)
    assert {"triton", "gateway", "redis", "postgres", "kafka", "mlflow"} <= set(stopped)
    assert not stack.is_running(state_dir)

    second = stack.up(settings)  # the same state dir: fresh processes, the same state
    try:
        assert second.gateway_url is not None and second.mlflow_uri is not None
        assert second.models == first.models
        after = _predict(second.gateway_url, token)  # the key created before the restart
        assert (after["model_version"], after["degraded"]) == (before["model_version"], False)
        assert after["prediction"] == pytest.approx(before["prediction"])
        assert _async_done(second.gateway_url, token, job) == result  # kept by Redis's AOF
        # MLflow decrypts the webhook secret it stored in the previous run
        hooks = MlflowClient(second.mlflow_uri, second.mlflow_uri).list_webhooks()
        assert [h.url for h in hooks if h.url.endswith("/hooks/mlflow")]
        seen = status(second.apply(settings))
        for service in ("redis", "postgres", "kafka", "mlflow", "triton", "gateway", "deployer"):
            assert seen[service]["alive"] and seen[service]["state"] == "RUNNING", service  # type: ignore[index]
    finally:
        stack.down(settings)


def _quickstart_env(state_dir: Path, repository: Path) -> dict[str, str]:
    ports = [
        "REDIS__PORT", "POSTGRES__PORT", "KAFKA__PORT", "KAFKA__CONTROLLER_PORT",
        "MLFLOW__PORT", "TRITON__HTTP_PORT", "TRITON__GRPC_PORT", "TRITON__METRICS_PORT",
        "GATEWAY__PORT", "LIFECYCLE__DEPLOYER_PORT",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("RTINFER_")}
    env.update({f"RTINFER_{name}": "0" for name in ports})
    env["RTINFER_STATE_DIR"] = str(state_dir)
    env["RTINFER_TRITON__MODEL_REPOSITORY"] = str(repository)
    return env


def test_quickstart_runs_twice_in_a_row(scratch: tuple[Path, Path]) -> None:
    state_dir, repository = scratch
    env = _quickstart_env(state_dir, repository)
    keys = []
    try:
        for run in (1, 2):
            started = time.monotonic()
            done = subprocess.run(
                [str(REPO_ROOT / "tools" / "quickstart")],
                env=env,
                cwd=REPO_ROOT,
                capture_output=True,
                text=True,
                timeout=420,
                check=False,
            )
            tail = "\n".join((done.stdout + done.stderr).splitlines()[-40:])
            assert done.returncode == 0, f"quickstart run {run} failed:\n{tail}"
            assert '"model_name":"fraud_xgb"' in done.stdout, tail  # the gateway's answer
            keys.append((state_dir / "quickstart.key").read_text())
            print(f"\nquickstart run {run}: {time.monotonic() - started:.1f}s")
        assert keys[0] == keys[1]  # the same API key, still valid
    finally:
        subprocess.run(
            [str(REPO_ROOT / ".venv" / "bin" / "rtinfer"), "stack", "down"],
            env=env,
            cwd=REPO_ROOT,
            capture_output=True,
            timeout=120,
            check=False,
        )
    assert not stack.is_running(state_dir)
