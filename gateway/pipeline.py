"""A proxied request, top to bottom: match route -> authenticate -> authorize -> forward (or,
for a WebSocket upgrade, relay)."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from aiohttp import web
from multidict import CIMultiDict

from . import cookies, websockets
from .config import Access
from .errors import BadRequest, Forbidden, InvalidToken, Unauthorized
from .paths import Target
from .proxy import strip_hop_by_hop
from .state import ROUTE, USER, Gateway
from .tokens import Identity


async def handle(gw: Gateway, request: web.Request, target: Target) -> web.StreamResponse:
    route, access = gw.routes.decide(request.method, target.path, target.query)
    request[ROUTE] = route
    inbound = strip_hop_by_hop(request.raw_headers)
    identity = None
    if not access.is_public:
        try:
            identity = authenticate(gw, inbound)
        except Unauthorized:
            if is_navigation(request.method, inbound):
                return login_redirect(gw, target)
            raise
        request[USER] = identity.sub
        authorize(access, identity)
    headers = gw.proxy.upstream_headers(request, inbound, identity)
    if websockets.is_upgrade(request):
        return await websockets.relay(gw, request, target, route, headers, identity)
    return await gw.proxy.forward(request, target, route, headers)


def authenticate(gw: Gateway, inbound: CIMultiDict[str]) -> Identity:
    """The identity of a valid access token from ``Authorization: Bearer`` or, failing
    that, the access cookie. Unauthorized when there is none; InvalidToken when the one
    presented is not valid."""
    token = bearer_token(inbound) or cookies.read(inbound, gw.config.cookies.access.name)
    if token is None:
        raise Unauthorized()
    identity = gw.tokens.verify(token)
    if gw.revocations.is_revoked(identity.sid):
        raise InvalidToken().because("session_revoked")
    return identity


def bearer_token(headers: CIMultiDict[str]) -> str | None:
    values = headers.getall("Authorization", [])
    if len(values) > 1:
        raise BadRequest("invalid_request", "Send at most one Authorization header.")
    if not values:
        return None
    scheme, _, token = values[0].partition(" ")
    if scheme.lower() != "bearer":
        return None  # another scheme is not ours to judge; it is not forwarded either
    if not token or token != token.strip():
        raise InvalidToken().because("malformed")
    return token


def authorize(access: Access, identity: Identity) -> None:
    if access.kind != "rules":
        return
    if access.roles and access.roles.isdisjoint(identity.roles):
        raise Forbidden("forbidden", "Your roles do not allow this.").because("role")
    for name, wanted in access.claims:
        if not _claim_holds(identity.claims.get(name), wanted):
            raise Forbidden("forbidden", "Your claims do not allow this.").because(f"claim:{name}")


def _claim_holds(value: Any, wanted: str | int | bool) -> bool:
    """Equal in value *and* type (``true`` is not ``1``), or a list holding such a value."""
    if isinstance(value, list):
        return any(type(v) is type(wanted) and v == wanted for v in value)
    return type(value) is type(wanted) and value == wanted


def is_navigation(method: str, headers: CIMultiDict[str]) -> bool:
    """A browser loading a page, which wants the sign-in page rather than a 401. Script
    traffic (fetch, XHR) must see the 401 so that it can refresh."""
    if method not in ("GET", "HEAD") or "text/html" not in headers.get("Accept", ""):
        return False
    if headers.get("Sec-Fetch-Mode", "navigate").lower() != "navigate":
        return False
    return "X-Requested-With" not in headers


def login_redirect(gw: Gateway, target: Target) -> web.Response:
    location = f"{gw.config.auth_prefix}/login?next={quote(target.path_qs, safe='/')}"
    return web.Response(status=302, headers={"Location": location, "Cache-Control": "no-store"})
