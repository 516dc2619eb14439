"""Browsers over HTTP: renewal at the edge, coming back from another site, CSRF, CORS,
tokens in two places, session fixation and the sign-in page. (Real Chromium drives the
same flows in test_chromium.py.)"""

from __future__ import annotations

import asyncio
import base64
import logging
from pathlib import Path
from typing import Any

import pytest

from gateway.sessions import hash_token

from conftest import PASSWORDS, Gateway, GatewayFactory, Upstream

HTML = {"Accept": "text/html,application/xhtml+xml", "Sec-Fetch-Mode": "navigate", "Sec-Fetch-Site": "same-origin"}


def _cookies(resp: Any) -> dict[str, Any]:
    return {name: morsel for name, morsel in resp.cookies.items()}


# --- renewal at the edge --------------------------------------------------------------------


async def test_an_expired_access_cookie_is_renewed_at_the_edge(gw: Gateway, upstream: Upstream) -> None:
    login = await gw.login("alice")
    gw.clock.advance(16 * 60)  # the access token is dead, the session is not
    cookie = f"gw_access={login['access_token']}; gw_refresh={login['refresh_token']}"
    for method, extra in (("GET", HTML), ("POST", {"Content-Type": "application/x-www-form-urlencoded"})):
        async with gw.http.request(method, f"{gw.url}/reports?x=1", headers={"Cookie": cookie, **extra},
                                   data=b"a=1" if method == "POST" else None, allow_redirects=False) as resp:
            assert resp.status == 200  # the original request completes, no redirect
            renewed = _cookies(resp)
        assert upstream.seen[-1].header("X-Auth-User") == ["alice"]
        assert upstream.seen[-1].method == method and upstream.seen[-1].target == "/reports?x=1"
        assert upstream.seen[-1].header("Cookie") == []  # neither cookie reaches the app
        assert renewed["gw_access"].value != login["access_token"] and renewed["gw_access"]["httponly"]
        assert int(renewed["gw_access"]["max-age"]) == 900
        assert renewed["gw_refresh"].value != login["refresh_token"]
        cookie = f"gw_access={renewed['gw_access'].value}; gw_refresh={renewed['gw_refresh'].value}"
        gw.clock.advance(16 * 60)


async def test_tabs_renewing_at_once_agree(gw: Gateway, upstream: Upstream) -> None:
    login = await gw.login("alice")
    gw.clock.advance(16 * 60)
    cookie = f"gw_access={login['access_token']}; gw_refresh={login['refresh_token']}"

    async def tab() -> tuple[int, str]:
        async with gw.http.get(f"{gw.url}/page", headers={"Cookie": cookie, **HTML}) as resp:
            return resp.status, resp.cookies["gw_refresh"].value

    results = await asyncio.gather(*(tab() for _ in range(6)))
    assert {status for status, _ in results} == {200}
    assert len({token for _, token in results}) == 1  # one successor: no tab logs out another


async def test_api_clients_refresh_for_themselves(gw: Gateway, upstream: Upstream) -> None:
    login = await gw.login("alice")
    gw.clock.advance(16 * 60)
    async with gw.http.get(f"{gw.url}/api/x", headers={
            "Authorization": f"Bearer {login['access_token']}",
            "Cookie": f"gw_refresh={login['refresh_token']}"}) as resp:
        assert resp.status == 401
        assert "Set-Cookie" not in resp.headers
    assert upstream.seen == []


async def test_a_dead_session_is_not_renewed_and_its_cookies_go(gw: Gateway, upstream: Upstream) -> None:
    login = await gw.login("alice")
    async with gw.http.post(f"{gw.url}/auth/logout", headers={"Authorization": f"Bearer {login['access_token']}"}):
        pass
    gw.clock.advance(16 * 60)
    async with gw.http.get(f"{gw.url}/page", allow_redirects=False, headers={
            "Cookie": f"gw_access={login['access_token']}; gw_refresh={login['refresh_token']}", **HTML}) as resp:
        assert resp.status == 302
        assert resp.headers["Location"] == "/auth/login?next=/page"
        assert resp.cookies["gw_refresh"]["max-age"] == "0" and resp.cookies["gw_access"]["max-age"] == "0"
    assert upstream.seen == []


