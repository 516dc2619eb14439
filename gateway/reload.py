"""Reloading the config while serving (SIGHUP).

The gateway in use sits in a :class:`Live` holder. Each request takes the current one once,
at its start, and keeps it to its end, so one request sees one config throughout. A reload
reads the config file again (same path, same environment), builds a new gateway beside the
old one and swaps it in: requests after the swap use the new one, requests in flight finish
with the old one, and the old one's own resources (its upstream connection pool, its
hashing threads and htpasswd watcher) are closed once the last of them is done. The store
and the revocation view are the process's, not a config's: they are never reopened, so no
session is lost and no revocation forgotten.

A reload is all or nothing. An invalid file, or a change to a key that only a restart can
apply (:data:`RESTART_ONLY`), keeps the running config entirely, logs one
``config_reload_failed`` line with every problem, and counts a failed reload.

With ``gateway run --watch-config`` the process that takes SIGHUP (with workers, the
supervisor) also looks at the config file every :data:`WATCH_INTERVAL` seconds and, when it
has changed (or a Kubernetes ConfigMap swapped the file under its symlink), sends itself
SIGHUP: a change is then reloaded exactly as a ``kill -HUP`` would reload it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections import Counter
from collections.abc import AsyncIterator, Callable

from aiohttp import web
from aiohttp.typedefs import Handler

from . import config as config_module
from . import cookies, metrics
from .config import Config
from .errors import ConfigError, StoreUnavailable
from .state import GATEWAY, Gateway

log = logging.getLogger("gateway")

WATCH_INTERVAL = 1.0  # seconds between looks at the config file, with --watch-config

# What a running process cannot change: its sockets, its store, its processes, and the
# shutdown bound it was started with.
RESTART_ONLY: dict[str, Callable[[Config], object]] = {
    "listen": lambda c: c.listen,
    "store": lambda c: c.store,
    "workers": lambda c: c.workers,
    "shutdown_timeout": lambda c: c.shutdown_timeout,
    "metrics.listen": lambda c: c.metrics.listen if c.metrics.enabled else None,
    "log_format": lambda c: c.log_format,  # the log handlers are set up once, at start
}


def restart_needed(old: Config, new: Config) -> list[str]:
    """The keys that differ between ``old`` and ``new`` and only a restart can apply."""
    return [key for key, value in RESTART_ONLY.items() if value(old) != value(new)]


class Live:
    """The gateway in use, and the ones replaced while requests were still using them."""

    def __init__(self, gw: Gateway, *, endpoints: Callable[[Config], dict[str, dict[str, Handler]]]) -> None:
        self.current = gw
        self._endpoints = endpoints
        self._users: Counter[int] = Counter()  # id(gateway) -> requests using it
        self._retired: dict[int, Gateway] = {}  # replaced, waiting for their last request
        self._closing: set[asyncio.Task[None]] = set()
        self._reloading = asyncio.Lock()

    def take(self) -> Gateway:
        gw = self.current
        self._users[id(gw)] += 1
        return gw

    def give_back(self, gw: Gateway) -> None:
        self._users[id(gw)] -= 1
        if self._users[id(gw)] == 0:
            del self._users[id(gw)]
            if id(gw) in self._retired:
                task = asyncio.get_running_loop().create_task(self._close(gw))
                self._closing.add(task)
                task.add_done_callback(self._closing.discard)

    def swap(self, gw: Gateway) -> None:
        old, self.current = self.current, gw
        self._retired[id(old)] = old
        if id(old) not in self._users:
            task = asyncio.get_running_loop().create_task(self._close(old))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        """At shutdown, once no request is left: close every gateway's resources."""
        await asyncio.gather(*self._closing, return_exceptions=True)
        for gw in [*self._retired.values(), self.current]:
            await self._close(gw, shutting_down=True)

    async def _close(self, gw: Gateway, *, shutting_down: bool = False) -> None:
        """Close what ``gw`` owns and no gateway still in use shares."""
        self._retired.pop(id(gw), None)
        others = [] if shutting_down else [self.current, *self._retired.values()]
        if all(other.proxy is not gw.proxy for other in others):
            await gw.proxy.close()
        if all(other.credentials is not gw.credentials for other in others):
            gw.credentials.close()

    async def reload(self) -> bool:
        """Read the config file again and swap it in (see the module docstring)."""
        async with self._reloading:  # one reload at a time, in the order they were asked for
            old = self.current
            source = old.config.source
            try:
                new = await asyncio.get_running_loop().run_in_executor(None, config_module.load, source)
            except ConfigError as exc:
                problems = list(exc.problems)
            else:
                problems = [f"{key}: changed, and takes effect only on a restart"
                            for key in restart_needed(old.config, new)]
            if problems:
                log.error("config_reload_failed", extra={"fields": {
                    "config": source, "problems": problems, "kept": "the running config"}})
                metrics.config_reloaded(ok=False)
                return False
            gw = Gateway.build(new, old.store, old.clock, endpoints=self._endpoints(new),
                               revocations=old.revocations,
                               credentials=old.credentials if new.users == old.config.users else None,
                               retired_cookies=cookies.retire(old.config.cookies, old.retired_cookies,
                                                              new.cookies),
                               retired_identity_headers=old.retired_identity_headers
                               | {header for header, _ in old.config.identity_headers})
            await gw.proxy.start()
            self.swap(gw)
            if new.users.source != old.config.users.source:
                await _end_foreign_sessions(gw)
            log.info("config_reloaded", extra={"fields": {
                "config": source, "routes": len(new.routes),
                "signing_key": new.tokens.keys[0].kid, "keys": [k.kid for k in new.tokens.keys]}})
            metrics.config_reloaded(ok=True)
            return True


