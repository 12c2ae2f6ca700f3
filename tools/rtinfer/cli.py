"""``rtinfer``: run the local inference stack, build the demo models, send predictions."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, TypeVar

import redis
import typer

from gateway.repository.layout import RenderError
from gateway.repository.render import render_repository
from gateway.settings import Settings
from python_backend.contract import CONTEXT_FEATURES
from rtinfer import cli_lifecycle
from rtinfer import stack as stack_mod
from rtinfer.apikeys import apikeys_app
from rtinfer.cli_common import echo_json, fail, settings_from_env
from rtinfer.cli_predictions import predictions_app
from rtinfer.client import FraudClient
from rtinfer.features import load_demo_features
from rtinfer.stack_status import status as stack_status_of

if TYPE_CHECKING:
    pass

T = TypeVar("T")

app = typer.Typer(help=__doc__, no_args_is_help=True, add_completion=False)
stack_app = typer.Typer(
    help="Start, stop and inspect the local Redis/Postgres/Kafka/MLflow/Triton/gateway."
)
models_app = typer.Typer(
    help="Train the demo models, render the model repository, register versions in MLflow; "
    "deploy, promote, canary and roll back versions on the running stack."
)
features_app = typer.Typer(help="Manage the online feature store.")
app.add_typer(stack_app, name="stack")
app.add_typer(models_app, name="models")
app.add_typer(features_app, name="features")
app.add_typer(apikeys_app, name="apikeys")
app.add_typer(predictions_app, name="predictions")

log = logging.getLogger("rtinfer")

TargetOpt = Annotated[
    str, typer.Option("--target", help="cpu (python backend) or ngc (FIL/onnxruntime).")
]
RepoOpt = Annotated[Path | None, typer.Option("--repository", help="Model repository path.")]
TrackingOpt = Annotated[
    str | None,
    typer.Option(
        "--tracking-uri", help="MLflow server to register in (default: the running stack's)."
    ),
]


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(
            {
                "ts": round(record.created, 3),
                "level": record.levelname.lower(),
                "logger": record.name,
                "msg": record.getMessage(),
            }
        )


@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter())
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler])


@models_app.command("build")
def models_build(
    target: TargetOpt = "cpu",
    repository: RepoOpt = None,
    rows: Annotated[int, typer.Option(help="Synthetic training transactions.")] = 60_000,
    nn_framework: Annotated[
        str, typer.Option(help="Train fraud_nn with sklearn (default) or torch (optional).")
    ] = "sklearn",
    tracking_uri: TrackingOpt = None,
    from_parquet: Annotated[
        Path | None,
        typer.Option(
            "--from-parquet",
            help="Train on served vectors and labels (rtinfer predictions export --with-labels).",
        ),
    ] = None,
    version: Annotated[
        int | None,
        typer.Option(min=1, help="Version to write (default: 1, or the next one with a file)."),
    ] = None,
) -> None:
    """Train fraud_xgb / fraud_nn / fraud_context_lr, render, register them in MLflow.

    The built versions are registered when ``--tracking-uri`` is given or the running stack
    has an MLflow server.
    """
    from rtinfer.demo.served_data import TrainingDataError, load_training_parquet
    from rtinfer.demo.torch_mlp import TorchUnavailable
    from rtinfer.demo.train import build_demo_models

    settings = settings_from_env()
    repo = (repository or settings.triton.model_repository).resolve()
    started = time.monotonic()
    if nn_framework not in ("sklearn", "torch"):
        fail(f"--nn-framework must be sklearn or torch, not {nn_framework!r}")
    try:
        dataset = load_training_parquet(from_parquet) if from_parquet is not None else None
        built = build_demo_models(
            repo,
            seed=settings.seed,
            n_rows=rows,
            version=version or (_next_version(repo) if dataset is not None else 1),
            nn_framework=nn_framework,  # type: ignore[arg-type]
            dataset=dataset,
        )
    except (TorchUnavailable, TrainingDataError) as exc:
        fail(str(exc))
    models = render_repository(repo, settings, target)  # type: ignore[arg-type]
    typer.echo(f"built {', '.join(built)} in {time.monotonic() - started:.1f}s")
    typer.echo(f"rendered {len(models)} models for target={target} into {repo}")
    uri = tracking_uri or _stack_tracking_uri(settings)
    if uri is None:
        typer.echo("not registered: no MLflow server in the stack (or pass --tracking-uri)")
        return
    _register(uri, {name: [version_dir] for name, version_dir in built.items()})


def _next_version(repository: Path) -> int:
    """One above the highest version directory of any demo model in ``repository``."""
    from rtinfer.registry import version_dirs

    found = [int(d.name) for dirs in version_dirs(repository).values() for d in dirs]
    return max(found, default=0) + 1


@models_app.command("register")
def models_register(repository: RepoOpt = None, tracking_uri: TrackingOpt = None) -> None:
    """Register every version of the demo models in MLflow (already registered: skipped)."""
    from rtinfer.registry import version_dirs

    settings = settings_from_env()
    repo = (repository or settings.triton.model_repository).resolve()
    uri = tracking_uri or _stack_tracking_uri(settings)
    if uri is None:
        fail("no MLflow server in the running stack; start it or pass --tracking-uri")
    _register(uri, version_dirs(repo))  # type: ignore[arg-type]


def _stack_tracking_uri(settings: Settings) -> str | None:
    """The running stack's MLflow server, if it has a live one."""
    state = stack_mod.StackState.load(settings.state_dir)
    if (
        state is None
        or state.mlflow is None
        or not stack_mod.service_alive(settings.state_dir, "mlflow", state.mlflow)
    ):
        return None
    return state.mlflow_uri