async def test_coming_back_from_another_site_reloads_once_then_signs_in(gw: Gateway, upstream: Upstream) -> None:
    # A Strict refresh cookie is not sent when a link on another site opens the app.
    cross = {**HTML, "Sec-Fetch-Site": "cross-site"}
    async with gw.http.get(f"{gw.url}/reports?id=7", headers=cross, allow_redirects=False) as resp:
        assert resp.status == 200
        page = await resp.text()
    assert '<meta http-equiv="refresh" content="0;url=/reports?id=7">' in page
    # the reload comes from our own origin: with a refresh cookie it is renewed at the edge...
    login = await gw.login("alice")
    async with gw.http.get(f"{gw.url}/reports?id=7", allow_redirects=False,
                           headers={"Cookie": f"gw_refresh={login['refresh_token']}", **HTML}) as resp:
        assert resp.status == 200
    assert upstream.seen[-1].header("X-Auth-User") == ["alice"]
    # ...and without one it goes to the sign-in page: one hop, never a loop
    async with gw.http.get(f"{gw.url}/reports?id=7", headers=HTML, allow_redirects=False) as resp:
        assert resp.status == 302


async def test_cookies_disabled_is_said_not_looped(gw: Gateway) -> None:
    async with gw.http.get(f"{gw.url}/auth/login?next=/x") as resp:
        assert resp.cookies["gw_probe"].value == "1"  # a browser that keeps cookies sends it back
    form = {"username": "alice", "password": PASSWORDS["alice"], "next": "/x"}
    async with gw.http.post(f"{gw.url}/auth/login", data=form, allow_redirects=False) as resp:
        assert resp.status == 400
        assert "not keeping cookies" in await resp.text()
        assert "gw_refresh" not in resp.cookies
    assert await gw.store.list_sessions("alice") == []


# --- the sign-in page -----------------------------------------------------------------------


