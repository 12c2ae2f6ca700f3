"""``rtinfer predictions show|query|quality|export|replay``: the prediction store.

The store is ``store.url`` when set; else the running stack's embedded server; else, with the
stack down, its data directory opened in this process (``<state>/clickhouse``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer

from gateway.settings import Settings
from gateway.store import queries
from gateway.store.backend import Store, StoreError, open_store
from gateway.store.replay import (
    ONNX_FILE,
    ReplayError,
    Runner,
    Scorer,
    logged_rows,
    onnx_runner,
    replay,
    served_scorer,
    version_scorer,
)
from gateway.store.server import data_dir
from rtinfer import stack as stack_mod
from rtinfer.cli_common import echo_json, fail, settings_from_env

predictions_app = typer.Typer(
    help="The prediction store: stored predictions, labels, live quality, export and replay."
)

ModelOpt = Annotated[str, typer.Option("--model", help="Public model name, e.g. fraud_xgb.")]
SinceOpt = Annotated[str, typer.Option("--since", help="Window: 30m, 1h, 7d, 2w.")]


def store_url(settings: Settings) -> str:
    """The store this invocation reads (see the module docstring)."""
    if settings.store.url is not None:
        return settings.store.url.get_secret_value()
    state = stack_mod.StackState.load(settings.state_dir)
    if state is not None and state.store is not None and stack_mod.is_running(settings.state_dir):
        return state.apply(settings).store_url()
    return f"chdb://{data_dir(settings)}?database={settings.store.database}"


@contextmanager
def _store() -> Iterator[Store]:
    settings = settings_from_env()
    try:
        store = open_store(store_url(settings), timeout_s=settings.store.query_timeout_s)
    except StoreError as exc:
        fail(f"the prediction store cannot be opened: {exc}")
    try:
        yield store
    except StoreError as exc:
        fail(f"the prediction store refused the query: {exc}")
    finally:
        store.close()


def _since(text: str) -> int:
    try:
        return queries.parse_since(text)
    except ValueError as exc:
        fail(str(exc))


@predictions_app.command("show")
def show(request_id: str) -> None:
    """One request's stored records (production, shadows) and labels, as JSON."""
    with _store() as store:
        found = queries.show(store, request_id)
    if found is None:
        fail(f"no prediction or label with request_id {request_id!r} in the store")
    echo_json(found)


