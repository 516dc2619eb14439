"""/auth/*: login, refresh, logout, logout-all and me, end to end."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import jwt
import pytest

from conftest import PASSWORDS, SECRET, Gateway, Upstream

PROBE = {"Cookie": "gw_probe=1"}  # the cookie the sign-in page sets, as a browser sends it back


def _refresh_cookie(resp) -> str:  # type: ignore[no-untyped-def]
    return str(resp.cookies["gw_refresh"].value)


# --- login ----------------------------------------------------------------------------------


async def test_login_json_returns_token_and_cookies(gw: Gateway) -> None:
    async with gw.http.post(f"{gw.url}/auth/login",
                            json={"username": "alice", "password": PASSWORDS["alice"]}) as resp:
        assert resp.status == 200
        assert resp.headers["Cache-Control"] == "no-store"
        body = await resp.json()
        refresh = resp.cookies["gw_refresh"]
        access = resp.cookies["gw_access"]
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == 900
    claims = jwt.decode(body["access_token"], SECRET, algorithms=["HS256"], audience="app",
                        issuer="https://gateway.test")
    assert claims["sub"] == "alice" and claims["roles"] == ["user"]
    assert set(claims) == {"iss", "aud", "sub", "iat", "exp", "jti", "sid", "roles"}
    assert jwt.get_unverified_header(body["access_token"])["kid"] == "k1"
    assert access.value == body["access_token"]
    assert access["httponly"] and access["path"] == "/" and access["samesite"] == "Lax"
    assert int(access["max-age"]) == 900
    assert refresh["httponly"] and refresh["path"] == "/" and refresh["samesite"] == "Strict"
    assert len(refresh.value) >= 43  # 256 bits, base64url
    assert int(refresh["max-age"]) == 14 * 86400


async def _secure_login(gateway_factory, **cookies: Any) -> tuple[Gateway, list[str]]:  # type: ignore[no-untyped-def]
    """A gateway on https with secure cookies (and ``cookies``), and alice's Set-Cookie headers."""
    def secure(raw: dict) -> None:
        raw["cookies"] = {"secure": True, **cookies}
        raw["public_url"] = "https://gateway.test"

    gw = await gateway_factory(secure)
    async with gw.http.post(f"{gw.url}/auth/login",
                            json={"username": "alice", "password": PASSWORDS["alice"]}) as resp:
        assert resp.status == 200
        return gw, resp.headers.getall("Set-Cookie")


async def test_secure_cookies_by_default(gateway_factory) -> None:  # type: ignore[no-untyped-def]
    # SEC-43: Secure, HttpOnly, SameSite, no Domain, and the __Host- prefix, which a browser
    # accepts only from this very host over HTTPS: a sibling subdomain cannot plant it.
    gw, set_cookies = await _secure_login(gateway_factory)
    assert [c.split("=")[0] for c in set_cookies] == ["__Host-gw_access", "__Host-gw_refresh"]
    for header, same_site in zip(set_cookies, ("Lax", "Strict"), strict=True):
        attributes = {a.strip().split("=")[0].lower() for a in header.split(";")[1:]}
        assert attributes == {"httponly", "max-age", "path", "samesite", "secure"}
        assert "Path=/" in header and f"SameSite={same_site}" in header
    async with gw.http.post(f"{gw.url}/auth/logout", headers={"Cookie": set_cookies[1].split(";")[0]}) as resp:
        cleared = resp.headers.getall("Set-Cookie")
    assert [c.split("=")[0] for c in cleared] == ["__Host-gw_access", "__Host-gw_refresh"]
    assert all("Secure" in c and "Path=/" in c and "Max-Age=0" in c for c in cleared)


async def test_a_secure_refresh_cookie_kept_to_auth_is_secure_prefixed(gateway_factory) -> None:  # type: ignore[no-untyped-def]
    # SEC-43: on /auth it cannot be __Host-; __Secure- keeps plain-HTTP pages from planting it
    gw, set_cookies = await _secure_login(gateway_factory, refresh={"path": "/auth"})
    assert [c.split("=")[0] for c in set_cookies] == ["__Host-gw_access", "__Secure-gw_refresh"]
    assert "Path=/auth" in set_cookies[1] and "Secure" in set_cookies[1]
    async with gw.http.post(f"{gw.url}/auth/refresh", headers={
            "Cookie": set_cookies[1].split(";")[0], "Origin": "https://gateway.test"}) as resp:
        assert resp.status == 200
        assert resp.headers.getall("Set-Cookie")[1].startswith("__Secure-gw_refresh=")


