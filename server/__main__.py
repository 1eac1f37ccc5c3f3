"""Entry point: ``python -m peftserve.server`` and ``peftserve serve``.

Serves until SIGTERM/SIGINT, then drains (in-flight requests get the configured grace) and
exits 0. Exits 1 if the model fails to load or the engine process (``--engine-process``) dies.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Sequence

from .app import create_server
from .config import ServerConfig, config_from_args
from .logs import configure_logging, stdout_line

logger = logging.getLogger("peftserve.server")


async def serve(config: ServerConfig) -> int:
    server, port = await create_server(config)
    stop_requested = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop_requested.set)
    ready = asyncio.create_task(server.wait_ready())
    stopping = asyncio.create_task(stop_requested.wait())
    await asyncio.wait({ready, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if ready.done() and ready.exception() is not None:
        await server.stop(0)
        return 1
    if ready.done():
        host = config.address.rsplit(":", 1)[0]
        # Printed on stdout so scripts and tests can wait for it.
        line = stdout_line(config.log_format, f"peftserve ready on {host}:{port}", port=port)
        print(line, flush=True)
    lost = asyncio.create_task(server.wait_engine_lost())
    await asyncio.wait({stopping, lost}, return_when=asyncio.FIRST_COMPLETED)
    ready.cancel()
    if lost.done():
        # In-flight calls already ended UNAVAILABLE; a supervisor restarts the server.
        stopping.cancel()
        await server.stop(1.0)
        return 1
    lost.cancel()
    logger.info("signal received; shutting down")
    await server.stop()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    config = config_from_args(argv)
    configure_logging(config.log_level, config.log_format)
    return asyncio.run(serve(config))


if __name__ == "__main__":
    sys.exit(main())