def _table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    cells = [[_cell(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    typer.echo("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    for row in cells:
        typer.echo("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, dict):
        return ",".join(str(v) for v in value.values())
    return str(value)


@predictions_app.command("query")
def query(
    model: ModelOpt,
    since: SinceOpt = "1h",
    entity: Annotated[str | None, typer.Option(help="An entity id, e.g. u_000042.")] = None,
    degraded: Annotated[bool, typer.Option("--degraded", help="Degraded rows only.")] = False,
    limit: Annotated[int, typer.Option(min=1, max=100_000)] = 50,
    as_json: Annotated[bool, typer.Option("--json", help="JSON instead of a table.")] = False,
) -> None:
    """The newest stored predictions of a model, as a table."""
    with _store() as store:
        found = queries.find(
            store,
            model,
            _since(since),
            entity=entity,
            degraded=True if degraded else None,
            limit=limit,
        )
    if as_json:
        echo_json(found)
        return
    _table(
        found,
        [
            "ts",
            "request_id",
            "model_version",
            "arm",
            "door",
            "entity_ids",
            "prediction",
            "label_class",
            "is_degraded",
            "latency_ms",
            "true_label",
        ],
    )
    typer.echo(f"{len(found)} rows")


@predictions_app.command("quality")
def quality(model: ModelOpt, since: SinceOpt = "7d") -> None:
    """Live quality per model version and arm over the labelled rows, as JSON."""
    with _store() as store:
        echo_json(queries.quality(store, model, _since(since)))


@predictions_app.command("export")
def export(
    model: ModelOpt,
    out: Annotated[Path, typer.Option("--out", help="Parquet file to write.")],
    since: SinceOpt = "7d",
    with_labels: Annotated[
        bool, typer.Option("--with-labels", help="Labelled rows only, with their label.")
    ] = False,
    include_degraded: Annotated[bool, typer.Option(help="Also rows a fallback served.")] = False,
) -> None:
    """The served feature vectors (after defaults) as a Parquet training set."""
    with _store() as store:
        data = queries.export_parquet(
            store, model, _since(since), with_labels=with_labels, include_degraded=include_degraded
        )
    import pyarrow.parquet as pq

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_bytes(data)
    n = pq.ParquetFile(tmp).metadata.num_rows
    tmp.replace(out)
    typer.echo(f"wrote {n} rows to {out}")


def artifact_locator(settings: Settings) -> Any:
    """(model, version) -> its version directory: the repository's, else the registry's
    (downloaded once into ``<state>/replay-artifacts``)."""
    repository = settings.triton.model_repository.resolve()
    cache = settings.state_dir / "replay-artifacts"
    state = stack_mod.StackState.load(settings.state_dir)
    tracking_uri = state.mlflow_uri if state is not None else None

    def locate(model: str, version: str) -> Path | None:
        for local in (repository / model / version, cache / model / version):
            if (local / ONNX_FILE).is_file():
                return local
        if tracking_uri is None or not version.isdigit():
            return None
        return _download(tracking_uri, model, int(version), cache / model)

    return locate


def _download(tracking_uri: str, model: str, version: int, into: Path) -> Path | None:
    import shutil
    import tempfile

    from mlflow.exceptions import MlflowException

    from gateway.lifecycle.mlflow_registry import MlflowRegistry

    registry = MlflowRegistry(tracking_uri)
    into.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{version}-", dir=into))
    try:
        info = registry.version(model, version)
        downloaded = registry.download(info, staging)
        downloaded.replace(into / str(version))
    except MlflowException:
        return None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return into / str(version)


@predictions_app.command("replay")
def replay_cmd(
    request_ids: Annotated[list[str] | None, typer.Argument(help="Request ids to replay.")] = None,
    model: Annotated[str | None, typer.Option("--model", help="Replay a model's rows.")] = None,
    since: SinceOpt = "1h",
    version: Annotated[str | None, typer.Option(help="Score with this version instead.")] = None,
    candidate: Annotated[Path | None, typer.Option(help="A version directory to compare.")] = None,
    via: Annotated[
        str, typer.Option(help="onnx: offline with ONNX Runtime; triton: the loaded version.")
    ] = "onnx",
    as_json: Annotated[bool, typer.Option("--json", help="Every row as JSON.")] = False,
) -> None:
    """Re-score logged feature vectors (ONNX Runtime) and compare with the served scores."""
    if not request_ids and model is None:
        fail("name request ids, or --model M [--since 1h]")
    if via not in ("onnx", "triton"):
        fail(f"--via must be onnx or triton, not {via!r}")
    settings = settings_from_env()
    try:
        scorer_of = _scorers(settings, version, candidate, _runner(settings, via))
        with _store() as store:
            logged = logged_rows(
                store,
                request_ids=request_ids or (),
                model=model,
                since_s=None if request_ids else _since(since),
            )
        report = replay(logged, scorer_of)
    except (ReplayError, stack_mod.StackError) as exc:
        fail(str(exc))
    if as_json:
        echo_json(report)
        return
    _table(
        report["rows"],
        [
            "request_id",
            "model_version",
            "logged",
            "replayed",
            "abs_delta",
            "served_label",
            "replayed_label",
        ],
    )
    typer.echo(json.dumps(report["summary"], indent=2))


def _runner(settings: Settings, via: str) -> Runner:
    if via == "onnx":
        return onnx_runner
    import tritonclient.grpc as grpcclient

    from gateway.store.replay_triton import triton_runner

    state = stack_mod.require_running(settings)
    return triton_runner(grpcclient.InferenceServerClient(state.triton_ports.grpc_url))


def _scorers(settings: Settings, version: str | None, candidate: Path | None, run: Runner) -> Any:
    if candidate is not None:
        fixed = version_scorer(candidate)  # a directory: always offline
        return lambda _row: fixed
    locate = artifact_locator(settings)
    cache: dict[tuple[str, str], Scorer] = {}
    weights = settings.postprocess.blend_weights

    def scorer_of(row: dict[str, Any]) -> Scorer:
        key = (row["model_name"], version or row["model_version"])
        if key not in cache:
            cache[key] = served_scorer(key[1], key[0], locate, weights, run)
        return cache[key]

    return scorer_of
