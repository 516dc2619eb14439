"""Shared fixtures: a real recording upstream and a real gateway, each on its own port.

``gateway_factory(**changes)`` writes a config file, loads it with the real loader, opens a
real SQLite file, adds alice (role user) and bob (role admin), and serves the gateway on a
listening socket. Time comes from a ``FakeClock`` so that tests move it instead of sleeping.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import os
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway import config as config_module
from gateway.app import create_app
from gateway.credentials import hash_password
from gateway.server import HANDLER_OPTIONS
from gateway.store import Store, User, open_store

PASSWORDS = {"alice": "alice-password-1", "bob": "bob-password-1", "carol": "carol-password-1"}
ROLES = {"alice": ("user",), "bob": ("admin",), "carol": ("user",)}
SECRET = secrets.token_urlsafe(48)


class FakeClock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


# --- the upstream ---------------------------------------------------------------------------


@dataclass
class Seen:
    method: str
    target: str  # the raw request-target, as it arrived
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]


@dataclass
class Upstream:
    url: str
    seen: list[Seen] = field(default_factory=list)
    hold: asyncio.Event = field(default_factory=asyncio.Event)  # /slow waits for this


@pytest.fixture
async def whoami_url() -> AsyncIterator[str]:
    """The URL of an upstream that answers any request with ``{"user": X-Auth-User}``: for
    tests that start gateway processes of their own."""
    async def ok(request: web.Request) -> web.Response:
        return web.json_response({"user": request.headers.get("X-Auth-User")})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", ok)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    yield f"http://127.0.0.1:{server.port}"
    await server.close()


def _pattern(size: int) -> bytes:
    block = hashlib.sha256(b"gateway").digest() * 2048  # 64 KiB of non-repeating-ish bytes
    return (block * (size // len(block) + 1))[:size]


async def _upstream_app(state: Upstream) -> web.Application:
    async def handler(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        state.seen.append(Seen(request.method, request.raw_path,
                               [(k, v) for k, v in request.headers.items()], body))
        path = request.path
        if path == "/slow":
            await state.hold.wait()
        if path.startswith("/download/"):
            size = int(path.rsplit("/", 1)[1])
            response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
            if request.query.get("length") != "no":
                response.content_length = size
            await response.prepare(request)
            data = _pattern(size)
            for i in range(0, size, 256 * 1024):
                await response.write(data[i:i + 256 * 1024])
            await response.write_eof()
            return response
        if path.endswith("/respond"):
            # /respond?status=N&header=Name:Value&header=...&body=text&gzip=1: an answer to order
            response = web.Response(status=int(request.query.get("status", "200")))
            for spec in request.query.getall("header", []):
                name, _, value = spec.partition(":")
                response.headers.add(name, value)
            if "body" in request.query:
                data = request.query["body"].encode()
                if request.query.get("gzip"):
                    data = gzip.compress(data, mtime=0)
                    response.headers["Content-Encoding"] = "gzip"
                response.body = data
            return response
        if path == "/cookies":
            response = web.Response(text="cookies")
            response.headers.add("Set-Cookie", "a=1; Path=/")
            response.headers.add("Set-Cookie", "b=2; Path=/")
            return response
        return web.json_response({
            "method": request.method,
            "target": request.raw_path,
            "headers": [[k, v] for k, v in request.headers.items()],
            "body_sha256": hashlib.sha256(body).hexdigest(),
            "body_length": len(body),
        })

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_route("*", "/{tail:.*}", handler)
    return app


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    state = Upstream(url="")
    server = TestServer(await _upstream_app(state), host="127.0.0.1")
    await server.start_server()
    state.url = f"http://127.0.0.1:{server.port}"
    yield state
    state.hold.set()
    await server.close()


# --- the gateway ----------------------------------------------------------------------------


def base_config(upstream_url: str, db_path: Path) -> dict[str, Any]:
    return {
        "public_url": "http://gateway.test",
        "store": f"sqlite:///{str(db_path).lstrip('/')}",
        "upstreams": {"app": {"url": upstream_url, "timeout": "2s", "connect_timeout": "1s"}},
        "tokens": {
            "issuer": "https://gateway.test",
            "audience": "app",
            "access_ttl": "15m",
            "refresh_ttl": "14d",
            "refresh_idle_ttl": "3d",
            "reuse_grace": "10s",
            "leeway": "5s",
            "keys": [{"kid": "k1", "algorithm": "HS256", "secret": "${TEST_GATEWAY_SECRET}"}],
        },
        "cookies": {"secure": False},
        "identity_headers": {"X-Auth-User": "sub", "X-Auth-Roles": "roles"},
        "routes": [
            {"path": "/static/**", "access": "public"},
            {"path": "/admin/**", "methods": ["GET", "POST"], "access": {"roles": ["admin"]}},
            {"path": "/team/**", "access": {"claims": {"sub": "alice"}}},
            {"path": "/**", "access": "authenticated", "upstream": "app"},
        ],
    }


@dataclass
class Gateway:
    url: str
    port: int
    store: Store
    clock: FakeClock
    config: config_module.Config
    http: aiohttp.ClientSession
    app: web.Application

    async def login(self, user: str = "alice", password: str | None = None) -> dict[str, Any]:
        async with self.http.post(f"{self.url}/auth/login", json={
                "username": user, "password": password or PASSWORDS[user]}) as resp:
            assert resp.status == 200, await resp.text()
            body: dict[str, Any] = await resp.json()
            body["refresh_token"] = resp.cookies["gw_refresh"].value
            return body

    async def token(self, user: str = "alice") -> str:
        return str((await self.login(user))["access_token"])


_HASHES: dict[str, str] = {}


async def add_test_users(store: Store) -> None:
    for name, password in PASSWORDS.items():
        if await store.get_user(name) is not None:
            continue  # a second gateway on a shared store
        if name not in _HASHES:
            _HASHES[name] = hash_password(password)
        await store.add_user(User(name=name, password_hash=_HASHES[name], roles=ROLES[name],
                                  created_at=time.time()))


GatewayFactory = Callable[..., Awaitable[Gateway]]


@pytest.fixture
async def gateway_factory(
    upstream: Upstream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[GatewayFactory]:
    monkeypatch.setenv("TEST_GATEWAY_SECRET", SECRET)
    started: list[tuple[TestServer, aiohttp.ClientSession, Store]] = []

    async def make(change: Callable[[dict[str, Any]], None] | None = None) -> Gateway:
        n = len(started)
        raw = base_config(upstream.url, tmp_path / f"gateway{n}.db")
        if change is not None:
            change(raw)
        path = tmp_path / f"gateway{n}.yaml"
        path.write_text(yaml.safe_dump(raw))
        cfg = config_module.load(path)
        store = await open_store(cfg.store)
        await add_test_users(store)
        clock = FakeClock()
        server = TestServer(create_app(cfg, clock=clock, store=store), host="127.0.0.1")
        await server.start_server(**HANDLER_OPTIONS)
        http = aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar())
        started.append((server, http, store))
        return Gateway(url=f"http://127.0.0.1:{server.port}", port=server.port, store=store,
                       clock=clock, config=cfg, http=http, app=server.app)

    yield make
    for server, http, store in reversed(started):
        await http.close()
        await server.close()
        await store.close()


@pytest.fixture
async def gw(gateway_factory: GatewayFactory) -> Gateway:
    return await gateway_factory()


# --- Redis ----------------------------------------------------------------------------------

REDIS_DEFAULT = "redis://127.0.0.1:6379/15"  # a database of the tests' own


def _redis_answers(url: str) -> bool:
    import redis  # noqa: PLC0415

    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=1).ping())
    except redis.RedisError:
        return False


@pytest.fixture(scope="session")
def redis_url() -> str:
    """The Redis the tests use: $GATEWAY_TEST_REDIS_URL (CI sets it, so CI never skips), else
    a local server's database 15 if one answers."""
    url = os.environ.get("GATEWAY_TEST_REDIS_URL")
    if url:
        return url
    if not _redis_answers(REDIS_DEFAULT):
        pytest.skip("no Redis: set GATEWAY_TEST_REDIS_URL or run one on 127.0.0.1:6379")
    return REDIS_DEFAULT


