"""``gateway routes explain`` and the route warnings of ``gateway check``: what the gateway
would do with one request, told from the same functions that decide it when serving
(aiohttp's HTTP request parser, paths.normalize, app.own_endpoint, RouteTable.route_for,
routes.required, pipeline.authorize, Proxy.upstream_url), so the explanation cannot drift
from the behaviour.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

from aiohttp import http_exceptions
from aiohttp.base_protocol import BaseProtocol
from aiohttp.http_parser import HttpRequestParser

from . import admin, cors, errors
from .app import own_endpoint, own_endpoints, own_handler
from .config import Access, Config, Route
from .errors import BadRequest, Forbidden, GatewayError, MethodNotAllowed, NotFound, Unauthorized
from .paths import normalize
from .pipeline import authorize
from .proxy import Proxy
from .routes import RouteTable, access_for, allowed_methods, offending_override, shadowed
from .tokens import Identity

ClaimValue = str | int | bool | list[str | int | bool]


@dataclass(frozen=True)
class Caller:
    """Who is asking: anonymous (``roles is None``), or authenticated with these roles and
    claims."""

    roles: tuple[str, ...] | None = None
    claims: Mapping[str, ClaimValue] = field(default_factory=dict)

    @property
    def anonymous(self) -> bool:
        return self.roles is None

    def as_json(self) -> dict[str, Any]:
        return {"anonymous": self.anonymous, "roles": list(self.roles or ()), "claims": dict(self.claims)}

    def describe(self) -> str:
        if self.roles is None:
            return "anonymous"
        text = f"authenticated, roles [{', '.join(self.roles)}]"
        if self.claims:
            text += ", claims " + ", ".join(f"{k}={_value(v)}" for k, v in self.claims.items())
        return text


@dataclass
class Explanation:
    method: str
    target: str  # as asked
    caller: Caller
    path: str | None = None  # normalized; None when refused before that
    query: str = ""
    endpoint: str | None = None  # one of the gateway's own endpoints
    route: Route | None = None
    access: Access | None = None  # what the route requires of this method
    allowed: bool = False
    status: int = 200
    code: str | None = None  # the stable error code when refused
    why: str = ""
    upstream_url: str | None = None
    notes: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        route = None
        if self.route is not None:
            r = self.route
            route = {"index": r.index, "pattern": r.path,
                     "methods": sorted(allowed_methods(r)) if _restricted(r) else None,
                     "upstream": r.upstream, "strip_prefix": r.strip_prefix or None,
                     "access": describe_access(self.access) if self.access else None}
        return {"method": self.method, "target": self.target, "path": self.path,
                "query": self.query if self.path is not None else None, "endpoint": self.endpoint, "route": route, "caller": self.caller.as_json(),
                "decision": "allowed" if self.allowed else "refused", "status": self.status,
                "code": self.code, "why": self.why, "upstream_url": self.upstream_url,
                "notes": self.notes}

    def lines(self) -> list[str]:
        out = [f"request   {self.method} {self.target}"]
        if self.path is not None:
            as_sent = self.target.partition("?")[0]
            out.append(f"path      {self.path}" + ("" if self.path == as_sent else "  (normalized)"))
            if self.query:
                out.append(f"query     {self.query}  (forwarded as sent; takes no part in route matching)")
        if self.endpoint is not None:
            out.append(f"endpoint  {self.endpoint} (served by the gateway itself, not proxied)")
        if self.route is not None:
            r = self.route
            methods = ", ".join(sorted(allowed_methods(r))) if _restricted(r) else "any"
            out.append(f"route     routes[{r.index}] {r.path}  methods: {methods}  upstream: {r.upstream}"
                       + (f"  strip_prefix: {r.strip_prefix}" if r.strip_prefix else ""))
            if self.access is not None:
                out.append(f"access    {self.method}: {describe_access(self.access)}")
        out.append(f"caller    {self.caller.describe()}")
        if self.allowed:
            where = f": forwarded to {self.upstream_url}" if self.upstream_url else f": {self.why}"
            out.append(f"decision  allowed{where}")
        else:
            out.append(f"decision  refused: {self.status} {self.code}: {self.why}")
        out += [f"note      {note}" for note in self.notes]
        return out


def explain(config: Config, method: str, target: str, caller: Caller) -> Explanation:
    """What the gateway answers ``method target`` from ``caller``, and why. The method is
    taken as written: the request line ``method target HTTP/1.1`` goes through the HTTP
    parser the server uses, which refuses what it does not know (lower-case methods, say)."""
    ex = Explanation(method=method, target=target, caller=caller)
    by_parser = _refused_by_parser(method, target)
    if by_parser is not None:
        ex.status, ex.code, ex.why = by_parser
        return ex
    if method == "CONNECT":
        # aiohttp reads any CONNECT target as an authority (host:port), which its router
        # answers 404 before the gateway sees the request: the gateway tunnels nothing.
        ex.status, ex.code = 404, "not_found"
        ex.why = "CONNECT is answered 404 before any route is looked at (the gateway tunnels nothing)"
        return ex
    try:
        normalized = normalize(target)
        ex.path, ex.query = normalized.path, normalized.query
        own = own_endpoint(own_endpoints(config), config, normalized.path)
        if own is not None:
            ex.endpoint = normalized.path
            own_handler(own, method)
            ex.allowed, ex.why = True, "the gateway answers it (its own rules apply, e.g. /auth/me needs a token)"
            if admin.kept_from_routes(config.metrics, normalized.path):
                ex.notes.append(admin.where(config.metrics))
            return ex
        table = RouteTable(config.routes)
        ex.route = route = table.route_for(normalized.path)
        _preflight_note(ex, route)
        ex.access = _access_for_explaining(route, method)
        access = table.decide(method, normalized.path, normalized.query)[1]
        if not access.is_public:
            if caller.roles is None:
                raise Unauthorized()
            authorize(access, _identity(caller))
    except GatewayError as refused:
        ex.allowed, ex.status, ex.code = False, refused.status, refused.code
        ex.why = _why(ex, refused, config)
        if ex.path is not None and admin.kept_from_routes(config.metrics, ex.path):
            ex.notes.append(admin.where(config.metrics))
        return ex
    ex.allowed = True
    ex.upstream_url = str(Proxy(config).upstream_url(route, normalized))
    return ex


def route_warnings(config: Config) -> list[str]:
    """One line per route that can never match: shadowed by an earlier route, or at a path
    the gateway serves itself; in route order."""
    out: list[tuple[int, str]] = []
    for s in shadowed(config.routes):
        if s.other_case_only:
            line = (f"routes[{s.route.index}] {s.route.path} is matched only when spelled in another case: "
                    f"routes[{s.by.index}] {s.by.path} comes first and matches it as written (public "
                    f"routes match case-sensitively)")
        else:
            line = (f"routes[{s.route.index}] {s.route.path} is never matched: routes[{s.by.index}] "
                    f"{s.by.path} comes first and matches every path it would")
        lost = _methods_lost(s.by, s.route)
        if lost:
            line += f"; requests for {lost} get 405 there (methods never fall through)"
        elif _access_differs(s.by, s.route):
            line += f"; those requests get its access ({_route_access(s.by)}), not {_route_access(s.route)}"
        out.append((s.route.index, line))
    table = own_endpoints(config)
    for route in config.routes:
        literal = route.path.removesuffix("**").removesuffix("*").rstrip("/") or "/"
        prefix = config.auth_prefix.lower()
        under_prefix = literal.lower() == prefix or literal.lower().startswith(prefix + "/")
        if under_prefix or (route.path == literal and route.path in table):
            out.append((route.index, f"routes[{route.index}] {route.path} is never matched: "
                        + (f"{config.auth_prefix} and everything below it belong to the gateway"
                           if under_prefix else f"{route.path} is served by the gateway itself")))
        elif route.path == literal and admin.kept_from_routes(config.metrics, literal):
            out.append((route.index, f"routes[{route.index}] {route.path} is never matched: the main listener "
                        f"answers it 404 ({admin.where(config.metrics)})"))
    return [line for _index, line in sorted(out, key=lambda item: item[0])]


def describe_access(access: Access) -> str:
    if access.kind != "rules":
        return access.kind
    parts = []
    if access.roles:
        parts.append(("role " if len(access.roles) == 1 else "any of roles ") + ", ".join(sorted(access.roles)))
    parts += [f"claim {name}={_value(want)}" for name, want in access.claims]
    return "authenticated with " + " and ".join(parts)


# --- helpers --------------------------------------------------------------------------------


def _identity(caller: Caller) -> Identity:
    roles = caller.roles or ()
    claims: dict[str, Any] = {"sub": "(caller)", **caller.claims, "roles": list(roles)}
    sub = claims["sub"] if isinstance(claims["sub"], str) else "(caller)"
    return Identity(sub=sub, roles=roles, sid="", jti="", exp=0.0, claims=claims, token="")


def _access_for_explaining(route: Route, method: str) -> Access | None:
    """The route's rule for ``method``, or None when the method is not allowed there (the
    refusal itself comes from RouteTable.decide)."""
    try:
        return access_for(route, method)
    except MethodNotAllowed:
        return None


def _refused_by_parser(method: str, target: str) -> tuple[int, str, str] | None:
    """(status, code, why) when the server's HTTP parser refuses the request line
    ``method target HTTP/1.1``, answered as server.py answers it; None when it takes it."""
    if any(c in method + target for c in "\r\n") or not method:
        return 400, "invalid_request", "a request line cannot hold that: the method and target are one line each"
    loop = asyncio.new_event_loop()
    try:
        parser = HttpRequestParser(BaseProtocol(loop), loop, 2**16)
        parser.feed_data(f"{method} {target} HTTP/1.1\r\nHost: gateway\r\n\r\n".encode("utf-8", "surrogateescape"))
    except http_exceptions.HttpProcessingError as exc:
        refused = errors.for_status(exc.code, HTTPStatus(exc.code).phrase)
        reason = (exc.message or type(exc).__name__).split(":", 1)[0].strip()
        return refused.status, refused.code, (f"the HTTP parser refuses the request line before the gateway "
                                              f"sees it ({reason}; methods are case-sensitive, and only the "
                                              f"ones it knows are taken)")
    finally:
        loop.close()
    return None


def _why(ex: Explanation, refused: GatewayError, config: Config) -> str:
    auth_prefix = config.auth_prefix
    route, access, caller = ex.route, ex.access, ex.caller
    where = f"routes[{route.index}]" if route else ""
    if isinstance(refused, MethodNotAllowed):
        override = offending_override(route, ex.method, ex.query) if route else None
        asked = override if override and route and _access_for_explaining(route, ex.method) else ex.method
        allowed = refused.headers["Allow"]
        named = f"method {asked}" + (" (named by _method in the query)" if asked != ex.method else "")
        return f"{named} not allowed on {where or ex.endpoint} ({allowed})"
    if isinstance(refused, NotFound):
        prefix, path = auth_prefix.lower(), (ex.path or "").lower()
        if path == prefix or path.startswith(prefix + "/"):
            return f"{auth_prefix} belongs to the gateway, which serves nothing at {ex.path}"
        if admin.kept_from_routes(config.metrics, ex.path or ""):
            if config.metrics.listen is not None:
                return (f"the main listener answers the metrics path ({ex.path}: /metrics in any case, with or "
                        f"without a trailing slash) 404, whatever the routes say")
            return (f"{ex.path} is another spelling of the metrics path: only /metrics itself is served, the "
                    f"others get 404, whatever the routes say")
        return f"no route matches {ex.path} (a path no route matches is denied)"
    if isinstance(refused, BadRequest):
        if refused.code == "ambiguous_method" and route is not None:
            override = offending_override(route, ex.method, ex.query) or ""
            other = _access_for_explaining(route, override)
            return (f"the query names _method={override}, which needs "
                    f"{describe_access(other) if other else '?'} on {where} while {ex.method} needs "
                    f"{describe_access(access) if access else '?'} (refused rather than guessed at)")
        return refused.description
    if isinstance(refused, Unauthorized):
        needs = f"a token ({describe_access(access)})" if access else "a token"
        navigation = " (a browser navigation gets a 302 to the sign-in page instead)" \
            if ex.method in {"GET", "HEAD"} else ""
        return f"{where} needs {needs}; caller is anonymous{navigation}"
    if isinstance(refused, Forbidden) and access is not None:
        if refused.reason == "role":
            held = ", ".join(caller.roles or ())
            return f"needs {describe_access(access).removeprefix('authenticated with ')}; caller has [{held}]"
        if refused.reason.startswith("claim:"):
            name = refused.reason.removeprefix("claim:")
            want = dict(access.claims)[name]
            has = caller.claims.get(name)
            held = f"caller has {name}={_value(has)}" if has is not None else f"caller has no {name} claim"
            return f"claim {name}={_value(want)} required; {held}"
    return refused.description


def _preflight_note(ex: Explanation, route: Route) -> None:
    if ex.method != "OPTIONS":
        return
    if route.cors is None:
        ex.notes.append(f"a CORS preflight here (OPTIONS with Origin and Access-Control-Request-Method) "
                        f"is refused: 403 cors_denied (routes[{route.index}] has no cors)")
        return
    methods = cors.preflight_methods(route.cors, allowed_methods(route))
    ex.notes.append(f"a CORS preflight here is answered by the gateway without a token: origins "
                    f"{', '.join(sorted(route.cors.origins))}; methods {', '.join(sorted(methods))}")


def _restricted(route: Route) -> bool:
    return route.methods is not None or "*" not in route.access


def _methods_lost(by: Route, route: Route) -> str:
    """The methods ``route`` would serve that ``by`` answers with 405, as text; "" if none."""
    if not _restricted(by):
        return ""
    allowed = allowed_methods(by)
    if _restricted(route):
        lost = sorted(allowed_methods(route) - allowed)
        return ", ".join(lost)
    return f"methods other than {', '.join(sorted(allowed))}"


def _route_access(route: Route) -> str:
    if set(route.access) == {"*"}:
        return describe_access(route.access["*"])
    return "; ".join(f"{m}: {describe_access(a)}" for m, a in sorted(route.access.items()))


def _access_differs(a: Route, b: Route) -> bool:
    return dict(a.access) != dict(b.access)


def _value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    return str(value)
