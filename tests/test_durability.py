"""A gateway killed with SIGKILL under refresh load loses nothing it answered for."""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import sqlite3
import time
from pathlib import Path

import aiohttp
import pytest
from processes import free_port, start_gateway, stop, until_healthy

from gateway.credentials import hash_password
from gateway.store import User, open_store

LOOPS = 8
CONFIG = """\
listen: {{host: 127.0.0.1, port: {port}}}
store: sqlite:gateway.db
upstreams: {{app: {{url: "http://127.0.0.1:9"}}}}
tokens:
  issuer: durability
  audience: durability
  keys: [{{kid: k1, algorithm: HS256, secret: "{secret}"}}]
cookies: {{secure: false}}
routes: [{{path: /**, access: authenticated}}]
"""


async def _refresh(http: aiohttp.ClientSession, url: str, token: str) -> tuple[int, str | None]:
    async with http.post(f"{url}/auth/refresh", headers={"Cookie": f"gw_refresh={token}"}) as resp:
        await resp.read()
        return resp.status, resp.cookies["gw_refresh"].value if "gw_refresh" in resp.cookies else None


@pytest.mark.slow
async def test_sigkill_under_refresh_load_keeps_every_answered_rotation(tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    config = tmp_path / "gateway.yaml"
    config.write_text(CONFIG.format(port=port, secret=secrets.token_urlsafe(48)))
    store = await open_store(f"sqlite:{tmp_path / 'gateway.db'}")
    await store.add_user(User("alice", hash_password("alice-password-1"), ("user",)))
    await store.close()

    proc = start_gateway(config)
    http = aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar())
    try:
        await until_healthy(http, url, proc)
        tokens = []
        for _ in range(LOOPS):
            async with http.post(f"{url}/auth/login", json={"username": "alice", "password": "alice-password-1"}) as resp:
                assert resp.status == 200
                tokens.append(resp.cookies["gw_refresh"].value)
        answered = [0] * LOOPS

        async def hammer(i: int) -> None:
            while True:
                try:
                    status, successor = await _refresh(http, url, tokens[i])
                except (aiohttp.ClientError, asyncio.TimeoutError):
                    return  # the gateway is gone
                assert status == 200 and successor
                tokens[i] = successor  # the last token the gateway answered 200 for
                answered[i] += 1

        loops = [asyncio.create_task(hammer(i)) for i in range(LOOPS)]
        deadline = time.monotonic() + 20
        while sum(answered) < 200:  # kill it in the middle of real work
            assert time.monotonic() < deadline, f"only {sum(answered)} rotations in 20 s"
            await asyncio.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        await asyncio.wait_for(asyncio.gather(*loops), 10)
        assert all(answered)

        db = sqlite3.connect(tmp_path / "gateway.db")
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        db.close()

        proc = start_gateway(config)  # the same file, well within reuse_grace (10 s)
        await until_healthy(http, url, proc)
        for i in range(LOOPS):
            status, successor = await _refresh(http, url, tokens[i])
            assert status == 200, f"loop {i}: its last answered token was lost"
            assert (await _refresh(http, url, successor or ""))[0] == 200  # and the chain goes on
        check = await open_store(f"sqlite:{tmp_path / 'gateway.db'}")
        sessions = await check.list_sessions("alice")
        await check.close()
        assert len(sessions) == LOOPS and all(s.revoked_at is None for s in sessions)
    finally:
        await http.close()
        stop(proc)
