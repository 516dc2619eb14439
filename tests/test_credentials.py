"""Who may log in (issue 7): the store, an htpasswd file and an upstream login endpoint,
each end to end through a running gateway, answering bad credentials in one way."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import argon2
import bcrypt
import jwt
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway import htpasswd
from gateway.credentials import HTPASSWD_MARK, UPSTREAM_MARK, belongs, verify_password
from gateway.logs import JsonFormatter
from gateway.store import User

from conftest import PASSWORDS, SECRET, Gateway, GatewayFactory, Upstream

LENIENT_THROTTLE = {"per_user": 100, "per_ip": 1000}


def claims(token: str) -> dict[str, Any]:
    return dict(jwt.decode(token, SECRET, algorithms=["HS256"], audience="app", issuer="https://gateway.test"))


async def login(gw: Gateway, username: str, password: str, *, form: bool = False) \
        -> tuple[int, dict[str, Any], dict[str, str]]:
    """Status, JSON body and headers (less Date and the per-request X-Request-ID) of a login."""
    kwargs: dict[str, Any] = {"data": {"username": username, "password": password},
                              "headers": {"Cookie": "gw_probe=1"}} if form else \
        {"json": {"username": username, "password": password}}
    async with gw.http.post(f"{gw.url}/auth/login", allow_redirects=False, **kwargs) as resp:
        body = await resp.json() if resp.content_type == "application/json" else {}
        if resp.status == 200:
            body["refresh_token"] = resp.cookies["gw_refresh"].value
        headers = {k: v for k, v in resp.headers.items() if k.lower() not in ("date", "x-request-id")}
        return resp.status, body, headers


async def refresh(gw: Gateway, token: str) -> tuple[int, dict[str, Any]]:
    async with gw.http.post(f"{gw.url}/auth/refresh", headers={"Cookie": f"gw_refresh={token}"}) as resp:
        body: dict[str, Any] = await resp.json()
        if resp.status == 200:
            body["refresh_token"] = resp.cookies["gw_refresh"].value
        return resp.status, body


async def eventually(condition: Callable[[], Any], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not await condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


REFUSED = {"error": "invalid_credentials", "error_description": "The user name or password is incorrect."}


# --- store ----------------------------------------------------------------------------------


@pytest.mark.skipif(sys.platform != "linux", reason="a thread's own nice value is Linux's")
async def test_passwords_are_hashed_at_the_lowest_cpu_priority(gw: Gateway) -> None:
    """A login's ~100 ms of hashing must not stall the proxied requests on its core."""
    from gateway.reload import LIVE  # noqa: PLC0415

    assert (await login(gw, "alice", PASSWORDS["alice"]))[0] == 200
    threads = list(gw.app[LIVE].current.credentials._pool._threads)
    assert threads and all(t.native_id is not None for t in threads)
    assert {os.getpriority(os.PRIO_PROCESS, t.native_id) for t in threads if t.native_id} == {19}
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) < 19  # the event loop's is not lowered


