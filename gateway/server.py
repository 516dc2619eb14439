"""Serving: the process around the application (logging, listening, signals)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import multiprocessing.process
import os
import re
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from http import HTTPStatus
from typing import Any

from aiohttp import http_parser, web
from aiohttp.web_protocol import RequestHandler

from . import config as config_module
from . import errors, logs, metrics, reload
from .app import create_app
from .config import Config
from .errors import ConfigError, UserError
from .explain import route_warnings

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


def _answer_parser_errors_without_echo() -> None:
    """aiohttp answers a request its HTTP parser refuses (an over-long header line, a bad
    Content-Length...) itself, before any middleware, with a text/plain 400 quoting up to
    ~100 bytes of the offending line: the start of a token or a cookie, sent back to
    whoever sent it, or reflected by a cache in between. Answer these with the gateway's
    JSON error instead, which says only what kind of error it was. aiohttp still logs
    the error (logs.setup redacts the bytes) and closes the connection."""
    aiohttp_handle_error = RequestHandler.handle_error

    def handle_error(self: RequestHandler, request: web.BaseRequest, status: int = 500,
                     exc: BaseException | None = None, message: str | None = None) -> web.StreamResponse:
        answer = aiohttp_handle_error(self, request, status, exc, message if status >= 500 else None)
        if status >= 500:
            return answer
        response = errors.response(errors.for_status(status, HTTPStatus(status).phrase))
        response.force_close()
        return response

    RequestHandler.handle_error = handle_error  # type: ignore[method-assign]


_answer_parser_errors_without_echo()


def serve(config: Config, *, host: str | None = None, port: int | None = None,
          workers: int | None = None, ready: Callable[[], None] | None = None,
          log_format: str | None = None, watch_config: bool = False) -> None:
    """Serve until SIGINT or SIGTERM; reload the config on SIGHUP (gateway/reload.py), and,
    with ``watch_config``, when the file changes.
    ``ready`` is called once the port is listening (with one worker). With several workers,
    each is a process of its own with its own event loop, all listening on the same port
    (SO_REUSEPORT: the kernel spreads connections) and sharing the store; this process only
    watches over them."""
    logs.setup(fmt=log_format or config.log_format)
    host = host or config.listen.host
    port = port if port is not None else config.listen.port
    workers = workers or config.workers
    log.info("starting", extra={"fields": {"config": config.source, "host": host, "port": port,
                                           "routes": len(config.routes), "workers": workers}})
    for warning in route_warnings(config):
        log.warning("route_never_matched", extra={"fields": {"why": warning}})
    if http_parser.HttpRequestParser is http_parser.HttpRequestParserPy:
        # e.g. AIOHTTP_NO_EXTENSIONS=1, or a platform without aiohttp's C extension
        log.warning("python_http_parser", extra={"fields": {
            "why": "aiohttp's C parser (llhttp) is not in use; the pure-Python one accepts some "
                   "malformed chunked bodies that llhttp refuses"}})
    if workers == 1:
        stopped_by: list[str] = []
        _serve_one(config, host, port, ready=ready, reuse_port=False, stopped_by=stopped_by,
                   watch_config=watch_config)
        if stopped_by:
            log.info("stopped", extra={"fields": {"signal": stopped_by[0]}})
        return
    if port == 0:
        raise UserError("several workers need a fixed port: each of them listens on it")
    with _shared_metrics():
        _supervise(config, host, port, workers, watch_config=watch_config)


@contextlib.contextmanager
def _shared_metrics() -> Iterator[None]:
    """Workers count into files in a private directory, made before they are forked and
    removed at exit, so that a scrape answered by any of them reports all of them."""
    path = tempfile.mkdtemp(prefix="gateway-metrics-")
    metrics.use_multiprocess_dir(path)
    try:
        yield
    finally:
        shutil.rmtree(path, ignore_errors=True)


SAME_SIGNAL = 0.2  # seconds: a second stop signal sooner than this is the first one again


def _stop_signals(stopped_by: list[str], *, worker: bool) -> Callable[[web.Application], AsyncIterator[None]]:
    """A cleanup context: SIGINT and SIGTERM stop the server as aiohttp's own handlers do
    (installed just before; these replace them). The first one is put in ``stopped_by`` and
    logged as ``stopping`` (by a worker's supervisor, for a worker). A second one during
    shutdown exits at once (status 1), except in a worker, which ignores it: a signal to the
    whole process group (Ctrl-C, systemd) reaches a worker from the sender and again from
    the supervisor, and the supervisor kills a worker that overstays its shutdown. One that
    comes within SAME_SIGNAL of the first is that same request: ``timeout`` and other tools
    signal both the process and its process group."""
    first: list[float] = []

    async def context(app: web.Application) -> AsyncIterator[None]:
        def stop(signum: signal.Signals) -> None:
            if stopped_by and (worker or time.monotonic() - first[0] < SAME_SIGNAL):
                return
            if stopped_by:
                # Asked twice: the requests still in flight are cut, their connections
                # closed by the kernel. The store needs nothing more: a SQLite transaction
                # or a Redis MULTI that did not finish is not there.
                log.warning("stopped_now", extra={"fields": {"signal": signum.name}})
                os._exit(1)
            stopped_by.append(signum.name)
            first.append(time.monotonic())
            if not worker:
                log.info("stopping", extra={"fields": {"signal": signum.name}})
            raise web.GracefulExit()

        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop, signum)
        yield

    return context


def _serve_one(config: Config, host: str, port: int, *, ready: Callable[[], None] | None,
               reuse_port: bool, stopped_by: list[str], worker: bool = False, watch_config: bool = False) -> None:
    """``stopped_by``: the SIGINT/SIGTERM that stopped it goes there (see _stop_signals).
    ``watch_config``: reload when the config file changes (a worker leaves that to the
    supervisor, which passes SIGHUP on)."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})  # until reload.on_sighup unblocks it
    app = create_app(config)
    app.cleanup_ctx.append(reload.on_sighup)
    app.cleanup_ctx.append(_stop_signals(stopped_by, worker=worker))
    if watch_config:
        app.cleanup_ctx.append(reload.watching(config.source))
    # On SIGINT/SIGTERM aiohttp stops listening, closes idle connections, lets the requests
    # in flight finish for up to shutdown_timeout (then cancels them), and only then runs
    # the cleanup contexts, which close the store.
    web.run_app(
        app,
        host=host,
        port=port,
        reuse_port=reuse_port,
        **HANDLER_OPTIONS,
        print=lambda banner: _listening(banner, ready),
        shutdown_timeout=config.shutdown_timeout,
        loop=event_loop(),
    )


def _listening(banner: str, ready: Callable[[], None] | None) -> None:
    """aiohttp's "Running on ..." banner, once every socket listens, holds the ports bound
    (the one the system chose, for port 0): logged as ``listening``."""
    log.info("listening", extra={"fields": {"urls": re.findall(r"https?://[^\s,]+", banner)}})
    if ready is not None:
        ready()


def event_loop() -> asyncio.AbstractEventLoop:
    """uvloop's event loop where it is installed (a dependency on Linux and macOS): the
    loop and its transports are a quarter of a proxied request's CPU time with asyncio's
    own, noticeably less with uvloop's. asyncio's own elsewhere."""
    try:
        import uvloop  # noqa: PLC0415
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def _worker(config: Config, host: str, port: int) -> None:
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_DFL)  # aiohttp installs its own graceful handlers
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})  # (see start())
    try:
        _serve_one(config, host, port, ready=None, reuse_port=True, stopped_by=[], worker=True)
    except OSError as exc:
        log.error("worker_cannot_listen", extra={"fields": {"host": host, "port": port,
                                                            "reason": exc.strerror or str(exc)}})
        raise SystemExit(3) from None
    # Done serving, so done: a worker stopped while it was still starting can leave the
    # store's thread behind, and waiting for it would keep the worker alive for good.
    sys.stdout.flush()
    os._exit(0)


