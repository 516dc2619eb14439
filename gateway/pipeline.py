"""A proxied request, top to bottom: match route -> authenticate -> authorize -> forward (or,
for a WebSocket upgrade, relay)."""

from __future__ import annotations

from typing import Any

from aiohttp import web
from multidict import CIMultiDict

from . import browser, cookies, cors, websockets
from .config import Access
from .errors import BadRequest, Forbidden, InvalidToken, Unauthorized
from .paths import Target
from .proxy import strip_hop_by_hop
from .routes import allowed_methods, required
from .state import CORS, ROUTE, USER, Gateway
from .tokens import Identity


async def handle(gw: Gateway, request: web.Request, target: Target) -> web.StreamResponse:
    route = gw.routes.route_for(target.path)
    request[ROUTE] = route
    if origin := cors.allowed_origin(route.cors, request):
        request[CORS] = (route.cors, origin)
    if cors.is_preflight(request):  # answered here: a preflight never carries a token
        return cors.preflight(route.cors, request, allowed_methods(route))
    access = required(route, request.method, target.query)
    browser.guard_upstream(gw, request, route.csrf, route.cors.origins if route.cors else frozenset())
    inbound = strip_hop_by_hop(request.raw_headers)
    identity = None
    if not access.is_public:
        try:
            identity = authenticate(gw, inbound)
        except Unauthorized as refused:
            identity = await browser.refresh_at_edge(gw, request, inbound)
            if identity is None:
                return browser.unauthenticated(gw, request, inbound, target, refused)
        request[USER] = identity.sub
        authorize(access, identity)
    headers = gw.proxy.upstream_headers(request, inbound, identity)
    if websockets.is_upgrade(request):
        return await websockets.relay(gw, request, target, route, headers, identity)
    return await gw.proxy.forward(request, target, route, headers)


def authenticate(gw: Gateway, inbound: CIMultiDict[str]) -> Identity:
    """The identity of a valid access token from ``Authorization: Bearer`` or, failing
    that, the access cookie. Unauthorized when there is none; InvalidToken when the one
    presented is not valid. A Bearer token and a cookie of two different users are refused
    (``ambiguous_credentials``) rather than one of them guessed at."""
    bearer = bearer_token(inbound)
    cookie = cookies.read(inbound, gw.config.cookies.access.name)
    token = bearer or cookie
    if token is None:
        raise Unauthorized()
    identity = _verified(gw, token)
    if bearer is not None and cookie is not None and cookie != bearer:
        try:
            other = _verified(gw, cookie)
        except Unauthorized:
            return identity  # a stale cookie beside a good Bearer token: the token decides
        if other.sub != identity.sub:
            raise Unauthorized("ambiguous_credentials", "The request carries the tokens of two users.")
    return identity


def _verified(gw: Gateway, token: str) -> Identity:
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
