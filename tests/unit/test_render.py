"""The rendered repository is valid for both the local CPU target and NVIDIA's container."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from gateway.repository.configs import class_prior_fallback
from gateway.repository.layout import PIPELINES, RenderError, Serving, pinned_name, served_models
from gateway.repository.render import render_repository
from gateway.settings import BatchingSettings, Settings


def _parse(path: Path) -> mc.ModelConfig:
    return text_format.Parse(path.read_text(), mc.ModelConfig())


@pytest.fixture()
def repo(built_repository: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "repo"
    shutil.copytree(built_repository, dest)
    return dest


def _io(config: mc.ModelConfig) -> tuple[list[tuple[str, int, list[int]]], ...]:
    ins = [(t.name, t.data_type, list(t.dims)) for t in config.input]
    outs = [(t.name, t.data_type, list(t.dims)) for t in config.output]
    return ins, outs


def test_cpu_and_ngc_scorers_have_identical_interfaces(repo: Path) -> None:
    settings = Settings()
    render_repository(repo, settings, "cpu")
    cpu = {m: _parse(repo / m / "config.pbtxt") for m in ("fraud_xgb", "fraud_nn")}
    assert (repo / "fraud_xgb" / "1" / "model.py").exists()
    render_repository(repo, settings, "ngc")
    ngc = {m: _parse(repo / m / "config.pbtxt") for m in ("fraud_xgb", "fraud_nn")}
    for m in cpu:
        assert _io(cpu[m]) == _io(ngc[m])
        assert _io(cpu[m]) == (
            [("input__0", mc.TYPE_FP32, [50])],
            [("output__0", mc.TYPE_FP32, [2])],
        )
    assert cpu["fraud_xgb"].backend == "python"
    assert not (repo / "fraud_xgb" / "1" / "model.py").exists()


def test_fil_config_for_xgboost_json(repo: Path) -> None:
    render_repository(repo, Settings(), "ngc")
    fil = _parse(repo / "fraud_xgb" / "config.pbtxt")
    assert fil.backend == "fil"
    params = {k: v.string_value for k, v in fil.parameters.items()}
    assert params["model_type"] == "xgboost_json"
    assert params["output_class"] == "true"
    assert params["predict_proba"] == "true"
    assert fil.default_model_filename == "xgboost.json"
    assert (repo / "fraud_xgb" / "1" / "xgboost.json").exists()
    ort_cfg = _parse(repo / "fraud_nn" / "config.pbtxt")
    assert ort_cfg.backend == "onnxruntime"
    assert (repo / "fraud_nn" / "1" / ort_cfg.default_model_filename).exists()


def test_every_model_has_bounded_dynamic_batching(repo: Path) -> None:
    settings = Settings(
        batching=BatchingSettings(max_batch_size=32, max_queue_size=100, queue_policy="all")
    )
    models = render_repository(repo, settings, "cpu")
    for name in models:
        config = _parse(repo / name / "config.pbtxt")
        assert config.max_batch_size == 32, name
        if config.platform == "ensemble":
            continue
        policy = config.dynamic_batching.default_queue_policy
        assert config.HasField("dynamic_batching"), name
        assert policy.max_queue_size == 100, name
        assert policy.default_timeout_microseconds > 0, name
        assert policy.timeout_action == mc.ModelQueuePolicy.REJECT


def test_no_queue_policy_by_default_and_entry_bounds_the_pipeline_entry(repo: Path) -> None:
    """Triton 2.51 stalls bursts behind any queue policy: none by default; ``entry`` bounds
    admission at feature_assembler, the first step of every ensemble."""
    for policy, bounded in (("none", set()), ("entry", {"feature_assembler"})):
        settings = Settings(batching=BatchingSettings(queue_policy=policy))  # type: ignore[arg-type]
        models = render_repository(repo, settings, "cpu")
        assert Settings().batching.queue_policy == "none"
        for name in models:
            config = _parse(repo / name / "config.pbtxt")
            if config.platform == "ensemble":
                assert config.ensemble_scheduling.step[0].model_name == "feature_assembler"
                continue
            has_policy = config.dynamic_batching.HasField("default_queue_policy")
            assert has_policy == (name in bounded), (policy, name)


def test_served_models_lists_what_rendering_loads(repo: Path) -> None:
    assert served_models(repo) == render_repository(repo, Settings(), "cpu")


def test_ensembles_reference_rendered_models_with_matching_tensors(repo: Path) -> None:
    models = set(render_repository(repo, Settings(), "cpu"))
    for pipe in PIPELINES:
        ens = _parse(repo / pipe.ensemble / "config.pbtxt")
        assert ens.platform == "ensemble"
        produced = {t.name for t in ens.input}
        for step in ens.ensemble_scheduling.step:
            assert step.model_name in models
            step_cfg = _parse(repo / step.model_name / "config.pbtxt")
            assert set(step.input_map) == {t.name for t in step_cfg.input}, step.model_name
            assert set(step.input_map.values()) <= produced, step.model_name
            assert set(step.output_map) <= {t.name for t in step_cfg.output}
            produced |= set(step.output_map.values())
        assert {t.name for t in ens.output} <= produced


def test_postprocess_gets_threshold_prior_and_fallback_indices(repo: Path) -> None:
    render_repository(repo, Settings(), "cpu")
    cfg = _parse(repo / "fraud_xgb_postprocess" / "config.pbtxt")
    params = {k: v.string_value for k, v in cfg.parameters.items()}
    assert 0 < float(params["threshold"]) < 1
    assert 0 < float(params["class_prior"]) < 0.2
    assert params["fallback_model"] == "fraud_context_lr"
    assert params["fallback_feature_indices"] == ",".join(str(i) for i in range(40, 50))


def test_missing_model_is_a_clear_error(repo: Path) -> None:
    shutil.rmtree(repo / "fraud_nn")
    with pytest.raises(RenderError, match="fraud_nn"):
        render_repository(repo, Settings(), "cpu")


def _with_threshold(repo: Path, model: str, version: int, threshold: float) -> None:
    """Version ``version`` of ``model``: version 1's files with another decision threshold."""
    dest = repo / model / str(version)
    shutil.copytree(repo / model / "1", dest)
    metadata = json.loads((dest / "metadata.json").read_text())
    metadata["threshold"] = threshold
    (dest / "metadata.json").write_text(json.dumps(metadata))


