"""Which store `rtinfer predictions` reads: the configured URL, else the stack's, else chdb."""

from __future__ import annotations

from pathlib import Path

from pydantic import SecretStr

from gateway.settings import Settings
from gateway.store.config import StoreSettings
from rtinfer.cli_predictions import store_url


def test_a_configured_url_wins(tmp_path: Path) -> None:
    url = "https://reader:secret@clickhouse.example:8443/rtinfer"
    settings = Settings(state_dir=tmp_path, store=StoreSettings(url=SecretStr(url)))
    assert store_url(settings) == url


def test_without_a_running_stack_the_data_directory_is_opened_in_process(tmp_path: Path) -> None:
    settings = Settings(state_dir=tmp_path, store=StoreSettings(database="audit"))
    assert store_url(settings) == f"chdb://{tmp_path / 'clickhouse'}?database=audit"
