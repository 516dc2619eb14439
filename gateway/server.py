"""Serving: the process around the application (logging, listening, signals)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from aiohttp import http_parser, web

from . import logs
from .app import create_app
from .config import Config

log = logging.getLogger("gateway")

# How aiohttp handles each connection; the tests serve with these same options.
HANDLER_OPTIONS: dict[str, Any] = {
    "access_log_class": logs.AccessLog,
    "access_log": logging.getLogger("gateway.access"),
    # A request refused before its body was read (a 401 for an upload) is answered, then
    # the connection is closed after at most this long, instead of reading on to keep it
    # alive. The short wait lets the client read the answer before the socket closes.
    "lingering_time": 1.0,
}


def serve(config: Config, *, host: str | None = None, port: int | None = None,
          ready: Callable[[], None] | None = None) -> None:
    """Serve until SIGINT or SIGTERM. ``ready`` is called once the port is listening."""
    logs.setup()
    host = host or config.listen.host
    port = port if port is not None else config.listen.port
    log.info("starting", extra={"fields": {"config": config.source, "host": host, "port": port,
                                           "routes": len(config.routes)}})
    if http_parser.HttpRequestParser is http_parser.HttpRequestParserPy:
        # e.g. AIOHTTP_NO_EXTENSIONS=1, or a platform without aiohttp's C extension
        log.warning("python_http_parser", extra={"fields": {
            "why": "aiohttp's C parser (llhttp) is not in use; the pure-Python one accepts some "
                   "malformed chunked bodies that llhttp refuses"}})
    web.run_app(
        create_app(config),
        host=host,
        port=port,
        **HANDLER_OPTIONS,
        print=(lambda _banner: ready()) if ready else None,
        shutdown_timeout=10,
    )
