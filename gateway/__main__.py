"""``python -m gateway``: the gateway under uvicorn (httptools) or granian (``gateway.server``),
on ``gateway.loop``, from settings."""

from __future__ import annotations

import uvicorn
from fastapi import FastAPI

from gateway.config import GatewaySettings
from gateway.http.app import create_app
from gateway.logs import configure_logging
from gateway.settings import Settings


def app_from_env() -> FastAPI:
    """The app factory each uvicorn worker calls: settings from ``RTINFER_*``."""
    settings = Settings()
    configure_logging(settings.gateway.log_level)
    return create_app(settings)


def main() -> None:
    gw = Settings().gateway
    configure_logging(gw.log_level)
    if gw.server == "granian":
        _granian(gw)
        return
    uvicorn.run(
        "gateway.__main__:app_from_env",
        factory=True,
        host=gw.host,
        port=gw.port,
        workers=gw.workers,
        loop=gw.loop,
        http="httptools",
        log_config=None,  # our JSON lines (configure_logging) for uvicorn too
        access_log=False,  # the prediction service writes one line per request
    )


def _granian(gw: GatewaySettings) -> None:
    try:
        from granian import Granian  # optional: only this server choice needs it
        from granian.constants import Interfaces, Loops
    except ImportError:
        raise SystemExit("gateway.server = granian needs `pip install granian`") from None
    Granian(
        "gateway.__main__:app_from_env",
        factory=True,
        address=gw.host,
        port=gw.port,
        workers=gw.workers,
        interface=Interfaces.ASGI,
        loop=Loops(gw.loop),
        log_enabled=False,  # our JSON lines (configure_logging), one per request
    ).serve()


if __name__ == "__main__":
    main()
