"""HTTP semantics across the hop: statuses without bodies, compression, header order,
Expect: 100-continue, body limits, and strip_prefix."""

from __future__ import annotations

import asyncio
import gc
import gzip
import uuid
from typing import Any

import pytest

from gateway.proxy import _Relayed

from conftest import Gateway, GatewayFactory, Upstream


async def _public(gateway_factory: GatewayFactory, **extra: Any) -> Gateway:
    def change(raw: dict[str, Any]) -> None:
        raw["routes"] = [{"path": "/app/**", "access": "public", "strip_prefix": "/app"},
                         {"path": "/**", "access": "public"}]
        raw.update(extra)
    return await gateway_factory(change)


async def test_statuses_without_a_body(gateway_factory: GatewayFactory) -> None:
    gw = await _public(gateway_factory)
    for status in (204, 304):
        async with gw.http.get(f"{gw.url}/respond", params={"status": str(status), "header": "ETag:\"v1\""}) as resp:
            assert resp.status == status
            assert resp.headers["ETag"] == '"v1"'
            assert await resp.read() == b""
    async with gw.http.head(f"{gw.url}/respond", params={"body": "x" * 100}) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Length"] == "100"
        assert await resp.read() == b""


async def test_compressed_bodies_pass_through_untouched(gateway_factory: GatewayFactory) -> None:
    gw = await _public(gateway_factory)
    text = "hello " * 1000
    async with gw.http.get(f"{gw.url}/respond", params={"body": text, "gzip": "1"},
                           auto_decompress=False, headers={"Accept-Encoding": "gzip"}) as resp:
        assert resp.headers["Content-Encoding"] == "gzip"
        raw = await resp.read()
    assert raw == gzip.compress(text.encode(), mtime=0)


async def test_repeated_headers_keep_their_order(gateway_factory: GatewayFactory, upstream: Upstream) -> None:
    gw = await _public(gateway_factory)
    params = [("header", "X-Multi:one"), ("header", "X-Other:x"), ("header", "X-Multi:two"),
              ("header", "Set-Cookie:a=1"), ("header", "Set-Cookie:b=2")]
    async with gw.http.get(f"{gw.url}/respond", params=params,
                           headers=[("X-In", "1"), ("X-In", "2"), ("X-In", "3")]) as resp:
        assert resp.headers.getall("X-Multi") == ["one", "two"]
        assert resp.headers.getall("Set-Cookie") == ["a=1", "b=2"]
    assert upstream.seen[-1].header("X-In") == ["1", "2", "3"]


async def test_expect_100_continue_only_after_authorization(gw: Gateway, upstream: Upstream) -> None:
    body = b"x" * 1000
    request = (b"POST /profile HTTP/1.1\r\nHost: gateway.test\r\nContent-Type: application/octet-stream\r\n"
               b"Content-Length: 1000\r\nExpect: 100-continue\r\n")

    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(request + b"\r\n")  # no token: refused without a 100 Continue first
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 401 ")
    writer.close()

    token = await gw.token("alice")
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(request + f"Authorization: Bearer {token}\r\n\r\n".encode())
    interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
    writer.write(body)
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 200 ")
    writer.close()
    assert [s.body for s in upstream.seen] == [body]
    assert upstream.seen[-1].header("Expect") == []


