"""``GET /metrics``: on the main listener, or only on an admin listener of its own
(``metrics.listen``), which serves nothing else.

A scrape first counts the live sessions in the store (one cheap store call), then renders
every metric; with several workers, the sum over all of them (see gateway/metrics.py).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from aiohttp import web
from aiohttp.typedefs import Handler

from . import errors, logs, metrics
from .config import Listen, Metrics
from .errors import MethodNotAllowed, NotFound, StoreUnavailable
from .reload import LIVE
from .state import ENDPOINT, GATEWAY, PATH, Gateway

log = logging.getLogger("gateway")


async def scrape(gw: Gateway) -> web.Response:
    try:
        metrics.active_sessions(await gw.store.count_sessions(gw.clock(), gw.sessions.rules))
    except StoreUnavailable as exc:
        # Every other metric is worth having all the same; the gauge keeps its last value.
        log.warning("sessions_not_counted", extra={"fields": {"reason": exc.reason}})
    body, content_type = metrics.render()
    return web.Response(body=body, headers={"Content-Type": content_type, "Cache-Control": "no-store"})


async def metrics_endpoint(request: web.Request) -> web.Response:
    """``GET /metrics`` among the gateway's own endpoints on the main listener."""
    return await scrape(request[GATEWAY])


METRICS_PATH = "/metrics"


def main_listener_endpoints(cfg: Metrics) -> dict[str, dict[str, Handler]]:
    """``GET /metrics`` among the main listener's own endpoints, unless an admin listener
    serves it (or metrics are disabled)."""
    if cfg.enabled and cfg.listen is None:
        return {METRICS_PATH: {"GET": metrics_endpoint}}
    return {}


def kept_from_routes(cfg: Metrics, path: str) -> bool:
    """Whether the main listener keeps ``path`` from the routes as the metrics path: with
    metrics enabled, ``/metrics`` in any case, with or without a trailing slash (as the auth
    prefix is kept in any case). Where no endpoint of the table above serves it, exactly,
    the answer is 404 whatever the routes say, so that an upstream's own /metrics is never
    reached under another spelling. Disabled, the path is the routes' like any other."""
    return cfg.enabled and path.lower().removesuffix("/") == METRICS_PATH


def where(cfg: Metrics) -> str:
    """Where ``GET /metrics`` is served, in words."""
    if not cfg.enabled:
        return "metrics are disabled (metrics.enabled: false)"
    if cfg.listen is None:
        return f"GET {METRICS_PATH} is served on the main listener"
    host = f"[{cfg.listen.host}]" if ":" in cfg.listen.host else cfg.listen.host
    return f"GET {METRICS_PATH} is served only on the admin listener, {host}:{cfg.listen.port} (metrics.listen)"


def listener_ctx(listen: Listen) -> Callable[[web.Application], AsyncIterator[None]]:
    """The admin listener as a cleanup context of the main application, after the one that
    puts the gateway in use in place."""

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        live = app[LIVE]
        async with listener(listen, lambda: live.current):
            yield

    return ctx


@asynccontextmanager
async def listener(listen: Listen, current: Callable[[], Gateway]) -> AsyncIterator[None]:
    """Serve ``GET /metrics`` on ``listen`` while the context is open. ``current`` gives the
    gateway in use (its store and session rules)."""

    async def answer(request: web.Request) -> web.StreamResponse:
        if request.path != METRICS_PATH:
            return errors.response(NotFound())
        request[ENDPOINT], request[PATH] = "metrics", METRICS_PATH
        if request.method not in ("GET", "HEAD"):
            return errors.response(MethodNotAllowed({"GET", "HEAD"}))
        return await scrape(current())

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    runner = web.AppRunner(app, access_log_class=logs.AccessLog,
                           access_log=logging.getLogger("gateway.access"), handle_signals=False)
    await runner.setup()
    # With several workers each one listens on the port, as on the main one, and any of
    # them answers for all (multiprocess mode).
    site = web.TCPSite(runner, listen.host, listen.port,
                       reuse_port=metrics.multiprocess_dir() is not None)
    try:
        await site.start()
    except OSError:
        await runner.cleanup()
        raise
    log.info("metrics_listening", extra={"fields": {"host": listen.host, "port": listen.port}})
    try:
        yield
    finally:
        await runner.cleanup()
