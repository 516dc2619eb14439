"""WebSocket upgrades end to end: a real gateway in front of a real WebSocket echo upstream.

The upstream echoes text and binary messages, closes with code N when sent ``close:N``,
drops its connection without a close when sent ``vanish``, records every request's headers, and reports the close code each of its sockets ended with.
"""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import WSMsgType, web
from aiohttp.test_utils import TestServer
from multidict import CIMultiDict

from gateway import websockets

from conftest import Gateway, GatewayFactory

WAIT = 5.0  # the longest any test waits for an event that must happen


@dataclass
class WsUpstream:
    url: str = ""
    requests: list[tuple[str, CIMultiDict[str]]] = field(default_factory=list)  # (path, headers)
    closes: asyncio.Queue[int | None] = field(default_factory=asyncio.Queue)

    def headers(self, name: str) -> list[str]:
        return self.requests[-1][1].getall(name, [])


async def _ws_app(state: WsUpstream) -> web.Application:
    async def handler(request: web.Request) -> web.StreamResponse:
        state.requests.append((request.path, CIMultiDict(request.headers)))
        ws = web.WebSocketResponse(protocols=("chat.v2", "chat.v1"))
        if request.path in ("/refuse", "/not-a-socket") or not ws.can_prepare(request).ok:
            return web.json_response({"plain": "http"}, status=403 if request.path == "/refuse" else 200)
        await ws.prepare(request)
        try:
            async for msg in ws:
                if msg.type is WSMsgType.TEXT and msg.data == "vanish":
                    assert request.transport is not None
                    request.transport.abort()  # gone without a close frame
                elif msg.type is WSMsgType.TEXT and msg.data.startswith("close:"):
                    await ws.close(code=int(msg.data[6:]), message=b"done")
                elif msg.type is WSMsgType.TEXT:
                    await ws.send_str(msg.data)
                elif msg.type is WSMsgType.BINARY:
                    await ws.send_bytes(msg.data)
        finally:  # also when the test server cancels this handler as its connection drops
            state.closes.put_nowait(ws.close_code)
        return ws

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    return app


