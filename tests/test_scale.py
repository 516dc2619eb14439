"""Scaling out, with real processes: workers on one SQLite file, replicas sharing a Redis,
and a Redis that goes away and comes back."""

from __future__ import annotations

import asyncio
import json
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from processes import free_port, start_gateway, stop, until_healthy

from gateway.store import open_store

from conftest import PASSWORDS, add_test_users, redis_store

pytestmark = pytest.mark.slow

CONFIG = """\
listen: {{host: 127.0.0.1, port: {port}}}
store: "{store}"
upstreams: {{app: {{url: "{upstream}", timeout: 5s}}}}
tokens:
  issuer: scale
  audience: scale
  reuse_grace: 1s
  keys: [{{kid: k1, algorithm: HS256, secret: "{secret}"}}]
cookies: {{secure: false}}
routes: [{{path: /**, access: authenticated}}]
workers: {workers}
"""
SECRET = secrets.token_urlsafe(48)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    # a new connection for every request, so that the kernel spreads them over workers
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True),
                                    cookie_jar=aiohttp.DummyCookieJar())
    yield session
    await session.close()


def _config(tmp_path: Path, name: str, *, store: str, upstream: str, workers: int = 1) -> tuple[Path, str]:
    port = free_port()
    path = tmp_path / f"{name}.yaml"
    path.write_text(CONFIG.format(port=port, store=store, upstream=upstream, secret=SECRET, workers=workers))
    return path, f"http://127.0.0.1:{port}"


async def _login(http: aiohttp.ClientSession, url: str) -> dict[str, str]:
    async with http.post(f"{url}/auth/login", json={"username": "alice", "password": PASSWORDS["alice"]}) as resp:
        assert resp.status == 200, await resp.text()
        return {"access": (await resp.json())["access_token"], "refresh": resp.cookies["gw_refresh"].value}


async def _status(http: aiohttp.ClientSession, url: str, token: str) -> int:
    async with http.get(f"{url}/profile", headers={"Authorization": f"Bearer {token}"}) as resp:
        return resp.status


async def _refresh(http: aiohttp.ClientSession, url: str, token: str) -> tuple[int, dict[str, str]]:
    async with http.post(f"{url}/auth/refresh", headers={"Cookie": f"gw_refresh={token}"}) as resp:
        body = await resp.json()
        if resp.status == 200:
            body["refresh"] = resp.cookies["gw_refresh"].value
        return resp.status, body


async def _all_refused_within(http: aiohttp.ClientSession, urls: list[str], token: str, seconds: float) -> None:
    """Every one of 10 requests to each url is refused, within ``seconds`` of now."""
    deadline = time.monotonic() + seconds
    while True:
        statuses = [await _status(http, url, token) for url in urls for _ in range(10)]
        if set(statuses) == {401}:
            return
        assert time.monotonic() < deadline, f"still accepted after {seconds}s: {statuses}"
        await asyncio.sleep(0.02)


async def test_two_workers_on_one_sqlite_file(tmp_path: Path, whoami_url: str, http: aiohttp.ClientSession) -> None:
    db = tmp_path / "gateway.db"
    store = await open_store(f"sqlite:{db}")
    await add_test_users(store)
    await store.close()
    config, url = _config(tmp_path, "workers", store=f"sqlite:///{db}", upstream=whoami_url, workers=2)
    log = tmp_path / "gateway.log"
    proc = start_gateway(config, log=log)
    try:
        await until_healthy(http, url, proc)
        tokens = await _login(http, url)
        assert [await _status(http, url, tokens["access"]) for _ in range(30)] == [200] * 30
        served_by = {line["pid"] for line in map(json.loads, log.read_text().splitlines())
                     if line.get("event") == "request" and line.get("path") == "/profile"}
        assert len(served_by) == 2, "both workers should have served requests"
        async with http.post(f"{url}/auth/logout", headers={"Authorization": f"Bearer {tokens['access']}"}) as resp:
            assert resp.status == 204
        await _all_refused_within(http, [url], tokens["access"], 1.0)  # on every worker
    finally:
        assert stop(proc) == 0


async def test_two_replicas_share_one_redis(
    tmp_path: Path, whoami_url: str, http: aiohttp.ClientSession, redis_url: str
) -> None:
    prefix = f"gwtest:{secrets.token_hex(6)}:"
    store_url = f"{redis_url}?key_prefix={prefix}"
    async with redis_store(redis_url, prefix) as store:  # (deletes the keys afterwards)
        await add_test_users(store)
        config_a, a = _config(tmp_path, "a", store=store_url, upstream=whoami_url)
        config_b, b = _config(tmp_path, "b", store=store_url, upstream=whoami_url)
        proc_a, proc_b = start_gateway(config_a), start_gateway(config_b)
        try:
            await until_healthy(http, a, proc_a)
            await until_healthy(http, b, proc_b)
            first = await _login(http, a)  # log in on A...
            status, second = await _refresh(http, b, first["refresh"])  # ...refresh on B
            assert status == 200
            assert await _status(http, a, second["access_token"]) == 200
            await asyncio.sleep(1.1)  # past reuse_grace (1s)
            status, body = await _refresh(http, a, first["refresh"])  # the old token, replayed on A
            assert (status, body["error"]) == (401, "refresh_token_reused")
            await _all_refused_within(http, [a, b], second["access_token"], 1.0)
            fresh = await _login(http, a)
            async with http.post(f"{b}/auth/logout", headers={"Authorization": f"Bearer {fresh['access']}"}) as resp:
                assert resp.status == 204  # log out on B...
            await _all_refused_within(http, [a], fresh["access"], 1.0)  # ...and A refuses within a second
        finally:
            assert stop(proc_a) == 0 and stop(proc_b) == 0


