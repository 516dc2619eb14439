"""``create_app(config)``: the aiohttp application.

Every request goes to :func:`dispatch`, which normalizes the path first and decides on that
one value: the gateway's own endpoints (auth, health) by exact path, everything else
through the proxied pipeline. aiohttp's router is not consulted, so no path is ever judged
in two different forms.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable

from aiohttp import web
from aiohttp.typedefs import Handler

from . import admin, auth_api, cookies, cors, errors, pipeline, revocations, wellknown
from .config import Config
from .errors import BadRequest, GatewayError, MethodNotAllowed, NotFound, StoreUnavailable
from .paths import normalize
from .reload import LIVE, Live, current_gateway
from .state import (
    CLEAR_COOKIES,
    CORS,
    ENDPOINT,
    ERROR,
    GATEWAY,
    IP,
    PATH,
    RENEWED,
    REQUEST_ID,
    STOPPING,
    Gateway,
)
from .store import Store, open_store

log = logging.getLogger("gateway")


def create_app(
    config: Config, *, clock: Callable[[], float] = time.time, store: Store | None = None
) -> web.Application:
    app = web.Application(middlewares=[error_middleware, current_gateway])
    app.router.register_resource(_EveryPath(dispatch))
    app.cleanup_ctx.append(_lifecycle(config, clock, store))
    if config.metrics.enabled and config.metrics.listen is not None:
        app.cleanup_ctx.append(admin.listener_ctx(config.metrics.listen))
    app.on_response_prepare.append(_session_and_cors_headers)
    app[STOPPING] = asyncio.Event()
    app.on_shutdown.append(_stopping)
    return app


async def _stopping(app: web.Application) -> None:
    """Shutdown has begun (aiohttp calls this before it waits for the requests in flight):
    open WebSockets close now (websockets.py), rather than be cut at the shutdown bound."""
    app[STOPPING].set()


async def _session_and_cors_headers(request: web.Request, response: web.StreamResponse) -> None:
    """What a request learned about the browser's session and origin goes on its answer,
    whichever answer that is (the upstream's, a refusal, a WebSocket's 101), and so does
    its request id."""
    if (request_id := request.get(REQUEST_ID)) is not None:
        response.headers["X-Request-ID"] = request_id
    renewed = request.get(RENEWED)
    if renewed is not None:
        config = request[GATEWAY].config
        cookies.set_access(response, config.cookies, renewed.access_token,
                           min(int(config.tokens.access_ttl), renewed.max_age))
        cookies.set_refresh(response, config.cookies, renewed.refresh_token, renewed.max_age)
    elif request.get(CLEAR_COOKIES):
        gw = request[GATEWAY]
        cookies.clear(response, gw.config.cookies, gw.retired_cookies)
    if (allowed := request.get(CORS)) is not None:
        cors.mark(response, *allowed)


def _lifecycle(config: Config, clock: Callable[[], float], given: Store | None) \
        -> Callable[[web.Application], AsyncIterator[None]]:
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        store = given if given is not None else await open_store(config.store)
        gw = Gateway.build(config, store, clock, endpoints=own_endpoints(config))
        try:
            await gw.revocations.sync()
        except StoreUnavailable as exc:  # serve anyway: /readyz says so, and the view catches up
            log.warning("store_unavailable_at_start", extra={"fields": {"reason": exc.reason}})
        await gw.proxy.start()
        app[LIVE] = live = Live(gw, endpoints=own_endpoints)
        background = [asyncio.create_task(gw.revocations.run()),  # one view, whatever reloads
                      asyncio.create_task(_purge_forever(live))]
        try:
            yield
        finally:
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            await live.close()
            if given is None:
                await store.close()

    return ctx


async def _purge_forever(live: Live) -> None:
    """Delete sessions that ended long enough ago, so the store does not grow without
    bound. Runs beside request handling, in small batches."""
    while True:
        await asyncio.sleep(revocations.PURGE_INTERVAL)
        gw = live.current
        try:
            removed = await gw.store.purge(gw.clock(), gw.sessions.rules, gw.revocations.horizon)
        except StoreUnavailable as exc:
            log.warning("purge_failed", extra={"fields": {"reason": exc.reason}})
            continue
        if removed:
            log.info("purged", extra={"fields": {"sessions": removed}})


async def dispatch(request: web.Request) -> web.StreamResponse:
    gw = request[GATEWAY]  # taken once (reload.current_gateway): one config for the whole request
    request[IP] = gw.proxy.client_ip(request)
    request[REQUEST_ID] = gw.proxy.request_id(request)
    _check_framing(request)
    target = normalize(request.raw_path)
    request[PATH] = target.path
    own = own_endpoint(gw.endpoints, gw.config, target.path)
    if own is None:
        return await pipeline.handle(gw, request, target)
    request[ENDPOINT] = _ENDPOINT_NAMES.get(target.path, "auth")
    if origin := cors.allowed_origin(gw.config.auth_cors, request):
        request[CORS] = (gw.config.auth_cors, origin)
    if cors.is_preflight(request):
        return cors.preflight(gw.config.auth_cors, request, set(own))
    return await own_handler(own, request.method)(request)


def _check_framing(request: web.Request) -> None:
    """Refuse what aiohttp's parsers let through but a strict one would not, before anything
    is decided: an HTTP version other than 1.0 or 1.1 (0.9, 2.0, 1.9, ... in an HTTP/1
    request line), and any Transfer-Encoding but a single ``chunked``. Another proxy in
    front could read such bytes differently, which is how requests are smuggled."""
    if request.version not in ((1, 0), (1, 1)):
        raise BadRequest("invalid_request", "Only HTTP/1.0 and HTTP/1.1 are spoken here.")
    codings = request.headers.getall("Transfer-Encoding", ())
    if codings and [c.strip().lower() for c in ",".join(codings).split(",")] != ["chunked"]:
        raise BadRequest("invalid_request", "The only Transfer-Encoding accepted is chunked.")


def own_endpoints(config: Config) -> dict[str, dict[str, Handler]]:
    """The gateway's own endpoints: path -> method -> handler (``parent/{id}`` stands for
    one more non-empty segment)."""
    return {
        **auth_api.endpoints(config.auth_prefix, registration=config.registration.enabled),
        "/healthz": {"GET": healthz}, "/readyz": {"GET": readyz},
        "/.well-known/jwks.json": {"GET": wellknown.jwks},
        **admin.main_listener_endpoints(config.metrics)}


# For the access log and the metrics: which own endpoint answered (else one under the auth prefix).
_ENDPOINT_NAMES = {"/healthz": "health", "/readyz": "health", "/metrics": "metrics",
                   "/.well-known/jwks.json": "jwks"}


def own_endpoint(table: dict[str, dict[str, Handler]], config: Config, path: str) \
        -> dict[str, Handler] | None:
    """The gateway's endpoint at ``path`` in ``table`` (``own_endpoints(config)``): an
    exact entry, or ``parent/{id}`` for one more non-empty segment (the handler reads the id
    from the normalized path). None when the path is for the proxied pipeline; NotFound for
    any other path that belongs to the gateway whatever the routes say: under the auth
    prefix, and the metrics path (admin.kept_from_routes), in any case."""
    own = table.get(path)
    if own is None:
        parent, _, last = path.rpartition("/")
        own = table.get(parent + "/{id}") if last else None
    if own is None:
        prefix, folded = config.auth_prefix.lower(), path.lower()
        if folded == prefix or folded.startswith(prefix + "/") or admin.kept_from_routes(config.metrics, path):
            raise NotFound()
    return own


def own_handler(own: dict[str, Handler], method: str) -> Handler:
    """The handler of one of the gateway's endpoints for ``method`` (HEAD as GET), or
    MethodNotAllowed."""
    handler = own.get(method) or (own.get("GET") if method == "HEAD" else None)
    if handler is None:
        raise MethodNotAllowed(set(own) | ({"HEAD"} if "GET" in own else set()))
    return handler


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"}, headers={"Cache-Control": "no-store"})


async def readyz(request: web.Request) -> web.Response:
    await request[GATEWAY].store.ping()
    return web.json_response({"status": "ready"}, headers={"Cache-Control": "no-store"})


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Renders every error as JSON: ours, aiohttp's (a body over its limit, say), and, as
    the last resort, anything unexpected as a bare 500 without detail."""
    try:
        return await handler(request)
    except GatewayError as exc:
        request[ERROR] = exc.reason
        response = errors.response(exc)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        response = errors.response(errors.for_status(exc.status, exc.reason))
    except ConnectionError:
        # The client went away while we read its request; nobody is left to answer.
        request[ERROR] = "client_disconnected"
        response = web.Response(status=499)
    except Exception:
        log.exception("unhandled_error", extra={"fields": {"path": request.get(PATH)}})
        response = errors.response(GatewayError())
    if response.status == 400 or (request.body_exists and not request.content.at_eof()):
        # A malformed request may have been framed differently than we read it: whatever
        # follows on this connection is not trusted as a request. And a request refused
        # before its body was read (a 401 for an upload, say) is closed rather than read
        # and discarded, which may be gigabytes, to keep the connection alive.
        response.force_close()
    return response


async def _not_yet(request: web.Request) -> None:
    return None


class _EveryPath(web.PlainResource):
    """A resource at "/" that claims every request, whatever its path (the router consults
    "/" last, for any path); see the module docstring."""

    def __init__(self, handler: Handler) -> None:
        super().__init__("/")
        # aiohttp would answer "Expect: 100-continue" as soon as the request arrives; the
        # gateway does it itself once the request is authorized (proxy.continue_if_expected).
        self._route = self.add_route("*", handler, expect_handler=_not_yet)

    async def resolve(self, request: web.Request) -> tuple[web.UrlMappingMatchInfo, set[str]]:
        return web.UrlMappingMatchInfo({}, self._route), {"*"}