async def test_login_form_redirects_to_safe_next(gw: Gateway) -> None:
    form = {"username": "alice", "password": PASSWORDS["alice"], "next": "/reports?year=2026"}
    async with gw.http.post(f"{gw.url}/auth/login", data=form, allow_redirects=False, headers=PROBE) as resp:
        assert resp.status == 303
        assert resp.headers["Location"] == "/reports?year=2026"
        assert "gw_refresh" in resp.cookies and "gw_access" in resp.cookies
    for evil in ("//evil.example", "https://evil.example/", "/\\evil.example", "javascript:alert(1)",
                 "/%2F/evil.example", "///evil.example"):
        form["next"] = evil
        async with gw.http.post(f"{gw.url}/auth/login", data=form, allow_redirects=False, headers=PROBE) as resp:
            assert resp.status == 303
            assert resp.headers["Location"] == "/", evil


async def test_login_page_is_served_and_escapes_next(gw: Gateway) -> None:
    async with gw.http.get(f"{gw.url}/auth/login", params={"next": '/x"><script>alert(1)</script>'}) as resp:
        assert resp.status == 200
        assert resp.content_type == "text/html"
        page = await resp.text()
    assert "<script>" not in page
    assert 'name="username"' in page and 'type="password"' in page
    async with gw.http.get(f"{gw.url}/auth/login", params={"next": "/reports?y=1"}) as resp:
        assert 'value="/reports?y=1"' in await resp.text()


async def test_failed_form_login_shows_the_page_again(gw: Gateway) -> None:
    form = {"username": "alice", "password": "wrong-password", "next": "/reports"}
    async with gw.http.post(f"{gw.url}/auth/login", data=form, allow_redirects=False, headers=PROBE) as resp:
        assert resp.status == 401
        page = await resp.text()
        assert "gw_refresh" not in resp.cookies
    assert "incorrect" in page and 'value="/reports"' in page


@pytest.mark.parametrize("username, password", [
    ("alice", "wrong-password"),
    ("nobody", "wrong-password"),
    ("alice", ""),
])
async def test_bad_credentials_are_one_answer(gw: Gateway, username: str, password: str) -> None:
    async with gw.http.post(f"{gw.url}/auth/login", json={"username": username, "password": password}) as resp:
        assert resp.status == 401
        assert await resp.json() == {"error": "invalid_credentials",
                                     "error_description": "The user name or password is incorrect."}
        assert resp.headers["WWW-Authenticate"] == 'Bearer realm="gateway"'
        assert "Set-Cookie" not in resp.headers


async def test_disabled_user_gets_the_same_answer(gw: Gateway) -> None:
    await gw.store.update_user("carol", disabled=True)
    async with gw.http.post(f"{gw.url}/auth/login",
                            json={"username": "carol", "password": PASSWORDS["carol"]}) as resp:
        assert resp.status == 401
        assert (await resp.json())["error"] == "invalid_credentials"


@pytest.mark.parametrize("body, content_type, status, code", [
    (b"{not json", "application/json", 400, "invalid_request"),
    (b'["alice", "pw"]', "application/json", 400, "invalid_request"),
    (b'{"username": 1, "password": "x"}', "application/json", 400, "invalid_request"),
    (b'{"username": "alice", "password": ["x"]}', "application/json", 400, "invalid_request"),
    (b'{"username": "alice"}', "application/json", 400, "invalid_request"),
    (b'{"username": null, "password": null}', "application/json", 400, "invalid_request"),
    (b"\xff\xfe", "application/json", 400, "invalid_request"),
    (b"username=alice", "application/x-www-form-urlencoded", 400, "invalid_request"),
    (b"username=alice&password=x", "text/plain", 415, "unsupported_media_type"),
    (b"--b\r\n", "multipart/form-data; boundary=b", 415, "unsupported_media_type"),
    (b"x" * (17 * 1024), "application/json", 413, "payload_too_large"),
])
async def test_malformed_login_is_4xx_never_500(
    gw: Gateway, body: bytes, content_type: str, status: int, code: str
) -> None:
    async with gw.http.post(f"{gw.url}/auth/login", data=body, headers={"Content-Type": content_type}) as resp:
        assert resp.status == status
        assert (await resp.json())["error"] == code


async def test_chunked_oversized_login_body_is_413(gw: Gateway) -> None:
    async def body():  # no Content-Length: the limit must hold while reading
        for _ in range(40):
            yield b"x" * 1024

    async with gw.http.post(f"{gw.url}/auth/login", data=body(),
                            headers={"Content-Type": "application/json"}) as resp:
        assert resp.status == 413


