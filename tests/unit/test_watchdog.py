"""The model watchdog's round: probe, name the dead stub, bump its versions, reload it once."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from types import SimpleNamespace

from prometheus_client import CollectorRegistry

from gateway.lifecycle.errors import LifecycleError
from gateway.lifecycle.triton_repo import VersionState
from gateway.lifecycle.watchdog import ModelWatchdog, dead_model, touch_versions

DEAD = "in ensemble 'fraud_xgb_pipeline', Stub process 'feature_assembler_0_0' is not healthy."


class FakeTriton:
    """Two pipelines sharing the assembler, and the BLS fallback model used by none."""

    def __init__(self) -> None:
        self.dead: set[str] = set()
        self.loads: list[str] = []
        self.steps = {
            "fraud_xgb_pipeline": ["feature_assembler", "fraud_xgb", "fraud_xgb_postprocess"],
            "fraud_nn_pipeline": ["feature_assembler", "fraud_nn", "fraud_nn_postprocess"],
        }

    async def index(self) -> list[VersionState]:
        names = [*self.steps, "feature_assembler", "fraud_xgb", "fraud_nn", "fraud_context_lr"]
        return [VersionState(n, 1, "READY", "") for n in names]

    async def config(self, name: str) -> SimpleNamespace:
        steps = [SimpleNamespace(model_name=m) for m in self.steps.get(name, [])]
        return SimpleNamespace(
            platform="ensemble" if name in self.steps else "",
            ensemble_scheduling=SimpleNamespace(step=steps),
        )

    async def infer_pipeline(self, ensemble: str, *args: object) -> None:
        for model in self.steps[ensemble]:
            if model in self.dead:
                raise LifecycleError(
                    f"in ensemble '{ensemble}', Stub process '{model}_0_0' is not healthy."
                )

    async def probe(self, model: str, version: int | None, timeout_s: float) -> None:
        if model in self.dead:
            raise LifecycleError(f"Stub process '{model}_0_0' is not healthy.")

    async def load(self, model: str) -> None:
        self.loads.append(model)
        self.dead.discard(model)


def _repository(tmp_path: Path) -> Path:
    for model in ("feature_assembler", "fraud_context_lr"):
        (tmp_path / model / "1").mkdir(parents=True)
    (tmp_path / "fraud_context_lr" / "not-a-version").mkdir()
    return tmp_path


def test_dead_stub_errors_name_their_model() -> None:
    assert dead_model(DEAD) == "feature_assembler"
    assert dead_model("Stub process 'fraud_xgb_postprocess__v2_0_1' is not healthy.") == (
        "fraud_xgb_postprocess__v2"
    )
    assert dead_model("Request timeout expired") is None


def test_touching_bumps_every_version_directory(tmp_path: Path) -> None:
    repo = _repository(tmp_path)
    os.utime(repo / "fraud_context_lr" / "1", (1, 1))
    assert touch_versions(repo, "fraud_context_lr") == [1]
    assert (repo / "fraud_context_lr" / "1").stat().st_mtime > 1
    assert touch_versions(repo, "absent") == []


def test_a_round_reloads_each_dead_model_once_and_only_those(tmp_path: Path) -> None:
    async def run() -> None:
        triton = FakeTriton()
        registry = CollectorRegistry()
        watchdog = ModelWatchdog(triton, None, registry, _repository(tmp_path), cooldown_s=60)  # type: ignore[arg-type]
        targets = await watchdog.targets()
        assert [(t.model, t.ensemble) for t in targets] == [
            ("fraud_nn_pipeline", True),
            ("fraud_xgb_pipeline", True),
            ("fraud_context_lr", False),  # used by no ensemble: probed directly
        ]
        assert await watchdog.tick() == []
        triton.dead = {"feature_assembler", "fraud_context_lr"}
        assert sorted(await watchdog.tick()) == ["feature_assembler", "fraud_context_lr"]
        assert sorted(triton.loads) == ["feature_assembler", "fraud_context_lr"]
        (model, endpoints, _), _ = watchdog.reloads
        assert (model, endpoints) == (
            "feature_assembler",
            ("fraud_nn_pipeline", "fraud_xgb_pipeline"),
        )
        assert await watchdog.tick() == []
        triton.dead = {"feature_assembler"}  # dies again within the cooldown: no reload storm
        assert await watchdog.tick() == []
        assert len(triton.loads) == 2
        value = registry.get_sample_value(
            "rtinfer_watchdog_reloads_total", {"model": "feature_assembler", "outcome": "ok"}
        )
        assert value == 1.0

    asyncio.run(run())