@contextlib.asynccontextmanager
async def redis_store(url: str, prefix: str | None = None) -> AsyncIterator[Store]:
    """A RedisStore under a key prefix of its own; its keys are deleted afterwards."""
    import redis.asyncio as aioredis  # noqa: PLC0415

    from gateway.store.redis import RedisStore  # noqa: PLC0415

    prefix = prefix or f"gwtest:{secrets.token_hex(6)}:"
    client = aioredis.from_url(url)
    store = RedisStore(client, prefix=prefix)
    try:
        yield store
    finally:
        keys = [key async for key in client.scan_iter(match=f"{prefix}*")]
        if keys:
            await client.delete(*keys)
        await store.close()


# --- raw HTTP, for what a client library would tidy up ----------------------------------


@dataclass
class RawResponse:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return None


async def raw_request(port: int, data: bytes, timeout: float = 5.0) -> RawResponse:
    """Send bytes as they are; read one response (the connection is closed after it)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        headers = [tuple(line.split(": ", 1)) for line in lines[1:] if ": " in line]
        length = next((int(v) for k, v in headers if k.lower() == "content-length"), 0)
        body = await asyncio.wait_for(reader.readexactly(length), timeout) if length else b""
        return RawResponse(status, headers, body)  # type: ignore[arg-type]
    finally:
        writer.close()


def raw_get(path: str, *headers: str) -> bytes:
    lines = [f"GET {path} HTTP/1.1", "Host: gateway.test", "Connection: close", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
