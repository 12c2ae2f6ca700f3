"""Render the Triton model repository from trained artifacts and ``ensembles/``.

Trained models live in ``<repository>/<model>/<version>/`` (XGBoost JSON and/or ONNX, plus
feature spec, training statistics and metadata). Rendering writes every ``config.pbtxt`` for the
chosen target and places the thin python-backend shells:

* ``cpu`` - the scoring models run in the python backend on ONNX Runtime (``onnx_runner``).
* ``ngc`` - NVIDIA's Triton container: ``fraud_xgb`` on the FIL backend (XGBoost JSON),
  ``fraud_nn``/``fraud_context_lr`` on the onnxruntime backend.

Both targets expose identical tensor names, dtypes and shapes, so the ensembles are the same.
Configs are built as ``ModelConfig`` protobufs, so a rendered file always parses.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from gateway.settings import REPO_ROOT, Settings, Target
from python_backend.feature_spec import (
    FEATURE_SPEC_FILE,
    METADATA_FILE,
    TRAINING_STATS_FILE,
    FeatureSpec,
    ModelMetadata,
    TrainingStats,
)

log = logging.getLogger(__name__)

ENSEMBLES_DIR = REPO_ROOT / "ensembles"
SHELLS_DIR = REPO_ROOT / "python_backend" / "triton_models"

SCORERS = ("fraud_xgb", "fraud_nn", "fraud_context_lr")
CONTEXT_DIM = 10


class RenderError(RuntimeError):
    """The repository cannot be rendered (missing or inconsistent artifacts)."""


@dataclass(frozen=True)
class Pipeline:
    """An ensemble and the model whose probabilities its postprocess step turns into labels."""

    ensemble: str
    postprocess: str
    scorers: tuple[str, ...]


PIPELINES = (
    Pipeline("fraud_xgb_pipeline", "fraud_xgb_postprocess", ("fraud_xgb",)),
    Pipeline("fraud_nn_pipeline", "fraud_nn_postprocess", ("fraud_nn",)),
    Pipeline("fraud_blend_pipeline", "fraud_blend_postprocess", ("fraud_xgb", "fraud_nn")),
)


#: per scoring model: which versions Triton serves (written by the lifecycle's swap procedure)
SERVING_FILE = "serving.json"
#: suffix of a pipeline pinned to one scorer version: fraud_xgb_pipeline__v2
PINNED_SEPARATOR = "__v"


def pinned_name(name: str, version: int) -> str:
    """Name of the copy of ``name`` (ensemble or postprocess) pinned to a scorer version."""
    return f"{name}{PINNED_SEPARATOR}{version}"


def own_pipeline(model: str) -> Pipeline:
    """The pipeline that serves scoring model ``model`` alone (fraud_xgb -> fraud_xgb_pipeline)."""
    for pipe in PIPELINES:
        if pipe.scorers == (model,):
            return pipe
    raise RenderError(
        f"{model} has no pipeline of its own; known: {[p.ensemble for p in PIPELINES]}"
    )


@dataclass(frozen=True)
class Serving:
    """What Triton serves of one scoring model, kept in ``<repository>/<model>/serving.json``.

    ``versions`` are loaded (the scorer's version policy); ``champion`` answers through the
    unversioned names (``fraud_xgb_pipeline``, ``fraud_blend_pipeline``); each version in
    ``pinned`` also has its own pipeline ``<model>_pipeline__v<N>``, which the catalog routes
    to. Without the file the newest version directory is the champion, with no pinned pipeline.
    """

    champion: int
    versions: tuple[int, ...]
    pinned: tuple[int, ...] = ()

    @classmethod
    def load(cls, repository: Path, model: str) -> Serving:
        path = repository / model / SERVING_FILE
        if not path.is_file():
            newest = latest_version(repository / model)
            return cls(newest, (newest,))
        try:
            raw = json.loads(path.read_text())
            serving = cls(
                int(raw["champion"]),
                tuple(sorted({int(v) for v in raw["versions"]})),
                tuple(sorted({int(v) for v in raw.get("pinned", ())})),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise RenderError(f"{path} is not a valid serving file: {exc}") from exc
        if serving.champion not in serving.versions or not set(serving.pinned) <= set(
            serving.versions
        ):
            raise RenderError(f"{path}: champion and pinned versions must be among versions")
        return serving

    def save(self, repository: Path, model: str) -> None:
        """Write the file atomically (temp file, fsync, rename)."""
        path = repository / model / SERVING_FILE
        tmp = path.with_name(f".{SERVING_FILE}.tmp")
        body = {
            "champion": self.champion,
            "versions": sorted(set(self.versions)),
            "pinned": sorted(set(self.pinned)),
        }
        with tmp.open("w") as fh:
            fh.write(json.dumps(body) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        tmp.replace(path)


def latest_version(model_dir: Path) -> int:
    if not model_dir.is_dir():
        raise RenderError(
            f"model {model_dir.name} not found in {model_dir.parent}; run `rtinfer models build`"
        )
    versions = [int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()]
    if not versions:
        raise RenderError(
            f"no numeric version directory in {model_dir}; run `rtinfer models build`"
        )
    return max(versions)


@dataclass(frozen=True)
class TrainedModel:
    name: str
    version: int
    path: Path
    metadata: ModelMetadata
    spec: FeatureSpec
    stats: TrainingStats

    @classmethod
    def load(cls, repository: Path, name: str, version: int | None = None) -> TrainedModel:
        """Version ``version`` of ``name`` (default: its newest version directory)."""
        model_dir = repository / name
        if not model_dir.is_dir():
            raise RenderError(f"model {name} not found in {repository}; run `rtinfer models build`")
        if version is None:
            version = latest_version(model_dir)
        path = model_dir / str(version)
        try:
            return cls(
                name=name,
                version=version,
                path=path,
                metadata=ModelMetadata.load(path / METADATA_FILE),
                spec=FeatureSpec.load(path / FEATURE_SPEC_FILE),
                stats=TrainingStats.load(path / TRAINING_STATS_FILE),
            )
        except (OSError, ValueError) as exc:
            raise RenderError(f"{name} version {version} is incomplete: {exc}") from exc


def _tensor(name: str, dtype: int, dims: Iterable[int]) -> dict[str, object]:
    return {"name": name, "data_type": dtype, "dims": list(dims)}


def _set_params(config: mc.ModelConfig, params: dict[str, object]) -> None:
    for key, value in params.items():
        config.parameters[key].string_value = str(value)


def _dynamic_batching(config: mc.ModelConfig, settings: Settings, entry: bool = False) -> None:
    b = settings.batching
    config.max_batch_size = b.max_batch_size
    db = config.dynamic_batching
    db.max_queue_delay_microseconds = b.max_queue_delay_us
    if b.queue_policy == "none" or (b.queue_policy == "entry" and not entry):
        return
    policy = db.default_queue_policy
    policy.max_queue_size = b.max_queue_size
    policy.timeout_action = mc.ModelQueuePolicy.REJECT
    policy.default_timeout_microseconds = b.queue_timeout_us
    policy.allow_timeout_override = True


def _python_model(
    name: str, settings: Settings, instances: int | None = None, entry: bool = False
) -> mc.ModelConfig:
    config = mc.ModelConfig(name=name, backend="python")
    _dynamic_batching(config, settings, entry)
    count = instances if instances is not None else settings.batching.instances
    config.instance_group.add(kind=mc.ModelInstanceGroup.KIND_CPU, count=count)
    return config


def scorer_config(model: TrainedModel, settings: Settings, target: Target) -> mc.ModelConfig:
    """One scoring model: input__0 FP32 [n_features] -> output__0 FP32 [2] on every target."""
    md = model.metadata
    if target == "cpu":
        if "onnx" not in md.artifacts:
            raise RenderError(f"{model.name} has no ONNX artifact for the cpu target")
        config = _python_model(model.name, settings)
        _set_params(config, {"model_file": md.artifacts["onnx"], "intra_op_threads": 1})
    elif md.kind == "xgboost":
        config = mc.ModelConfig(name=model.name, backend="fil")
        _dynamic_batching(config, settings)
        config.instance_group.add(kind=mc.ModelInstanceGroup.KIND_AUTO)
        # binary classifier with predict_proba -> [P(class 0), P(class 1)] per row
        _set_params(
            config,
            {
                "model_type": "xgboost_json",
                "output_class": "true",
                "predict_proba": "true",
                "use_experimental_optimizations": "true",
            },
        )
        config.default_model_filename = md.artifacts["xgboost"]
    else:
        config = mc.ModelConfig(name=model.name, backend="onnxruntime")
        _dynamic_batching(config, settings)
        config.instance_group.add(kind=mc.ModelInstanceGroup.KIND_AUTO)
        config.default_model_filename = md.artifacts["onnx"]
    config.input.add(**_tensor(md.input_name, mc.TYPE_FP32, [md.n_features]))
    config.output.add(**_tensor(md.output_name, mc.TYPE_FP32, [2]))
    # first inference pays one-off costs (session init, allocations): pay them at load time
    warmup = config.model_warmup.add(name="zeros", batch_size=1)
    warmup.inputs[md.input_name].data_type = mc.TYPE_FP32
    warmup.inputs[md.input_name].dims.append(md.n_features)
    warmup.inputs[md.input_name].zero_data = True
    return config


def assembler_config(spec: FeatureSpec, settings: Settings) -> mc.ModelConfig:
    config = _python_model(
        "feature_assembler", settings, settings.batching.assembler_instances, entry=True
    )
    n_context = len(spec.indices("context"))
    config.input.add(**_tensor("user_id", mc.TYPE_STRING, [1]))
    config.input.add(**_tensor("merchant_id", mc.TYPE_STRING, [1]))
    config.input.add(**_tensor("context", mc.TYPE_FP32, [n_context]))
    config.output.add(**_tensor("features", mc.TYPE_FP32, [spec.n_features]))
    config.output.add(**_tensor("imputed_count", mc.TYPE_INT32, [1]))
    config.output.add(**_tensor("feature_store_ok", mc.TYPE_BOOL, [1]))
    r, f = settings.redis, settings.features
    _set_params(
        config,
        {
            "feature_spec": FEATURE_SPEC_FILE,
            "redis_url": r.url,
            "redis_timeout_ms": r.timeout_ms,
            "key_prefix": r.key_prefix,
            "cache_max_entities": f.cache_max_entities,
            "cache_ttl_s": f.cache_ttl_s,
            "breaker_failure_threshold": f.breaker_failure_threshold,
            "breaker_reset_timeout_s": f.breaker_reset_timeout_s,
        },
    )
    return config


def blend_config(settings: Settings, scorers: tuple[str, ...]) -> mc.ModelConfig:
    config = _python_model("fraud_blend", settings)
    for i, _ in enumerate(scorers):
        config.input.add(**_tensor(f"probabilities_{i}", mc.TYPE_FP32, [2]))
    config.output.add(**_tensor("probabilities", mc.TYPE_FP32, [2]))
    weights = settings.postprocess.blend_weights
    missing = [s for s in scorers if s not in weights]
    if missing:
        raise RenderError(f"blend weights missing for {missing}; set RTINFER_POSTPROCESS__...")
    _set_params(config, {"weights": ",".join(str(weights[s]) for s in scorers)})
    return config


def operating_point(scorers: list[TrainedModel], settings: Settings) -> tuple[float, float]:
    """(decision threshold, class prior) of a pipeline scoring with ``scorers``: one model's
    own, or for a blend the weight-averaged threshold; the prior of the training set."""
    if len(scorers) == 1:
        threshold = scorers[0].metadata.threshold
    else:
        w = settings.postprocess.blend_weights
        total = sum(w[s.name] for s in scorers)
        threshold = sum(w[s.name] * s.metadata.threshold for s in scorers) / total
    return threshold, scorers[0].stats.class_prior


def class_prior_fallback(
    repository: Path, endpoint: str, settings: Settings
) -> dict[str, object] | None:
    """The catalog ``fallback_config`` of a deployment serving through ``endpoint``: the class
    prior and threshold of the scorer versions that endpoint answers with, from their
    ``training_stats.json`` and ``metadata.json``. ``None`` for an endpoint that is not one of
    the rendered pipelines."""
    base, _, pinned = endpoint.partition(PINNED_SEPARATOR)
    pipe = next((p for p in PIPELINES if p.ensemble == base), None)
    if pipe is None or (pinned and (not pinned.isdigit() or len(pipe.scorers) != 1)):
        return None
    if pinned:
        versions = {pipe.scorers[0]: int(pinned)}
    else:
        versions = {s: Serving.load(repository, s).champion for s in pipe.scorers}
    scorers = [TrainedModel.load(repository, name, v) for name, v in versions.items()]
    threshold, prior = operating_point(scorers, settings)
    return {
        "type": "class_prior",
        "score": round(prior, 6),
        "threshold": round(threshold, 6),
        "source": "training_stats",
        "versions": {name: str(v) for name, v in versions.items()},
    }


def postprocess_config(
    name: str,
    scorers: list[TrainedModel],
    fallback: TrainedModel | None,
    settings: Settings,
) -> mc.ModelConfig:
    """Label/confidence from the scorer(s); fallback scoring when features are unavailable."""
    spec = scorers[0].spec
    if fallback is not None:
        missing = [n for n in fallback.spec.names if n not in spec.names]
        if missing:
            raise RenderError(f"fallback {fallback.name} needs features {missing} not served")
        indices = [spec.names.index(n) for n in fallback.spec.names]
    else:
        indices = []
    threshold, class_prior = operating_point(scorers, settings)
    config = _python_model(name, settings)
    config.input.add(**_tensor("probabilities", mc.TYPE_FP32, [2]))
    config.input.add(**_tensor("feature_store_ok", mc.TYPE_BOOL, [1]))
    config.input.add(**_tensor("features", mc.TYPE_FP32, [spec.n_features]))
    for out, dtype in (
        ("prediction", mc.TYPE_FP32),
        ("label", mc.TYPE_STRING),
        ("confidence", mc.TYPE_FP32),
        ("degraded", mc.TYPE_BOOL),
        ("degraded_reason", mc.TYPE_STRING),
    ):
        config.output.add(**_tensor(out, dtype, [1]))
    _set_params(
        config,
        {
            "threshold": f"{threshold:.6f}",
            "class_names": ",".join(scorers[0].metadata.class_names),
            "class_prior": f"{class_prior:.6f}",
            "fallback_model": fallback.name if fallback is not None else "",
            "fallback_input": fallback.metadata.input_name if fallback is not None else "",
            "fallback_output": fallback.metadata.output_name if fallback is not None else "",
            "fallback_feature_indices": ",".join(map(str, indices)),
            "fallback_timeout_ms": settings.postprocess.fallback_timeout_ms,
        },
    )
    return config


def ensemble_config(
    name: str,
    settings: Settings,
    pins: Mapping[str, int] | None = None,
    rename: Mapping[str, str] | None = None,
) -> mc.ModelConfig:
    """Ensemble ``name`` from ``ensembles/``; ``pins`` fixes the version of named steps (else
    Triton picks the newest loaded one); ``rename`` maps the ensemble and step model names."""
    path = ENSEMBLES_DIR / f"{name}.pbtxt"
    config = text_format.Parse(path.read_text(), mc.ModelConfig())
    config.max_batch_size = settings.batching.max_batch_size
    names = dict(rename or {})
    config.name = names.get(config.name, config.name)
    for step in config.ensemble_scheduling.step:
        if pins and step.model_name in pins:
            step.model_version = pins[step.model_name]
        step.model_name = names.get(step.model_name, step.model_name)
    return config


def _fallback(repository: Path, settings: Settings) -> TrainedModel | None:
    name = settings.postprocess.fallback_model
    return TrainedModel.load(repository, name) if name else None


def write_pinned_pipeline(
    repository: Path, model: str, version: int, settings: Settings
) -> tuple[str, str]:
    """Write ``<model>_postprocess__v<N>`` and ``<model>_pipeline__v<N>``: the pipeline with the
    scorer pinned to ``version`` and that version's decision threshold.

    Returns (postprocess, ensemble) names, in load order.
    """
    pipe = own_pipeline(model)
    trained = TrainedModel.load(repository, model, version)
    post, ens = pinned_name(pipe.postprocess, version), pinned_name(pipe.ensemble, version)
    fallback = _fallback(repository, settings)
    write_config(repository / post, postprocess_config(post, [trained], fallback, settings))
    _place_shell(repository / post / "1", "postprocess")
    config = ensemble_config(
        pipe.ensemble,
        settings,
        pins={model: version},
        rename={pipe.ensemble: ens, pipe.postprocess: post},
    )
    write_config(repository / ens, config)
    (repository / ens / "1").mkdir(parents=True, exist_ok=True)
    return post, ens


def remove_pinned_pipeline(repository: Path, model: str, version: int) -> None:
    pipe = own_pipeline(model)
    for name in (pinned_name(pipe.ensemble, version), pinned_name(pipe.postprocess, version)):
        shutil.rmtree(repository / name, ignore_errors=True)


def _champions(repository: Path) -> dict[str, TrainedModel]:
    return {
        name: TrainedModel.load(repository, name, Serving.load(repository, name).champion)
        for name in SCORERS
    }


def write_pipelines(
    repository: Path,
    settings: Settings,
    trained: Mapping[str, TrainedModel] | None = None,
    only_with: str | None = None,
) -> list[str]:
    """Write the unversioned pipelines (postprocess + ensemble), their scorer steps pinned to
    each scorer's champion; ``only_with``: just the pipelines using that scorer.

    Returns the names written, in load order (postprocess before its ensemble).
    """
    champions = dict(trained) if trained is not None else _champions(repository)
    fallback = _fallback(repository, settings)
    names: list[str] = []
    for pipe in PIPELINES:
        if only_with is not None and only_with not in pipe.scorers:
            continue
        scorers = [champions[s] for s in pipe.scorers]
        post_dir = repository / pipe.postprocess
        write_config(post_dir, postprocess_config(pipe.postprocess, scorers, fallback, settings))
        _place_shell(post_dir / "1", "postprocess")
        pins = {s.name: s.version for s in scorers}
        write_config(repository / pipe.ensemble, ensemble_config(pipe.ensemble, settings, pins))
        (repository / pipe.ensemble / "1").mkdir(parents=True, exist_ok=True)
        names += [pipe.postprocess, pipe.ensemble]
    return names


def write_config(model_dir: Path, config: mc.ModelConfig) -> None:
    model_dir.mkdir(parents=True, exist_ok=True)
    tmp = model_dir / "config.pbtxt.tmp"
    tmp.write_text(text_format.MessageToString(config))
    tmp.replace(model_dir / "config.pbtxt")


def _place_shell(version_dir: Path, shell: str | None) -> None:
    """Put (or, for non-python backends, remove) the python-backend ``model.py``."""
    version_dir.mkdir(parents=True, exist_ok=True)
    target = version_dir / "model.py"
    if shell is None:
        target.unlink(missing_ok=True)
        return
    shutil.copyfile(SHELLS_DIR / shell / "model.py", target)


def place_scorer_shell(version_dir: Path, target: Target) -> None:
    """Put the scorer's python-backend shell into ``version_dir`` (``cpu``), or remove it."""
    _place_shell(version_dir, "onnx_runner" if target == "cpu" else None)


def set_version_policy(config: mc.ModelConfig, versions: Iterable[int]) -> mc.ModelConfig:
    """Make Triton serve exactly ``versions`` of ``config``'s model (sorted, no duplicates)."""
    wanted = sorted(set(versions))
    if not wanted or wanted[0] < 1:
        raise RenderError(f"{config.name}: versions to serve must be >= 1, got {wanted}")
    config.version_policy.specific.versions[:] = wanted
    return config


def render_scorer_versions(
    repository: Path, name: str, versions: Iterable[int], settings: Settings, target: Target
) -> mc.ModelConfig:
    """Rewrite the config of scorer ``name`` so that Triton serves exactly ``versions``.

    The newest listed version's artifacts define the config; the versions of one model share
    its tensor interface (checked before a version is placed in the repository).
    """
    wanted = sorted(set(versions))
    if not wanted:
        raise RenderError(f"{name}: no version to serve")
    config = scorer_config(TrainedModel.load(repository, name, wanted[-1]), settings, target)
    set_version_policy(config, wanted)
    write_config(repository / name, config)
    return config


def served_models(repository: Path) -> list[str]:
    """The models Triton loads for ``repository`` as rendered, in load order: the scorers,
    the assembler, the blend, each pipeline (postprocess before its ensemble), then the
    pipelines pinned in each scorer's ``serving.json``."""
    models = [*SCORERS, "feature_assembler", "fraud_blend"]
    for pipe in PIPELINES:
        models += [pipe.postprocess, pipe.ensemble]
    for name in SCORERS:
        serving = Serving.load(repository, name)
        if not serving.pinned:
            continue
        pipe = own_pipeline(name)
        for version in serving.pinned:
            models += [pinned_name(pipe.postprocess, version), pinned_name(pipe.ensemble, version)]
    return models


def render_repository(repository: Path, settings: Settings, target: Target = "cpu") -> list[str]:
    """Write every config of ``repository``; return the model names Triton must load.

    Each scorer serves the versions of its ``serving.json`` (default: the newest version
    directory); the unversioned pipelines use its champion, and every pinned version gets its
    own pipeline.
    """
    serving = {name: Serving.load(repository, name) for name in SCORERS}
    for name, state in serving.items():  # from now on a dropped version is not the champion
        if not (repository / name / SERVING_FILE).is_file():
            state.save(repository, name)
    trained = _champions(repository)
    spec = trained["fraud_xgb"].spec
    if trained["fraud_nn"].spec.names != spec.names:
        raise RenderError("fraud_xgb and fraud_nn must share one feature spec")
    if len(spec.indices("context")) != CONTEXT_DIM:
        raise RenderError(f"ensembles take {CONTEXT_DIM} context features")
    fallback_name = settings.postprocess.fallback_model
    if fallback_name and fallback_name not in trained:
        raise RenderError(f"fallback model {fallback_name!r} is not a trained model")

    models: list[str] = []
    for name, model in trained.items():
        config = set_version_policy(scorer_config(model, settings, target), serving[name].versions)
        write_config(repository / name, config)
        for version in serving[name].versions:
            _place_shell(
                repository / name / str(version), "onnx_runner" if target == "cpu" else None
            )
        models.append(name)

    assembler_dir = repository / "feature_assembler"
    write_config(assembler_dir, assembler_config(spec, settings))
    _place_shell(assembler_dir / "1", "feature_assembler")
    spec.save(assembler_dir / "1" / FEATURE_SPEC_FILE)
    models.append("feature_assembler")

    blend_scorers = next(p.scorers for p in PIPELINES if p.ensemble == "fraud_blend_pipeline")
    write_config(repository / "fraud_blend", blend_config(settings, blend_scorers))
    _place_shell(repository / "fraud_blend" / "1", "blend")
    models.append("fraud_blend")

    models += write_pipelines(repository, settings, trained)
    for name, state in serving.items():
        for version in state.pinned:
            models += write_pinned_pipeline(repository, name, version, settings)
    log.info("rendered %d models for target %s into %s", len(models), target, repository)
    return models
