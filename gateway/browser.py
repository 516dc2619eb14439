"""The browser half: telling page loads from script traffic, renewing an expired access
token at the edge, and refusing cross-site requests.

**Edge refresh.** A browser carries the access token in a cookie that lives as long as the
token (``access_ttl``). When that token is missing or expired on a request that carries the
refresh cookie (and no ``Authorization`` header: API clients refresh for themselves), the
gateway exchanges the refresh token as ``POST /auth/refresh`` would, lets the original
request through as the session's user, and puts both renewed cookies on whatever answers
it. So a page load, a form post or a ``fetch`` after a coffee break just works, with no
redirect. Tabs that renew at the same moment all get the same successor token (see
sessions.py), so they never log each other out.

The refresh cookie is therefore scoped to ``/`` (and ``SameSite=Strict``), not to the auth
path: it must reach the gateway on every request for this to work. No upstream ever sees it.

**Coming back from another site.** A ``Strict`` cookie is not sent when a link on another
site opens the app. When such a navigation has no valid access token, the gateway answers
once with a tiny page that reloads the same address from the gateway's own origin, where
the refresh cookie is sent; if there is still no session, the reload (now same-origin) goes
to the sign-in page. One extra hop, never a loop.
"""

from __future__ import annotations

import html
import logging
from urllib.parse import quote, urlsplit

from aiohttp import web
from multidict import CIMultiDict

from . import cookies, metrics, websockets
from .errors import Forbidden, Unauthorized
from .paths import Target
from .sessions import RefreshRefused
from .state import CLEAR_COOKIES, ERROR, IP, RENEWED, Gateway, Renewal
from .tokens import Identity

security = logging.getLogger("gateway.security")

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})


def is_navigation(method: str, headers: CIMultiDict[str]) -> bool:
    """A browser loading a page, which wants the sign-in page rather than a 401. Script
    traffic (fetch, XHR) must see the 401 so that it can refresh."""
    if method not in ("GET", "HEAD") or "text/html" not in headers.get("Accept", ""):
        return False
    if headers.get("Sec-Fetch-Mode", "navigate").lower() != "navigate":
        return False
    return "X-Requested-With" not in headers


async def refresh_at_edge(gw: Gateway, request: web.Request, inbound: CIMultiDict[str]) -> Identity | None:
    """The session's identity, renewed from the refresh cookie, or None when there is none
    to renew (no cookie, an API client, or a dead session: its cookies are then cleared)."""
    if "Authorization" in inbound:
        return None
    presented = cookies.read_all(inbound, gw.config.cookies.refresh.name)
    if not presented:
        return None
    try:
        done = await gw.sessions.refresh_presented(presented, request.get(IP, ""))
    except RefreshRefused as exc:
        request[CLEAR_COOKIES] = True
        if exc.reason != "reused":
            security.info("refresh_refused", extra={"fields": {"reason": exc.reason, "at": "edge",
                                                               "ip": request.get(IP, "")}})
        return None
    access_token, _ = gw.tokens.issue(done.user.name, done.user.roles, done.session.id,
                                         done.user.claims)
    request[RENEWED] = Renewal(access_token, done.refresh_token, gw.sessions.remaining(done.session))
    return gw.tokens.verify(access_token)


def unauthenticated(gw: Gateway, request: web.Request, inbound: CIMultiDict[str], target: Target,
                    refused: Unauthorized) -> web.Response:
    """What a request without a usable session gets: for a page load, the sign-in page (or,
    arriving from another site, one same-origin reload first); for anything else, the 401.
    Every refused access token of a proxied request passes here, and is counted."""
    metrics.auth_failure(refused.reason)
    request[ERROR] = refused.reason  # for the access log, whichever answer follows
    if not is_navigation(request.method, inbound):
        raise refused
    if (inbound.get("Sec-Fetch-Site", "").lower() == "cross-site"
            and gw.config.cookies.refresh.same_site == "Strict"):
        return _reload_from_here(target)
    return login_redirect(gw, target)


def login_redirect(gw: Gateway, target: Target) -> web.Response:
    location = f"{gw.config.auth_prefix}/login?next={quote(target.path_qs, safe='/')}"
    return web.Response(status=302, headers={"Location": location, "Cache-Control": "no-store"})


def _reload_from_here(target: Target) -> web.Response:
    url = html.escape(target.path_qs, quote=True)
    page = (f'<!doctype html><meta charset="utf-8"><meta http-equiv="refresh" content="0;url={url}">'
            f'<title>Signing you in</title><p><a href="{url}">Continue</a></p>')
    return web.Response(text=page, content_type="text/html", headers={
        "Cache-Control": "no-store",
        "Content-Security-Policy": "default-src 'none'; frame-ancestors 'none'",
        "Referrer-Policy": "no-referrer",
    })


# --- cross-site requests --------------------------------------------------------------------


def same_origin(gw: Gateway, request: web.BaseRequest, also: frozenset[str] = frozenset()) -> bool:
    """Whether a browser sent this from the gateway's own origin (or one of ``also``).

    ``Sec-Fetch-Site`` is set by the browser itself and no page can forge it, so when it
    says ``same-origin`` that settles it (even with ``Origin: null``, which Chromium sends
    for a form posted from a page with ``Referrer-Policy: no-referrer``). Otherwise the
    origin comes from ``Origin``, or from ``Referer`` for older browsers. A request with
    none of these headers is not from a browser page, so it carries no ambient credentials
    worth forging."""
    site = request.headers.get("Sec-Fetch-Site", "").lower() or None
    if site in ("same-origin", "none"):
        return True
    origin = request.headers.get("Origin")
    if origin is None:
        referer = request.headers.get("Referer")
        if referer:
            parts = urlsplit(referer)
            origin = f"{parts.scheme}://{parts.netloc}" if parts.scheme and parts.netloc else "null"
    if origin is None:
        return site is None
    if origin in also:
        return True
    if site is not None:
        return False  # the browser says another site sent it
    if gw.config.public_url is not None:
        return origin == gw.config.public_url
    parts = urlsplit(origin)
    return parts.scheme in ("http", "https") and parts.netloc == request.host


def refuse_cross_site(gw: Gateway, request: web.BaseRequest, also: frozenset[str] = frozenset()) -> None:
    if not same_origin(gw, request, also):
        raise Forbidden("csrf", "Cross-site requests are not allowed here.").because("csrf")


def guard_upstream(gw: Gateway, request: web.Request, csrf: bool, allowed: frozenset[str]) -> None:
    """A route's opt-in CSRF guard: an app behind the gateway that never had to think about
    cross-site requests gets none that change state (anything but GET, HEAD, OPTIONS), and
    no WebSocket opened from another site: its handshake is a GET, but the socket then
    sends whatever it likes with the user's cookies (cross-site WebSocket hijacking)."""
    if csrf and (request.method not in SAFE_METHODS or websockets.is_upgrade(request)):
        refuse_cross_site(gw, request, allowed)
