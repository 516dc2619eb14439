"""The gateway's own endpoints under the auth prefix (``/auth`` by default).

Each handler reads the same way: check where the request comes from, parse a bounded body,
call sessions/tokens/credentials, answer. State-changing endpoints are POST-only and refuse
cross-site requests by ``Origin``/``Sec-Fetch-Site``.
"""

from __future__ import annotations

import asyncio
import html
import json
import logging
import time
from importlib import resources
from string import Template
from typing import Any
from urllib.parse import parse_qsl

from aiohttp import web
from aiohttp.typedefs import Handler
from multidict import CIMultiDict

from . import browser, cookies, errors, metrics, users
from .config import Registration
from .credentials import InvalidCredentials, belongs
from .errors import (
    BadRequest,
    Conflict,
    NotFound,
    PayloadTooLarge,
    RequestTimeout,
    TooManyRequests,
    Unauthorized,
    UnsupportedMediaType,
    UserError,
)
from .paths import safe_next
from .pipeline import authenticate
from .proxy import continue_if_expected, strip_hop_by_hop
from .sessions import RefreshRefused
from .state import GATEWAY, PATH, Gateway
from .store import Session, User

security = logging.getLogger("gateway.security")

BODY_TIMEOUT = 10.0  # seconds for a whole auth body to arrive
_PAGE = Template(resources.files(__package__).joinpath("login.html").read_text(encoding="utf-8"))
_NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}


def endpoints(prefix: str, *, registration: bool = False) -> dict[str, dict[str, Handler]]:
    return {
        **({f"{prefix}/register": {"POST": register}} if registration else {}),
        f"{prefix}/login": {"GET": login_page, "POST": login},
        f"{prefix}/refresh": {"POST": refresh},
        f"{prefix}/logout": {"POST": logout},
        f"{prefix}/logout-all": {"POST": logout_all},
        f"{prefix}/me": {"GET": me},
        f"{prefix}/sessions": {"GET": list_sessions},
        f"{prefix}/sessions/{{id}}": {"DELETE": end_session},
    }


# --- handlers -------------------------------------------------------------------------------


async def login_page(request: web.Request) -> web.Response:
    gw = request[GATEWAY]
    next_path = safe_next(request.query.get("next"))
    try:
        authenticate(gw, strip_hop_by_hop(request.raw_headers))
    except (Unauthorized, BadRequest):
        response = _page(gw, next_path, error="", status=200)
        cookies.set_probe(response, gw.config.cookies)
        return response
    return web.Response(status=303, headers={"Location": next_path, **_NO_STORE})  # signed in already


async def login(request: web.Request) -> web.StreamResponse:
    gw = request[GATEWAY]
    _refuse_cross_site(gw, request)
    fields, is_form = await _read_fields(request)
    username, password = fields.get("username"), fields.get("password")
    if not isinstance(username, str) or not isinstance(password, str) or not username \
            or len(username) > 256 or len(password) > 1024:
        raise BadRequest("invalid_request", "Send a username and a password as strings.")
    ip = gw.proxy.client_ip(request)
    inbound = strip_hop_by_hop(request.raw_headers)
    if is_form and not cookies.has_probe(inbound, gw.config.cookies):
        # The page set a cookie; a browser that did not send it back keeps no cookies for
        # this site, and signing it in would only lead back here.
        response = _page(gw, safe_next(fields.get("next")), status=400,
                         error="Your browser is not keeping cookies for this site. Allow them to sign in.")
        cookies.set_probe(response, gw.config.cookies)
        return response
    try:
        await gw.throttle.check(username, ip)
    except TooManyRequests as exc:
        metrics.login("throttled")
        security.warning("login_throttled", extra={"fields": {"user": username[:64], "ip": ip}})
        if is_form:
            response = _page(gw, safe_next(fields.get("next")), status=429,
                             error="Too many failed attempts. Wait a moment and try again.")
            response.headers.update(exc.headers)
            return response
        raise
    try:
        user = await gw.credentials.check(username, password)
        await _end_presented_session(gw, inbound)
        session, refresh_token = await gw.sessions.start(user, ip, request.headers.get("User-Agent", ""))
        user = await _as_it_is_now(gw, user, session)
    except Unauthorized as exc:
        await gw.throttle.failed(username, ip)
        metrics.login("failed")
        security.info("login_failed", extra={"fields": {"user": username[:64], "ip": ip,
                                                        "reason": exc.reason}})
        if is_form:
            return _page(gw, safe_next(fields.get("next")), status=401,
                         error="The user name or password is incorrect.")
        raise
    await gw.throttle.succeeded(username)
    metrics.login("ok")
    security.info("login_succeeded", extra={"fields": {"user": user.name, "sid": session.id, "ip": ip}})
    if is_form:
        response = web.Response(status=303, headers={"Location": safe_next(fields.get("next")), **_NO_STORE})
    else:
        response = web.Response()
    return _signed_in(gw, response, user, session, refresh_token)


