"""``python -m gateway.lifecycle``: the deployer service under uvicorn, from settings.

Serves ``lifecycle.deployer_host:deployer_port`` with the webhook receiver, the registry
reconcile loop and (``lifecycle.watch``) the repository watcher; ``RTINFER_*`` settings.
"""

from __future__ import annotations

import asyncio

import uvicorn

from gateway.lifecycle.service import create_deployer_app, open_deployer, webhook_secret
from gateway.logs import configure_logging
from gateway.settings import Settings


async def serve(settings: Settings) -> None:
    """Open the deployer runtime, serve until SIGINT/SIGTERM, close it."""
    lc = settings.lifecycle
    webhook_secret(lc)  # refuse to start before opening anything
    async with open_deployer(settings) as rt:
        app = create_deployer_app(
            settings,
            rt.deployer,
            rt.sync,
            metrics_registry=rt.metrics_registry,
            watcher=rt.watcher,
            watchdog=rt.watchdog,
        )
        config = uvicorn.Config(
            app,
            host=lc.deployer_host,
            port=lc.deployer_port,
            log_config=None,  # our JSON lines (configure_logging)
            access_log=False,
        )
        await uvicorn.Server(config).serve()


def main() -> None:
    settings = Settings()
    configure_logging(settings.gateway.log_level)
    asyncio.run(serve(settings))


if __name__ == "__main__":
    main()
