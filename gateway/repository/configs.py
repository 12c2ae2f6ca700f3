"""Model configs (``config.pbtxt``) of the repository's models, built as ``ModelConfig`` protobufs
so a rendered file always parses; and the class-prior fallback each version serves with.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from gateway.repository.layout import (
    ENSEMBLES_DIR,
    PINNED_SEPARATOR,
    PIPELINES,
    RenderError,
    Serving,
    TrainedModel,
)
from gateway.settings import Settings, Target
from python_backend.contract import CONTEXT, CONTEXT_FEATURES, MERCHANT_ID, USER_ID
from python_backend.feature_spec import (
    FEATURE_SPEC_FILE,
    FeatureSpec,
)


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


def direct_log_params(
    name: str, endpoint: str, scorers: list[TrainedModel], settings: Settings
) -> dict[str, object]:
    """Where postprocess ``name`` logs direct clients' predictions (docs/prediction-log.md);
    an empty bootstrap turns that off."""
    on = settings.postprocess.log_direct and settings.gateway.prediction_log == "kafka"
    version = (
        str(scorers[0].version)
        if len(scorers) == 1
        else "+".join(f"{s.name}:{s.version}" for s in scorers)
    )
    return {
        "prediction_log_bootstrap": settings.kafka_bootstrap() if on else "",
        "prediction_log_spool_dir": settings.spool_root().resolve() / "triton" / name,
        "prediction_log_linger_ms": settings.gateway.prediction_log_linger_ms,
        "log_model_name": endpoint.split(PINNED_SEPARATOR)[0].removesuffix("_pipeline"),
        "log_model_version": version,
        "serving_endpoint": endpoint,
    }


def postprocess_config(
    name: str,
    scorers: list[TrainedModel],
    fallback: TrainedModel | None,
    settings: Settings,
    *,
    endpoint: str,
) -> mc.ModelConfig:
    """Label/confidence from the scorer(s); fallback scoring when features are unavailable;
    the predictions of direct clients of ensemble ``endpoint`` go to the prediction log."""
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
    # the request as sent, for the log records of direct clients
    config.input.add(**_tensor(USER_ID, mc.TYPE_STRING, [1]))
    config.input.add(**_tensor(MERCHANT_ID, mc.TYPE_STRING, [1]))
    config.input.add(**_tensor(CONTEXT, mc.TYPE_FP32, [len(CONTEXT_FEATURES)]))
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
            **direct_log_params(name, endpoint, scorers, settings),
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


def set_version_policy(config: mc.ModelConfig, versions: Iterable[int]) -> mc.ModelConfig:
    """Make Triton serve exactly ``versions`` of ``config``'s model (sorted, no duplicates)."""
    wanted = sorted(set(versions))
    if not wanted or wanted[0] < 1:
        raise RenderError(f"{config.name}: versions to serve must be >= 1, got {wanted}")
    config.version_policy.specific.versions[:] = wanted
    return config