async def test_sign_in_page_is_self_contained_accessible_and_branded(
    gateway_factory: GatewayFactory, tmp_path: Path
) -> None:
    logo = tmp_path / "logo.svg"
    logo.write_bytes(b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>')

    def brand(raw: dict[str, Any]) -> None:
        raw["login_page"] = {"title": "Acme <Intranet>", "accent_color": "#aa3300", "logo_file": str(logo)}

    gw = await gateway_factory(brand)
    async with gw.http.get(f"{gw.url}/auth/login") as resp:
        page = await resp.text()
        csp = resp.headers["Content-Security-Policy"]
    assert "<title>Acme &lt;Intranet&gt;</title>" in page and "--accent: #aa3300" in page
    assert f'src="data:image/svg+xml;base64,{base64.b64encode(logo.read_bytes()).decode()}"' in page
    assert "default-src 'none'" in csp and "img-src data:" in csp
    assert "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "") and "https://" not in page
    assert '<label for="username">' in page and '<label for="password">' in page
    assert 'role="alert"' in page and ":focus-visible" in page


async def test_sign_in_page_when_already_signed_in_goes_on(gw: Gateway) -> None:
    token = await gw.token("alice")
    async with gw.http.get(f"{gw.url}/auth/login?next=/reports", headers={"Cookie": f"gw_access={token}"},
                           allow_redirects=False) as resp:
        assert resp.status == 303
        assert resp.headers["Location"] == "/reports"
    async with gw.http.get(f"{gw.url}/auth/login?next=//evil.example", headers={"Cookie": f"gw_access={token}"},
                           allow_redirects=False) as resp:
        assert resp.headers["Location"] == "/"  # SEC-54: the same validator everywhere


# --- CSRF -----------------------------------------------------------------------------------


async def test_login_ends_a_session_the_browser_brought_along(gw: Gateway) -> None:
    planted = await gw.login("bob")  # SEC-46: someone else's session, planted in the browser
    async with gw.http.post(f"{gw.url}/auth/login", json={"username": "alice", "password": PASSWORDS["alice"]},
                            headers={"Cookie": f"gw_refresh={planted['refresh_token']}"}) as resp:
        assert resp.status == 200
        assert resp.cookies["gw_refresh"].value != planted["refresh_token"]
    session = await gw.store.session_of_refresh(hash_token(planted["refresh_token"]))
    assert session is not None and session.revoked_reason == "replaced_by_login"


async def test_a_second_refresh_cookie_is_refused_not_guessed_at(
        gw: Gateway, upstream: Upstream, caplog: pytest.LogCaptureFixture) -> None:
    # SEC-42/43: a sibling subdomain can plant its own refresh cookie (Domain= the parent, a
    # longer Path, so the browser sends it first). Neither is taken for the other.
    caplog.set_level(logging.INFO, logger="gateway.security")
    alice, planted = await gw.login("alice"), await gw.login("bob")
    both = f"gw_refresh={planted['refresh_token']}; gw_refresh={alice['refresh_token']}"
    async with gw.http.post(f"{gw.url}/auth/refresh", headers={"Cookie": both}) as resp:
        assert (resp.status, (await resp.json())["error"]) == (401, "ambiguous_credentials")
        assert resp.cookies["gw_refresh"]["max-age"] == "0"
    gw.clock.advance(16 * 60)  # at the edge too: no renewal from either, the sign-in page instead
    async with gw.http.get(f"{gw.url}/page", allow_redirects=False, headers={
            "Cookie": f"gw_access={alice['access_token']}; {both}", **HTML}) as resp:
        assert (resp.status, resp.headers["Location"]) == (302, "/auth/login?next=/page")
        assert resp.cookies["gw_refresh"]["max-age"] == "0"
    assert upstream.seen == []
    refused = [getattr(r, "fields", {}) for r in caplog.records if r.getMessage() == "refresh_refused"]
    assert [(f["reason"], f.get("at")) for f in refused] == [("several_refresh_tokens", None),
                                                              ("several_refresh_tokens", "edge")]
    for login in (alice, planted):  # nothing was rotated: each still works on its own
        session = await gw.store.session_of_refresh(hash_token(login["refresh_token"]))
        assert session is not None and session.revoked_at is None
    same = f"gw_refresh={alice['refresh_token']}; gw_refresh={alice['refresh_token']}"
    async with gw.http.post(f"{gw.url}/auth/refresh", headers={"Cookie": same}) as resp:
        assert resp.status == 200  # the same cookie twice is one cookie
        alice["refresh_token"] = resp.cookies["gw_refresh"].value
    # signing out ends every session presented, so the user's own is never left running
    async with gw.http.post(f"{gw.url}/auth/logout", headers={
            "Cookie": f"gw_refresh={planted['refresh_token']}; gw_refresh={alice['refresh_token']}"}) as resp:
        assert resp.status == 204
    for login in (alice, planted):
        session = await gw.store.session_of_refresh(hash_token(login["refresh_token"]))
        assert session is not None and session.revoked_reason == "logout"


@pytest.mark.parametrize("headers", [
    {"Origin": "https://evil.example"}, {"Sec-Fetch-Site": "cross-site"}, {"Origin": "null"},
    {"Referer": "https://evil.example/page"},
])
async def test_auth_endpoints_refuse_other_sites(gw: Gateway, headers: dict[str, str]) -> None:
    login = await gw.login("alice")  # SEC-44
    for path in ("/auth/refresh", "/auth/logout", "/auth/logout-all"):
        async with gw.http.post(f"{gw.url}{path}", headers={
                **headers, "Cookie": f"gw_refresh={login['refresh_token']}; gw_access={login['access_token']}"}) as resp:
            assert resp.status == 403, path
            assert (await resp.json())["error"] == "csrf"
    async with gw.http.post(f"{gw.url}/auth/refresh", headers={
            "Cookie": f"gw_refresh={login['refresh_token']}", "Referer": "http://gateway.test/app"}) as resp:
        assert resp.status == 200  # our own page


async def test_a_browser_saying_same_origin_is_believed_over_a_null_origin(gw: Gateway) -> None:
    # Chromium posts a form from a page with Referrer-Policy: no-referrer with Origin: null;
    # Sec-Fetch-Site, which no page can forge, still says same-origin.
    login = await gw.login("alice")
    async with gw.http.post(f"{gw.url}/auth/refresh", headers={
            "Origin": "null", "Sec-Fetch-Site": "same-origin", "Cookie": f"gw_refresh={login['refresh_token']}"}) as resp:
        assert resp.status == 200
    async with gw.http.post(f"{gw.url}/auth/refresh", headers={
            "Origin": "http://gateway.test", "Sec-Fetch-Site": "cross-site"}) as resp:
        assert resp.status == 403  # and a browser saying cross-site is believed too


async def test_the_optional_csrf_guard_for_an_upstream(gateway_factory: GatewayFactory, upstream: Upstream) -> None:
    def guard(raw: dict[str, Any]) -> None:
        raw["routes"].insert(0, {"path": "/forms/**", "access": "authenticated", "csrf": True})

    gw = await gateway_factory(guard)
    cookie = {"Cookie": f"gw_access={await gw.token('alice')}"}
    async with gw.http.post(f"{gw.url}/forms/transfer", headers={**cookie, "Origin": "https://evil.example"}) as resp:
        assert resp.status == 403
        assert (await resp.json())["error"] == "csrf"
    assert upstream.seen == []
    async with gw.http.get(f"{gw.url}/forms/transfer", headers={**cookie, "Sec-Fetch-Site": "cross-site"}) as resp:
        assert resp.status == 200  # reading is not changing
    async with gw.http.post(f"{gw.url}/forms/transfer", headers={**cookie, "Origin": "http://gateway.test"}) as resp:
        assert resp.status == 200
    async with gw.http.post(f"{gw.url}/profile", headers={**cookie, "Origin": "https://evil.example"}) as resp:
        assert resp.status == 200  # routes without the guard are the app's own business


# --- CORS -----------------------------------------------------------------------------------


def _cors(raw: dict[str, Any]) -> None:
    raw["routes"].insert(0, {"path": "/api/**", "access": "authenticated", "cors": {
        "origins": ["https://spa.example"], "methods": ["GET", "POST"], "headers": ["Authorization", "Content-Type"],
        "credentials": True, "max_age": "10m"}})
    raw["auth_cors"] = {"origins": ["https://spa.example"], "credentials": True}


async def test_preflights_are_answered_by_the_gateway_without_a_token(
    gateway_factory: GatewayFactory, upstream: Upstream
) -> None:
    gw = await gateway_factory(_cors)
    preflight = {"Origin": "https://spa.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type"}
    async with gw.http.options(f"{gw.url}/api/items", headers={**preflight, "Accept": "text/html"}) as resp:
        assert resp.status == 204
        assert resp.headers["Access-Control-Allow-Origin"] == "https://spa.example"
        assert resp.headers["Access-Control-Allow-Credentials"] == "true"
        assert resp.headers["Access-Control-Allow-Methods"] == "GET, POST"
        assert resp.headers["Access-Control-Max-Age"] == "600" and resp.headers["Vary"] == "Origin"
    for refused in ({**preflight, "Origin": "https://evil.example"}, {**preflight, "Access-Control-Request-Method": "DELETE"},
                    {**preflight, "Access-Control-Request-Headers": "x-secret"}):
        async with gw.http.options(f"{gw.url}/api/items", headers=refused, allow_redirects=False) as resp:
            assert resp.status == 403  # never a 401, never a redirect
            assert (await resp.json())["error"] == "cors_denied"
            if refused["Origin"] != "https://spa.example":
                assert "Access-Control-Allow-Origin" not in resp.headers
    async with gw.http.options(f"{gw.url}/profile", headers=preflight) as resp:  # no cors on this route
        assert resp.status == 403
    assert upstream.seen == []


async def test_answers_to_an_allowed_origin_are_readable_there(gateway_factory: GatewayFactory, upstream: Upstream) -> None:
    gw = await gateway_factory(_cors)
    origin = {"Origin": "https://spa.example"}
    async with gw.http.get(f"{gw.url}/api/items", headers=origin) as resp:
        assert resp.status == 401  # the SPA must be able to read the 401 to refresh
        assert resp.headers["Access-Control-Allow-Origin"] == "https://spa.example"
    token = await gw.token("alice")
    async with gw.http.get(f"{gw.url}/api/items", headers={**origin, "Authorization": f"Bearer {token}"}) as resp:
        assert resp.status == 200 and resp.headers["Access-Control-Allow-Origin"] == "https://spa.example"
    async with gw.http.get(f"{gw.url}/api/items", headers={"Origin": "https://evil.example",
                                                           "Authorization": f"Bearer {token}"}) as resp:
        assert "Access-Control-Allow-Origin" not in resp.headers
    # the gateway's own endpoints, for an SPA on that origin (auth_cors)
    login = await gw.login("alice")
    async with gw.http.options(f"{gw.url}/auth/refresh", headers={
            **origin, "Access-Control-Request-Method": "POST"}) as resp:
        assert resp.status == 204 and resp.headers["Access-Control-Allow-Credentials"] == "true"
    async with gw.http.post(f"{gw.url}/auth/refresh", headers={
            **origin, "Cookie": f"gw_refresh={login['refresh_token']}"}) as resp:
        assert resp.status == 200 and resp.headers["Access-Control-Allow-Origin"] == "https://spa.example"


# --- a token in two places (SEC-36) ---------------------------------------------------------


async def test_tokens_of_two_users_are_refused(gw: Gateway, upstream: Upstream) -> None:
    alice, bob = await gw.token("alice"), await gw.token("bob")
    async with gw.http.get(f"{gw.url}/profile", headers={"Authorization": f"Bearer {alice}",
                                                         "Cookie": f"gw_access={bob}"}) as resp:
        assert resp.status == 401
        assert (await resp.json())["error"] == "ambiguous_credentials"
    assert upstream.seen == []
    other_alice = await gw.token("alice")  # two tokens of one user (two tabs): the Bearer one decides
    async with gw.http.get(f"{gw.url}/profile", headers={"Authorization": f"Bearer {alice}",
                                                         "Cookie": f"gw_access={other_alice}"}) as resp:
        assert resp.status == 200
    async with gw.http.get(f"{gw.url}/profile", headers={"Authorization": "Bearer forged.token.value",
                                                         "Cookie": f"gw_access={alice}"}) as resp:
        assert resp.status == 401  # a Bearer token, when sent, is the credential