def _supervise(config: Config, host: str, port: int, count: int, *, watch_config: bool = False) -> None:
    """Start ``count`` workers; restart one that dies; on SIGINT/SIGTERM, stop them all
    (each finishes its requests in flight) and return. SIGHUP is passed on to every worker,
    and each reloads its config; a worker started later starts with the last config that
    could be reloaded."""
    context = multiprocessing.get_context("fork")
    stopping = False
    stop_signal: signal.Signals | None = None
    reload_asked = False
    started_at = time.monotonic()
    stop_by = float("inf")

    def start(n: int) -> multiprocessing.process.BaseProcess:
        process = context.Process(target=_worker, args=(config, host, port), name=f"gateway-worker-{n}")
        # The worker starts with SIGHUP blocked (and so pending, not lost, until its own
        # handler is in place: reload.on_sighup); this process's handler is not for it.
        # SIGTERM and SIGINT too, until _worker has put the default action back: run by
        # this process's handlers, a stop would be taken for the supervisor's own.
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP, signal.SIGTERM, signal.SIGINT})
        try:
            process.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        return process

    workers = {n: start(n) for n in range(count)}

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping, stop_by
        stopping = True
        stop_by = min(stop_by, time.monotonic() + config.shutdown_timeout + 15)
        for process in workers.values():
            if process.exitcode is None:
                process.terminate()

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stop_signal
        stop_signal = stop_signal or signal.Signals(signum)
        stop(signum, frame)

    def hangup(signum: int, frame: object) -> None:
        nonlocal reload_asked
        reload_asked = True
        for process in workers.values():
            if process.exitcode is None and process.pid is not None:
                os.kill(process.pid, signal.SIGHUP)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGHUP, hangup)
    announced = False

    def announce() -> None:  # from the loop, not the handler: logging is not reentrant
        nonlocal announced
        if stop_signal is not None and not announced:
            announced = True
            log.info("stopping", extra={"fields": {"signal": stop_signal.name}})

    watch = reload.FileWatch(config.source) if watch_config else None
    looked_at = time.monotonic()
    while workers:
        if watch is not None and not stopping and time.monotonic() - looked_at >= reload.WATCH_INTERVAL:
            looked_at = time.monotonic()
            reload.hang_up_on_change(watch)  # SIGHUP to this process: hangup() asks for the reload
        if reload_asked:
            reload_asked = False
            config = _reloadable(config)
        for n, process in list(workers.items()):
            announce()
            if stopping and time.monotonic() > stop_by and process.exitcode is None:
                process.kill()  # past its shutdown_timeout and then some: stuck
            process.join(timeout=0.2)
            if process.exitcode is None:
                continue
            del workers[n]
            if process.pid is not None:
                metrics.process_dead(process.pid)
            if stopping:
                continue
            if process.exitcode != 0 and time.monotonic() - started_at < 5:
                # (exit 0 is a worker stopped by a signal from elsewhere: it is replaced)
                stop(signal.SIGTERM, None)
                for other in workers.values():
                    other.join(timeout=15)
                raise UserError(f"a worker could not start (exit code {process.exitcode}); "
                                f"is {host}:{port} free?")
            log.warning("worker_exited", extra={"fields": {"worker": n, "code": process.exitcode}})
            workers[n] = start(n)
            if stopping:  # a stop signalled while it was starting did not see it in workers
                workers[n].terminate()
    if stop_signal is not None:
        announce()  # the signal came during the last worker's last wait
        log.info("stopped", extra={"fields": {"signal": stop_signal.name}})


def _reloadable(config: Config) -> Config:
    """The config file as it is now, if a reload would take it; else ``config``. (Each
    worker reloads, and logs the outcome, itself.)"""
    try:
        new = config_module.load(config.source)
    except ConfigError:
        return config
    return config if reload.restart_needed(config, new) else new