async def test_a_login_body_that_stalls_times_out(gw: Gateway, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("gateway.auth_api.BODY_TIMEOUT", 0.3)
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(b"POST /auth/login HTTP/1.1\r\nHost: gateway.test\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 1000\r\n\r\n{\"username\"")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 408 ")
    writer.close()


async def test_client_leaving_mid_body_is_not_an_error(gw: Gateway, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(b"POST /auth/login HTTP/1.1\r\nHost: gateway.test\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 1000\r\n\r\n{")
    await writer.drain()
    writer.close()
    await writer.wait_closed()
    for _ in range(100):  # until the gateway has logged the abandoned request
        logged = [getattr(r, "fields", {}) for r in caplog.records if r.name == "gateway.access"]
        if any(f.get("path") == "/auth/login" for f in logged):
            break
        await asyncio.sleep(0.05)
    assert [f["status"] for f in logged if f.get("path") == "/auth/login"] == [499]
    assert not [r for r in caplog.records if r.levelname == "ERROR" and r.name.startswith("gateway")]
    async with gw.http.get(f"{gw.url}/healthz") as resp:
        assert resp.status == 200


async def test_cross_site_login_is_refused(gw: Gateway) -> None:
    creds = {"username": "alice", "password": PASSWORDS["alice"]}
    for headers in ({"Origin": "https://evil.example"}, {"Sec-Fetch-Site": "cross-site"}, {"Origin": "null"}):
        async with gw.http.post(f"{gw.url}/auth/login", json=creds, headers=headers) as resp:
            assert resp.status == 403, headers
            assert (await resp.json())["error"] == "csrf"
    async with gw.http.post(f"{gw.url}/auth/login", json=creds,
                            headers={"Origin": "http://gateway.test", "Sec-Fetch-Site": "same-origin"}) as resp:
        assert resp.status == 200


# --- refresh --------------------------------------------------------------------------------


async def test_refresh_rotates_the_token(gw: Gateway, upstream: Upstream) -> None:
    first = await gw.login("alice")
    rt1 = first["refresh_token"]
    async with gw.http.post(f"{gw.url}/auth/refresh", headers={"Cookie": f"gw_refresh={rt1}"}) as resp:
        assert resp.status == 200
        body = await resp.json()
        rt2 = _refresh_cookie(resp)
        assert resp.cookies["gw_access"].value == body["access_token"]
    assert rt2 != rt1
    assert body["access_token"] != first["access_token"]
    claims = jwt.decode(body["access_token"], options={"verify_signature": False})
    first_claims = jwt.decode(first["access_token"], options={"verify_signature": False})
    assert claims["sid"] == first_claims["sid"]  # the same session, a new link in its chain
    async with gw.http.get(f"{gw.url}/profile", headers={"Authorization": f"Bearer {body['access_token']}"}) as resp:
        assert resp.status == 200
    # the new token rotates in turn
    async with gw.http.post(f"{gw.url}/auth/refresh", headers={"Cookie": f"gw_refresh={rt2}"}) as resp:
        assert resp.status == 200
        assert _refresh_cookie(resp) not in (rt1, rt2)


async def test_refresh_within_grace_gives_the_same_successor(gw: Gateway) -> None:
    rt1 = (await gw.login("alice"))["refresh_token"]
    answers = []
    for _ in range(2):  # a retry whose first answer was lost, or a second tab
        async with gw.http.post(f"{gw.url}/auth/refresh", headers={"Cookie": f"gw_refresh={rt1}"}) as resp:
            assert resp.status == 200
            answers.append(_refresh_cookie(resp))
        gw.clock.advance(3)
    assert answers[0] == answers[1]


async def test_parallel_refreshes_make_one_chain(gw: Gateway) -> None:
    rt1 = (await gw.login("alice"))["refresh_token"]

    async def refresh() -> tuple[int, str | None]:
        async with gw.http.post(f"{gw.url}/auth/refresh", headers={"Cookie": f"gw_refresh={rt1}"}) as resp:
            return resp.status, resp.cookies["gw_refresh"].value if "gw_refresh" in resp.cookies else None

    results = await asyncio.gather(*(refresh() for _ in range(20)))
    assert {status for status, _ in results} == {200}
    assert len({token for _, token in results}) == 1


async def test_replay_after_grace_ends_the_session(gw: Gateway) -> None:
    rt1 = (await gw.login("alice"))["refresh_token"]
    async with gw.http.post(f"{gw.url}/auth/refresh", headers={"Cookie": f"gw_refresh={rt1}"}) as resp:
        rt2 = _refresh_cookie(resp)
    gw.clock.advance(11)  # past reuse_grace (10s)
    async with gw.http.post(f"{gw.url}/auth/refresh", headers={"Cookie": f"gw_refresh={rt1}"}) as resp:
        assert resp.status == 401
        assert (await resp.json())["error"] == "refresh_token_reused"
        assert resp.cookies["gw_refresh"].value == "" and resp.cookies["gw_refresh"]["max-age"] == "0"
    async with gw.http.post(f"{gw.url}/auth/refresh", headers={"Cookie": f"gw_refresh={rt2}"}) as resp:
        assert resp.status == 401
        assert (await resp.json())["error"] == "session_revoked"


@pytest.mark.parametrize("cookie", ["", "gw_refresh=", "gw_refresh=short",
                                    "gw_refresh=" + "A" * 43, "other=1"])
async def test_refresh_without_a_valid_token_is_401(gw: Gateway, cookie: str) -> None:
    async with gw.http.post(f"{gw.url}/auth/refresh", headers={"Cookie": cookie} if cookie else {}) as resp:
        assert resp.status == 401
        assert (await resp.json())["error"] == "invalid_token"


async def test_access_token_is_not_a_refresh_token(gw: Gateway) -> None:
    access = await gw.token("alice")
    async with gw.http.post(f"{gw.url}/auth/refresh", headers={"Cookie": f"gw_refresh={access}"}) as resp:
        assert resp.status == 401
    refresh = (await gw.login("alice"))["refresh_token"]
    async with gw.http.get(f"{gw.url}/profile", headers={"Authorization": f"Bearer {refresh}"}) as resp:
        assert resp.status == 401
        assert (await resp.json())["error"] == "invalid_token"


async def test_refresh_after_absolute_lifetime_is_expired(gw: Gateway) -> None:
    token = (await gw.login("alice"))["refresh_token"]
    for day in range(2, 14, 2):  # refreshing every two days keeps it from going idle...
        gw.clock.advance(2 * 86400)
        async with gw.http.post(f"{gw.url}/auth/refresh", headers={"Cookie": f"gw_refresh={token}"}) as resp:
            assert resp.status == 200
            token = _refresh_cookie(resp)
            assert int(resp.cookies["gw_refresh"]["max-age"]) == (14 - day) * 86400
    # ...but not past refresh_ttl (14d) from login
    gw.clock.advance(2 * 86400)
    async with gw.http.post(f"{gw.url}/auth/refresh", headers={"Cookie": f"gw_refresh={token}"}) as resp:
        assert resp.status == 401
        assert (await resp.json())["error"] == "session_expired"


async def test_refresh_cookie_max_age_never_outlives_the_session(gw: Gateway) -> None:
    token = (await gw.login("alice"))["refresh_token"]
    gw.clock.advance(86400)
    async with gw.http.post(f"{gw.url}/auth/refresh", headers={"Cookie": f"gw_refresh={token}"}) as resp:
        assert int(resp.cookies["gw_refresh"]["max-age"]) == 13 * 86400


async def test_idle_session_expires(gw: Gateway) -> None:
    token = (await gw.login("alice"))["refresh_token"]
    gw.clock.advance(3 * 86400 + 1)  # refresh_idle_ttl is 3d
    async with gw.http.post(f"{gw.url}/auth/refresh", headers={"Cookie": f"gw_refresh={token}"}) as resp:
        assert resp.status == 401
        assert (await resp.json())["error"] == "session_expired"


async def test_refresh_carries_current_roles_and_stops_for_disabled_users(gw: Gateway) -> None:
    token = (await gw.login("carol"))["refresh_token"]
    await gw.store.update_user("carol", roles=("user", "auditor"))
    async with gw.http.post(f"{gw.url}/auth/refresh", headers={"Cookie": f"gw_refresh={token}"}) as resp:
        body = await resp.json()
        token = _refresh_cookie(resp)
    assert jwt.decode(body["access_token"], options={"verify_signature": False})["roles"] == ["user", "auditor"]
    await gw.store.update_user("carol", disabled=True)
    async with gw.http.post(f"{gw.url}/auth/refresh", headers={"Cookie": f"gw_refresh={token}"}) as resp:
        assert resp.status == 401
        assert (await resp.json())["error"] == "session_revoked"


async def test_cross_site_refresh_is_refused(gw: Gateway) -> None:
    token = (await gw.login("alice"))["refresh_token"]
    async with gw.http.post(f"{gw.url}/auth/refresh", headers={
            "Cookie": f"gw_refresh={token}", "Origin": "https://evil.example"}) as resp:
        assert resp.status == 403
    async with gw.http.post(f"{gw.url}/auth/refresh", headers={"Cookie": f"gw_refresh={token}"}) as resp:
        assert resp.status == 200  # the refused attempt did not use the token up


# --- logout ---------------------------------------------------------------------------------


async def test_logout_ends_the_session_and_clears_cookies(gw: Gateway) -> None:
    login = await gw.login("alice")
    async with gw.http.post(f"{gw.url}/auth/logout", headers={"Cookie": f"gw_refresh={login['refresh_token']}"}) as resp:
        assert resp.status == 204
        cleared = {name: morsel for name, morsel in resp.cookies.items()}
    assert cleared["gw_refresh"].value == "" and cleared["gw_refresh"]["path"] == "/"
    assert cleared["gw_access"].value == "" and cleared["gw_access"]["path"] == "/"
    assert cleared["gw_refresh"]["max-age"] == "0" and cleared["gw_refresh"]["httponly"]
    async with gw.http.post(f"{gw.url}/auth/refresh", headers={"Cookie": f"gw_refresh={login['refresh_token']}"}) as resp:
        assert resp.status == 401
        assert (await resp.json())["error"] == "session_revoked"
    sessions = await gw.store.list_sessions("alice")
    assert [s.revoked_reason for s in sessions] == ["logout"]


async def test_logout_from_a_form_lands_on_the_sign_in_page(gw: Gateway) -> None:
    login = await gw.login("alice")
    async with gw.http.post(f"{gw.url}/auth/logout", data={}, allow_redirects=False,
                            headers={"Cookie": f"gw_refresh={login['refresh_token']}"}) as resp:
        assert resp.status == 303
        assert resp.headers["Location"] == "/auth/login"
        assert resp.cookies["gw_refresh"]["max-age"] == "0"
    async with gw.http.post(f"{gw.url}/auth/refresh", headers={"Cookie": f"gw_refresh={login['refresh_token']}"}) as resp:
        assert resp.status == 401


async def test_logout_with_only_the_access_token(gw: Gateway) -> None:
    login = await gw.login("alice")
    async with gw.http.post(f"{gw.url}/auth/logout", headers={"Authorization": f"Bearer {login['access_token']}"}) as resp:
        assert resp.status == 204
    async with gw.http.post(f"{gw.url}/auth/refresh", headers={"Cookie": f"gw_refresh={login['refresh_token']}"}) as resp:
        assert resp.status == 401


async def test_logout_without_a_session_still_clears_cookies(gw: Gateway) -> None:
    async with gw.http.post(f"{gw.url}/auth/logout") as resp:
        assert resp.status == 204
        assert resp.cookies["gw_refresh"]["max-age"] == "0"


async def test_logout_all_ends_every_session_of_the_user(gw: Gateway) -> None:
    one, two = await gw.login("alice"), await gw.login("alice")
    other = await gw.login("bob")
    async with gw.http.post(f"{gw.url}/auth/logout-all", headers={"Authorization": f"Bearer {one['access_token']}"}) as resp:
        assert resp.status == 204
    for login, status in ((one, 401), (two, 401), (other, 200)):
        async with gw.http.post(f"{gw.url}/auth/refresh", headers={"Cookie": f"gw_refresh={login['refresh_token']}"}) as resp:
            assert resp.status == status
    async with gw.http.post(f"{gw.url}/auth/logout-all") as resp:
        assert resp.status == 401


async def test_logout_is_post_only_and_same_site(gw: Gateway) -> None:
    login = await gw.login("alice")
    async with gw.http.get(f"{gw.url}/auth/logout", headers={"Cookie": f"gw_refresh={login['refresh_token']}"}) as resp:
        assert resp.status == 405
    async with gw.http.post(f"{gw.url}/auth/logout", headers={
            "Cookie": f"gw_refresh={login['refresh_token']}", "Sec-Fetch-Site": "cross-site"}) as resp:
        assert resp.status == 403
    async with gw.http.post(f"{gw.url}/auth/refresh", headers={"Cookie": f"gw_refresh={login['refresh_token']}"}) as resp:
        assert resp.status == 200  # neither attempt ended the session


# --- me -------------------------------------------------------------------------------------


async def test_me_returns_the_claims(gw: Gateway) -> None:
    token = await gw.token("bob")
    async with gw.http.get(f"{gw.url}/auth/me", headers={"Authorization": f"Bearer {token}"}) as resp:
        assert resp.status == 200
        claims = await resp.json()
    assert claims["sub"] == "bob" and claims["roles"] == ["admin"]
    async with gw.http.get(f"{gw.url}/auth/me") as resp:
        assert resp.status == 401
        assert json.loads(await resp.text())["error"] == "unauthorized"
