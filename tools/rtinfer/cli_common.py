"""Helpers every ``rtinfer`` command module shares: settings, JSON output, failing."""

from __future__ import annotations

import json
from typing import NoReturn

import typer

from gateway.settings import Settings


def settings_from_env() -> Settings:
    """The settings of this invocation, from ``RTINFER_*`` variables."""
    return Settings()


def echo_json(obj: object) -> None:
    typer.echo(json.dumps(obj, indent=2))


def fail(message: str) -> NoReturn:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(1)
