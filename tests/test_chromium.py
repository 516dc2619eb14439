"""Real flows in a real browser: Debian's Chromium, headless, driven by Playwright.

The upstream is the example legacy app (``gateway.demo_app``, which also serves the
single-page app of ``examples/spa`` under ``/spa/``); the gateway in front of it is
conftest's in-process one, on a real port, with a ``FakeClock``. A ``/echo/**`` route goes
to conftest's recording upstream, so that a test can see what a POST delivered. Every test
gets a fresh browser context; nothing sleeps: Playwright's waits have timeouts.

``GATEWAY_SCREENSHOTS=1`` also writes docs/sign-in.png and docs/spa.png.
(The same flows over plain HTTP are in test_browser.py.)
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from gateway import demo_app

from conftest import PASSWORDS, Gateway, GatewayFactory, Upstream

try:
    from playwright.async_api import (
        Browser,
        BrowserContext,
        Locator,
        Page,
        Playwright,
        Route,
        async_playwright,
        expect,
    )
except ImportError:  # pragma: no cover
    pytest.skip("playwright is not installed: below Python 3.12 the test extra leaves it out (httpbin "
                "pins greenlet<3, playwright needs >=3.1); pip install 'playwright>=1.50', as .ci/run does",
                allow_module_level=True)

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TIMEOUT_MS = 10_000
DOCS = Path(__file__).resolve().parent.parent / "docs"
SCREENSHOTS = os.environ.get("GATEWAY_SCREENSHOTS") == "1"
ACCESS_TTL = 15 * 60

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason=f"no Chromium at {CHROMIUM} "
                       "(Debian: apt-get install chromium; .ci/run installs it)"),
]

expect.set_options(timeout=TIMEOUT_MS)

# --- the upstream, the gateway, the browser -------------------------------------------------


@pytest.fixture(scope="module")
def legacy_app() -> Iterator[str]:
    server = demo_app.make_server("127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture
async def gw(gateway_factory: GatewayFactory, legacy_app: str, upstream: Upstream) -> Gateway:
    def change(raw: dict[str, Any]) -> None:
        # The port is not known before the gateway listens, so there is no public_url: the
        # Origin of a POST to /auth/* is compared with the Host header instead.
        del raw["public_url"]
        raw["upstreams"] = {
            "app": {"url": legacy_app, "timeout": "5s", "connect_timeout": "1s"},
            "echo": {"url": upstream.url, "timeout": "5s", "connect_timeout": "1s"},
        }
        raw["cookies"] = {"secure": False}
        raw["routes"] = [
            {"path": "/static/**", "access": "public", "upstream": "app"},
            {"path": "/spa/**", "access": "public", "upstream": "app"},
            {"path": "/admin/**", "access": {"roles": ["admin"]}, "upstream": "app"},
            {"path": "/echo/**", "access": "authenticated", "upstream": "echo"},
            {"path": "/**", "access": "authenticated", "upstream": "app"},
        ]

    return await gateway_factory(change)


@pytest.fixture
async def playwright() -> AsyncIterator[Playwright]:
    # async, in the test's own event loop: the in-process gateway is served by that loop too
    async with async_playwright() as p:
        yield p


@pytest.fixture
async def browser(playwright: Playwright) -> AsyncIterator[Browser]:
    browser = await playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=ARGS)
    yield browser
    await browser.close()


@pytest.fixture
async def context(browser: Browser) -> AsyncIterator[BrowserContext]:
    context = await browser.new_context(viewport={"width": 900, "height": 720}, locale="en-US")
    context.set_default_timeout(TIMEOUT_MS)
    yield context
    await context.close()


# --- helpers --------------------------------------------------------------------------------


async def submit_sign_in(page: Page, gw: Gateway, path: str) -> None:
    """Submit the sign-in form: its POST must answer 303, and the browser land on ``path``."""
    async with page.expect_navigation() as navigation:
        await page.click("button[type=submit]")
    response = await navigation.value
    assert response is not None
    posted = response.request.redirected_from
    answer = await posted.response() if posted else response
    assert answer is not None and answer.status == 303, \
        f"POST /auth/login answered {answer and answer.status}: {await response.text()}"
    assert (response.request.method, response.status, page.url) == ("GET", 200, f"{gw.url}{path}")


async def sign_in_from_a_script(page: Page, gw: Gateway, user: str = "alice") -> None:
    """Sign in the way the single-page app does: a JSON POST to /auth/login from a page of
    the gateway's own origin; the answer sets the same two cookies as the form's. The flows
    that are not about the form start this way."""
    await page.goto(f"{gw.url}/static/hello.txt")
    status = await page.evaluate("""async ([username, password]) => {
        const r = await fetch("/auth/login", {method: "POST", headers: {"Content-Type": "application/json"},
                              body: JSON.stringify({username, password})});
        return r.status;
    }""", [user, PASSWORDS[user]])
    assert status == 200
    await page.goto(f"{gw.url}/")
    await expect(hello(page)).to_have_text(f"Hello, {user}.")


def hello(page: Page) -> Locator:
    return page.locator("p", has_text="Hello,")


async def cookie_jar(context: BrowserContext) -> dict[str, dict[str, Any]]:
    return {c["name"]: dict(c) for c in await context.cookies()}


async def screenshot(page: Page, name: str) -> None:
    if SCREENSHOTS:
        DOCS.mkdir(exist_ok=True)
        await page.screenshot(path=str(DOCS / name), full_page=True)


# --- the legacy app behind the gateway ------------------------------------------------------


async def test_sign_in_with_the_form(gw: Gateway, context: BrowserContext) -> None:
    page = await context.new_page()
    response = await page.goto(f"{gw.url}/")
    assert response is not None and response.status == 200
    await expect(page).to_have_url(f"{gw.url}/auth/login?next=/")
    first = response.request.redirected_from
    assert first is not None and first.url == f"{gw.url}/"
    first_response = await first.response()
    assert first_response is not None and first_response.status == 302
    await expect(page.locator("input[name=next]")).to_have_value("/")
    await page.fill("#username", "alice")
    await screenshot(page, "sign-in.png")
    await page.fill("#password", PASSWORDS["alice"])
    await submit_sign_in(page, gw, "/")
    await expect(hello(page)).to_have_text("Hello, alice.")
    assert {"gw_access", "gw_refresh"} <= set(await cookie_jar(context))


async def test_signed_in_navigation_and_cookies(gw: Gateway, context: BrowserContext) -> None:
    page = await context.new_page()
    await page.goto(f"{gw.url}/")
    await expect(page).to_have_url(f"{gw.url}/auth/login?next=/")  # (it set the probe cookie)
    await sign_in_from_a_script(page, gw)
    await expect(page.locator("p", has_text="Your roles")).to_have_text("Your roles: user.")

    response = await page.goto(f"{gw.url}/whoami")
    assert response is not None and response.status == 200
    assert await response.json() == {"user": "alice", "roles": "user"}
    response = await page.goto(f"{gw.url}/admin/")
    assert response is not None and response.status == 403
    assert response.headers["content-type"].startswith("application/json")
    assert (await response.json())["error"] == "forbidden"

    jar = await cookie_jar(context)
    assert set(jar) == {"gw_access", "gw_refresh", "gw_probe"}
    expected = {"gw_access": "Lax", "gw_refresh": "Strict", "gw_probe": "Lax"}
    for name, same_site in expected.items():
        cookie = jar[name]
        assert (cookie["httpOnly"], cookie["sameSite"], cookie["path"], cookie["secure"]) == \
            (True, same_site, "/", False), cookie
        assert cookie["domain"] == "127.0.0.1"
    await page.goto(f"{gw.url}/")
    assert await page.evaluate("document.cookie") == ""  # no script sees a token


async def test_an_expired_access_token_is_renewed_without_a_detour(
    gw: Gateway, context: BrowserContext, upstream: Upstream
) -> None:
    page = await context.new_page()
    await sign_in_from_a_script(page, gw)
    before = await cookie_jar(context)

    gw.clock.advance(ACCESS_TTL + 60)  # the browser still sends the access cookie; it is dead
    response = await page.reload()
    assert response is not None and response.status == 200
    assert response.request.redirected_from is None and page.url == f"{gw.url}/"
    await expect(hello(page)).to_have_text("Hello, alice.")
    renewed = await cookie_jar(context)
    assert renewed["gw_access"]["value"] != before["gw_access"]["value"]
    assert renewed["gw_refresh"]["value"] != before["gw_refresh"]["value"]

    # A fetch() POST from the page, after the next expiry: it completes as alice, renewed.
    gw.clock.advance(ACCESS_TTL + 60)
    result = await page.evaluate("""async () => {
        const r = await fetch("/echo/notes?x=1", {method: "POST", body: "note=hi",
                              headers: {"Content-Type": "application/x-www-form-urlencoded"}});
        return {status: r.status, body: await r.json()};
    }""")
    assert result["status"] == 200
    assert (result["body"]["method"], result["body"]["target"]) == ("POST", "/echo/notes?x=1")
    seen = upstream.seen[-1]
    assert seen.header("X-Auth-User") == ["alice"] and seen.body == b"note=hi"
    assert seen.header("Cookie") == []  # the gateway's cookies never reach the app
    after_fetch = await cookie_jar(context)
    assert after_fetch["gw_refresh"]["value"] != renewed["gw_refresh"]["value"]

    # A form posted from the page (a navigation), after the next expiry. The legacy app's
    # only form is its Sign out button, so the page is given one.
    gw.clock.advance(ACCESS_TTL + 60)
    await page.evaluate("""() => {
        const form = document.createElement("form");
        form.method = "post";
        form.action = "/echo/form";
        form.innerHTML = '<input name="note" value="from a form"><button id="send">Send</button>';
        document.body.append(form);
    }""")
    async with page.expect_navigation() as navigation:
        await page.click("#send")
    response = await navigation.value
    assert response is not None and response.status == 200 and page.url == f"{gw.url}/echo/form"
    assert response.request.method == "POST" and response.request.redirected_from is None
    seen = upstream.seen[-1]
    assert (seen.method, seen.target, seen.body) == ("POST", "/echo/form", b"note=from+a+form")
    assert seen.header("X-Auth-User") == ["alice"]
    assert (await cookie_jar(context))["gw_refresh"]["value"] != after_fetch["gw_refresh"]["value"]


async def test_two_tabs_renewing_at_once_keep_each_other_signed_in(gw: Gateway, context: BrowserContext) -> None:
    tabs = [await context.new_page(), await context.new_page()]
    await sign_in_from_a_script(tabs[0], gw)
    await tabs[1].goto(f"{gw.url}/")
    await expect(hello(tabs[1])).to_have_text("Hello, alice.")
    gw.clock.advance(ACCESS_TTL + 60)

    # Hold both reloads in the browser until both have started, so that both carry the same
    # expired access cookie and the same refresh cookie to the gateway.
    held: list[Route] = []
    both = asyncio.Event()

    async def hold(route: Route) -> None:
        held.append(route)
        if len(held) == 2:
            both.set()
        await asyncio.wait_for(both.wait(), TIMEOUT_MS / 1000)
        await route.continue_()

    await context.route(f"{gw.url}/", hold)
    responses = await asyncio.gather(*(tab.reload() for tab in tabs))
    await context.unroute(f"{gw.url}/", hold)
    successors = set()
    for tab, response in zip(tabs, responses, strict=True):
        assert response is not None and response.status == 200 and tab.url == f"{gw.url}/"
        await expect(hello(tab)).to_have_text("Hello, alice.")
        set_cookies = await response.header_values("set-cookie")
        successors |= {c.split(";")[0] for c in set_cookies if c.startswith("gw_refresh=")}
    assert len(successors) == 1  # both tabs were renewed, with the same successor

    for tab in tabs:  # neither tab was signed out by the other's renewal
        response = await tab.reload()
        assert response is not None and response.status == 200
        await expect(hello(tab)).to_have_text("Hello, alice.")
    gw.clock.advance(ACCESS_TTL + 60)  # past reuse_grace too: the cookie held is the live one
    for tab in tabs:
        response = await tab.reload()
        assert response is not None and response.status == 200 and tab.url == f"{gw.url}/"
        await expect(hello(tab)).to_have_text("Hello, alice.")
    sessions = await gw.store.list_sessions("alice")
    assert len(sessions) == 1 and sessions[0].revoked_at is None


async def test_sign_out_ends_the_session(gw: Gateway, context: BrowserContext) -> None:
    page = await context.new_page()
    await sign_in_from_a_script(page, gw)
    old_refresh = (await cookie_jar(context))["gw_refresh"]["value"]

    await page.get_by_role("button", name="Sign out").click()
    await page.wait_for_url(f"{gw.url}/auth/login")
    await expect(page.locator("#username")).to_be_visible()
    assert {"gw_access", "gw_refresh"}.isdisjoint(await cookie_jar(context))

    await page.goto(f"{gw.url}/")
    await expect(page).to_have_url(f"{gw.url}/auth/login?next=/")
    [session] = await gw.store.list_sessions("alice")
    assert session.revoked_at is not None and session.revoked_reason == "logout"

    async with gw.http.post(f"{gw.url}/auth/refresh", headers={"Cookie": f"gw_refresh={old_refresh}"}) as resp:
        assert resp.status == 401
        assert (await resp.json())["error"] == "session_revoked"
    # ...and a browser that still had it is sent to the sign-in page, not let in
    await context.add_cookies([{"name": "gw_refresh", "value": old_refresh, "url": gw.url,
                                "httpOnly": True, "sameSite": "Strict"}])
    await page.goto(f"{gw.url}/")
    await expect(page).to_have_url(f"{gw.url}/auth/login?next=/")
    assert "gw_refresh" not in await cookie_jar(context)  # the gateway cleared it


async def test_the_next_parameter_cannot_send_the_browser_elsewhere(gw: Gateway, context: BrowserContext) -> None:
    elsewhere: list[str] = []
    context.on("request", lambda request: elsewhere.append(request.url)
               if urlsplit(request.url).netloc != f"127.0.0.1:{gw.port}" else None)
    page = await context.new_page()
    await page.goto(f"{gw.url}/auth/login?next=//evil.example/x")
    await expect(page.locator("input[name=next]")).to_have_value("/")
    await page.fill("#username", "alice")
    await page.fill("#password", PASSWORDS["alice"])
    await submit_sign_in(page, gw, "/")
    assert urlsplit(page.url)[:3] == ("http", f"127.0.0.1:{gw.port}", "/")
    await expect(hello(page)).to_have_text("Hello, alice.")
    assert elsewhere == []


async def test_a_browser_refusing_cookies_is_told_so(gw: Gateway, playwright: Playwright, tmp_path: Path) -> None:
    # Chromium's own setting "Don't allow sites to save data" (content setting cookies: block),
    # in the profile it starts with.
    profile = tmp_path / "profile"
    (profile / "Default").mkdir(parents=True)
    (profile / "Default" / "Preferences").write_text(json.dumps(
        {"profile": {"default_content_setting_values": {"cookies": 2}}}))
    context = await playwright.chromium.launch_persistent_context(
        str(profile), executable_path=str(CHROMIUM), headless=True, args=ARGS, locale="en-US")
    try:
        context.set_default_timeout(TIMEOUT_MS)
        page = context.pages[0] if context.pages else await context.new_page()
        posts: list[str] = []
        page.on("request", lambda request: posts.append(request.url) if request.method == "POST" else None)
        await page.goto(f"{gw.url}/whoami")
        await expect(page).to_have_url(f"{gw.url}/auth/login?next=/whoami")
        assert await context.cookies() == []  # the probe cookie was refused: the premise holds
        for attempt in (1, 2):
            await page.fill("#username", "alice")
            await page.fill("#password", PASSWORDS["alice"])
            async with page.expect_navigation() as navigation:
                await page.click("button[type=submit]")
            response = await navigation.value
            assert response is not None and response.status == 400
            await expect(page).to_have_url(f"{gw.url}/auth/login")
            await expect(page.locator("#error")).to_have_text(
                "Your browser is not keeping cookies for this site. Allow them to sign in.")
            await expect(page.locator("input[name=next]")).to_have_value("/whoami")
            assert len(posts) == attempt  # one POST per click: no redirect loop
        assert await context.cookies() == []
        assert await gw.store.list_sessions("alice") == []  # and no session was started
    finally:
        await context.close()


# --- the single-page app --------------------------------------------------------------------


async def test_single_page_app(gw: Gateway, context: BrowserContext) -> None:
    page = await context.new_page()
    body, summary = page.locator("body"), page.locator("#batch-summary")

    async def storage_is_empty() -> None:
        assert await page.evaluate("[localStorage.length, sessionStorage.length, document.cookie]") == [0, 0, ""]

    async def call_five(refreshes: int) -> None:
        await page.click("#call-many")
        await expect(summary).to_have_attribute("data-refreshes", str(refreshes))
        await expect(summary).to_have_attribute("data-state", "done")
        await expect(summary).to_have_attribute("data-calls", "5")
        await expect(summary).to_have_attribute("data-ok", "5")
        suffix = "1 refresh" if refreshes == 1 else f"{refreshes} refreshes"
        await expect(summary).to_have_text(f"5 calls: 5 succeeded, {suffix}.")
        results = page.locator("#results li")
        await expect(results).to_have_count(5)
        for i in range(5):
            await expect(results.nth(i)).to_have_attribute("data-status", "200")
            await expect(results.nth(i)).to_have_attribute("data-ok", "true")
            await expect(results.nth(i).locator(".body")).to_have_text('{"user": "alice", "roles": "user"}')

    await page.goto(f"{gw.url}/spa/")
    await expect(body).to_have_attribute("data-state", "signed-out")  # the refresh at load: 401
    await expect(page.locator("#refresh-count")).to_have_text("1")
    await page.fill("#username", "alice")
    await page.fill("#password", PASSWORDS["alice"])
    await page.click("#signin-button")
    await expect(body).to_have_attribute("data-state", "signed-in")
    await expect(page.locator("#user")).to_have_text("alice (roles: user)")
    await storage_is_empty()

    await call_five(refreshes=0)
    await page.click("#spoil-token")
    await call_five(refreshes=1)
    await expect(page.locator("#refresh-count")).to_have_text("2")
    await storage_is_empty()
    await screenshot(page, "spa.png")

    await page.reload()  # the token in memory is gone; the refresh cookie signs the page in
    await expect(body).to_have_attribute("data-state", "signed-in")
    await expect(page.locator("#user")).to_have_text("alice (roles: user)")
    await expect(page.locator("#refresh-count")).to_have_text("1")
    await call_five(refreshes=0)

    await page.click("#signout")
    await expect(body).to_have_attribute("data-state", "signed-out")
    await expect(page.locator("#signin-form")).to_be_visible()
    await expect(page.locator("#status")).to_have_text("Signed out.")
    assert {"gw_access", "gw_refresh"}.isdisjoint(await cookie_jar(context))
    [session] = await gw.store.list_sessions("alice")
    assert session.revoked_reason == "logout"
    await page.reload()  # no session to come back to
    await expect(body).to_have_attribute("data-state", "signed-out")
    await expect(page.locator("#signin-form")).to_be_visible()
    await storage_is_empty()
