"""Reloading the config (SIGHUP) and shutting down (SIGTERM), with real ``gateway run``
processes on real ports, a real upstream that can hold an answer, and a real SQLite file."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import secrets
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import bcrypt
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from processes import free_port, start_gateway, stop, until_healthy

from gateway import reload
from gateway.server import SAME_SIGNAL
from gateway.store import open_store

from conftest import PASSWORDS, add_test_users

pytestmark = pytest.mark.slow

SECRETS = {"RELOAD_KEY_1": secrets.token_urlsafe(48), "RELOAD_KEY_2": secrets.token_urlsafe(48)}
ADMIN_ROUTE = "{path: /admin/**, access: {roles: [admin]}}"
CATCH_ALL = "{path: /**, access: authenticated}"
KEY_1 = '{kid: k1, algorithm: HS256, secret: "${RELOAD_KEY_1}"}'
KEY_2 = '{kid: k2, algorithm: HS256, secret: "${RELOAD_KEY_2}"}'


@pytest.fixture(autouse=True)
def key_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in SECRETS.items():  # the gateway reads them through ${VAR}, on every load
        monkeypatch.setenv(name, value)


# --- an upstream that can hold an answer, and echo a WebSocket --------------------------------


@dataclass
class Upstream:
    url: str = ""
    held: int = 0  # /slow requests waiting now
    release: asyncio.Event = field(default_factory=asyncio.Event)
    cookies: list[str] = field(default_factory=list)  # every Cookie header that arrived
    headers: list[dict[str, str]] = field(default_factory=list)  # of every request, lower-cased names


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    state = Upstream()

    async def handler(request: web.Request) -> web.StreamResponse:
        if request.path == "/slow":
            state.held += 1
            await state.release.wait()
            state.held -= 1
            return web.Response(body=b"x" * 100_000)  # a whole answer, to check it arrives whole
        if request.path == "/ws":
            ws = web.WebSocketResponse()
            await ws.prepare(request)
            async for msg in ws:
                await ws.send_str(msg.data)
            return ws
        state.cookies.extend(request.headers.getall("Cookie", ()))
        state.headers.append({name.lower(): value for name, value in request.headers.items()})
        return web.json_response({"path": request.path, "user": request.headers.get("X-Auth-User")})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    state.url = f"http://127.0.0.1:{server.port}"
    yield state
    state.release.set()
    await server.close()


async def until(check: Callable[[], Any], what: str, seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        assert time.monotonic() < deadline, f"not within {seconds} s: {what}"
        await asyncio.sleep(0.05)


# --- a gateway process and its config file ----------------------------------------------------


@dataclass
class Running:
    config: Path
    log: Path
    url: str
    port: int
    proc: subprocess.Popen[bytes]
    http: aiohttp.ClientSession
    settings: dict[str, Any]

    def write(self, **changes: Any) -> None:
        self.settings.update(changes)
        self.config.write_text(_yaml(**self.settings))

    def hangup(self) -> None:
        self.proc.send_signal(signal.SIGHUP)

    def events(self, name: str) -> list[dict[str, Any]]:
        lines = (json.loads(line) for line in self.log.read_text().splitlines() if line.startswith("{"))
        return [line for line in lines if line.get("event") == name]

    async def status(self, path: str, token: str | None = None) -> int:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        async with self.http.get(f"{self.url}{path}", headers=headers) as resp:
            await resp.read()
            return resp.status

    async def login(self, name: str = "alice") -> dict[str, str]:
        async with self.http.post(f"{self.url}/auth/login",
                                  json={"username": name, "password": PASSWORDS[name]}) as resp:
            assert resp.status == 200, await resp.text()
            return {"access": (await resp.json())["access_token"], "refresh": resp.cookies["gw_refresh"].value}

    async def refresh(self, refresh: str) -> tuple[int, dict[str, Any]]:
        async with self.http.post(f"{self.url}/auth/refresh", headers={"Cookie": f"gw_refresh={refresh}"}) as resp:
            return resp.status, await resp.json()


def _yaml(*, port: int, db: Path, upstream: str, routes: list[str], keys: list[str], workers: int = 1,
          shutdown_timeout: str = "10s", cookies: str = "{secure: false}", users: str = "{source: store}",
          registration: str = "{enabled: false}", identity_headers: str = "{X-Auth-User: sub}") -> str:
    return "\n".join([
        f"listen: {{host: 127.0.0.1, port: {port}}}",
        f'store: "sqlite:///{db}"',
        f'upstreams: {{app: {{url: "{upstream}", timeout: 30s}}}}',
        "tokens:",
        "  issuer: reload",
        "  audience: reload",
        "  keys:",
        *(f"    - {key}" for key in keys),
        f"cookies: {cookies}",
        f"users: {users}",
        f"registration: {registration}",
        f"identity_headers: {identity_headers}",
        "routes:",
        *(f"  - {route}" for route in routes),
        f"workers: {workers}",
        f"shutdown_timeout: {shutdown_timeout}",
        "",
    ])


@pytest.fixture
async def gateway(tmp_path: Path, upstream: Upstream) -> AsyncIterator[Callable[..., Any]]:
    db = tmp_path / "gateway.db"
    store = await open_store(f"sqlite:{db}")
    await add_test_users(store)
    await store.close()
    # a new connection for every request: with workers, the kernel spreads them over all
    http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True),
                                 cookie_jar=aiohttp.DummyCookieJar())
    started: list[Running] = []

    async def start(*args: str, **settings: Any) -> Running:
        port = free_port()
        settings = {"port": port, "db": db, "upstream": upstream.url,
                    "routes": [ADMIN_ROUTE, CATCH_ALL], "keys": [KEY_1], **settings}
        config, log = tmp_path / "gateway.yaml", tmp_path / "gateway.log"
        config.write_text(_yaml(**settings))
        proc = start_gateway(config, *args, log=log)
        running = Running(config, log, f"http://127.0.0.1:{port}", port, proc, http, settings)
        started.append(running)
        await until_healthy(http, running.url, proc)
        return running

    yield start
    upstream.release.set()
    for running in started:
        stop(running.proc)
    await http.close()


def _kid(token: str) -> str:
    header = token.split(".")[0]
    return str(json.loads(base64.urlsafe_b64decode(header + "=" * (-len(header) % 4)))["kid"])


async def _slow_request(gw: Running, upstream: Upstream, token: str) -> asyncio.Task[tuple[int, bytes]]:
    """A request the upstream holds until ``upstream.release`` is set; returns once it is held."""
    before = upstream.held

    async def go() -> tuple[int, bytes]:
        async with gw.http.get(f"{gw.url}/slow", headers={"Authorization": f"Bearer {token}"}) as resp:
            return resp.status, await resp.read()

    task = asyncio.create_task(go())
    await until(lambda: upstream.held > before, "the upstream holds the slow request")
    return task


# --- reload -------------------------------------------------------------------------------------


async def test_sighup_swaps_in_the_new_config_and_nobody_notices(gateway: Any, upstream: Upstream) -> None:
    gw = await gateway()
    alice = await gw.login()
    assert _kid(alice["access"]) == "k1"
    assert await gw.status("/open/page") == 401
    assert await gw.status("/admin/x", alice["access"]) == 403
    slow = await _slow_request(gw, upstream, alice["access"])

    # A public route, alice's role admitted to /admin, and a new first (signing) key.
    gw.write(routes=["{path: /open/**, access: public}", "{path: /admin/**, access: {roles: [admin, user]}}",
                     CATCH_ALL], keys=[KEY_2, KEY_1])
    gw.hangup()
    await until(lambda: _is(gw, "/open/page", 200), "the new route is served")
    assert await gw.status("/admin/x", alice["access"]) == 200
    assert await gw.status("/profile", alice["access"]) == 200  # a k1 token still verifies

    status, body = await gw.refresh(alice["refresh"])  # the session from before the reload
    assert status == 200
    assert _kid(body["access_token"]) == "k2"  # new tokens are signed with the new first key
    assert await gw.status("/profile", body["access_token"]) == 200

    upstream.release.set()
    assert await slow == (200, b"x" * 100_000)  # began under the old config, finished whole
    [reloaded] = gw.events("config_reloaded")
    assert reloaded["signing_key"] == "k2" and reloaded["keys"] == ["k2", "k1"]
    assert gw.proc.poll() is None


async def _is(gw: Running, path: str, status: int, token: str | None = None) -> bool:
    return await gw.status(path, token) == status


async def test_an_invalid_config_keeps_the_running_one(gateway: Any) -> None:
    gw = await gateway()
    alice = await gw.login()
    gw.write(routes=["{path: /open/**, access: everyone}", "{path: /**, access: authenticated, upstream: nope}"])
    gw.hangup()
    await until(lambda: gw.events("config_reload_failed"), "the failed reload is logged")
    [failed] = gw.events("config_reload_failed")
    assert failed["level"] == "error" and failed["kept"] == "the running config"
    assert any(p.startswith("routes[0].access") for p in failed["problems"]), failed["problems"]
    assert any(p.startswith("routes[1].upstream") and "nope" in p for p in failed["problems"]), failed["problems"]
    assert await gw.status("/open/page") == 401  # the old routes, still
    assert await gw.status("/admin/x", alice["access"]) == 403
    assert await gw.status("/profile", alice["access"]) == 200
    assert gw.events("config_reloaded") == []
    assert await _reloads(gw) == {"ok": 0.0, "failed": 1.0}

    gw.write(routes=["{path: /open/**, access: public}", CATCH_ALL])  # fixed: the next reload takes it
    gw.hangup()
    await until(lambda: _is(gw, "/open/page", 200), "the fixed config is served")
    assert await _reloads(gw) == {"ok": 1.0, "failed": 1.0}


async def _reloads(gw: Running) -> dict[str, float]:
    async with gw.http.get(f"{gw.url}/metrics") as resp:
        assert resp.status == 200
        text = await resp.text()
    counted = {outcome: 0.0 for outcome in ("ok", "failed")}
    for line in text.splitlines():
        if line.startswith("gateway_config_reloads_total{"):
            name, value = line.rsplit(" ", 1)
            counted[name.split('outcome="')[1].split('"')[0]] = float(value)
    return counted


async def test_a_change_that_needs_a_restart_is_refused_whole(gateway: Any) -> None:
    gw = await gateway()
    gw.write(port=free_port(), shutdown_timeout="3s", routes=["{path: /open/**, access: public}", CATCH_ALL])
    gw.hangup()
    await until(lambda: gw.events("config_reload_failed"), "the refused reload is logged")
    [failed] = gw.events("config_reload_failed")
    assert failed["problems"] == ["listen: changed, and takes effect only on a restart",
                                  "shutdown_timeout: changed, and takes effect only on a restart"]
    assert await gw.status("/open/page") == 401  # nothing of that file was applied
    assert await gw.status("/healthz") == 200  # still on the old port


def test_a_file_watch_takes_a_change_once_it_holds_still(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text("routes: []\n")
    watch = reload.FileWatch(str(path))
    assert not watch.changed()
    path.write_text("routes: []\nidentity_headers:\n")  # saved half way...
    assert not watch.changed()  # ...is not taken at the first look
    path.write_text("routes: []\nidentity_headers:\n  X-Auth-User: sub\n")  # still being written
    assert not watch.changed()
    assert watch.changed()  # the same at two looks in a row: taken, once
    assert not watch.changed()
    path.unlink()
    assert not watch.changed() and not watch.changed()  # gone is no change
    path.write_text("routes: []\n")
    assert [watch.changed(), watch.changed()] == [False, True]  # the file that comes back is


@pytest.mark.parametrize("workers", [1, 2])
async def test_watch_config_reloads_a_changed_file_without_a_signal(gateway: Any, workers: int) -> None:
    gw = await gateway("--watch-config", workers=workers)
    assert await gw.status("/open/page") == 401
    gw.write(routes=["{path: /open/**, access: public}", CATCH_ALL])  # and no SIGHUP
    await until(lambda: _is(gw, "/open/page", 200), "the changed file is served", seconds=15)
    changed = gw.events("config_changed")[0]
    assert changed["pid"] == gw.proc.pid  # the supervisor, with workers: it passes SIGHUP on
    await until(lambda: len(gw.events("config_reloaded")) == workers, "every process reloads")

    gw.write(routes=["{path: /open/**, access: everyone}", CATCH_ALL])  # broken: kept out
    await until(lambda: gw.events("config_reload_failed"), "the broken file is refused")
    assert await gw.status("/open/page") == 200
    gw.write(routes=["{path: /open/**, access: authenticated}", CATCH_ALL])  # fixed: taken
    await until(lambda: _is(gw, "/open/page", 401), "the fixed file is served", seconds=15)
    assert gw.proc.poll() is None


async def test_every_worker_reloads(gateway: Any) -> None:
    gw = await gateway(workers=2)
    gw.write(routes=["{path: /open/**, access: public}", CATCH_ALL])
    gw.hangup()  # to the supervisor, which passes it on

    async def all_open() -> bool:
        return [await gw.status("/open/page") for _ in range(20)] == [200] * 20

    await until(all_open, "every worker serves the new route")
    await until(lambda: len({e["pid"] for e in gw.events("config_reloaded")}) == 2, "both workers log the reload")
    assert gw.events("config_reload_failed") == []


async def test_many_reloads_leak_nothing(gateway: Any) -> None:
    gw = await gateway()
    alice = await gw.login()
    assert await gw.status("/profile", alice["access"]) == 200  # the upstream pool is open

    def counts() -> tuple[int, int]:
        return len(os.listdir(f"/proc/{gw.proc.pid}/fd")), len(os.listdir(f"/proc/{gw.proc.pid}/task"))

    fds, threads = counts()
    for n in range(1, 21):
        gw.write(routes=[f"{{path: /open{n}/**, access: public}}", CATCH_ALL])
        gw.hangup()
        await until(lambda: len(gw.events("config_reloaded")) == n, f"reload {n}")  # noqa: B023 (awaited here)
        assert await gw.status("/profile", alice["access"]) == 200  # through the new pool
    assert await gw.status(f"/open{n}/x") == 200
    now_fds, now_threads = counts()
    assert now_fds <= fds + 2, (fds, now_fds)  # each old upstream pool was closed
    assert now_threads <= threads + 2, (threads, now_threads)  # the hashing threads were reused


PUBLIC_ROUTE = "{path: /static/**, access: public}"


async def test_a_renamed_identity_header_is_still_taken_from_clients_after_the_reload(
    gateway: Any, upstream: Upstream
) -> None:
    # The app may read the old name until it is changed too: a client must not fill it in.
    gw = await gateway(identity_headers="{X-Remote-User: sub}")
    alice = await gw.login()
    gw.write(identity_headers="{X-User: sub}")
    gw.hangup()
    await until(lambda: gw.events("config_reloaded"), "the renamed header is in use")
    for spelling in ("X-Remote-User", "x_remote_user"):
        upstream.headers.clear()
        async with gw.http.get(f"{gw.url}/profile", headers={
                "Authorization": f"Bearer {alice['access']}", spelling: "admin"}) as resp:
            assert resp.status == 200
        [seen] = upstream.headers
        assert seen["x-user"] == "alice"
        assert not {"x-remote-user", "x_remote_user"} & seen.keys()


async def test_renamed_cookies_never_reach_the_upstream_and_logout_expires_them(
        gateway: Any, upstream: Upstream) -> None:
    gw = await gateway(routes=[PUBLIC_ROUTE, CATCH_ALL])
    alice = await gw.login()
    browser = f"gw_refresh={alice['refresh']}; gw_access={alice['access']}; app=1"

    async def upstream_hears(cookie: str) -> str:
        """The Cookie header the upstream received for a public request carrying ``cookie``."""
        upstream.cookies.clear()
        async with gw.http.get(f"{gw.url}/static/x", headers={"Cookie": cookie}) as resp:
            assert resp.status == 200
        return "; ".join(upstream.cookies)

    def every_variant(token: str, *names: str) -> str:
        return "; ".join(f"{prefix}{name}={token}" for name in names
                         for prefix in ("", "__Host-", "__Secure-", "__host-", "__SECURE-"))

    assert await upstream_hears(browser) == "app=1"
    gw.write(cookies="{secure: false, access: {name: sess_a}, refresh: {name: sess_r}}")
    gw.hangup()
    await until(lambda: gw.events("config_reloaded"), "the renamed cookies are in use")
    assert await upstream_hears(browser) == "app=1"  # the browser still holds the old ones
    assert await upstream_hears(every_variant("t", "sess_a", "sess_r", "gw_refresh") + "; app=1") == "app=1"

    # logout expires the cookies under the new names and under the old
    async with gw.http.post(f"{gw.url}/auth/logout", headers={"Cookie": browser}) as resp:
        assert resp.status == 204
        expired = {c.split("=", 1)[0] for c in resp.headers.getall("Set-Cookie") if "Max-Age=0" in c}
    assert {"sess_a", "sess_r", "gw_access", "gw_refresh"} <= expired

    # secure: true (the names become __Host-...): the previous names, unprefixed, stay stripped
    gw.write(cookies="{secure: true, access: {name: sess_a}, refresh: {name: sess_r}}")
    gw.hangup()
    await until(lambda: len(gw.events("config_reloaded")) == 2, "the secure cookies are in use")
    assert await upstream_hears(every_variant("t", "sess_a", "sess_r", "gw_access") + "; app=1") == "app=1"
    assert await upstream_hears("sess_rx=1; xsess_r=2") == "sess_rx=1; xsess_r=2"  # others' cookies pass


async def test_a_reload_to_htpasswd_ends_the_store_users_sessions(gateway: Any, tmp_path: Path) -> None:
    gw = await gateway(registration="{enabled: true}")
    async with gw.http.post(f"{gw.url}/auth/register",
                            json={"username": "dave", "password": "attacker-password-1"}) as resp:
        assert resp.status == 201
        attacker = {"access": (await resp.json())["access_token"], "refresh": resp.cookies["gw_refresh"].value}
    alice = await gw.login()
    assert await gw.status("/profile", attacker["access"]) == 200

    made = bcrypt.hashpw(b"dave-password-1", bcrypt.gensalt(5)).decode()
    (tmp_path / "users.htpasswd").write_text(f"dave:$2y${made[4:]}\n")
    gw.write(users=f'{{source: htpasswd, file: "{tmp_path / "users.htpasswd"}"}}', registration="{enabled: false}")
    gw.hangup()
    await until(lambda: gw.events("config_reloaded"), "the htpasswd source is in use")
    for earlier in (attacker, alice):  # ended by the reload: the access tokens stop too
        await until(lambda: _is(gw, "/profile", 401, earlier["access"]), "the access token is refused")  # noqa: B023
        status, body = await gw.refresh(earlier["refresh"])
        assert (status, body["error"]) == (401, "session_revoked")
    [changed] = gw.events("users_source_changed")
    assert (changed["source"], changed["ended"]) == ("htpasswd", 2)

    # the real dave signs in from the file; the attacker's session does not come back
    async with gw.http.post(f"{gw.url}/auth/login", json={"username": "dave", "password": "dave-password-1"}) as resp:
        assert resp.status == 200
        dave = resp.cookies["gw_refresh"].value
    assert (await gw.refresh(attacker["refresh"]))[0] == 401
    assert (await gw.refresh(dave))[0] == 200


# --- shutdown -----------------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [1, 2])
async def test_sigterm_lets_a_request_in_flight_finish(gateway: Any, upstream: Upstream, workers: int) -> None:
    gw = await gateway(workers=workers)
    alice = await gw.login()
    slow = await _slow_request(gw, upstream, alice["access"])
    gw.proc.send_signal(signal.SIGTERM)

    async def refused() -> bool:
        try:
            await gw.status("/healthz")
        except aiohttp.ClientConnectionError:
            return True
        return False

    await until(refused, "new connections are refused")
    assert gw.proc.poll() is None  # still finishing the slow request
    upstream.release.set()
    assert await slow == (200, b"x" * 100_000)
    assert await _exit_code(gw.proc) == 0
    # the process that was signalled (with workers, the supervisor) says so, once, and when it is done
    [stopping], [stopped] = gw.events("stopping"), gw.events("stopped")
    assert (stopping["signal"], stopping["pid"]) == (stopped["signal"], stopped["pid"]) == ("SIGTERM", gw.proc.pid)


async def test_sigterm_to_the_whole_process_group_still_lets_requests_finish(
    gateway: Any, upstream: Upstream
) -> None:
    # Ctrl-C or systemd signal every process: each worker gets SIGTERM from the sender and
    # then again from the supervisor, and must not take the second for "exit at once".
    gw = await gateway(workers=2)
    alice = await gw.login()
    slow = await _slow_request(gw, upstream, alice["access"])
    children = Path(f"/proc/{gw.proc.pid}/task/{gw.proc.pid}/children").read_text().split()
    assert len(children) == 2
    for pid in map(int, children):  # the sender's signal reaches the workers...
        os.kill(pid, signal.SIGTERM)
    # ...the one without a request stops at once (so both have taken their signal), and the
    # supervisor, not yet signalled itself, replaces it rather than give up
    await until(lambda: gw.events("worker_exited"), "an idle worker stops and is replaced")
    gw.proc.send_signal(signal.SIGTERM)  # ...then the supervisor, which passes it on again
    await until(lambda: gw.events("stopping"), "the supervisor is stopping")
    upstream.release.set()
    assert await slow == (200, b"x" * 100_000)
    assert await _exit_code(gw.proc) == 0
    assert gw.events("worker_exited")[0]["code"] == 0


async def test_sigterm_past_shutdown_timeout_cuts_the_request_and_exits_0(gateway: Any, upstream: Upstream) -> None:
    gw = await gateway(shutdown_timeout="1s")
    alice = await gw.login()
    slow = await _slow_request(gw, upstream, alice["access"])  # never released
    gw.proc.send_signal(signal.SIGTERM)
    assert await _exit_code(gw.proc) == 0
    with pytest.raises(aiohttp.ClientError):
        await slow


async def test_two_sigterms_at_once_are_one_request_to_stop(gateway: Any, upstream: Upstream) -> None:
    # timeout(1) and other tools signal the process and then its process group
    gw = await gateway()
    alice = await gw.login()
    slow = await _slow_request(gw, upstream, alice["access"])
    gw.proc.send_signal(signal.SIGTERM)
    time.sleep(SAME_SIGNAL / 10)  # two deliveries, not one signal pending twice
    gw.proc.send_signal(signal.SIGTERM)
    await until(lambda: gw.events("stopping"), "the gateway is stopping")
    assert gw.proc.poll() is None  # still finishing the slow request
    upstream.release.set()
    assert await slow == (200, b"x" * 100_000)
    assert await _exit_code(gw.proc) == 0
    assert not gw.events("stopped_now")


async def test_a_second_sigterm_exits_at_once_with_one_clear_line(gateway: Any, upstream: Upstream) -> None:
    gw = await gateway()
    alice = await gw.login()
    slow = await _slow_request(gw, upstream, alice["access"])  # never released
    gw.proc.send_signal(signal.SIGTERM)
    await until(lambda: gw.events("stopping"), "the gateway is stopping")
    await asyncio.sleep(2 * SAME_SIGNAL)  # (sooner, it is taken for the first one again)
    gw.proc.send_signal(signal.SIGTERM)
    assert await _exit_code(gw.proc) == 1
    with pytest.raises(aiohttp.ClientError):
        await slow
    [now] = gw.events("stopped_now")
    assert (now["level"], now["signal"]) == ("warning", "SIGTERM")
    assert "Traceback" not in gw.log.read_text()
    assert not gw.events("stopped")


@pytest.mark.parametrize("workers", [1, 2])
async def test_sigterm_closes_websockets_with_going_away(gateway: Any, workers: int) -> None:
    gw = await gateway(workers=workers)
    alice = await gw.login()
    async with gw.http.ws_connect(f"{gw.url}/ws", headers={"Authorization": f"Bearer {alice['access']}"}) as ws:
        await ws.send_str("hello")
        assert (await ws.receive(timeout=5)).data == "hello"
        gw.proc.send_signal(signal.SIGTERM)
        msg = await ws.receive(timeout=15)
        assert (msg.type, msg.data, msg.extra) == (aiohttp.WSMsgType.CLOSE, 1001, "server shutting down")
    assert await _exit_code(gw.proc) == 0


async def _exit_code(proc: subprocess.Popen[bytes]) -> int:
    """Wait for the process to exit by itself (a second SIGTERM would hurry it)."""
    return await asyncio.get_running_loop().run_in_executor(None, proc.wait, 20)