async def _as_it_is_now(gw: Gateway, user: User, session: Session) -> User:
    """The user as the store has it now that the session exists. A ``users roles`` or
    ``users disable`` that ran while this login was hashing the password ended the sessions
    that existed then, not this one: read after the session was made, the row tells, and the
    new session either carries the roles as they are now or ends before its first token."""
    now = await gw.store.get_user(user.name)
    if now is None or now.disabled or not belongs(now, gw.config.users.source):
        await gw.store.revoke_session(session.id, gw.clock(), "user_disabled")
        raise InvalidCredentials().because("user_changed_during_login")
    return now


async def register(request: web.Request) -> web.StreamResponse:
    """Self-registration (``registration.enabled``): a new user of the store, signed in at
    once. Throttled like a login, and every attempt counts against its address."""
    gw = request[GATEWAY]
    _refuse_cross_site(gw, request)
    fields, _ = await _read_fields(request)
    username, password = fields.get("username"), fields.get("password")
    if not isinstance(username, str) or not isinstance(password, str) or len(username) > 256 \
            or len(password) > 1024:
        raise BadRequest("invalid_request", "Send a username and a password as strings.")
    try:
        username.encode(), password.encode()
    except UnicodeEncodeError:  # a lone surrogate from JSON: no text is made of that
        raise BadRequest("invalid_request", "Send a username and a password as UTF-8 text.") from None
    ip = gw.proxy.client_ip(request)
    await gw.throttle.check(username, ip)
    await gw.throttle.attempted(ip)
    try:
        users.check_registration(gw.config.registration, username, password)
    except UserError as exc:
        raise BadRequest(str(exc), _registration_problem(gw.config.registration, str(exc))) from None
    password_hash = await gw.credentials.hash(password)
    user = User(name=username, password_hash=password_hash, roles=gw.config.users.default_roles,
                created_at=gw.clock())
    try:
        if await users.look_alike_taken(gw.store, username):
            raise UserError("look-alike")
        await gw.store.add_user(user)
    except UserError:
        raise Conflict("username_taken", "This user name is taken.") from None
    session, refresh_token = await gw.sessions.start(user, ip, request.headers.get("User-Agent", ""))
    security.info("registered", extra={"fields": {"user": user.name, "sid": session.id, "ip": ip}})
    return _signed_in(gw, web.Response(status=201), user, session, refresh_token)


def _registration_problem(cfg: Registration, code: str) -> str:
    if code == "weak_password":
        return (f"Choose a longer, less common password: at least {cfg.min_password_length} characters, "
                "at least 4 different ones, not a common password and not your user name.")
    if cfg.username_pattern == Registration.username_pattern:
        return ("Choose another user name: 3 to 32 lower-case letters, digits, '.', '_' or '-', "
                "beginning with a letter or digit.")
    return (f"Choose another user name: one that matches {cfg.username_pattern}, of at most 64 "
            "letters, digits, '.', '_', '@' or '-', beginning with a letter or digit.")