async def test_store_hash_is_upgraded_on_login(gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory()
    weak = argon2.PasswordHasher(time_cost=1, memory_cost=8192).hash(PASSWORDS["alice"])
    await gw.store.update_user("alice", password_hash=weak)

    status, body, _ = await login(gw, "alice", "wrong-password-1")
    assert status == 401
    row = await gw.store.get_user("alice")
    assert row is not None and row.password_hash == weak  # a failed login changes nothing

    status, body, _ = await login(gw, "alice", PASSWORDS["alice"])
    assert status == 200, body
    row = await gw.store.get_user("alice")
    assert row is not None and row.password_hash != weak
    current = argon2.PasswordHasher()
    assert not current.check_needs_rehash(row.password_hash)
    got = argon2.extract_parameters(row.password_hash)
    assert (got.time_cost, got.memory_cost, got.type) == \
        (current.time_cost, current.memory_cost, argon2.Type.ID)
    assert verify_password(row.password_hash, PASSWORDS["alice"])
    upgraded = row.password_hash
    assert (await login(gw, "alice", PASSWORDS["alice"]))[0] == 200
    row = await gw.store.get_user("alice")
    assert row is not None and row.password_hash == upgraded  # once is enough


async def test_store_refuses_a_password_that_is_not_text(gw: Gateway) -> None:
    async with gw.http.post(f"{gw.url}/auth/login", data=b'{"username": "alice", "password": "\\ud800"}',
                            headers={"Content-Type": "application/json"}) as resp:
        assert resp.status == 401
        assert await resp.json() == REFUSED


# --- htpasswd -------------------------------------------------------------------------------


def entry(name: str, password: str, cost: int = 5) -> str:
    """A line as ``htpasswd -B`` writes it (Apache's $2y$ prefix)."""
    made = bcrypt.hashpw(password.encode(), bcrypt.gensalt(cost)).decode()
    return f"{name}:$2y${made[4:]}"


def write(path: Path, *lines: str) -> None:
    """Replace the file the way editors and tools do: a new file renamed over the old one."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in lines))
    os.replace(tmp, path)


@pytest.fixture
async def htpasswd_gw(gateway_factory: GatewayFactory, tmp_path: Path) -> tuple[Gateway, Path, list[str]]:
    path = tmp_path / "users.htpasswd"
    lines = ["# made with htpasswd -B", entry("dave", "dave-password-1"), entry("erin", "erin-password-1")]
    write(path, *lines)

    def change(raw: dict[str, Any]) -> None:
        raw["users"] = {"source": "htpasswd", "file": str(path), "default_roles": ["reader"]}
        raw["throttle"] = LENIENT_THROTTLE

    return await gateway_factory(change), path, lines


async def test_htpasswd_login_and_identical_refusals(htpasswd_gw: tuple[Gateway, Path, list[str]]) -> None:
    gw, _, _ = htpasswd_gw
    status, body, _ = await login(gw, "dave", "dave-password-1")
    assert status == 200, body
    assert claims(body["access_token"])["sub"] == "dave"
    assert claims(body["access_token"])["roles"] == ["reader"]
    row = await gw.store.get_user("dave")
    assert row is not None and row.password_hash.startswith(HTPASSWD_MARK) and row.roles == ("reader",)
    assert not verify_password(row.password_hash, "dave-password-1")  # the row cannot be logged in with

    refusals = [await login(gw, "dave", "wrong-password-1"), await login(gw, "nobody", "dave-password-1"),
                await login(gw, "alice", PASSWORDS["alice"])]  # a store user is no htpasswd user
    for status, body, headers in refusals:
        assert status == 401
        assert body == REFUSED
        assert headers == refusals[0][2]
        assert headers["WWW-Authenticate"] == 'Bearer realm="gateway"'

    # a refresh works from the row the login wrote, with the same roles
    status, body, _ = await login(gw, "erin", "erin-password-1")
    status, again = await refresh(gw, body["refresh_token"])
    assert status == 200, again
    assert claims(again["access_token"])["roles"] == ["reader"]


async def test_htpasswd_file_is_followed_without_a_restart(
        htpasswd_gw: tuple[Gateway, Path, list[str]], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    gw, path, lines = htpasswd_gw
    _, dave, _ = await login(gw, "dave", "dave-password-1")
    _, erin, _ = await login(gw, "erin", "erin-password-1")

    # a user added while the gateway runs can log in (the file is looked at once a second)
    assert (await login(gw, "frank", "frank-password-1"))[0] == 401
    lines.append(entry("frank", "frank-password-1"))
    write(path, *lines)
    await asyncio.sleep(1.1)
    status, frank, _ = await login(gw, "frank", "frank-password-1")
    assert status == 200, frank

    # a user removed from the file cannot refresh any more, and their access token stops
    lines.remove(next(line for line in lines if line.startswith("dave:")))
    write(path, *lines)
    await eventually(lambda: _gone(gw, "dave"))

    async def refused_upstream() -> bool:
        async with gw.http.get(f"{gw.url}/x", headers={"Authorization": f"Bearer {dave['access_token']}"}) as r:
            return r.status == 401

    await eventually(refused_upstream)
    status, body = await refresh(gw, dave["refresh_token"])
    assert status == 401 and body["error"] == "session_revoked"
    assert (await login(gw, "dave", "dave-password-1"))[0] == 401
    status, erin_again = await refresh(gw, erin["refresh_token"])  # the others stay signed in
    assert status == 200

    # a new password for frank in the file ends his sessions, as gateway users passwd does
    lines[-1] = entry("frank", "frank-password-2")
    write(path, *lines)

    async def frank_refused() -> bool:
        async with gw.http.get(f"{gw.url}/x", headers={"Authorization": f"Bearer {frank['access_token']}"}) as r:
            return r.status == 401

    await eventually(frank_refused)
    assert (await refresh(gw, frank["refresh_token"]))[0] == 401
    assert (await login(gw, "frank", "frank-password-1"))[0] == 401
    assert (await login(gw, "frank", "frank-password-2"))[0] == 200

    # a file that cannot be used is not taken: the previous contents stay, with a warning
    write(path, *lines, "mallory:{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=")
    await asyncio.sleep(1.1)
    assert (await login(gw, "erin", "erin-password-1"))[0] == 200
    assert (await login(gw, "mallory", "password"))[0] == 401
    warned = [r for r in caplog.records if r.getMessage() == "htpasswd_not_reloaded"]
    assert warned and "line 4" in warned[-1].fields["reason"] and "{SHA}" in warned[-1].fields["reason"]  # type: ignore[attr-defined]
    assert (await refresh(gw, erin_again["refresh_token"]))[0] == 200


async def _gone(gw: Gateway, name: str) -> bool:
    return await gw.store.get_user(name) is None


async def test_disabled_row_refuses_an_htpasswd_user(htpasswd_gw: tuple[Gateway, Path, list[str]]) -> None:
    gw, _, _ = htpasswd_gw
    assert (await login(gw, "dave", "dave-password-1"))[0] == 200
    await gw.store.update_user("dave", disabled=True)  # gateway users disable dave
    status, body, _ = await login(gw, "dave", "dave-password-1")
    assert (status, body) == (401, REFUSED)


@pytest.mark.parametrize(("value", "scheme"), [
    ("{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=", "{SHA}"),
    ("$apr1$Qx1pXhVJ$d/5mr1Wq/1JwSpoIkNFes1", "$apr1$"),
    ("rqXexS6ZhobKA", "crypt (DES)"),
    ("hunter2", "plain text"),
    ("$6$salt$abc", "$6$"),
    ("$2y$05$tooshort", "malformed bcrypt"),
])
def test_htpasswd_weak_schemes_are_refused(value: str, scheme: str) -> None:
    text = f"# users\n{entry('dave', 'x')}\n\ncarol:{value}\n"
    with pytest.raises(htpasswd.HtpasswdError) as caught:
        htpasswd.parse(text)
    assert str(caught.value).startswith("line 4: user carol ")
    assert scheme in str(caught.value) and "htpasswd -B" in str(caught.value)


def test_htpasswd_takes_every_bcrypt_prefix() -> None:
    made = bcrypt.hashpw(b"pw", bcrypt.gensalt(4)).decode()[4:]
    entries = htpasswd.parse(f"a:$2y${made}\nb:$2a${made}\r\nc:$2b${made}\n")
    assert sorted(entries) == ["a", "b", "c"] and {e.cost for e in entries.values()} == {4}
    with pytest.raises(htpasswd.HtpasswdError, match="line 2: user a is already on line 1"):
        htpasswd.parse(f"a:$2y${made}\na:$2y${made}\n")


CLI_CONFIG = """\
listen: {host: 127.0.0.1, port: 8080}
store: sqlite:gateway.db
upstreams:
  app: {url: "http://127.0.0.1:9"}
tokens:
  issuer: gateway-test
  audience: app
  keys:
    - {kid: k1, algorithm: HS256, secret: "${CLI_TEST_SECRET}"}
cookies: {secure: false}
users:
  source: htpasswd
  file: users.htpasswd
routes:
  - {path: /**, access: authenticated}
"""


def test_weak_htpasswd_file_stops_check_and_run(tmp_path: Path) -> None:
    (tmp_path / "gateway.yaml").write_text(CLI_CONFIG)
    (tmp_path / "users.htpasswd").write_text(f"{entry('dave', 'x')}\nbob:$apr1$Qx1pXhVJ$d/5mr1Wq/1JwSpoIkNFes1\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env["CLI_TEST_SECRET"] = SECRET

    def gateway(*args: str) -> tuple[int, list[str]]:
        proc = subprocess.run([sys.executable, "-m", "gateway", *args, "-c", str(tmp_path / "gateway.yaml")],
                              capture_output=True, text=True, env=env, timeout=60, stdin=subprocess.DEVNULL)
        assert "Traceback" not in proc.stdout + proc.stderr
        return proc.returncode, [x for x in (proc.stdout + proc.stderr).splitlines() if x.strip()]

    for command in ("check", "run"):
        code, printed = gateway(command)
        assert code == 1 and len(printed) == 1, printed
        assert "users.file (line 13)" in printed[0] and "line 2: user bob" in printed[0]
        assert "$apr1$ (Apache MD5)" in printed[0]

    (tmp_path / "users.htpasswd").write_text(f"{entry('dave', 'x')}\n")
    code, printed = gateway("check")
    assert code == 0, printed


# --- upstream -------------------------------------------------------------------------------


@dataclass
class Legacy:
    """A legacy app's login endpoint: the user name picks how it answers."""

    url: str = ""
    seen: list[tuple[str, list[tuple[str, str]], bytes]] = field(default_factory=list)
    hold: asyncio.Event = field(default_factory=asyncio.Event)


GOOD = {"grace": "grace-password-1"}


@pytest.fixture
async def legacy() -> AsyncIterator[Legacy]:
    state = Legacy()

    async def handle(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        state.seen.append((request.raw_path, list(request.headers.items()), body))
        if request.content_type == "application/json":
            fields = json.loads(body)
            name, password = fields.get("username"), fields.get("password")
        else:
            form = parse_qs(body.decode())
            name, password = form.get("login", [""])[0], form.get("secret", [""])[0]
        if name == "slow":
            await state.hold.wait()
        if name == "broken":
            return web.json_response({"error": "database is down"}, status=500)
        if name == "html":
            return web.Response(text="<html>Welcome!</html>", content_type="text/html")
        if name == "moved":
            raise web.HTTPFound("/elsewhere")
        if name == "odd-roles":
            return web.json_response({"user": {"roles": "admin"}})
        if GOOD.get(name) != password:
            return web.json_response({"error": "bad credentials"}, status=401)
        return web.json_response({"user": {"name": name, "roles": ["editor", "bad role\r\nX: y", "staff"],
                                           "tenant": "acme", "groups": ["north", "south"], "level": 3,
                                           "profile": {"nested": "objects are not claims"},
                                           "bio": "x" * 1000}},
                                 headers={"Set-Cookie": "legacy_session=abc; Path=/"})

    app = web.Application()
    app.router.add_post("/api/login", handle)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    state.url = f"http://127.0.0.1:{server.port}/api/login"
    yield state
    state.hold.set()
    await server.close()


def upstream_users(url: str, **more: Any) -> Callable[[dict[str, Any]], None]:
    def change(raw: dict[str, Any]) -> None:
        raw["users"] = {"source": "upstream", "url": url, "timeout": "500ms", "roles_field": "user.roles",
                        "default_roles": ["member"], **more}
        raw["throttle"] = LENIENT_THROTTLE

    return change


async def test_upstream_json(gateway_factory: GatewayFactory, legacy: Legacy,
                             caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    gw = await gateway_factory(upstream_users(legacy.url))

    status, body, _ = await login(gw, "grace", GOOD["grace"])
    assert status == 200, body
    assert claims(body["access_token"])["roles"] == ["editor", "staff", "member"]  # the bad role dropped
    path, headers, sent = legacy.seen[-1]
    assert json.loads(sent) == {"username": "grace", "password": GOOD["grace"]}
    assert dict(headers)["Content-Type"] == "application/json"
    row = await gw.store.get_user("grace")
    assert row is not None and row.password_hash == UPSTREAM_MARK and row.roles == ("editor", "staff", "member")

    # the refresh keeps the roles captured at login, without asking the upstream again
    asked = len(legacy.seen)
    status, again = await refresh(gw, body["refresh_token"])
    assert status == 200 and claims(again["access_token"])["roles"] == ["editor", "staff", "member"]
    assert len(legacy.seen) == asked

    # roles that are not a list of strings are no roles
    legacy_roles = await login(gw, "odd-roles", "whatever-1")
    assert legacy_roles[0] == 200 and claims(legacy_roles[1]["access_token"])["roles"] == ["member"]

    # every way of failing is the one refusal
    refusals = {}
    for name in ("grace-wrong", "broken", "slow", "html", "moved", "bad name"):
        password = "not-" + GOOD["grace"]
        started = time.monotonic()
        refusals[name] = await login(gw, "grace" if name == "grace-wrong" else name, password)
        assert time.monotonic() - started < 3
    for name, (status, body, answer_headers) in refusals.items():
        assert (status, body) == (401, REFUSED), name
        assert answer_headers == refusals["grace-wrong"][2], name
    assert not any(b"bad name" in sent for _, _, sent in legacy.seen)  # refused before asking
    reasons = {r.fields["reason"] for r in caplog.records  # type: ignore[attr-defined]
               if r.getMessage() == "upstream_check_failed"}
    assert reasons == {"upstream_status_500", "upstream_timeout", "upstream_invalid_answer",
                       "upstream_status_302"}

    # the password went in request bodies only: never in a URL, a header or a log line
    passwords = [GOOD["grace"], "not-" + GOOD["grace"]]
    for path, headers, _ in legacy.seen:
        assert path == "/api/login"
        assert not any(p in f"{k}: {v}" for p in passwords for k, v in headers)
        assert "Cookie" not in dict(headers)  # no cookie jar: the legacy_session cookie never came back
    assert any(passwords[0].encode() in sent for _, _, sent in legacy.seen)
    formatter = JsonFormatter()
    lines = [formatter.format(record) for record in caplog.records]
    assert lines and not [line for line in lines for p in passwords if p in line]


async def test_upstream_claims_are_mapped_into_tokens_and_kept_on_refresh(
        gateway_factory: GatewayFactory, legacy: Legacy, upstream: Upstream, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    wanted = {"tenant": "user.tenant", "groups": "user.groups", "level": "user.level",
              "profile": "user.profile", "bio": "user.bio", "missing": "user.nothing.here"}

    def change(raw: dict[str, Any]) -> None:
        upstream_users(legacy.url, claims=wanted)(raw)
        raw["routes"].insert(0, {"path": "/acme/**", "access": {"claims": {"tenant": "acme"}}})
        raw["routes"].insert(0, {"path": "/globex/**", "access": {"claims": {"tenant": "globex"}}})
        raw["identity_headers"]["X-Auth-Tenant"] = "tenant"

    gw = await gateway_factory(change)
    status, body, _ = await login(gw, "grace", GOOD["grace"])
    assert status == 200, body
    token = claims(body["access_token"])
    assert {k: token.get(k) for k in wanted} == {"tenant": "acme", "groups": ["north", "south"], "level": 3,
                                                 "profile": None, "bio": None, "missing": None}
    assert token["sub"] == "grace"  # the gateway's own claims are its own
    dropped = {r.fields["claim"] for r in caplog.records  # type: ignore[attr-defined]
               if r.getMessage() == "upstream_claim_dropped"}
    assert dropped == {"profile", "bio"}

    # routes decide on them, and identity headers carry them
    bearer = {"Authorization": f"Bearer {body['access_token']}"}
    async with gw.http.get(f"{gw.url}/acme/report", headers=bearer) as resp:
        assert resp.status == 200
    assert upstream.seen[-1].header("X-Auth-Tenant") == ["acme"]
    async with gw.http.get(f"{gw.url}/globex/report", headers=bearer) as resp:
        assert resp.status == 403

    # a refresh carries them without asking the upstream again
    asked = len(legacy.seen)
    status, again = await refresh(gw, body["refresh_token"])
    assert status == 200 and claims(again["access_token"])["groups"] == ["north", "south"]
    assert len(legacy.seen) == asked


async def test_upstream_form(gateway_factory: GatewayFactory, legacy: Legacy) -> None:
    gw = await gateway_factory(upstream_users(legacy.url, body="form", username_field="login",
                                              password_field="secret", roles_field=""))
    status, body, _ = await login(gw, "grace", GOOD["grace"], form=True)
    assert status == 303, body  # a form post lands on next
    _, headers, sent = legacy.seen[-1]
    assert dict(headers)["Content-Type"] == "application/x-www-form-urlencoded"
    assert parse_qs(sent.decode()) == {"login": ["grace"], "secret": [GOOD["grace"]]}
    status, body, _ = await login(gw, "grace", GOOD["grace"])
    assert status == 200 and claims(body["access_token"])["roles"] == ["member"]
    assert (await login(gw, "grace", "wrong-password-1"))[:2] == (401, REFUSED)


async def test_upstream_down(gateway_factory: GatewayFactory, legacy: Legacy) -> None:
    gw = await gateway_factory(upstream_users("http://127.0.0.1:9/api/login"))  # nothing listens there
    assert (await login(gw, "grace", GOOD["grace"]))[:2] == (401, REFUSED)


# --- a row belongs to one source ----------------------------------------------------------------


@pytest.mark.parametrize(("password_hash", "source"), [
    ("$argon2id$v=19$m=65536,t=3,p=4$c2FsdA$aGFzaA", "store"),  # a store user's real hash
    (HTPASSWD_MARK + "0123456789abcdef", "htpasswd"),  # kept for an htpasswd entry
    (UPSTREAM_MARK, "upstream"),  # kept for a user of the upstream source
])
def test_each_row_belongs_to_exactly_one_source(password_hash: str, source: str) -> None:
    row = User(name="dave", password_hash=password_hash, roles=(), created_at=0.0)
    assert {s for s in ("store", "htpasswd", "upstream") if belongs(row, s)} == {source}


def _on(db: Path, **users: Any) -> Callable[[dict[str, Any]], None]:
    """A gateway on the shared store ``db``, with self-registration or the given users."""
    def change(raw: dict[str, Any]) -> None:
        raw["store"] = f"sqlite:///{str(db).lstrip('/')}"
        raw["throttle"] = LENIENT_THROTTLE
        if users:
            raw["users"] = users
        else:
            raw["registration"] = {"enabled": True}
    return change


async def register(gw: Gateway, name: str, password: str) -> dict[str, Any]:
    async with gw.http.post(f"{gw.url}/auth/register", json={"username": name, "password": password}) as resp:
        assert resp.status == 201, await resp.text()
        body: dict[str, Any] = await resp.json()
        body["refresh_token"] = resp.cookies["gw_refresh"].value
        return body


async def test_an_htpasswd_login_takes_over_a_registered_row_and_ends_its_sessions(
        gateway_factory: GatewayFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    db, path = tmp_path / "shared.db", tmp_path / "users.htpasswd"
    store_gw = await gateway_factory(_on(db))
    attacker = await register(store_gw, "dave", "attacker-password-1")
    write(path, entry("dave", "dave-password-1"))
    gw = await gateway_factory(_on(db, source="htpasswd", file=str(path), default_roles=["reader"]))

    status, dave, _ = await login(gw, "dave", "dave-password-1")  # the real dave, from the file
    assert status == 200, dave
    assert claims(dave["access_token"])["sub"] == "dave"
    session = await gw.store.get_session(claims(attacker["access_token"])["sid"])
    assert session is not None and session.revoked_reason == "user_replaced"
    for where in (gw, store_gw):  # the earlier session cannot become htpasswd dave's anywhere
        status, body = await refresh(where, attacker["refresh_token"])
        assert (status, body["error"]) == (401, "session_revoked")
    [replaced] = [r for r in caplog.records if r.getMessage() == "user_replaced"]
    assert replaced.name == "gateway.security"
    assert replaced.fields == {"user": "dave", "was": "store", "now": "htpasswd", "ended": 1}  # type: ignore[attr-defined]

    # htpasswd dave's own row and sessions are his: a second login ends nothing
    status, again, _ = await login(gw, "dave", "dave-password-1")
    assert status == 200
    assert (await refresh(gw, dave["refresh_token"]))[0] == 200
    assert len([r for r in caplog.records if r.getMessage() == "user_replaced"]) == 1


async def test_an_upstream_login_takes_over_an_htpasswd_row_and_ends_its_sessions(
        gateway_factory: GatewayFactory, legacy: Legacy, tmp_path: Path) -> None:
    db, path = tmp_path / "shared.db", tmp_path / "users.htpasswd"
    write(path, entry("grace", "file-password-1"))
    file_gw = await gateway_factory(_on(db, source="htpasswd", file=str(path)))
    status, earlier, _ = await login(file_gw, "grace", "file-password-1")
    assert status == 200
    gw = await gateway_factory(_on(db, source="upstream", url=legacy.url, timeout="500ms",
                                   roles_field="user.roles"))
    status, now, _ = await login(gw, "grace", GOOD["grace"])
    assert status == 200
    session = await gw.store.get_session(claims(earlier["access_token"])["sid"])
    assert session is not None and session.revoked_reason == "user_replaced"
    assert (await refresh(gw, earlier["refresh_token"]))[0] == 401
    assert (await refresh(gw, now["refresh_token"]))[0] == 200


async def test_a_refresh_is_refused_for_a_user_of_another_source(
        gateway_factory: GatewayFactory, tmp_path: Path) -> None:
    db, path = tmp_path / "shared.db", tmp_path / "users.htpasswd"
    store_gw = await gateway_factory(_on(db))
    attacker = await register(store_gw, "dave", "attacker-password-1")
    alice = await store_gw.login("alice")
    still = await store_gw.login("alice")
    write(path, entry("erin", "erin-password-1"))
    gw = await gateway_factory(_on(db, source="htpasswd", file=str(path)))

    # the store's users, registered or added, cannot go on under htpasswd
    for earlier in (attacker, alice):
        status, body = await refresh(gw, earlier["refresh_token"])
        assert (status, body["error"]) == (401, "session_revoked")
        session = await gw.store.get_session(claims(earlier["access_token"])["sid"])
        assert session is not None and session.revoked_reason == "user_source_changed"
    # ... nor an htpasswd user under the store source
    status, erin, _ = await login(gw, "erin", "erin-password-1")
    assert status == 200
    assert (await refresh(gw, erin["refresh_token"]))[0] == 200
    assert (await refresh(store_gw, erin["refresh_token"]))[0] == 401
    # each source's own users refresh as before
    assert (await refresh(store_gw, still["refresh_token"]))[0] == 200