def _register(tracking_uri: str, dirs: dict[str, list[Path]]) -> None:
    from mlflow.exceptions import MlflowException

    from rtinfer.registry import RegistryError, register_version

    try:
        for name, version_dirs in dirs.items():
            for version_dir in version_dirs:
                reg = register_version(tracking_uri, version_dir, name)
                what = "registered" if reg.created else "already registered"
                typer.echo(f"{what} {name} version {reg.version} ({version_dir}) in {tracking_uri}")
    except (RegistryError, MlflowException) as exc:
        fail(str(exc))


@models_app.command("render")
def models_render(target: TargetOpt = "cpu", repository: RepoOpt = None) -> None:
    """Re-render every config.pbtxt (e.g. for the NGC container) without retraining."""
    settings = settings_from_env()
    repo = (repository or settings.triton.model_repository).resolve()
    try:
        models = render_repository(repo, settings, target)  # type: ignore[arg-type]
    except RenderError as exc:
        fail(str(exc))
    typer.echo(f"rendered {len(models)} models for target={target} into {repo}")


# the lifecycle on the running stack (rtinfer/cli_lifecycle.py)
models_app.command("deploy")(cli_lifecycle.models_deploy)
models_app.command("promote")(cli_lifecycle.models_promote)
models_app.command("canary")(cli_lifecycle.models_canary)
models_app.command("rollback")(cli_lifecycle.models_rollback)
models_app.command("history")(cli_lifecycle.models_history)


@features_app.command("load")
def features_load(
    url: Annotated[str | None, typer.Option(help="Redis URL (default: the running stack).")] = None,
) -> None:
    """Write the demo users and merchants into Redis."""
    settings = settings_from_env()
    if url is None:
        state = stack_mod.StackState.load(settings.state_dir)
        url = state.redis_url if state is not None else settings.redis.url
    client = redis.Redis.from_url(url)
    n = load_demo_features(client, seed=settings.seed, prefix=settings.redis.key_prefix)
    typer.echo(f"loaded {n} entities into {url}")


@stack_app.command("up")
def stack_up(
    features: Annotated[bool, typer.Option(help="Seed the demo features.")] = True,
) -> None:
    """Start Redis, PostgreSQL, Kafka, MLflow, Triton (every model READY) and the gateway."""
    settings = settings_from_env()
    try:
        state = stack_mod.up(settings, load_features=features)
    except (stack_mod.StackError, RenderError, RuntimeError) as exc:
        fail(str(exc))
    ports = state.triton_ports
    typer.echo(f"redis    {state.redis_url}")
    if state.postgres is not None:
        pg = settings.postgres
        typer.echo(
            f"postgres postgresql://{pg.user}@{state.host}:{state.postgres.port}/"
            f"{pg.database} (password in {settings.state_dir / 'postgres' / 'password'})"
        )
    if state.kafka_bootstrap is not None:
        typer.echo(f"kafka    {state.kafka_bootstrap}")
    if state.mlflow_uri is not None:
        typer.echo(f"mlflow   {state.mlflow_uri}  (model registry)")
    typer.echo(
        f"triton   http://{ports.http_url}  grpc {ports.grpc_url}  "
        f"metrics http://{ports.host}:{ports.metrics}/metrics"
    )
    typer.echo(f"models   {', '.join(state.models)}")
    if state.gateway_url is not None:
        typer.echo(f"gateway  {state.gateway_url}  (docs {state.gateway_url}/docs)")
    for i, w in enumerate(state.async_workers):
        metrics_host = settings.gateway.async_predict.metrics_host
        typer.echo(
            f"worker   async-worker-{i} pid {w.pid}  metrics http://{metrics_host}:{w.port}/metrics"
        )
    _echo_store(settings, state)


