"""Session fixtures: demo models built once into a temp repository."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.settings import Settings

#: smaller than the CLI default so the suite stays fast; same code path
TEST_ROWS = 20_000


@pytest.fixture(scope="session")
def built_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model repository with the three demo models trained from scratch (not rendered)."""
    from rtinfer.demo.train import build_demo_models

    repo = tmp_path_factory.mktemp("model_repository")
    build_demo_models(repo, seed=Settings().seed, n_rows=TEST_ROWS)
    return repo


@pytest.fixture(scope="session")
def chdb_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """The embedded engine (chdb) on a temp directory, migrated; one per process (chdb allows
    one open data directory per process)."""
    from gateway.store.backend import ChdbStore
    from gateway.store.migrate import apply_store_migrations

    store = ChdbStore(tmp_path_factory.mktemp("chdb"), "rtinfer_test")
    apply_store_migrations(store)
    yield store
    store.close()
