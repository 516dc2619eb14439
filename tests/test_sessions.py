"""Sessions as token families: instant revocation everywhere, the user's own session list,
lifetimes and purging, concurrency."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import jwt
import pytest

from gateway import users
from gateway.config import Tokens
from gateway.reload import LIVE
from gateway.revocations import Revocations
from gateway.sessions import RefreshRefused, Sessions, hash_token
from gateway.store import RefreshRules, Session, User, open_store

from conftest import Gateway, GatewayFactory


async def _status(gw: Gateway, token: str, path: str = "/profile") -> int:
    async with gw.http.get(f"{gw.url}{path}", headers={"Authorization": f"Bearer {token}"}) as resp:
        return resp.status


async def _refresh(gw: Gateway, token: str) -> tuple[int, dict[str, Any], str | None]:
    async with gw.http.post(f"{gw.url}/auth/refresh", headers={"Cookie": f"gw_refresh={token}"}) as resp:
        body = await resp.json()
        return resp.status, body, resp.cookies["gw_refresh"].value if "gw_refresh" in resp.cookies else None


async def _refused_within(gw: Gateway, token: str, seconds: float) -> float:
    """How long until ``gw`` refuses ``token``; fails if that takes longer than ``seconds``."""
    start = time.monotonic()
    while await _status(gw, token) != 401:
        assert time.monotonic() - start < seconds, f"still accepted after {seconds}s"
        await asyncio.sleep(0.02)
    return time.monotonic() - start


def _shared_store(path: Path):  # type: ignore[no-untyped-def]
    def change(raw: dict[str, Any]) -> None:
        raw["store"] = f"sqlite:///{str(path).lstrip('/')}"
    return change


# --- instant revocation ---------------------------------------------------------------------


async def test_logout_stops_the_sessions_access_tokens_at_once(gw: Gateway) -> None:
    login = await gw.login("alice")
    other = await gw.login("alice")  # a second session of the same user
    assert await _status(gw, login["access_token"]) == 200
    async with gw.http.post(f"{gw.url}/auth/logout", headers={"Cookie": f"gw_refresh={login['refresh_token']}"}) as resp:
        assert resp.status == 204
    async with gw.http.get(f"{gw.url}/profile", headers={"Authorization": f"Bearer {login['access_token']}"}) as resp:
        assert resp.status == 401
        assert resp.headers["WWW-Authenticate"] == 'Bearer realm="gateway", error="invalid_token"'
    assert await _status(gw, other["access_token"]) == 200  # two sessions never interfere


async def test_reuse_stops_every_access_token_of_the_session(gw: Gateway, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    login = await gw.login("alice")
    bystander = await gw.login("alice")
    status, body, rt2 = await _refresh(gw, login["refresh_token"])
    assert status == 200 and rt2
    gw.clock.advance(11)  # past reuse_grace
    status, body2, _ = await _refresh(gw, login["refresh_token"])
    assert (status, body2["error"]) == (401, "refresh_token_reused")
    assert await _status(gw, login["access_token"]) == 401
    assert await _status(gw, body["access_token"]) == 401
    assert await _status(gw, bystander["access_token"]) == 200
    events = [r for r in caplog.records if r.name == "gateway.security" and r.getMessage() == "refresh_token_reused"]
    assert len(events) == 1
    fields = events[0].fields  # type: ignore[attr-defined]
    sid = (await gw.store.session_of_refresh(hash_token(login["refresh_token"]))).id  # type: ignore[union-attr]
    assert fields["user"] == "alice" and fields["sid"] == sid and fields["ip"] == "127.0.0.1"
    assert login["refresh_token"] not in str(fields) and rt2 not in str(fields)


async def test_revocation_on_one_process_reaches_another_within_a_second(
    gateway_factory: GatewayFactory, tmp_path: Path
) -> None:
    shared = _shared_store(tmp_path / "shared.db")
    a = await gateway_factory(shared)
    b = await gateway_factory(shared)
    login = await a.login("alice")
    status, body, _ = await _refresh(b, login["refresh_token"])  # log in on A, refresh on B
    assert status == 200
    assert await _status(a, body["access_token"]) == 200
    async with b.http.post(f"{b.url}/auth/logout", headers={"Authorization": f"Bearer {body['access_token']}"}) as resp:
        assert resp.status == 204
    await _refused_within(a, body["access_token"], 1.0)
    assert await _status(a, login["access_token"]) == 401


async def test_operator_revoke_from_the_cli_reaches_a_running_gateway(
    gateway_factory: GatewayFactory, tmp_path: Path
) -> None:
    db = tmp_path / "ops.db"
    gw = await gateway_factory(_shared_store(db))
    token = await gw.token("bob")
    assert await _status(gw, token, "/admin/x") == 200
    done = await asyncio.to_thread(subprocess.run, [
        sys.executable, "-m", "gateway", "sessions", "revoke", "--user", "bob", "--store", f"sqlite:///{db}"],
        capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ended 1 session(s)"
    await _refused_within(gw, token, 1.0)


@pytest.mark.parametrize("change", ["passwd", "disable", "remove"])
async def test_user_changes_end_every_session(gw: Gateway, change: str) -> None:
    first, second = await gw.login("carol"), await gw.login("carol")
    if change == "passwd":
        ended = await users.passwd(gw.store, "carol", "a-new-password-1", clock=gw.clock)
    elif change == "disable":
        ended = await users.disable(gw.store, "carol", clock=gw.clock)
    else:
        ended = await users.remove(gw.store, "carol", clock=gw.clock)
    assert ended == 2
    for login in (first, second):
        await _refused_within(gw, login["access_token"], 1.0)
        status, body, _ = await _refresh(gw, login["refresh_token"])
        assert status == 401 and body["error"] in ("session_revoked", "invalid_token")


def _claims(token: str) -> dict[str, Any]:
    return dict(jwt.decode(token, options={"verify_signature": False}))


async def test_a_role_added_arrives_at_the_next_refresh_and_one_taken_away_ends_the_session(gw: Gateway) -> None:
    login = await gw.login("carol")
    before = _claims(login["access_token"])["roles"]
    assert "auditor" not in before
    assert await users.set_roles(gw.store, "carol", [*before, "auditor"], clock=gw.clock) == 0
    assert await _status(gw, login["access_token"]) == 200  # the session goes on
    status, body, refresh_token = await _refresh(gw, login["refresh_token"])
    assert status == 200 and _claims(body["access_token"])["roles"] == [*before, "auditor"]

    assert await users.set_roles(gw.store, "carol", ["auditor"], clock=gw.clock) == 1
    await _refused_within(gw, body["access_token"], 1.0)  # it still says the roles taken away
    assert refresh_token is not None
    status, body, _ = await _refresh(gw, refresh_token)
    assert status == 401 and body["error"] == "session_revoked"


@pytest.mark.parametrize("change", ["roles", "disable"])
async def test_a_user_change_while_a_login_hashes_reaches_its_new_session(
    gw: Gateway, monkeypatch: pytest.MonkeyPatch, change: str
) -> None:
    # The operator's command lands between the password check and the session: it ends the
    # sessions that exist then, which are not yet this one.
    credentials = gw.app[LIVE].current.credentials
    check = credentials.check

    async def operator_acts_meanwhile(username: str, password: str) -> User:
        user = await check(username, password)
        if change == "roles":
            await users.set_roles(gw.store, "bob", ["user"], clock=gw.clock)  # admin taken away
        else:
            await users.disable(gw.store, "bob", clock=gw.clock)
        return user

    monkeypatch.setattr(credentials, "check", operator_acts_meanwhile)
    async with gw.http.post(f"{gw.url}/auth/login", json={"username": "bob", "password": "bob-password-1"}) as resp:
        status, body = resp.status, await resp.json()
    live = [s for s in await gw.store.list_sessions("bob") if s.revoked_at is None]
    if change == "roles":
        assert status == 200 and _claims(body["access_token"])["roles"] == ["user"]
        assert await _status(gw, body["access_token"], "/admin/x") == 403
        assert len(live) == 1
    else:
        assert (status, body["error"]) == (401, "invalid_credentials")
        assert live == []


async def test_revocations_leave_the_view_after_the_horizon(gw: Gateway) -> None:
    login = await gw.login("alice")
    async with gw.http.post(f"{gw.url}/auth/logout", headers={"Authorization": f"Bearer {login['access_token']}"}) as resp:
        assert resp.status == 204
    sid = (await gw.store.session_of_refresh(hash_token(login["refresh_token"]))).id  # type: ignore[union-attr]
    view = gw.app[LIVE].current.revocations
    assert view.horizon == 900 + 5 + 60  # access_ttl + leeway + a minute of clock disagreement
    gw.clock.advance(900 + 5 + 59)
    await view.sync()
    assert view.is_revoked(sid)  # a token issued just before the logout could still be alive...
    assert await _status(gw, login["access_token"]) == 401
    gw.clock.advance(2)  # ...and now none can: the view forgets the session
    await view.sync()
    assert not view.is_revoked(sid)


# --- the user's own sessions ----------------------------------------------------------------


async def test_users_see_and_end_their_own_sessions(gw: Gateway) -> None:
    laptop = await gw.login("alice")
    gw.clock.advance(60)
    async with gw.http.post(f"{gw.url}/auth/login", json={"username": "alice", "password": "alice-password-1"},
                            headers={"User-Agent": "Phone/1.0"}) as resp:
        phone = await resp.json()
    bobs = await gw.login("bob")
    async with gw.http.get(f"{gw.url}/auth/sessions", headers={"Authorization": f"Bearer {phone['access_token']}"}) as resp:
        assert resp.status == 200
        listed = (await resp.json())["sessions"]
    assert [s["current"] for s in listed] == [True, False]  # most recently used first
    assert listed[0]["user_agent"] == "Phone/1.0" and listed[0]["ip"] == "127.0.0.1"
    assert set(listed[0]) == {"id", "created_at", "last_used_at", "expires_at", "ip", "user_agent", "current"}
    assert listed[0]["created_at"].endswith("Z") and listed[0]["created_at"] > listed[1]["created_at"]

    laptop_id = listed[1]["id"]
    auth = {"Authorization": f"Bearer {phone['access_token']}"}
    async with gw.http.delete(f"{gw.url}/auth/sessions/{laptop_id}", headers=auth) as resp:
        assert resp.status == 204
        assert "gw_refresh" not in resp.cookies  # another session: this one's cookies stay
    assert await _status(gw, laptop["access_token"]) == 401
    assert await _status(gw, phone["access_token"]) == 200

    bob_id = (await gw.store.session_of_refresh(hash_token(bobs["refresh_token"]))).id  # type: ignore[union-attr]
    for missing in (bob_id, laptop_id, "nope"):  # someone else's, already ended, unknown: all the same
        async with gw.http.delete(f"{gw.url}/auth/sessions/{missing}", headers=auth) as resp:
            assert resp.status == 404
            assert (await resp.json())["error"] == "not_found"
    assert await _status(gw, bobs["access_token"]) == 200

    async with gw.http.delete(f"{gw.url}/auth/sessions/{listed[0]['id']}", headers=auth) as resp:
        assert resp.status == 204
        assert resp.cookies["gw_refresh"]["max-age"] == "0"  # its own session: signed out
    assert await _status(gw, phone["access_token"]) == 401


async def test_session_endpoints_need_a_token_and_the_same_site(gw: Gateway) -> None:
    login = await gw.login("alice")
    async with gw.http.get(f"{gw.url}/auth/sessions") as resp:
        assert resp.status == 401
    sid = (await gw.store.session_of_refresh(hash_token(login["refresh_token"]))).id  # type: ignore[union-attr]
    async with gw.http.delete(f"{gw.url}/auth/sessions/{sid}", headers={
            "Cookie": f"gw_access={login['access_token']}", "Sec-Fetch-Site": "cross-site"}) as resp:
        assert resp.status == 403
    async with gw.http.post(f"{gw.url}/auth/sessions/{sid}", headers={
            "Authorization": f"Bearer {login['access_token']}"}) as resp:
        assert resp.status == 405
    assert await _status(gw, login["access_token"]) == 200


async def test_listed_sessions_leave_out_ended_ones(gw: Gateway) -> None:
    idle = await gw.login("alice")
    ended = await gw.login("alice")
    async with gw.http.post(f"{gw.url}/auth/logout", headers={"Authorization": f"Bearer {ended['access_token']}"}) as resp:
        assert resp.status == 204
    gw.clock.advance(2 * 86400)
    active = await gw.login("alice")
    gw.clock.advance(86400 + 1)  # the first session is now unused for 3d+1s: past refresh_idle_ttl
    current = await gw.login("alice")
    async with gw.http.get(f"{gw.url}/auth/sessions", headers={"Authorization": f"Bearer {current['access_token']}"}) as resp:
        listed = [s["id"] for s in (await resp.json())["sessions"]]
    ids = {name: (await gw.store.session_of_refresh(hash_token(login["refresh_token"]))).id  # type: ignore[union-attr]
           for name, login in (("idle", idle), ("ended", ended), ("active", active), ("current", current))}
    assert listed == [ids["current"], ids["active"]]


# --- lifetimes and purging ------------------------------------------------------------------


async def test_purge_removes_only_ended_sessions(gw: Gateway) -> None:
    old = await gw.login("alice")
    kept = await gw.login("bob")
    gw.clock.advance(3 * 86400 - 60)
    status, _, kept_rt = await _refresh(gw, kept["refresh_token"])  # bob stays active
    assert status == 200
    gw.clock.advance(3600)  # alice's session went idle an hour ago... plus the horizon below
    gw.clock.advance(900 + 5 + 60)
    purged = await gw.store.purge(gw.clock(), gateway_rules(gw), horizon=900 + 5 + 60)
    assert purged == 1
    assert await gw.store.session_of_refresh(hash_token(old["refresh_token"])) is None
    assert await gw.store.session_of_refresh(hash_token(kept_rt or "")) is not None


def gateway_rules(gw: Gateway) -> RefreshRules:
    return RefreshRules(idle_ttl=gw.config.tokens.refresh_idle_ttl, reuse_grace=gw.config.tokens.reuse_grace)


async def test_the_purge_task_runs_in_the_background(
    gateway_factory: GatewayFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("gateway.revocations.PURGE_INTERVAL", 0.05)
    gw = await gateway_factory()
    now = gw.clock()
    for n in range(1200):  # more than one batch
        await gw.store.create_session(Session(id=f"old{n}", user="alice", created_at=now - 40 * 86400,
                                              last_used_at=now - 30 * 86400, expires_at=now - 26 * 86400,
                                              chain_key=b"k" * 32), hash_token(f"old-token-{n}"))
    live = await gw.login("alice")
    for _ in range(200):
        if len(await gw.store.list_sessions("alice")) == 1:
            break
        await asyncio.sleep(0.05)
    assert [s.id for s in await gw.store.list_sessions("alice")] == [
        (await gw.store.session_of_refresh(hash_token(live["refresh_token"]))).id]  # type: ignore[union-attr]
    assert await _status(gw, live["access_token"]) == 200


# --- concurrency ----------------------------------------------------------------------------


async def test_fifty_parallel_refreshes_are_consistent(gw: Gateway) -> None:
    login = await gw.login("alice")
    results = await asyncio.gather(*(_refresh(gw, login["refresh_token"]) for _ in range(50)))
    assert [status for status, _, _ in results] == [200] * 50
    successors = {token for _, _, token in results}
    assert len(successors) == 1 and None not in successors
    sid = (await gw.store.session_of_refresh(hash_token(login["refresh_token"]))).id  # type: ignore[union-attr]
    session = await gw.store.get_session(sid)
    assert session is not None and session.generation == 1 and session.revoked_at is None
    for _, body, _ in results:  # every answer carries a working access token
        assert await _status(gw, body["access_token"]) == 200
    (successor,) = successors
    assert (await _refresh(gw, successor or ""))[0] == 200  # the chain goes on from there


async def test_two_sessions_of_one_user_refresh_independently(gw: Gateway) -> None:
    one, two = await gw.login("alice"), await gw.login("alice")
    t1, t2 = one["refresh_token"], two["refresh_token"]
    for _ in range(3):
        s1, _, t1 = await _refresh(gw, t1)
        s2, _, t2 = await _refresh(gw, t2)
        assert (s1, s2) == (200, 200)
        gw.clock.advance(30)
    gw.clock.advance(30)
    status, body, _ = await _refresh(gw, one["refresh_token"])  # a replay in session one...
    assert body["error"] == "refresh_token_reused"
    assert (await _refresh(gw, t2 or ""))[0] == 200  # ...leaves session two alone


async def test_parallel_refreshes_across_two_processes_make_one_chain(
    gateway_factory: GatewayFactory, tmp_path: Path
) -> None:
    shared = _shared_store(tmp_path / "shared.db")
    a, b = await gateway_factory(shared), await gateway_factory(shared)
    token = (await a.login("alice"))["refresh_token"]
    results = await asyncio.gather(*(_refresh(gw, token) for gw in [a, b] * 10))
    assert [status for status, _, _ in results] == [200] * 20
    assert len({successor for _, _, successor in results}) == 1


# --- a session continues only under its user's source -------------------------------------------


@pytest.mark.parametrize(("source", "row_hash", "refused"), [
    ("store", "!htpasswd:0123456789abcdef", True),  # an htpasswd row after a switch to the store
    ("store", "!upstream", True),
    ("htpasswd", None, True),  # a store user's row (its real hash) after a switch to htpasswd
    ("htpasswd", "!upstream", True),
    ("upstream", "!htpasswd:0123456789abcdef", True),
    ("upstream", None, True),
    ("htpasswd", "!htpasswd:0123456789abcdef", False),  # each source's own rows go on
    ("upstream", "!upstream", False),
    ("store", None, False),
])
async def test_refresh_refuses_a_row_of_another_source(
        tmp_path: Path, source: str, row_hash: str | None, refused: bool) -> None:
    store = await open_store(f"sqlite:{tmp_path / 'sessions.db'}")
    try:
        await store.add_user(User(name="dave", password_hash=row_hash or "$argon2id$v=19$m=65536,t=3,p=4$x$y",
                                  roles=("user",), created_at=time.time()))
        tokens = Tokens(issuer="i", audience="a", keys=())
        revocations = Revocations(store, time.time, horizon=3600)
        sessions = Sessions(store, tokens, time.time, revocations, source=source)
        user = await store.get_user("dave")
        assert user is not None
        session, token = await sessions.start(user, "127.0.0.1", "test")
        if not refused:
            assert (await sessions.refresh(token)).user.name == "dave"
            return
        with pytest.raises(RefreshRefused) as caught:
            await sessions.refresh(token)
        assert (caught.value.code, caught.value.reason) == ("session_revoked", "user_source_changed")
        assert caught.value.status == 401
        assert revocations.is_revoked(session.id)  # its access tokens stop at once
        ended = await store.get_session(session.id)
        assert ended is not None and ended.revoked_reason == "user_source_changed"
    finally:
        await store.close()
