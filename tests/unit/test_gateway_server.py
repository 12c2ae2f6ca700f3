"""Child processes see the stack's resolved settings, secrets included."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import SecretStr

from gateway.settings import Settings
from rtinfer.gateway_server import settings_env


def test_settings_round_trip_through_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    settings = Settings(state_dir=tmp_path / "state", services=["redis", "triton"])
    settings.redis.port = 7777
    settings.gateway.postgres_dsn = SecretStr("host=db password=s3cret")
    env = settings_env(settings, {"PATH": "/usr/bin", "RTINFER_REDIS__PORT": "1"})

    assert env["PATH"] == "/usr/bin"
    assert "RTINFER_REDIS__PORT" not in env  # the parent's overrides are already resolved
    monkeypatch.setattr(os, "environ", dict(env))
    child = Settings()
    assert child.model_dump() == settings.model_dump()
    assert child.gateway.postgres_dsn is not None
    assert child.gateway.postgres_dsn.get_secret_value() == "host=db password=s3cret"
    assert child.state_dir == tmp_path / "state"


def test_granian_without_the_package_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    from gateway import __main__ as entry

    real_import = builtins.__import__

    def no_granian(name: str, *args: object, **kwargs: object) -> object:
        if name.startswith("granian"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setenv("RTINFER_GATEWAY__SERVER", "granian")
    monkeypatch.setattr(builtins, "__import__", no_granian)
    with pytest.raises(SystemExit, match="pip install granian"):
        entry.main()