def test_first_render_records_the_newest_version_as_served(repo: Path) -> None:
    render_repository(repo, Settings(), "cpu")
    assert Serving.load(repo, "fraud_xgb") == Serving(1, (1,), ())
    _with_threshold(repo, "fraud_xgb", 2, 0.4)  # dropped later: not served by a re-render
    render_repository(repo, Settings(), "cpu")
    assert Serving.load(repo, "fraud_xgb") == Serving(1, (1,), ())
    assert list(_parse(repo / "fraud_xgb" / "config.pbtxt").version_policy.specific.versions) == [1]


def test_serving_file_pins_champion_and_renders_each_pinned_version(repo: Path) -> None:
    _with_threshold(repo, "fraud_xgb", 2, 0.4)
    _with_threshold(repo, "fraud_xgb", 3, 0.3)
    Serving(2, (2, 3), (2, 3)).save(repo, "fraud_xgb")
    models = render_repository(repo, Settings(), "cpu")

    scorer = _parse(repo / "fraud_xgb" / "config.pbtxt")
    assert list(scorer.version_policy.specific.versions) == [2, 3]
    for ensemble in ("fraud_xgb_pipeline", "fraud_blend_pipeline"):
        steps = _parse(repo / ensemble / "config.pbtxt").ensemble_scheduling.step
        assert {s.model_name: s.model_version for s in steps}["fraud_xgb"] == 2, ensemble
    for version, threshold in ((2, 0.4), (3, 0.3)):
        pipeline, post = (
            pinned_name("fraud_xgb_pipeline", version),
            pinned_name("fraud_xgb_postprocess", version),
        )
        assert models.index(post) < models.index(pipeline)
        steps = {
            s.model_name: s.model_version
            for s in _parse(repo / pipeline / "config.pbtxt").ensemble_scheduling.step
        }
        assert steps == {"feature_assembler": -1, "fraud_xgb": version, post: -1}
        params = _parse(repo / post / "config.pbtxt").parameters
        assert float(params["threshold"].string_value) == pytest.approx(threshold)
    base = _parse(repo / "fraud_xgb_postprocess" / "config.pbtxt").parameters
    assert float(base["threshold"].string_value) == pytest.approx(0.4)  # the champion's


def test_inconsistent_serving_file_is_a_clear_error(repo: Path) -> None:
    Serving(2, (1,), ()).save(repo, "fraud_xgb")
    with pytest.raises(RenderError, match="champion"):
        render_repository(repo, Settings(), "cpu")


