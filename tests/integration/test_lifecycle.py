"""Model lifecycle building blocks against the stack's real Triton (explicit model control).

The tests add versions of ``fraud_xgb`` to the stack's repository; a fixture removes them,
restores ``config.pbtxt`` and reloads the model, so later tests see version 1 alone again.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.lifecycle.artifacts import copy_artifacts, validate_version_dir
from gateway.lifecycle.errors import ArtifactInvalid, ModelLoadFailed, SmokeTestFailed
from gateway.lifecycle.materialize import materialize_version, remove_version, serve_versions
from gateway.lifecycle.smoke import smoke_test
from gateway.lifecycle.triton_repo import READY, TritonRepository
from gateway.repository.layout import latest_version, place_scorer_shell
from gateway.settings import Settings
from rtinfer.client import FraudClient
from rtinfer.stack import StackState

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

MODEL = "fraud_xgb"
SERVED = 1


class Scratch:
    """Versions of ``fraud_xgb`` a test adds; all of them are undone at teardown."""

    def __init__(self, state: StackState) -> None:
        self.repo = Path(state.model_repository)
        self.grpc_url = state.triton_ports.grpc_url
        self.target = state.target
        self.config_file = self.repo / MODEL / "config.pbtxt"
        self.original_config = self.config_file.read_bytes()
        self.first_new = latest_version(self.repo / MODEL) + 1
        self.created: list[int] = []

    def new_version(self) -> int:
        version = self.first_new + len(self.created)
        self.created.append(version)
        return version

    def restore(self) -> None:
        async def reload() -> tuple[list[int], bool]:
            repo = TritonRepository(self.grpc_url)
            try:
                failed = [
                    v
                    for v, s in (await repo.versions(MODEL)).items()
                    if v in self.created and s.state != READY and s.reason != "unloaded"
                ]
                if failed:
                    # Triton keeps a failed version's error, and with --strict-readiness the
                    # server stays not ready, until that version number loads successfully:
                    # load a good copy under it, then drop it with the rest below
                    for version in failed:
                        shutil.rmtree(self.repo / MODEL / str(version))
                        good = copy_artifacts(
                            self.repo / MODEL / str(SERVED), self.repo / MODEL / str(version)
                        )
                        place_scorer_shell(good, self.target)
                    await repo.load_versions(MODEL, [SERVED, *failed])
                for version in self.created:
                    remove_version(self.repo, MODEL, version)
                self.config_file.write_bytes(self.original_config)
                await repo.load(MODEL)
                for version in self.created:
                    await repo.wait_unloaded(MODEL, version, timeout_s=15)
                return await repo.ready_versions(MODEL), await repo.server_ready()
            finally:
                await repo.close()

        assert asyncio.run(reload()) == ([SERVED], True)


@pytest.fixture()
def scratch(running_stack: StackState) -> Iterator[Scratch]:
    made = Scratch(running_stack)
    assert made.first_new > SERVED
    try:
        yield made
    finally:
        made.restore()


def _pipeline_answers(state: StackState) -> bool:
    with FraudClient(state.triton_ports.grpc_url, "grpc") as client:
        (row,) = client.predict("fraud_xgb_pipeline", ["u-1"], ["m-1"], [[0.0] * 10])
    return row.label in ("legit", "fraud")


def test_new_version_loads_alongside_and_passes_smoke(
    scratch: Scratch, running_stack: StackState, tmp_path: Path
) -> None:
    candidate = copy_artifacts(scratch.repo / MODEL / str(SERVED), tmp_path / "candidate")
    new = scratch.new_version()
    report = materialize_version(
        candidate, scratch.repo, MODEL, new, scratch.target, reference_version=SERVED
    )
    serve_versions(scratch.repo, MODEL, [SERVED, new], Settings(), scratch.target)

    async def go() -> tuple[dict[int, str], float, float]:
        repo = TritonRepository(scratch.grpc_url)
        try:
            await repo.load(MODEL)
            await repo.wait_ready(MODEL, new, timeout_s=30)
            states = {v: s.state for v, s in (await repo.versions(MODEL)).items()}
            new_smoke = await smoke_test(repo, MODEL, new, report.metadata)
            old_smoke = await smoke_test(repo, MODEL, SERVED, report.metadata)
            # the same checks fail on wrong expectations, a latency bound, a missing version
            wrong = report.metadata.model_copy(deep=True)
            wrong.golden[2].probability += 0.05
            with pytest.raises(SmokeTestFailed, match="golden example 2 scored"):
                await smoke_test(repo, MODEL, new, wrong)
            with pytest.raises(SmokeTestFailed, match="median single-row latency"):
                await smoke_test(repo, MODEL, new, report.metadata, p50_bound_ms=0.001)
            with pytest.raises(SmokeTestFailed, match="inference failed"):
                await smoke_test(repo, MODEL, new + 50, report.metadata)
            return states, new_smoke.max_diff, old_smoke.p50_ms
        finally:
            await repo.close()

    states, diff, p50_ms = asyncio.run(go())
    assert states[SERVED] == READY and states[new] == READY
    assert diff <= 1e-4
    assert p50_ms < 50
    assert _pipeline_answers(running_stack)


def test_corrupt_version_fails_to_load_and_the_served_one_keeps_serving(
    scratch: Scratch, running_stack: StackState, tmp_path: Path
) -> None:
    bad = scratch.new_version()
    # placed by hand: validation would have refused it before Triton ever saw it
    version_dir = scratch.repo / MODEL / str(bad)
    copy_artifacts(scratch.repo / MODEL / str(SERVED), version_dir)
    (version_dir / "model.onnx").write_bytes(b"\x08\x07 this is not an ONNX graph")
    place_scorer_shell(version_dir, scratch.target)
    shutil.rmtree(version_dir / "__pycache__", ignore_errors=True)

    async def go() -> tuple[str, dict[int, tuple[str, str]], bool]:
        repo = TritonRepository(scratch.grpc_url)
        try:
            with pytest.raises(ModelLoadFailed) as failed:
                await repo.load_versions(MODEL, [SERVED, bad])
            versions = await repo.versions(MODEL)
            states = {v: (s.state, s.reason) for v, s in versions.items()}
            return failed.value.message, states, await repo.server_ready()
        finally:
            await repo.close()

    message, states, server_ready = asyncio.run(go())
    # Triton's reason reaches the caller: the python model's initialize failed on the file
    assert f"version {bad}" in message and "model.onnx" in message, message
    assert states[SERVED][0] == READY
    assert states[bad][0] == "UNAVAILABLE" and "model.onnx" in states[bad][1]
    assert _pipeline_answers(running_stack)
    # strict readiness counts the failed version until it is healed (see Scratch.restore)
    assert server_ready is False
    with pytest.raises(ArtifactInvalid, match="does not load in ONNX Runtime"):
        validate_version_dir(copy_artifacts(version_dir, tmp_path / "bad"), MODEL)