async def _end_foreign_sessions(gw: Gateway) -> None:
    """After a switch of ``users.source``, no session of a user the new source does not own
    goes on (their refreshes are refused regardless: sessions.Sessions.refresh); ending
    them now stops their access tokens too."""
    try:
        ended = await gw.credentials.end_foreign_sessions()
        await gw.revocations.sync()
    except StoreUnavailable as exc:
        log.warning("users_source_sessions_not_ended", extra={"fields": {"reason": exc.reason}})
        return
    log.info("users_source_changed", extra={"fields": {"source": gw.config.users.source, "ended": ended}})


LIVE = web.AppKey("live", Live)


@web.middleware
async def current_gateway(request: web.Request, handler: Handler) -> web.StreamResponse:
    live = request.app[LIVE]
    gw = request[GATEWAY] = live.take()
    try:
        return await handler(request)
    finally:
        live.give_back(gw)


async def on_sighup(app: web.Application) -> AsyncIterator[None]:
    """A cleanup context for a serving process: SIGHUP reloads the config. The process
    serves with SIGHUP blocked until this handler is in place (server._serve_one), so that
    one sent while it starts waits for it, instead of ending the process or being lost;
    once the server is shutting down, SIGHUP is ignored."""
    loop = asyncio.get_running_loop()
    live = app[LIVE]
    pending: set[asyncio.Task[bool]] = set()

    def reload() -> None:
        task = loop.create_task(live.reload())
        pending.add(task)
        task.add_done_callback(pending.discard)

    loop.add_signal_handler(signal.SIGHUP, reload)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})
    try:
        yield
    finally:
        loop.remove_signal_handler(signal.SIGHUP)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        await asyncio.gather(*pending, return_exceptions=True)


class FileWatch:
    """Whether a file has changed since the last look: its modification or status-change
    time (a chmod, a restored mtime), size or inode (a new file renamed over it, or a
    symlink pointed at a new one). A change counts once two looks in a row see the same new
    state, so that a file still being written is not taken half way. A file that cannot be
    read does not count as a change; the change is the file that comes back."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._seen = self._signature()
        self._settling: tuple[int, int, int, int] | None = None

    def _signature(self) -> tuple[int, int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_mtime_ns, st.st_ctime_ns, st.st_size, st.st_ino

    def changed(self) -> bool:
        now = self._signature()
        if now is None or now == self._seen:
            self._settling = None
            return False
        if now != self._settling:  # new since the last look: wait for it to hold still
            self._settling = now
            return False
        self._seen, self._settling = now, None
        return True


def hang_up_on_change(watch: FileWatch) -> None:
    """What a look does: on a change, log it and send this process SIGHUP."""
    if watch.changed():
        log.info("config_changed", extra={"fields": {"config": watch.path}})
        os.kill(os.getpid(), signal.SIGHUP)


def watching(path: str) -> Callable[[web.Application], AsyncIterator[None]]:
    """A cleanup context for a single serving process: look at ``path`` every
    WATCH_INTERVAL seconds (see the module docstring)."""

    async def context(app: web.Application) -> AsyncIterator[None]:
        watch = FileWatch(path)

        async def look() -> None:
            while True:
                await asyncio.sleep(WATCH_INTERVAL)
                hang_up_on_change(watch)

        task = asyncio.get_running_loop().create_task(look())
        yield
        task.cancel()

    return context
