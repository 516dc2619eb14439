"""The upgraded hop: a WebSocket relayed between the client and its upstream.

``pipeline.handle`` matches the route, authenticates and authorizes an upgrade exactly as it
does any request; only then is the upstream dialled, with the same sanitized headers as an
HTTP request (the WebSocket handshake headers are aiohttp's to set on each hop). The
client's upgrade is answered (101) only once the upstream has accepted its own, so every
refusal is still an ordinary JSON answer: 401/403/405 from the pipeline, 400 for a malformed
handshake, 502 when the upstream refuses the upgrade or cannot be reached, 504 when it has
not answered within ``connect_timeout + timeout``.

Once open:

- Text and binary messages are relayed both ways, whole (aiohttp's limit: 4 MiB each).
  Pings are answered by aiohttp on each hop and are not relayed.
- Subprotocols: the client's ``Sec-WebSocket-Protocol`` offer goes to the upstream, and the
  client is answered with the upstream's choice (or none).
- Close passes through with its code and reason, both ways: whichever side began, the
  upstream hop's closing handshake is done first, then the client's. A side that vanishes
  without a close is reported to the other as 1001 (the client went away) or 1014 (bad
  gateway: the upstream went away). Each close waits at most ``CLOSE_TIMEOUT`` (5 s) for
  the other end's answer before the connection is cut.

A socket opened with an access token lives no longer than the token's session. It is closed
on both hops with **1008 (policy violation)**, reason ``session revoked`` or
``token expired``, when its session is revoked or once the gateway's clock passes the
token's ``exp`` plus ``websockets.expiry_grace`` (a client that wants to stay connected
refreshes and reconnects). When the gateway shuts down (SIGTERM), every open socket is
closed at once on both hops with **1001 (going away)**, reason ``server shutting down``,
rather than held open until the shutdown bound cuts it. Both are checked every ``CHECK_INTERVAL`` (250 ms) against this
process's revocation view, which is itself at most 250 ms behind the store (revocations.py):
a revocation closes the socket within about half a second, a logout on the same process
within 250 ms (plus the upstream's answer to its close, as above). Sockets on public routes
carry no identity and are never closed this way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import Literal

import aiohttp
from aiohttp import WSCloseCode, WSMsgType, web
from multidict import CIMultiDict

from . import metrics
from .config import Route
from .errors import BadGateway, BadRequest, GatewayTimeout
from .paths import Target
from .proxy import error_kind
from .state import STOPPING, Gateway
from .tokens import Identity

log = logging.getLogger("gateway.websockets")
security = logging.getLogger("gateway.security")

CHECK_INTERVAL = 0.25  # seconds between checks of a socket's session and token expiry
CLOSE_TIMEOUT = 5.0  # seconds a side has to answer our close before its connection is cut
POLICY_CLOSE = WSCloseCode.POLICY_VIOLATION  # 1008: session revoked or token expired

Socket = web.WebSocketResponse | aiohttp.ClientWebSocketResponse
Side = Literal["client", "upstream", "gateway"]


def is_upgrade(request: web.BaseRequest) -> bool:
    """A WebSocket handshake (RFC 6455 §4.1). Read from ``request.headers``: these are
    hop-by-hop, so they are no longer in what the pipeline forwards."""
    if request.method != "GET":
        return False
    return "upgrade" in _tokens(request, "Connection") and "websocket" in _tokens(request, "Upgrade")


async def relay(
    gw: Gateway, request: web.Request, target: Target, route: Route,
    headers: CIMultiDict[str], identity: Identity | None,
) -> web.WebSocketResponse:
    offered = [p for p in _tokens(request, "Sec-WebSocket-Protocol", lower=False) if p]
    if not web.WebSocketResponse(protocols=offered).can_prepare(request).ok:
        raise BadRequest("invalid_request", "The WebSocket handshake is malformed.")
    upstream = await _dial(gw, target, route, headers, offered)
    try:
        chosen = upstream.protocol
        client = web.WebSocketResponse(protocols=(chosen,) if chosen else (), autoclose=False,
                                       timeout=CLOSE_TIMEOUT)
        await client.prepare(request)
        await _run(gw, client, upstream, identity, request.app[STOPPING])
        return client
    finally:
        if not upstream.closed:  # a client gone before its 101, or the handler cancelled
            await _close(upstream, WSCloseCode.GOING_AWAY)


async def _dial(
    gw: Gateway, target: Target, route: Route, headers: CIMultiDict[str], offered: list[str]
) -> aiohttp.ClientWebSocketResponse:
    upstream = gw.config.upstreams[route.upstream]
    url = gw.proxy.upstream_url(route, target)
    url = url.with_scheme("wss" if url.scheme == "https" else "ws")
    # The client's Sec-WebSocket-Key/Version/Extensions described *its* hop; aiohttp sets
    # ours (an extension the gateway did not negotiate must never be offered for it).
    sent = CIMultiDict((k, v) for k, v in headers.items() if not k.lower().startswith("sec-websocket-"))
    try:
        async with asyncio.timeout(upstream.connect_timeout + upstream.timeout):
            return await gw.proxy.client.ws_connect(
                url, headers=sent, protocols=offered, autoclose=False,
                timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=CLOSE_TIMEOUT))
    except TimeoutError:
        metrics.upstream_error("timeout")
        raise GatewayTimeout().because(f"timeout:{upstream.name}") from None
    except aiohttp.WSServerHandshakeError as exc:
        metrics.upstream_error("invalid_response")
        raise BadGateway().because(f"ws_refused:{exc.status}:{upstream.name}") from None
    except aiohttp.ClientError as exc:
        metrics.upstream_error(error_kind(exc))
        raise BadGateway().because(f"{exc.__class__.__name__}:{upstream.name}") from None


@dataclass(frozen=True)
class _End:
    """Why a relay stopped: the side that ended it and the close both sides are sent."""

    side: Side
    code: int
    reason: str = ""


async def _run(gw: Gateway, client: web.WebSocketResponse, upstream: aiohttp.ClientWebSocketResponse,
               identity: Identity | None, stopping: asyncio.Event) -> None:
    """Relay messages both ways until a side closes or goes away, the session ends or the
    gateway shuts down; then close both sides."""
    tasks = [asyncio.create_task(_pump(client, upstream, "client", "upstream")),
             asyncio.create_task(_pump(upstream, client, "upstream", "client")),
             asyncio.create_task(_shutdown(stopping))]
    if identity is not None:
        tasks.append(asyncio.create_task(_expiry(gw, identity)))
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        try:
            end = next(task for task in tasks if task in done).result()
        except Exception:  # past the 101 no error answer is possible: close, and say why here
            log.exception("websocket_relay_failed")
            end = _End("gateway", WSCloseCode.INTERNAL_ERROR)
        if end.code == POLICY_CLOSE and end.side == "gateway" and identity is not None:
            security.info("websocket_closed", extra={"fields": {
                "user": identity.sub, "sid": identity.sid, "reason": end.reason}})
        # Upstream first, whoever began: once the client's connection is closed, the server
        # may cancel this handler (aiohttp's handler_cancellation) before it could finish.
        # Closing a socket that a pump is reading from ends that read (aiohttp allows it).
        await _close(upstream, end.code, end.reason)
        await _close(client, end.code, end.reason)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _pump(source: Socket, sink: Socket, source_side: Side, sink_side: Side) -> _End:
    while True:
        msg = await source.receive()
        try:
            if msg.type is WSMsgType.TEXT:
                await sink.send_str(msg.data)
            elif msg.type is WSMsgType.BINARY:
                await sink.send_bytes(msg.data)
            elif msg.type is WSMsgType.CLOSE:
                return _End(source_side, _sendable(msg.data), msg.extra or "")
            else:  # CLOSED or ERROR: gone without a close (CLOSING: we closed it ourselves)
                return _End(source_side, _GONE[source_side])
        except (ConnectionError, aiohttp.ClientError):
            return _End(sink_side, _GONE[sink_side])


# What the other side is told when one vanishes without a close.
_GONE = {"client": WSCloseCode.GOING_AWAY, "upstream": WSCloseCode.BAD_GATEWAY}


async def _expiry(gw: Gateway, identity: Identity) -> _End:
    deadline = identity.exp + gw.config.websockets.expiry_grace
    while True:
        if gw.revocations.is_revoked(identity.sid):
            return _End("gateway", POLICY_CLOSE, "session revoked")
        if gw.clock() > deadline:
            return _End("gateway", POLICY_CLOSE, "token expired")
        await asyncio.sleep(CHECK_INTERVAL)


async def _shutdown(stopping: asyncio.Event) -> _End:
    await stopping.wait()
    return _End("gateway", WSCloseCode.GOING_AWAY, "server shutting down")


async def _close(ws: Socket, code: int, reason: str = "") -> None:
    # A peer that does not read cannot hold the handler: on timeout aiohttp cuts the connection.
    with contextlib.suppress(TimeoutError, ConnectionError, aiohttp.ClientError):
        async with asyncio.timeout(CLOSE_TIMEOUT):
            await ws.close(code=code, message=reason.encode())


def _sendable(code: int) -> int:
    """A received close code that may go on the wire again; 1000 for "no code" (0, 1005) and
    the codes that only describe a connection locally (1006, 1015)."""
    if 1000 <= code <= 1014 and code not in (1004, 1005, 1006) or 3000 <= code <= 4999:
        return code
    return WSCloseCode.OK


def _tokens(request: web.BaseRequest, header: str, *, lower: bool = True) -> list[str]:
    values = (t.strip() for v in request.headers.getall(header, ()) for t in v.split(","))
    return [t.lower() for t in values] if lower else list(values)
