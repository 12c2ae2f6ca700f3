"""The embedded store server: chdb behind ClickHouse's HTTP interface, used through
clickhouse-connect exactly as a ClickHouse server is (a real process on a free port)."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import clickhouse_connect
import httpx
import pytest

from gateway.settings import Settings
from gateway.store.backend import StoreError, open_store, rows
from gateway.store.config import StoreSettings
from gateway.store.migrate import apply_store_migrations
from rtinfer.gateway_server import settings_env
from rtinfer.procs import free_port

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def start(state_dir: Path, port: int) -> subprocess.Popen[bytes]:
    settings = Settings(state_dir=state_dir, store=StoreSettings(port=port))
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway.store.server"],
        env=settings_env(settings),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/ping", timeout=1).text == "Ok.\n":
                return proc
        except httpx.HTTPError:
            pass
        assert proc.poll() is None, proc.stderr.read().decode()  # type: ignore[union-attr]
        assert time.monotonic() < deadline, "the store server never answered /ping"
        time.sleep(0.2)


@pytest.fixture()
def server(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    port = free_port("127.0.0.1")
    proc = start(tmp_path, port)
    yield tmp_path, port
    proc.terminate()
    proc.wait(10)


def test_clients_use_it_like_a_clickhouse_server(server: tuple[Path, int]) -> None:
    state_dir, port = server
    store = open_store(f"http://127.0.0.1:{port}/rtinfer")
    assert apply_store_migrations(store) == ["0001_predictions", "0002_prediction_labels"]
    line = (
        b'{"request_id":"a","arm":"prod","deployment_id":"1","ts":1796000000.5,'
        b'"model_name":"m","features":[0.5,1.5],"is_degraded":true}\n'
    )
    store.insert_json("predictions", line * 2)
    store.insert_json("predictions", line)
    got = rows(
        store,
        "SELECT request_id, features, is_degraded FROM predictions FINAL "
        "WHERE has({ids:Array(String)}, request_id) AND is_degraded = {d:Bool}",
        {"ids": ["a", "it's"], "d": True},
    )
    assert got == [{"request_id": "a", "features": [0.5, 1.5], "is_degraded": True}]
    with pytest.raises(StoreError) as refused:
        store.command("SELEKT 1")
    assert not refused.value.transient and "Syntax error" in str(refused.value)
    # clickhouse-connect's own insert (Native, binary) works too, by column name
    client = clickhouse_connect.get_client(port=port, database="rtinfer", compress=False)
    client.insert(
        "predictions",
        [["b", "prod", "", datetime.fromtimestamp(1_796_000_000, timezone.utc), "m", [2.5]]],
        column_names=["request_id", "arm", "deployment_id", "ts", "model_name", "features"],
    )
    assert client.query("SELECT features FROM predictions WHERE request_id = 'b'").result_rows == [
        ([2.5],)
    ]
    client.close()
    with pytest.raises(StoreError) as bad_data:
        store.insert_json("predictions", b'{"request_id": "c", "ts": "not a time"}\n')
    assert not bad_data.value.transient
    with pytest.raises(StoreError, match="cannot open"):  # the server holds the directory
        open_store(f"chdb://{state_dir / 'clickhouse'}?database=rtinfer")
    store.close()


def test_an_unreachable_server_is_a_transient_error() -> None:
    port = free_port("127.0.0.1")
    with pytest.raises(StoreError) as down:
        open_store(f"http://127.0.0.1:{port}/rtinfer", timeout_s=1.0)
    assert down.value.transient