def _redis_server(port: int, data: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "yes", "--appendfsync", "always", "--dir", str(data)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def _until_redis(port: int) -> None:
    import redis.asyncio as aioredis  # noqa: PLC0415

    client = aioredis.Redis(port=port, socket_connect_timeout=0.5)
    deadline = time.monotonic() + 10
    try:
        while True:
            try:
                if await client.ping():
                    return
            except OSError:
                pass
            except aioredis.RedisError:
                pass
            assert time.monotonic() < deadline, "redis-server did not start"
            await asyncio.sleep(0.05)
    finally:
        await client.aclose()


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server")
async def test_redis_going_away_and_coming_back(tmp_path: Path, whoami_url: str, http: aiohttp.ClientSession) -> None:
    port = free_port()
    data = tmp_path / "redis"
    data.mkdir()
    redis = _redis_server(port, data)
    proc = None
    try:
        await _until_redis(port)
        store = await open_store(f"redis://127.0.0.1:{port}/0")
        await add_test_users(store)
        await store.close()
        config, url = _config(tmp_path, "outage", store=f"redis://127.0.0.1:{port}/0", upstream=whoami_url)
        proc = start_gateway(config)
        await until_healthy(http, url, proc)
        tokens = await _login(http, url)

        redis.terminate()  # Redis goes away
        redis.wait(timeout=10)
        async with http.get(f"{url}/readyz") as resp:
            assert resp.status == 503 and (await resp.json())["error"] == "store_unavailable"
        async with http.post(f"{url}/auth/login", json={"username": "alice", "password": PASSWORDS["alice"]}) as resp:
            assert resp.status == 503 and (await resp.json())["error"] == "store_unavailable"
        status, body = await _refresh(http, url, tokens["refresh"])
        assert (status, body["error"]) == (503, "store_unavailable")
        assert await _status(http, url, tokens["access"]) == 200  # a valid token keeps working
        async with http.get(f"{url}/healthz") as resp:
            assert resp.status == 200

        redis = _redis_server(port, data)  # ...and comes back, with what it had written
        await _until_redis(port)
        deadline = time.monotonic() + 15
        while True:
            async with http.get(f"{url}/readyz") as resp:
                if resp.status == 200:
                    break
            assert time.monotonic() < deadline, "not ready again 15 s after Redis came back"
            await asyncio.sleep(0.1)
        status, body = await _refresh(http, url, tokens["refresh"])  # nothing was half-written
        assert status == 200
        assert (await _login(http, url))["access"]
    finally:
        if proc is not None:
            assert stop(proc) == 0
        redis.terminate()
        redis.wait(timeout=10)


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server")
async def test_a_store_behind_redis_sentinel(tmp_path: Path) -> None:
    redis_port, sentinel_port = free_port(), free_port()
    (tmp_path / "redis").mkdir()
    redis = _redis_server(redis_port, tmp_path / "redis")
    conf = tmp_path / "sentinel.conf"
    conf.write_text(f"port {sentinel_port}\nbind 127.0.0.1\nsentinel monitor gwmaster 127.0.0.1 {redis_port} 1\n")
    sentinel = subprocess.Popen(["redis-server", str(conf), "--sentinel"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        await _until_redis(redis_port)
        await _until_redis(sentinel_port)
        store = await open_store(f"redis+sentinel://127.0.0.1:{sentinel_port}/gwmaster/3")
        try:
            await add_test_users(store)
            assert [u.name for u in await store.list_users()] == sorted(PASSWORDS)
        finally:
            await store.close()
        import redis as redis_client  # noqa: PLC0415

        assert redis_client.Redis(port=redis_port, db=3).scard("gw:users") == len(PASSWORDS)  # on the master
    finally:
        for proc in (sentinel, redis):
            proc.terminate()
            proc.wait(timeout=10)


# `gateway run`, with a look at the event loop it hands aiohttp
_OBSERVED_RUN = """
import atexit, json, sys
from aiohttp import web
seen = {}
run_app = web.run_app
def observed(app, **options):
    seen["loop"] = type(options.get("loop")).__module__.split(".")[0]
    return run_app(app, **options)
web.run_app = observed
atexit.register(lambda: print(json.dumps(seen), file=sys.stderr))
from gateway.cli import main
sys.exit(main(sys.argv[1:]))
"""


async def test_gateway_run_serves_on_uvloop_where_it_is_installed(
    tmp_path: Path, whoami_url: str, http: aiohttp.ClientSession
) -> None:
    db = tmp_path / "gateway.db"
    store = await open_store(f"sqlite:{db}")
    await add_test_users(store)
    await store.close()
    config, url = _config(tmp_path, "gw", store=f"sqlite:{db}", upstream=whoami_url)
    proc = subprocess.Popen([sys.executable, "-c", _OBSERVED_RUN, "run", "-c", str(config)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        await until_healthy(http, url, proc)
        assert await _status(http, url, (await _login(http, url))["access"]) == 200
    finally:
        code = stop(proc)
    assert code == 0 and proc.stderr is not None
    seen = json.loads(proc.stderr.read().decode().strip().splitlines()[-1])
    assert seen["loop"] == ("uvloop" if sys.platform != "win32" else "asyncio")