async def refresh(request: web.Request) -> web.StreamResponse:
    gw = request[GATEWAY]
    _refuse_cross_site(gw, request)
    presented = cookies.read_all(strip_hop_by_hop(request.raw_headers), gw.config.cookies.refresh.name)
    if not presented:
        raise Unauthorized("invalid_token", "No refresh token was sent.")
    try:
        done = await gw.sessions.refresh_presented(presented, gw.proxy.client_ip(request))
    except RefreshRefused as exc:
        if exc.reason != "reused":  # (a replay is logged by sessions, with its user)
            security.info("refresh_refused", extra={"fields": {"reason": exc.reason,
                                                               "ip": gw.proxy.client_ip(request)}})
        response = errors.response(exc)
        cookies.clear(response, gw.config.cookies, gw.retired_cookies)
        return response
    return _signed_in(gw, web.Response(), done.user, done.session, done.refresh_token)


async def logout(request: web.Request) -> web.Response:
    gw = request[GATEWAY]
    _refuse_cross_site(gw, request)
    inbound = strip_hop_by_hop(request.raw_headers)
    # every session presented ends: with two refresh cookies, one may be someone else's
    ended = {session.id for token in cookies.read_all(inbound, gw.config.cookies.refresh.name)
             if (session := await gw.sessions.find(token)) is not None}
    if not ended:
        try:
            ended.add(authenticate(gw, inbound).sid)
        except (Unauthorized, BadRequest):
            pass  # nothing to end; the cookies are cleared all the same
    for session_id in sorted(ended):
        if await gw.sessions.end(session_id, "logout"):
            security.info("logout", extra={"fields": {"sid": session_id, "ip": gw.proxy.client_ip(request)}})
    if request.content_type == "application/x-www-form-urlencoded":
        # a sign-out button in a page: land on the sign-in page, not on an empty 204
        response = web.Response(status=303, headers={
            "Location": f"{gw.config.auth_prefix}/login", **_NO_STORE})
    else:
        response = web.Response(status=204, headers=_NO_STORE)
    cookies.clear(response, gw.config.cookies, gw.retired_cookies)
    return response


async def logout_all(request: web.Request) -> web.Response:
    gw = request[GATEWAY]
    _refuse_cross_site(gw, request)
    identity = authenticate(gw, strip_hop_by_hop(request.raw_headers))
    ended = await gw.sessions.end_all(identity.sub, "logout_all")
    security.info("logout_all", extra={"fields": {"user": identity.sub, "ended": ended,
                                                  "ip": gw.proxy.client_ip(request)}})
    response = web.Response(status=204, headers=_NO_STORE)
    cookies.clear(response, gw.config.cookies, gw.retired_cookies)
    return response


async def me(request: web.Request) -> web.Response:
    gw = request[GATEWAY]
    identity = authenticate(gw, strip_hop_by_hop(request.raw_headers))
    return web.json_response(identity.claims, headers=_NO_STORE)


async def list_sessions(request: web.Request) -> web.Response:
    """The signed-in user's live sessions: where and when each was used."""
    gw = request[GATEWAY]
    identity = authenticate(gw, strip_hop_by_hop(request.raw_headers))
    now = gw.clock()
    live = [s for s in await gw.store.list_sessions(identity.sub)
            if s.revoked_at is None and now < s.expires_at
            and now < s.last_used_at + gw.config.tokens.refresh_idle_ttl]
    return web.json_response({"sessions": [{
        "id": s.id,
        "created_at": _iso(s.created_at),
        "last_used_at": _iso(s.last_used_at),
        "expires_at": _iso(s.expires_at),
        "ip": s.ip,
        "user_agent": s.user_agent,
        "current": s.id == identity.sid,
    } for s in sorted(live, key=lambda s: s.last_used_at, reverse=True)]}, headers=_NO_STORE)


async def end_session(request: web.Request) -> web.Response:
    """End one of the signed-in user's own sessions (another device, say)."""
    gw = request[GATEWAY]
    _refuse_cross_site(gw, request)
    identity = authenticate(gw, strip_hop_by_hop(request.raw_headers))
    session_id = request[PATH].rsplit("/", 1)[1]
    session = await gw.store.get_session(session_id)
    if session is None or session.user != identity.sub or session.revoked_at is not None:
        raise NotFound("not_found", "You have no live session with this id.")  # never says whose it is
    await gw.sessions.end(session_id, "user_revoke")
    security.info("session_ended", extra={"fields": {"user": identity.sub, "sid": session_id,
                                                     "ip": gw.proxy.client_ip(request)}})
    response = web.Response(status=204, headers=_NO_STORE)
    if session_id == identity.sid:
        cookies.clear(response, gw.config.cookies, gw.retired_cookies)
    return response