async def test_request_body_limit(gateway_factory: GatewayFactory, upstream: Upstream) -> None:
    gw = await _public(gateway_factory, limits={"request_body": "64k"})
    async with gw.http.post(f"{gw.url}/upload", data=b"x" * (64 * 1024)) as resp:
        assert resp.status == 200  # exactly the limit
    async with gw.http.post(f"{gw.url}/upload", data=b"x" * (64 * 1024 + 1)) as resp:
        assert resp.status == 413
        assert (await resp.json())["error"] == "payload_too_large"
    assert len(upstream.seen) == 1  # a declared length over the limit never leaves

    async def chunked(total: int):  # type: ignore[no-untyped-def]
        for _ in range(total // 8192):
            yield b"y" * 8192

    async with gw.http.post(f"{gw.url}/upload", data=chunked(128 * 1024)) as resp:
        assert resp.status == 413
    async with gw.http.post(f"{gw.url}/upload", data=chunked(32 * 1024)) as resp:
        assert resp.status == 200
        assert (await resp.json())["body_length"] == 32 * 1024


async def test_strip_prefix_forwards_without_it_and_rewrites_redirects_and_cookies(
    gateway_factory: GatewayFactory, upstream: Upstream
) -> None:
    gw = await _public(gateway_factory)
    async with gw.http.get(f"{gw.url}/app/reports/1?x=1") as resp:
        assert resp.status == 200
    assert upstream.seen[-1].target == "/reports/1?x=1"
    async with gw.http.get(f"{gw.url}/app") as resp:
        assert resp.status == 200
    assert upstream.seen[-1].target == "/"

    params = [("status", "302"), ("header", "Location:/login?next=/x"),
              ("header", "Set-Cookie:sid=1; Path=/; HttpOnly"), ("header", "Set-Cookie:pref=2; Path=/reports"),
              ("header", "Set-Cookie:bare=3")]
    async with gw.http.get(f"{gw.url}/app/respond", params=params, allow_redirects=False) as resp:
        assert resp.headers["Location"] == "/app/login?next=/x"
        assert resp.headers.getall("Set-Cookie") == ["sid=1; Path=/app; HttpOnly", "pref=2; Path=/app/reports",
                                                     "bare=3"]
    absolute = f"Location:{upstream.url}/done"
    async with gw.http.get(f"{gw.url}/app/respond", params=[("status", "303"), ("header", absolute)],
                           allow_redirects=False) as resp:
        assert resp.headers["Location"] == "/app/done"
    async with gw.http.get(f"{gw.url}/app/respond", params=[("status", "302"), ("header", "Location:https://elsewhere.example/x")],
                           allow_redirects=False) as resp:
        assert resp.headers["Location"] == "https://elsewhere.example/x"
    # without strip_prefix, nothing is rewritten
    async with gw.http.get(f"{gw.url}/respond", params=params, allow_redirects=False) as resp:
        assert resp.headers["Location"] == "/login?next=/x"


_PREFIXES = ("", "__Host-", "__Secure-", "__host-", "__SECURE-")


@pytest.mark.parametrize("secure", [False, True])
async def test_no_gateway_cookie_reaches_the_upstream_under_any_name(
        gateway_factory: GatewayFactory, upstream: Upstream, secure: bool) -> None:
    """Every prefix variant of the current names, of the defaults (a rename by restart) and
    of ``cookies.retired_names`` is the gateway's; cookies merely alike pass."""
    gw = await _public(gateway_factory, cookies={
        "secure": secure, "access": {"name": "sess_a"}, "refresh": {"name": "sess_r"},
        "retired_names": ["old_refresh", "__Host-old_access"]})
    ours = [f"{prefix}{name}=t{n}" for n, name in enumerate(
        ("sess_a", "sess_r", "gw_access", "gw_refresh", "gw_probe", "old_refresh", "old_access"))
        for prefix in _PREFIXES]
    theirs = ["app=1", "sess_ax=2", "x_sess_r=3", "__Host-app=4", "old_refresh_v2=5"]
    async with gw.http.get(f"{gw.url}/x", headers={"Cookie": "; ".join(ours[:17] + theirs[:2])}) as resp:
        assert resp.status == 200
    two_headers = [("Cookie", "; ".join(ours[17:])), ("Cookie", "; ".join(theirs[2:]))]
    async with gw.http.get(f"{gw.url}/y", headers=two_headers) as resp:
        assert resp.status == 200
    assert upstream.seen[-2].header("Cookie") == ["app=1; sess_ax=2"]
    assert upstream.seen[-1].header("Cookie") == ["x_sess_r=3; __Host-app=4; old_refresh_v2=5"]

    # logout expires the retired names too
    async with gw.http.post(f"{gw.url}/auth/logout") as resp:
        assert resp.status == 204
        expired = [c for c in resp.headers.getall("Set-Cookie") if "Max-Age=0" in c]
    prefix = "__Host-" if secure else ""
    assert sorted(c.split("=", 1)[0] for c in expired) == sorted(
        [f"{prefix}sess_a", f"{prefix}sess_r", "old_refresh", "__Host-old_access"])
    assert all("Path=/" in c for c in expired)


async def test_an_idle_keep_alive_connection_keeps_no_headers_of_its_last_answer(
        gateway_factory: GatewayFactory) -> None:
    """aiohttp's handler holds a connection's last request and answer until its next request
    arrives: with thousands of idle keep-alive connections, their headers were most of what
    each one cost. Once an answer is sent and logged, its headers are let go."""
    gw = await _public(gateway_factory)
    marker = f"m-{uuid.uuid4().hex}"

    def held() -> list[Any]:
        gc.collect()
        return [o for o in gc.get_objects()
                if isinstance(o, _Relayed) and o.headers.get("X-Marker") == marker]

    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    try:
        writer.write(f"GET /respond?header=X-Marker:{marker}&body=hi HTTP/1.1\r\n"
                     f"Host: gateway.test\r\n\r\n".encode())
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and f"X-Marker: {marker}".encode() in head
        assert await reader.readexactly(2) == b"hi"
        # the answer is on the wire; the access log runs just after it is written
        deadline = asyncio.get_running_loop().time() + 2.0
        while held() and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)
        assert held() == []
        assert not reader.at_eof()  # the connection is still open, idle
    finally:
        writer.close()
