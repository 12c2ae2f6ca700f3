"""The repository watcher with a fake deployer and a temporary repository: settling, served
versions, ignored directories, one deploy per version."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from gateway.lifecycle.config import LifecycleSettings
from gateway.lifecycle.errors import ModelLoadFailed
from gateway.lifecycle.watcher import VersionWatcher
from gateway.repository.layout import SERVING_FILE
from gateway.settings import Settings, TritonSettings

MODEL = "fraud_xgb"
SETTLE_S = 3.0


@dataclass
class FakeDeployer:
    """Records deploy requests; ``attempted`` is true once a deploy of the version ran."""

    fail: set[int] = field(default_factory=set)
    already: set[tuple[str, int]] = field(default_factory=set)
    requests: list[Any] = field(default_factory=list)
    asked: list[tuple[str, int]] = field(default_factory=list)

    async def attempted(self, model: str, version: int) -> bool:
        self.asked.append((model, version))
        return (model, version) in self.already

    async def deploy(self, req: Any) -> str:
        self.requests.append(req)
        self.already.add((req.model, req.version))
        if req.version in self.fail:
            raise ModelLoadFailed(f"{req.model} version {req.version}: Triton refused it")
        return f"deployed {req.version}"


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def metadata(version: int) -> dict[str, Any]:
    return {
        "model_name": MODEL,
        "version": version,
        "kind": "xgboost",
        "artifacts": {"onnx": "model.onnx", "xgboost": "xgboost.json"},
        "n_features": 50,
        "threshold": 0.5,
    }


def write_version(repo: Path, version: int, *, files: tuple[str, ...] = ()) -> Path:
    """A version directory with ``metadata.json`` and ``files`` (default: all it declares)."""
    path = repo / MODEL / str(version)
    path.mkdir(parents=True)
    (path / "metadata.json").write_text(json.dumps(metadata(version)))
    for name in files or ("model.onnx", "xgboost.json", "feature_spec.json"):
        (path / name).write_bytes(b"x" * 100)
    return path


@pytest.fixture()
def repo(tmp_path: Path) -> Path:
    write_version(tmp_path, 1)
    return tmp_path


def watcher_for(
    repo: Path, deployer: FakeDeployer, clock: Clock, **lifecycle: Any
) -> VersionWatcher:
    settings = Settings(
        triton=TritonSettings(model_repository=repo),
        lifecycle=LifecycleSettings(managed_models=(MODEL,), watch_settle_s=SETTLE_S, **lifecycle),
    )
    watcher = VersionWatcher(settings, deployer, clock=clock)  # type: ignore[arg-type]
    tick(watcher)  # the first scan finds version 1 as what serves
    return watcher


def tick(watcher: VersionWatcher) -> list[Any]:
    return asyncio.run(watcher.tick())


def at(watcher: VersionWatcher, clock: Clock, now: float) -> list[Any]:
    clock.now = now
    return tick(watcher)


def test_partial_directory_is_deployed_once_after_it_stops_changing(repo: Path) -> None:
    deployer, clock = FakeDeployer(), Clock()
    watcher = watcher_for(repo, deployer, clock, on_drop="canary")
    path = write_version(repo, 2, files=("feature_spec.json",))  # model files still to come
    assert at(watcher, clock, 1.0) == []
    (path / "model.onnx").write_bytes(b"x" * 10)
    assert at(watcher, clock, 5.0) == []  # changed at 5
    with open(path / "model.onnx", "ab") as f:
        f.write(b"y" * 10)
    (path / "xgboost.json").write_bytes(b"{}")
    assert at(watcher, clock, 7.0) == []  # changed at 7: settled from 10
    assert at(watcher, clock, 9.9) == []
    assert deployer.requests == []

    assert at(watcher, clock, 10.0) == ["deployed 2"]
    for now in (11.0, 20.0, 100.0):
        assert at(watcher, clock, now) == []
    (req,) = deployer.requests
    assert (req.model, req.version, req.mode, req.source, req.trigger) == (
        MODEL,
        2,
        "canary",
        None,
        "watcher",
    )
    assert len(req.detail["fingerprint"]) == 16


def test_stable_directory_missing_a_declared_file_waits_for_it(repo: Path) -> None:
    deployer, clock = FakeDeployer(), Clock()
    watcher = watcher_for(repo, deployer, clock)
    path = write_version(repo, 2, files=("model.onnx",))  # xgboost.json declared, missing
    at(watcher, clock, 0.0)
    assert at(watcher, clock, 60.0) == []
    (path / "xgboost.json").write_bytes(b"{}")
    assert at(watcher, clock, 61.0) == []
    assert at(watcher, clock, 64.0) == ["deployed 2"]


def test_unparsable_metadata_is_not_deployed(repo: Path) -> None:
    deployer, clock = FakeDeployer(), Clock()
    watcher = watcher_for(repo, deployer, clock)
    path = write_version(repo, 2)
    (path / "metadata.json").write_text('{"model_name": "fraud_xgb", "vers')
    at(watcher, clock, 0.0)
    assert at(watcher, clock, 60.0) == []
    assert deployer.requests == []


def test_served_and_older_versions_are_ignored(repo: Path) -> None:
    deployer, clock = FakeDeployer(), Clock()
    watcher = watcher_for(repo, deployer, clock)
    for version in (2, 3):
        write_version(repo, version)
    (repo / MODEL / SERVING_FILE).write_text(json.dumps({"champion": 3, "versions": [2, 3]}))
    at(watcher, clock, 0.0)
    assert at(watcher, clock, 10.0) == []
    write_version(repo, 4)
    at(watcher, clock, 11.0)
    assert at(watcher, clock, 14.0) == ["deployed 4"]
    assert [r.version for r in deployer.requests] == [4]
    assert deployer.asked == [(MODEL, 4)]


def test_without_serving_file_the_newest_directory_at_start_is_served(tmp_path: Path) -> None:
    for version in (1, 2):
        write_version(tmp_path, version)
    deployer, clock = FakeDeployer(), Clock()
    watcher = watcher_for(tmp_path, deployer, clock)
    assert at(watcher, clock, 10.0) == []
    write_version(tmp_path, 3)
    at(watcher, clock, 11.0)
    assert at(watcher, clock, 14.0) == ["deployed 3"]


def test_hidden_and_non_numeric_directories_are_ignored(repo: Path) -> None:
    deployer, clock = FakeDeployer(), Clock()
    watcher = watcher_for(repo, deployer, clock)
    for name in (".tmp-7-abcd", "latest", "8.bak"):
        src = write_version(repo, 99)
        src.rename(repo / MODEL / name)
    at(watcher, clock, 0.0)
    assert at(watcher, clock, 10.0) == []
    assert deployer.asked == []


def test_failed_deploy_is_not_retried_even_after_the_directory_changes(repo: Path) -> None:
    deployer, clock = FakeDeployer(fail={2}), Clock()
    watcher = watcher_for(repo, deployer, clock)
    path = write_version(repo, 2)
    at(watcher, clock, 0.0)
    assert at(watcher, clock, 3.0) == []  # deploy raised; logged, not raised here
    assert len(deployer.requests) == 1
    for now in (4.0, 10.0, 30.0):
        at(watcher, clock, now)
    assert len(deployer.requests) == 1

    (path / "model.onnx").write_bytes(b"fixed" * 30)  # new contents: asked again, not retried
    at(watcher, clock, 31.0)
    at(watcher, clock, 40.0)
    assert len(deployer.requests) == 1
    assert deployer.asked == [(MODEL, 2), (MODEL, 2)]


def test_version_the_deployer_already_ran_is_not_deployed(repo: Path) -> None:
    deployer, clock = FakeDeployer(already={(MODEL, 2)}), Clock()
    watcher = watcher_for(repo, deployer, clock)
    write_version(repo, 2)
    at(watcher, clock, 0.0)
    for now in (3.0, 4.0, 30.0):
        assert at(watcher, clock, now) == []
    assert deployer.requests == []
    assert deployer.asked == [(MODEL, 2)]  # asked once per fingerprint


def test_scan_is_synchronous_and_lists_ready_versions(repo: Path) -> None:
    deployer, clock = FakeDeployer(), Clock()
    watcher = watcher_for(repo, deployer, clock)
    path = write_version(repo, 2)
    assert watcher.scan(0.0) == []
    (ready,) = watcher.scan(SETTLE_S)
    assert (ready.model, ready.version, ready.path) == (MODEL, 2, path)
    assert deployer.asked == []


def test_start_scans_periodically_and_close_stops(repo: Path) -> None:
    deployer = FakeDeployer()

    async def run() -> None:
        settings = Settings(
            triton=TritonSettings(model_repository=repo),
            lifecycle=LifecycleSettings(
                managed_models=(MODEL,), watch_settle_s=0, watch_interval_s=0.01
            ),
        )
        watcher = VersionWatcher(settings, deployer)  # type: ignore[arg-type]
        await watcher.start()
        await asyncio.sleep(0.05)
        write_version(repo, 2)
        for _ in range(200):
            if deployer.requests:
                break
            await asyncio.sleep(0.01)
        await watcher.close()

    asyncio.run(run())
    assert [r.version for r in deployer.requests] == [2]