def _echo_store(settings: Settings, state: stack_mod.StackState) -> None:
    from gateway.store.backend import redact

    if state.store is not None:
        url = state.apply(settings).store_url()
        typer.echo(
            f"store    {url}  (embedded ClickHouse, data in {settings.state_dir}/clickhouse)"
        )
    elif settings.store.url is not None:
        typer.echo(f"store    {redact(settings.store_url())}")
    for i, w in enumerate(state.sinks):
        host = settings.store.metrics_host
        typer.echo(f"sink     sink-{i} pid {w.pid}  metrics http://{host}:{w.port}/metrics")


@app.command("worker")
def worker() -> None:
    """Run one async-prediction worker in the foreground (Ctrl-C stops it cleanly).

    With a stack running it joins the stack's consumer group (one more worker); otherwise
    it connects to what RTINFER_* configures.
    """
    from gateway.asyncpred.worker import main as run_worker

    settings = settings_from_env().model_copy(deep=True)
    state = stack_mod.StackState.load(settings.state_dir)
    if state is not None:
        settings.redis.port = state.redis.port
        settings.postgres.port = state.postgres.port if state.postgres else settings.postgres.port
        settings.kafka.port = state.kafka.port if state.kafka else settings.kafka.port
        settings.gateway.triton_grpc_url = state.triton_ports.grpc_url
    run_worker(settings)


@stack_app.command("down")
def stack_down() -> None:
    """Stop the running stack."""
    stopped = stack_mod.down(settings_from_env())
    typer.echo(f"stopped {', '.join(stopped)}" if stopped else "nothing was running")


@stack_app.command("restart")
def stack_restart(
    service: Annotated[str, typer.Argument(help="e.g. gateway, triton, async-worker-0.")],
) -> None:
    """Restart one service of the running stack through its supervisor."""
    settings = settings_from_env()
    try:
        stack_mod.restart(settings, service)
    except stack_mod.StackError as exc:
        fail(str(exc))
    typer.echo(f"restarted {service}")


@stack_app.command("status")
def stack_status() -> None:
    """Show pids, ports and readiness of each service."""
    echo_json(stack_status_of(settings_from_env()))


@app.command("predict")
def predict(
    model: Annotated[str, typer.Option(help="Ensemble to call.")] = "fraud_xgb_pipeline",
    user_id: Annotated[str, typer.Option(help="User entity id.")] = "u_000042",
    merchant_id: Annotated[str, typer.Option(help="Merchant entity id.")] = "m_00007",
    context: Annotated[
        str,
        typer.Option(help=f"JSON object of request context; keys: {', '.join(CONTEXT_FEATURES)}"),
    ] = '{"amount": 129.99, "hour_of_day": 2, "day_of_week": 5, "channel": 1, '
    '"is_international": 1, "card_present": 0, "device_age_days": 3, "ip_risk_score": 0.7, '
    '"distance_from_home_km": 850, "is_new_device": 1}',
    protocol: Annotated[str, typer.Option(help="http or grpc.")] = "http",
    features: Annotated[bool, typer.Option(help="Also print the served feature vector.")] = False,
) -> None:
    """Send one prediction request to the running stack and print the result."""
    settings = settings_from_env()
    try:
        state = stack_mod.require_running(settings)
        ctx = json.loads(context)
    except (stack_mod.StackError, json.JSONDecodeError) as exc:
        fail(str(exc))
    ports = state.triton_ports
    url = ports.http_url if protocol == "http" else ports.grpc_url
    with FraudClient(url, protocol) as client:  # type: ignore[arg-type]
        try:
            started = time.perf_counter()
            result = client.predict_one(model, user_id, merchant_id, ctx)
        except Exception as exc:  # tritonclient raises its own InferenceServerException
            fail(f"{type(exc).__name__}: {exc}")
    out = {
        "model": model,
        "user_id": user_id,
        "merchant_id": merchant_id,
        **result.to_dict(with_features=features),
        "latency_ms": round((time.perf_counter() - started) * 1000, 2),
    }
    echo_json(out)


if __name__ == "__main__":
    app()