# --- helpers --------------------------------------------------------------------------------


async def _end_presented_session(gw: Gateway, inbound: CIMultiDict[str]) -> None:
    """A sign-in always starts a new session, never continues one a browser brought along
    (possibly planted by someone else: session fixation); that one is ended."""
    for token in cookies.read_all(inbound, gw.config.cookies.refresh.name):
        session = await gw.sessions.find(token)
        if session is not None and session.revoked_at is None:
            await gw.sessions.end(session.id, "replaced_by_login")


def _refuse_cross_site(gw: Gateway, request: web.Request) -> None:
    """CSRF: state-changing endpoints take requests from the gateway's own origin (and from
    the other origins ``auth_cors`` lists) only."""
    allowed = gw.config.auth_cors.origins if gw.config.auth_cors else frozenset()
    browser.refuse_cross_site(gw, request, allowed)


def _iso(timestamp: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))


def _signed_in(gw: Gateway, response: web.Response, user: User, session: Session,
               refresh_token: str) -> web.Response:
    """Mint an access token for ``session`` and put it and the refresh token on
    ``response``: the access token in the body for API clients, both in cookies."""
    access_token, expires_in = gw.tokens.issue(user.name, user.roles, session.id, user.claims)
    if response.status in (200, 201):
        response.text = json.dumps({"access_token": access_token, "token_type": "Bearer",
                                    "expires_in": expires_in})
        response.content_type = "application/json"
        response.headers.update(_NO_STORE)
    cfg = gw.config.cookies
    cookies.set_access(response, cfg, access_token, min(expires_in, gw.sessions.remaining(session)))
    cookies.set_refresh(response, cfg, refresh_token, gw.sessions.remaining(session))
    return response


async def _read_fields(request: web.Request) -> tuple[dict[str, Any], bool]:
    """The body as fields, and whether it was a form. At most ``limits.auth_body`` bytes
    are read, whether or not the client declared a length."""
    limit = request[GATEWAY].config.limits.auth_body
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge()
    kind = request.content_type
    if kind not in ("application/json", "application/x-www-form-urlencoded"):
        raise UnsupportedMediaType()
    await continue_if_expected(request)
    try:
        body = await asyncio.wait_for(_read_at_most(request, limit + 1), BODY_TIMEOUT)
    except asyncio.TimeoutError:
        raise RequestTimeout() from None
    if len(body) > limit:
        raise PayloadTooLarge()
    try:
        text = body.decode("utf-8")
        if kind == "application/json":
            data = json.loads(text)
            if not isinstance(data, dict):
                raise ValueError("not an object")
            return data, False
        return dict(parse_qsl(text, keep_blank_values=True, max_num_fields=20)), True
    except ValueError:  # includes UnicodeDecodeError and JSONDecodeError
        raise BadRequest("invalid_request", "The body is not valid JSON or form data.") from None


async def _read_at_most(request: web.Request, limit: int) -> bytes:
    body = b""
    while len(body) < limit:
        more = await request.content.read(limit - len(body))
        if not more:
            break
        body += more
    return body


def _page(gw: Gateway, next_path: str, *, error: str, status: int) -> web.Response:
    look = gw.config.login_page
    page = _PAGE.substitute(
        title=html.escape(look.title),
        accent=look.accent_color,  # validated as #rgb or #rrggbb
        logo=f'<img class="logo" src="{look.logo}" alt="">' if look.logo else "",
        action=html.escape(f"{gw.config.auth_prefix}/login"),
        next=html.escape(next_path),
        error=html.escape(error),
        error_hidden="" if error else "hidden",
    )
    return web.Response(text=page, content_type="text/html", status=status, headers={
        **_NO_STORE,
        "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; img-src data:; "
                                   "form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        "X-Frame-Options": "DENY",
        "Referrer-Policy": "same-origin",
    })
