"""Render the Triton model repository from trained artifacts and ``ensembles/``.

Trained models live in ``<repository>/<model>/<version>/`` (XGBoost JSON and/or ONNX, plus
feature spec, training statistics and metadata). Rendering writes every ``config.pbtxt`` for the
chosen target and places the thin python-backend shells:

* ``cpu`` - the scoring models run in the python backend on ONNX Runtime (``onnx_runner``).
* ``ngc`` - NVIDIA's Triton container: ``fraud_xgb`` on the FIL backend (XGBoost JSON),
  ``fraud_nn``/``fraud_context_lr`` on the onnxruntime backend.

Both targets expose identical tensor names, dtypes and shapes, so the ensembles are the same.
Configs are built as ``ModelConfig`` protobufs, so a rendered file always parses."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path

from tritonclient.grpc import model_config_pb2 as mc

from gateway.repository.configs import (
    assembler_config,
    blend_config,
    ensemble_config,
    postprocess_config,
    scorer_config,
    set_version_policy,
)
from gateway.repository.layout import (
    CONTEXT_DIM,
    PIPELINES,
    SCORERS,
    SERVING_FILE,
    RenderError,
    Serving,
    TrainedModel,
    _place_shell,
    own_pipeline,
    pinned_name,
    write_config,
)
from gateway.settings import Settings, Target
from python_backend.feature_spec import (
    FEATURE_SPEC_FILE,
)

log = logging.getLogger(__name__)


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
    write_config(
        repository / post, postprocess_config(post, [trained], fallback, settings, endpoint=ens)
    )
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
        config = postprocess_config(
            pipe.postprocess, scorers, fallback, settings, endpoint=pipe.ensemble
        )
        write_config(post_dir, config)
        _place_shell(post_dir / "1", "postprocess")
        pins = {s.name: s.version for s in scorers}
        write_config(repository / pipe.ensemble, ensemble_config(pipe.ensemble, settings, pins))
        (repository / pipe.ensemble / "1").mkdir(parents=True, exist_ok=True)
        names += [pipe.postprocess, pipe.ensemble]
    return names


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