@pytest.fixture
def cancellation(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    """Whether a server cancels a handler whose client's connection is gone. aiohttp's test
    server does; ``web.run_app`` (how ``gateway run`` serves) does not. Closing must work
    either way: parametrize with ``indirect=True`` to run a test both ways."""
    cancel: bool = getattr(request, "param", True)
    if not cancel:
        make_runner = TestServer._make_runner

        async def keep_handlers(self: TestServer, **kwargs: Any) -> web.BaseRunner:
            return await make_runner(self, **{**kwargs, "handler_cancellation": False})

        monkeypatch.setattr(TestServer, "_make_runner", keep_handlers)
    return cancel


both_ways = pytest.mark.parametrize("cancellation", [True, False], indirect=True,
                                    ids=["handler_cancellation", "run_app"])


@pytest.fixture
async def ws_upstream(cancellation: bool) -> AsyncIterator[WsUpstream]:
    state = WsUpstream()
    server = TestServer(await _ws_app(state), host="127.0.0.1")
    await server.start_server()
    state.url = f"http://127.0.0.1:{server.port}"
    yield state
    await server.close()


Change = Callable[[dict[str, Any]], None]


@pytest.fixture
async def ws_factory(
    ws_upstream: WsUpstream, gateway_factory: GatewayFactory
) -> Callable[..., Awaitable[Gateway]]:
    """A gateway whose upstream is the echo server (set up after it, so torn down first)."""

    async def make(change: Change | None = None) -> Gateway:
        def to_echo(raw: dict[str, Any]) -> None:
            raw["upstreams"]["app"]["url"] = ws_upstream.url
            if change is not None:
                change(raw)

        return await gateway_factory(to_echo)

    return make


@pytest.fixture
async def wsgw(ws_factory: Callable[..., Awaitable[Gateway]]) -> Gateway:
    return await ws_factory()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def upgrade(**extra: str) -> dict[str, str]:
    """A client's handshake headers, for requests that must be refused as plain HTTP."""
    return {"Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
            "Sec-WebSocket-Key": base64.b64encode(os.urandom(16)).decode(), **extra}


async def receive(ws: aiohttp.ClientWebSocketResponse) -> aiohttp.WSMessage:
    return await asyncio.wait_for(ws.receive(), WAIT)


async def echo(ws: aiohttp.ClientWebSocketResponse, text: str = "ping?") -> None:
    await ws.send_str(text)
    msg = await receive(ws)
    assert (msg.type, msg.data) == (WSMsgType.TEXT, text)


# --- refused upgrades -------------------------------------------------------------------------


async def test_upgrade_without_a_token_is_401_and_never_reaches_the_upstream(
    wsgw: Gateway, ws_upstream: WsUpstream
) -> None:
    async with wsgw.http.get(f"{wsgw.url}/ws", headers=upgrade()) as resp:
        assert resp.status == 401
        assert resp.headers["WWW-Authenticate"] == 'Bearer realm="gateway"'
        assert (await resp.json())["error"] == "unauthorized"
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await wsgw.http.ws_connect(f"{wsgw.url}/ws")
    assert refused.value.status == 401
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:  # an invalid token, likewise
        await wsgw.http.ws_connect(f"{wsgw.url}/ws", headers=bearer("x.y.z"))
    assert refused.value.status == 401
    assert ws_upstream.requests == []


async def test_the_csrf_guard_refuses_a_websocket_opened_from_another_site(
    ws_factory: Callable[..., Awaitable[Gateway]], ws_upstream: WsUpstream
) -> None:
    def guarded(raw: dict[str, Any]) -> None:
        raw["routes"].insert(0, {"path": "/live/**", "access": "authenticated", "csrf": True})

    gw = await ws_factory(guarded)
    cookie = {"Cookie": f"gw_access={await gw.token('alice')}"}
    for other_site in ({"Origin": "https://evil.example"}, {"Origin": "http://gateway.test.evil.example"}):
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await gw.http.ws_connect(f"{gw.url}/live/ws", headers={**cookie, **other_site})
        assert refused.value.status == 403
    assert ws_upstream.requests == []
    async with gw.http.ws_connect(f"{gw.url}/live/ws", headers={**cookie, "Origin": "http://gateway.test"}) as ws:
        await echo(ws)
    async with gw.http.ws_connect(f"{gw.url}/ws", headers={**cookie, "Origin": "https://evil.example"}) as ws:
        await echo(ws)  # routes without the guard are the app's own business


async def test_wrong_role_is_403_and_an_unlisted_method_405(
    ws_factory: Callable[..., Awaitable[Gateway]], ws_upstream: WsUpstream
) -> None:
    def post_only(raw: dict[str, Any]) -> None:
        raw["routes"].insert(0, {"path": "/push/**", "methods": ["POST"], "access": "authenticated"})

    gw = await ws_factory(post_only)
    alice = await gw.token("alice")
    async with gw.http.get(f"{gw.url}/admin/ws", headers={**upgrade(), **bearer(alice)}) as resp:
        assert resp.status == 403
        assert (await resp.json())["error"] == "forbidden"
    async with gw.http.get(f"{gw.url}/push/ws", headers={**upgrade(), **bearer(alice)}) as resp:
        assert resp.status == 405
        assert (await resp.json())["error"] == "method_not_allowed"
    assert ws_upstream.requests == []
    bob = await gw.token("bob")
    async with gw.http.ws_connect(f"{gw.url}/admin/ws", headers=bearer(bob)) as ws:
        await echo(ws)
    assert [path for path, _ in ws_upstream.requests] == ["/admin/ws"]


async def test_malformed_handshake_is_400_and_not_forwarded(wsgw: Gateway, ws_upstream: WsUpstream) -> None:
    token = await wsgw.token("alice")
    for broken in ({"Sec-WebSocket-Key": "short"}, {"Sec-WebSocket-Key": ""}, {"Sec-WebSocket-Version": "99"}):
        async with wsgw.http.get(f"{wsgw.url}/ws", headers={**upgrade(**broken), **bearer(token)}) as resp:
            assert resp.status == 400
            assert (await resp.json())["error"] == "invalid_request"
    assert ws_upstream.requests == []


async def test_another_upgrade_is_forwarded_as_plain_http(wsgw: Gateway, ws_upstream: WsUpstream) -> None:
    # Upgrade and Connection are hop-by-hop: an h2c upgrade must not reach the upstream.
    token = await wsgw.token("alice")
    async with wsgw.http.get(f"{wsgw.url}/x", headers={"Connection": "Upgrade, HTTP2-Settings",
                                                        "Upgrade": "h2c", "HTTP2-Settings": "AAMAAABkAAQAAP__",
                                                        **bearer(token)}) as resp:
        assert resp.status == 200
        assert await resp.json() == {"plain": "http"}
    assert ws_upstream.headers("Upgrade") == [] and ws_upstream.headers("HTTP2-Settings") == []


# --- relaying ---------------------------------------------------------------------------------


async def test_text_and_binary_messages_are_relayed_both_ways(wsgw: Gateway, ws_upstream: WsUpstream) -> None:
    token = await wsgw.token("alice")
    async with wsgw.http.ws_connect(f"{wsgw.url}/chat/room?id=7", headers=bearer(token)) as ws:
        await echo(ws, "hello")
        await echo(ws, "héllo, wörld ✓")
        for data in (b"\x00\x01\xff", os.urandom(1024 * 1024)):
            await ws.send_bytes(data)
            msg = await receive(ws)
            assert (msg.type, msg.data) == (WSMsgType.BINARY, data)
        await ws.ping(b"are you there")  # answered by the gateway; the relay goes on
        await echo(ws, "still here")
    assert ws_upstream.requests[-1][0] == "/chat/room"


async def test_handshake_carries_identity_headers_and_not_the_clients_secrets(
    wsgw: Gateway, ws_upstream: WsUpstream
) -> None:
    token = await wsgw.token("alice")
    headers = {"Cookie": f"theme=dark; gw_access={token}", "X-Auth-User": "bob", "X-Auth-Roles": "admin",
               "X-Forwarded-For": "6.6.6.6", "Sec-WebSocket-Extensions": "x-made-up", "Origin": "http://gateway.test"}
    async with wsgw.http.ws_connect(f"{wsgw.url}/ws", headers=headers) as ws:  # cookie auth
        await echo(ws)
    assert ws_upstream.headers("X-Auth-User") == ["alice"]
    assert ws_upstream.headers("X-Auth-Roles") == ["user"]
    assert ws_upstream.headers("Authorization") == []
    assert ws_upstream.headers("Cookie") == ["theme=dark"]
    assert ws_upstream.headers("X-Forwarded-For") == ["127.0.0.1"]
    assert ws_upstream.headers("Origin") == ["http://gateway.test"]
    # the upstream hop's handshake is the gateway's own
    assert ws_upstream.headers("Sec-WebSocket-Extensions") == []
    assert ws_upstream.headers("Sec-WebSocket-Version") == ["13"]
    assert len(ws_upstream.headers("Sec-WebSocket-Key")) == 1


async def test_public_route_sockets_carry_no_identity(wsgw: Gateway, ws_upstream: WsUpstream) -> None:
    async with wsgw.http.ws_connect(f"{wsgw.url}/static/live", headers={"X-Auth-User": "bob"}) as ws:
        await echo(ws)
        wsgw.clock.advance(30 * 86400)  # no token, nothing to expire
        await asyncio.sleep(2 * websockets.CHECK_INTERVAL)  # two checks' worth: nothing may happen
        await echo(ws)
    assert ws_upstream.headers("X-Auth-User") == []


async def test_subprotocol_is_negotiated_with_the_upstream(wsgw: Gateway, ws_upstream: WsUpstream) -> None:
    token = await wsgw.token("alice")
    async with wsgw.http.ws_connect(f"{wsgw.url}/ws", headers=bearer(token),
                                    protocols=("made-up", "chat.v1", "chat.v2")) as ws:
        assert ws.protocol == "chat.v1"  # the upstream's choice, from the client's offer
        await echo(ws)
    assert ws_upstream.headers("Sec-WebSocket-Protocol") == ["made-up,chat.v1,chat.v2"]
    async with wsgw.http.ws_connect(f"{wsgw.url}/ws", headers=bearer(token), protocols=("made-up",)) as ws:
        assert ws.protocol is None  # the upstream chose none: neither does the gateway
        await echo(ws)
    async with wsgw.http.ws_connect(f"{wsgw.url}/ws", headers=bearer(token)) as ws:
        assert ws.protocol is None
    assert ws_upstream.headers("Sec-WebSocket-Protocol") == []


# --- closing ----------------------------------------------------------------------------------


@both_ways
async def test_client_close_code_reaches_the_upstream(wsgw: Gateway, ws_upstream: WsUpstream) -> None:
    token = await wsgw.token("alice")
    ws = await wsgw.http.ws_connect(f"{wsgw.url}/ws", headers=bearer(token))
    await echo(ws)
    await asyncio.wait_for(ws.close(code=4000, message=b"bye"), WAIT)
    assert ws.close_code == 4000  # the gateway answered the close with its code
    assert await asyncio.wait_for(ws_upstream.closes.get(), WAIT) == 4000


@both_ways
async def test_upstream_close_code_reaches_the_client(wsgw: Gateway, ws_upstream: WsUpstream) -> None:
    token = await wsgw.token("alice")
    async with wsgw.http.ws_connect(f"{wsgw.url}/ws", headers=bearer(token)) as ws:
        await ws.send_str("close:4001")
        msg = await receive(ws)
        assert (msg.type, msg.data, msg.extra) == (WSMsgType.CLOSE, 4001, "done")
    assert await asyncio.wait_for(ws_upstream.closes.get(), WAIT) == 4001


@both_ways
async def test_a_side_that_vanishes_is_reported_to_the_other(wsgw: Gateway, ws_upstream: WsUpstream) -> None:
    token = await wsgw.token("alice")
    async with wsgw.http.ws_connect(f"{wsgw.url}/ws", headers=bearer(token)) as ws:
        await ws.send_str("vanish")
        msg = await receive(ws)
        assert (msg.type, msg.data) == (WSMsgType.CLOSE, 1014)  # bad gateway
    await asyncio.wait_for(ws_upstream.closes.get(), WAIT)

    # a client that drops its connection: the upstream hears "going away"
    reader, writer = await asyncio.open_connection("127.0.0.1", wsgw.port)
    head = ["GET /ws HTTP/1.1", "Host: gateway.test", f"Authorization: Bearer {token}",
            *(f"{k}: {v}" for k, v in upgrade().items())]
    writer.write(("\r\n".join(head) + "\r\n\r\n").encode())
    answer = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
    assert answer.startswith(b"HTTP/1.1 101 ")
    writer.transport.abort()
    assert await asyncio.wait_for(ws_upstream.closes.get(), WAIT) == 1001


@both_ways
async def test_revoking_the_session_closes_its_socket(wsgw: Gateway, ws_upstream: WsUpstream) -> None:
    token = await wsgw.token("alice")
    other = await wsgw.token("alice")  # another session of the same user stays open
    async with wsgw.http.ws_connect(f"{wsgw.url}/ws", headers=bearer(token)) as ws, \
            wsgw.http.ws_connect(f"{wsgw.url}/ws", headers=bearer(other)) as kept:
        await echo(ws)
        async with wsgw.http.post(f"{wsgw.url}/auth/logout", headers=bearer(token)) as resp:
            assert resp.status == 204
        started = time.monotonic()
        msg = await receive(ws)
        assert time.monotonic() - started < 1.0
        assert (msg.type, msg.data, msg.extra) == (WSMsgType.CLOSE, 1008, "session revoked")
        assert await asyncio.wait_for(ws_upstream.closes.get(), WAIT) == 1008
        await echo(kept)
    # and a new upgrade with the revoked token is refused before the upstream hears of it
    seen = len(ws_upstream.requests)
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await wsgw.http.ws_connect(f"{wsgw.url}/ws", headers=bearer(token))
    assert refused.value.status == 401
    assert len(ws_upstream.requests) == seen


@both_ways
async def test_token_expiry_closes_the_socket_after_the_grace(wsgw: Gateway, ws_upstream: WsUpstream) -> None:
    token = await wsgw.token("alice")
    ttl, grace = wsgw.config.tokens.access_ttl, wsgw.config.websockets.expiry_grace
    async with wsgw.http.ws_connect(f"{wsgw.url}/ws", headers=bearer(token)) as ws:
        wsgw.clock.advance(ttl + 1)  # expired, but within the grace
        await asyncio.sleep(2 * websockets.CHECK_INTERVAL)  # two checks' worth: nothing may happen
        await echo(ws)
        wsgw.clock.advance(grace)
        msg = await receive(ws)
        assert (msg.type, msg.data, msg.extra) == (WSMsgType.CLOSE, 1008, "token expired")
    assert await asyncio.wait_for(ws_upstream.closes.get(), WAIT) == 1008


# --- a broken upstream ------------------------------------------------------------------------


async def test_upstream_down_is_502_before_the_upgrade(gateway_factory: GatewayFactory) -> None:
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]

    def dead_upstream(raw: dict[str, Any]) -> None:
        raw["upstreams"]["app"]["url"] = f"http://127.0.0.1:{dead}"

    gw = await gateway_factory(dead_upstream)
    token = await gw.token("alice")
    async with gw.http.get(f"{gw.url}/ws", headers={**upgrade(), **bearer(token)}) as resp:
        assert resp.status == 502
        assert await resp.json() == {"error": "upstream_unavailable",
                                     "error_description": "The upstream service is unavailable."}


async def test_upstream_refusing_the_upgrade_is_502(wsgw: Gateway, ws_upstream: WsUpstream) -> None:
    token = await wsgw.token("alice")
    for path in ("/refuse", "/not-a-socket"):  # a 403, and a 200 that is no upgrade
        async with wsgw.http.get(f"{wsgw.url}{path}", headers={**upgrade(), **bearer(token)}) as resp:
            assert resp.status == 502
            assert (await resp.json())["error"] == "upstream_unavailable"


async def test_upstream_silent_during_the_handshake_is_504(gateway_factory: GatewayFactory) -> None:
    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # reads the handshake, never answers

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]

    def silent_upstream(raw: dict[str, Any]) -> None:
        raw["upstreams"]["app"].update(url=f"http://127.0.0.1:{port}", timeout="300ms",
                                       connect_timeout="200ms")

    try:
        gw = await gateway_factory(silent_upstream)
        token = await gw.token("alice")
        async with gw.http.get(f"{gw.url}/ws", headers={**upgrade(), **bearer(token)}) as resp:
            assert resp.status == 504
            assert (await resp.json())["error"] == "upstream_timeout"
    finally:
        server.close()
