"""``rtinfer models deploy|promote|canary|rollback|history``: the lifecycle on the running stack.

Each command runs the deployer's one swap procedure against the running stack's catalog and
Triton (trigger ``cli``, the OS user as actor) and waits for the drain.
"""

from __future__ import annotations

import asyncio
import getpass
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, TypeVar

import typer

from gateway.settings import Settings
from rtinfer import stack as stack_mod
from rtinfer.cli_common import echo_json, fail, settings_from_env

if TYPE_CHECKING:
    from gateway.lifecycle.deployer import Deployer

T = TypeVar("T")


def _stack_settings(state: stack_mod.StackState) -> Settings:
    """The settings with the running stack's resolved ports, repository and target."""
    return state.apply(settings_from_env())


def _run_deployer(action: Callable[[Deployer], Awaitable[T]], *, settle: bool = True) -> T:
    """Run ``action`` with a deployer on the running stack (its catalog and Triton); then,
    with ``settle``, wait until the replaced versions are drained and unloaded."""
    from psycopg import OperationalError
    from psycopg_pool import PoolTimeout

    from gateway.lifecycle.deployer import open_deployer
    from gateway.lifecycle.errors import LifecycleError

    try:
        state = stack_mod.require_running(settings_from_env())
    except stack_mod.StackError as exc:
        fail(str(exc))
    if state.postgres is None:
        fail("the running stack has no postgres, which holds the model catalog")
    settings = _stack_settings(state)

    async def run() -> T:
        wait_s = settings.gateway.postgres_connect_timeout_s
        async with open_deployer(settings, wait_s=wait_s) as deployer:
            result = await action(deployer)
            if settle:
                drain_until = getattr(result, "drain_until", None)
                if drain_until is not None:
                    typer.echo(
                        f"waiting for the drain; the replaced version is unloaded at "
                        f"{time.strftime('%H:%M:%S', time.localtime(drain_until))}",
                        err=True,
                    )
                await deployer.wait_settled()
            return result

    try:
        return asyncio.run(run())
    except LifecycleError as exc:
        fail(f"{exc.code}: {exc.message}")
    except (OperationalError, PoolTimeout) as exc:
        fail(f"the model catalog database is unavailable: {str(exc).strip()}")


def _cli_actor() -> str | None:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no user name for this uid
        return None


ModelArg = Annotated[str, typer.Argument(help="Managed model, e.g. fraud_xgb.")]


def models_deploy(
    model: ModelArg,
    version: Annotated[int, typer.Option("--version", help="Version number to serve.")],
    source: Annotated[
        Path | None,
        typer.Option(
            "--source",
            help="Candidate directory to place as the version (default: the version directory "
            "already in the model repository).",
        ),
    ] = None,
    mode: Annotated[str, typer.Option(help="promote, canary or shadow.")] = "promote",
    traffic_pct: Annotated[
        float | None,
        typer.Option("--traffic-pct", help="Canary share, or shadow sample percentage."),
    ] = None,
) -> None:
    """Validate, load, smoke-test and switch to a model version; wait for the drain."""
    from gateway.lifecycle.deployer import DeployRequest

    if mode not in ("promote", "canary", "shadow"):
        fail(f"--mode must be promote, canary or shadow, not {mode!r}")
    request = DeployRequest(
        model,
        version,
        mode,  # type: ignore[arg-type]
        source=source.resolve() if source is not None else None,
        traffic_pct=traffic_pct,
        trigger="cli",
        actor=_cli_actor(),
    )
    echo_json(_run_deployer(lambda d: d.deploy(request)).as_dict())


def models_promote(
    model: ModelArg,
    version: Annotated[
        int | None,
        typer.Option("--version", help="Version to serve all traffic (default: the canary)."),
    ] = None,
) -> None:
    """Make a version (default: the active canary) the champion; wait for the drain."""
    outcome = _run_deployer(lambda d: d.promote(model, version, trigger="cli", actor=_cli_actor()))
    echo_json(outcome.as_dict())


def models_canary(
    model: ModelArg,
    version: Annotated[int, typer.Option("--version", help="Version to serve as canary.")],
    traffic_pct: Annotated[
        float, typer.Option("--traffic-pct", help="Share of traffic, 0 < P < 100.")
    ],
) -> None:
    """Serve a version to a share of the traffic beside the champion."""
    outcome = _run_deployer(
        lambda d: d.canary(model, version, traffic_pct, trigger="cli", actor=_cli_actor())
    )
    echo_json(outcome.as_dict())


def models_rollback(model: ModelArg) -> None:
    """End the model's canary or shadow, else return to its previous champion."""
    outcome = _run_deployer(lambda d: d.rollback(model, trigger="cli", actor=_cli_actor()))
    echo_json(outcome.as_dict())


def models_history(
    model: ModelArg,
    limit: Annotated[int, typer.Option(min=1, help="Entries to show, newest first.")] = 20,
) -> None:
    """The model's lifecycle history: deploys, failures with their step, rollbacks."""
    entries = _run_deployer(lambda d: d.history(model, limit), settle=False)
    echo_json([e.as_dict() for e in entries])