def test_served_models_follow_the_serving_files(repo: Path) -> None:
    _with_threshold(repo, "fraud_xgb", 2, 0.4)
    Serving(2, (1, 2), (2,)).save(repo, "fraud_xgb")
    models = render_repository(repo, Settings(), "cpu")
    assert served_models(repo) == models
    assert models[-2:] == ["fraud_xgb_postprocess__v2", "fraud_xgb_pipeline__v2"]


def _stats_prior(repo: Path, model: str, version: int, prior: float) -> None:
    path = repo / model / str(version) / "training_stats.json"
    stats = json.loads(path.read_text())
    stats["class_prior"] = prior
    path.write_text(json.dumps(stats))


def test_class_prior_fallback_comes_from_the_answering_versions_training_stats(
    repo: Path,
) -> None:
    _with_threshold(repo, "fraud_xgb", 2, 0.4)
    _stats_prior(repo, "fraud_xgb", 2, 0.0625)
    Serving(1, (1, 2), (2,)).save(repo, "fraud_xgb")
    render_repository(repo, Settings(), "cpu")
    v1 = json.loads((repo / "fraud_xgb" / "1" / "training_stats.json").read_text())
    assert class_prior_fallback(repo, "fraud_xgb_pipeline__v2", Settings()) == {
        "type": "class_prior",
        "score": 0.0625,
        "threshold": 0.4,
        "source": "training_stats",
        "versions": {"fraud_xgb": "2"},
    }
    champion = class_prior_fallback(repo, "fraud_xgb_pipeline", Settings())
    assert champion is not None and champion["versions"] == {"fraud_xgb": "1"}
    assert champion["score"] == pytest.approx(v1["class_prior"], abs=1e-6)
    assert champion["score"] != 0.035  # not the seed catalog's constant
    blend = class_prior_fallback(repo, "fraud_blend_pipeline", Settings())
    assert blend is not None and set(blend["versions"]) == {"fraud_xgb", "fraud_nn"}  # type: ignore[arg-type]
    for unknown in ("other_pipeline", "fraud_blend_pipeline__v2", "fraud_xgb_pipeline__vx"):
        assert class_prior_fallback(repo, unknown, Settings()) is None


def _params(repo: Path, model: str) -> dict[str, str]:
    return {k: v.string_value for k, v in _parse(repo / model / "config.pbtxt").parameters.items()}


def test_postprocess_logs_direct_clients_with_the_pipelines_identity(
    repo: Path, tmp_path: Path
) -> None:
    _with_threshold(repo, "fraud_xgb", 2, 0.4)
    Serving(1, (1, 2), (2,)).save(repo, "fraud_xgb")
    settings = Settings(state_dir=tmp_path / "state")
    settings.kafka.port = 19093
    render_repository(repo, settings, "cpu")
    xgb = _params(repo, "fraud_xgb_postprocess")
    assert xgb["prediction_log_bootstrap"] == "127.0.0.1:19093"
    assert xgb["prediction_log_spool_dir"] == str(
        (tmp_path / "state" / "spool" / "triton" / "fraud_xgb_postprocess").resolve()
    )
    assert (xgb["log_model_name"], xgb["log_model_version"]) == ("fraud_xgb", "1")
    assert xgb["serving_endpoint"] == "fraud_xgb_pipeline"
    blend = _params(repo, "fraud_blend_postprocess")
    assert (blend["log_model_name"], blend["log_model_version"]) == (
        "fraud_blend",
        "fraud_xgb:1+fraud_nn:1",
    )
    pinned = _params(repo, pinned_name("fraud_xgb_postprocess", 2))
    assert (pinned["log_model_name"], pinned["log_model_version"]) == ("fraud_xgb", "2")
    assert pinned["serving_endpoint"] == pinned_name("fraud_xgb_pipeline", 2)
    # the request as sent reaches the postprocess step of every pipeline
    for pipe in PIPELINES:
        (step,) = [
            s
            for s in _parse(repo / pipe.ensemble / "config.pbtxt").ensemble_scheduling.step
            if s.model_name == pipe.postprocess
        ]
        assert {"user_id", "merchant_id", "context"} <= set(step.input_map)


@pytest.mark.parametrize("off", ["log_direct", "discard"])
def test_direct_logging_can_be_turned_off(repo: Path, off: str) -> None:
    settings = Settings()
    if off == "log_direct":
        settings.postprocess.log_direct = False
    else:
        settings.gateway.prediction_log = "discard"
    render_repository(repo, settings, "cpu")
    for pipe in PIPELINES:
        assert _params(repo, pipe.postprocess)["prediction_log_bootstrap"] == ""
