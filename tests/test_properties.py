"""Property tests: whatever the path, method and headers, the gateway forwards only what its
own route table allows, exactly in the form it decided on.

Design. Hypothesis drives a *blocking* raw-socket client, and that client runs on a worker
thread (``asyncio.to_thread``) while the test's event loop keeps serving the in-process
gateway (``gateway_factory``) and its upstream. So the async fixtures stay as they are, the
``@given`` function is an ordinary sync function built inside the test (it closes over the
running gateway's port and tokens), and every example is one real HTTP/1.1 request sent as
raw bytes, so no client library tidies the path first. Requests go one at a time with
``Connection: close``; an upstream records a request before it answers, and the gateway
answers only after the upstream has, so once the client has read the whole response the
upstream's records for that request are complete.

Each example is checked against three upstreams, one gateway each:

- ``strict``: the recording upstream of conftest (records the raw request line and headers).
- ``lenient``: a Tomcat/WSGI-like app. It strips ``;params`` from every segment, decodes
  percent-escapes once more than HTTP does, lower-cases the path, removes dot segments and
  merges slashes; and it reads header names with ``_`` and ``.`` collapsed into ``-``.
- ``dead``: nothing listens; every forwarded request must be a 502 (or 504).

Properties, per example, on what each upstream actually received:

(a) without a valid token, anything that reaches the upstream is on a path (and method) that
    the gateway's own table (``RouteTable`` + ``normalize`` on the path the upstream saw) says
    is public;
(b) with alice's token (role ``user``), nothing reaches an ``/admin/**`` path, and more
    generally nothing that the table would not let alice have;
(c) no 5xx, except 502/504 from the dead upstream;
(d) what is forwarded is what was decided: one request upstream, whose request line is the
    normalized form of the one sent (same path and query, method upper-cased), and whose
    decision (on the normalized path) admits the sender;
(e) identity and forwarding headers reach the upstream only as the gateway set them, for
    every spelling that collapses onto theirs.

(a) and (b) are also checked on the path as a lenient app would read what the upstream got
(``;params`` stripped, lower-cased, percent-decoded once): that catches a gateway that
decides and forwards consistently but in a form an ordinary app reads differently. For the
lenient upstream they are checked once more on *its* reading (decoding twice): anonymous
users reach only what the table calls public, alice never an admin path.

A double-decoding upstream would turn ``%252e%252e`` into ``..`` and ``%2561dmin`` into
``admin``; the gateway refuses an escaped escape (``%25`` and two hex digits) with 400, and
``test_double_decoding_upstream_sees_admin_paths`` pins those inputs down.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

import pytest
from aiohttp import web
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from gateway.errors import BadRequest, Forbidden, MethodNotAllowed, NotFound
from gateway.paths import normalize
from gateway.pipeline import authorize
from gateway.routes import RouteTable
from gateway.tokens import Identity

from conftest import Gateway, GatewayFactory, Upstream

pytestmark = pytest.mark.slow

MAX_EXAMPLES = 800  # per upstream; three upstreams

# --- what gets generated --------------------------------------------------------------------

PIECES = [
    # words the route table cares about, in several cases and spellings
    "admin", "ADMIN", "Admin", "aDmIn", "%61dmin", "adm%69n", "%41DMIN", "%2561dmin",
    "static", "STATIC", "Static", "%73tatic", "team", "api", "files", "users", "x",
    # dot segments, plain and encoded once or twice
    "..", ".", "%2e", "%2E", "%2e%2e", ".%2e", "%2E.", "%252e", "%252E%252E",
    # separators and parameters
    "", ";", ";x=1", "%3B", "%3b", "%253B", "%2F", "%2f", "%252F", "%5C", "%5c", "\\",
    # NUL, control characters, malformed escapes, the query and fragment characters
    "%00", "%0a", "%09", "%7f", "\t", "\x01", "\x7f", "%", "%zz", "%c0%ae", "%ff",
    "?", "#", "%23", "%3F", "%25", "~", "%7E", "*", "@", ":",
    # unicode, raw and encoded
    "é", "ä", "𝟙", "K", "%C3%A9", "%E2%84%AA", "%C4%B0",
]
METHODS = ["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]
HEADERS = [
    # identity spoofs, in the spellings WSGI/CGI collapse onto ours
    ("X-Auth-User", "bob"), ("x-auth-user", "bob"), ("X_Auth_User", "bob"), ("X.Auth.User", "bob"),
    ("x_auth.user", "bob"), ("X-AUTH-ROLES", "admin"), ("X_Auth_Roles", "admin"),
    ("X.Auth.Roles", "admin"), ("X-Auth-Roles", "user, admin"),
    # forwarding and rewriting
    ("X-Forwarded-For", "6.6.6.6"), ("X_Forwarded_For", "6.6.6.6"), ("X.Forwarded.For", "6.6.6.6"),
    ("X-Forwarded-Host", "evil.example"), ("X-Forwarded-Proto", "https"),
    ("X-Forwarded-Uri", "/static/x"), ("X-Forwarded-Prefix", "/static"),
    ("Forwarded", "for=6.6.6.6;host=evil.example"), ("X-Real-IP", "6.6.6.6"),
    ("X-Original-URL", "/static/x"), ("X_Original_URL", "/admin/users"),
    ("X.Original.URL", "/admin/users"), ("X-Rewrite-URL", "/static/"), ("X-Original-URI", "/admin"),
    # method overrides
    ("X-HTTP-Method-Override", "DELETE"), ("X_HTTP_Method_Override", "GET"),
    ("X-HTTP-Method", "DELETE"), ("X-Method-Override", "PUT"),
    # hop-by-hop tricks, browsers, CORS, a bad cookie
    ("Connection", "X-Auth-User"), ("Connection", "Authorization"), ("Accept", "text/html"),
    ("Sec-Fetch-Mode", "cors"), ("X-Requested-With", "XMLHttpRequest"),
    ("Origin", "https://evil.example"), ("Access-Control-Request-Method", "DELETE"),
    ("Cookie", "gw_access=not.a.token; theme=dark"),
]
QUERIES = ["", "?x=1", "?x=/static/a", "?/static", "?_method=DELETE", "?a=%2F..%2Fadmin"]
USERS = [None, "invalid", "alice", "alice", "bob", "bob"]  # None: no token at all


@dataclass(frozen=True)
class Probe:
    method: str
    target: str  # the request-target, sent as UTF-8 bytes
    headers: tuple[tuple[str, str], ...]
    user: str | None


# Plain words two times in three, so that many requests are well-formed enough to be
# forwarded and the hostile pieces land inside otherwise ordinary paths.
WORDS = ["static", "admin", "team", "api", "files", "users", "x", "app.js", "7", "Admin", "STATIC", ".."]
words = st.sampled_from(WORDS)
hostile = st.lists(st.sampled_from(PIECES), min_size=0, max_size=3).map("".join)
segments = st.integers(0, 2).flatmap(lambda i: hostile if i == 0 else words)
probes = st.builds(
    Probe,
    # lower-case one time in four (llhttp refuses those outright)
    method=st.sampled_from(METHODS * 3 + [m.lower() for m in METHODS]),
    target=st.tuples(st.lists(segments, min_size=1, max_size=4), st.sampled_from(QUERIES))
    .map(lambda t: "/" + "/".join(t[0]) + t[1]),
    headers=st.lists(st.sampled_from(HEADERS), max_size=4, unique=True).map(tuple),
    user=st.sampled_from(USERS),
)

# The attack cases' own inputs, always tried first.
EXAMPLES = [
    Probe("GET", path, (), user)
    for user in (None, "alice")
    for path in (
        "/static/../admin/users", "/static/x/../../admin/users", "/../admin", "/static/%2e%2e/admin/users",
        "/static/%2E%2E/admin/users", "/static/.%2e/admin/users", "/static/%2e./admin/users",
        "/static/%252e%252e/admin/users", "/admin%2Fusers", "/static/..%2Fadmin/users",
        "/static/..%5Cadmin/users", "/static\\..\\admin\\users", "//admin/users", "/admin//users",
        "/static//../admin/users", "/ADMIN/users", "/aDmIn/users", "/admin;jsessionid=x/users",
        "/static/..;/admin/users", "/admin%3Busers", "/admin/users%00.css", "/admin/%c0%ae%c0%ae/",
        "/admin/users?x=/static/a", "/admin/users#/static/x", "/admin/users%23/static/x",
        "/%2561dmin/users", "/static/%252e%252e/%2561dmin",
    )
] + [
    Probe("DELETE", "/admin/users/7", (("X-HTTP-Method-Override", "GET"),), "alice"),
    Probe("delete", "/api/items/7", (), "alice"),
    Probe("POST", "/api/items/7?_method=DELETE", (("X-HTTP-Method-Override", "DELETE"),), "alice"),
    Probe("GET", "/profile", tuple(HEADERS[:9]), "alice"),
    Probe("GET", "/static/app.js", (("X_Auth_User", "bob"), ("X.Auth.Roles", "admin")), None),
    Probe("OPTIONS", "/admin/users", (("Origin", "https://evil.example"),
                                      ("Access-Control-Request-Method", "DELETE")), None),
]


# --- the upstreams --------------------------------------------------------------------------


def collapse(name: str) -> str:
    """A header name as a WSGI/CGI app reads it."""
    return name.lower().replace("_", "-").replace(".", "-")


def lenient_path(raw_target: str, decodes: int = 2) -> str:
    """The path a Tomcat/WSGI-like app serves for ``raw_target``: ``;params`` stripped from
    every segment, percent-decoded ``decodes`` times (HTTP's once, and once more), each time
    stripping ``;params`` again, then lower-cased, dot segments removed, slashes merged."""
    path = raw_target.split("?", 1)[0].split("#", 1)[0]
    for _ in range(decodes):
        path = "/".join(segment.split(";", 1)[0] for segment in path.split("/"))
        path = unquote(path, errors="replace")
    path = "/".join(segment.split(";", 1)[0] for segment in path.split("/")).lower()
    out: list[str] = []
    for segment in path.split("/"):
        if segment == "..":
            if out:
                out.pop()
        elif segment not in ("", "."):
            out.append(segment)
    return "/" + "/".join(out)


@dataclass
class Received:
    method: str
    target: str  # raw, as it arrived
    headers: list[tuple[str, str]]


@dataclass
class Lenient:
    url: str = ""
    seen: list[Received] = field(default_factory=list)


@pytest.fixture
async def lenient() -> AsyncIterator[Lenient]:
    """The lenient upstream. A low-level server (no router) so that every request is
    recorded, whatever its path."""
    state = Lenient()

    async def handler(request: web.BaseRequest) -> web.Response:
        await request.read()
        state.seen.append(Received(request.method, request.raw_path, list(request.headers.items())))
        return web.json_response({"path": lenient_path(request.raw_path)})

    runner = web.ServerRunner(web.Server(handler))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    state.url = f"http://127.0.0.1:{port}"
    yield state
    await runner.cleanup()


def _dead_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"  # closed again: connections are refused


def _extra_routes(url: str | None) -> Callable[[dict[str, Any]], None]:
    def change(raw: dict[str, Any]) -> None:
        if url is not None:
            raw["upstreams"]["app"]["url"] = url
        # a per-method rule (SEC-14's shape) and a one-segment public pattern
        raw["routes"][-1:-1] = [
            {"path": "/api/**", "access": {"DELETE": {"roles": ["admin"]}, "*": "authenticated"}},
            {"path": "/files/*", "access": "public"},
        ]

    return change


# --- one request, and what to think of it ---------------------------------------------------


@dataclass
class Outcome:
    status: int
    body: bytes


def send(port: int, probe: Probe, tokens: dict[str, str]) -> Outcome:
    lines = [f"{probe.method} {probe.target} HTTP/1.1", "Host: gateway.test"]
    if probe.user is not None:
        lines.append(f"Authorization: Bearer {tokens[probe.user]}")
    lines += [f"{k}: {v}" for k, v in probe.headers]
    lines.append("Connection: close")
    body = b"a=1" if probe.method.upper() in ("POST", "PUT", "PATCH") else b""
    if body:
        lines.append(f"Content-Length: {len(body)}")
    data = ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8") + body
    raw = b""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        while chunk := sock.recv(65536):
            raw += chunk
    match = re.match(rb"HTTP/\d\.\d (\d{3})", raw)
    assert match, f"no HTTP response to {data!r}: {raw[:200]!r}"
    return Outcome(int(match.group(1)), raw.partition(b"\r\n\r\n")[2])


ROLES = {"alice": ("user",), "bob": ("admin",)}


def admits(table: RouteTable, user: str | None, method: str, path: str) -> bool:
    """Whether the gateway's own table lets ``user`` (None: no valid token) have
    ``method path``."""
    try:
        _, access = table.decide(method, path)
    except (NotFound, MethodNotAllowed):
        return False
    if access.is_public:
        return True
    if user is None:
        return False
    roles = ROLES[user]
    identity = Identity(sub=user, roles=roles, sid="", jti="", exp=0.0,
                        claims={"sub": user, "roles": list(roles)}, token="")
    try:
        authorize(access, identity)
    except Forbidden:
        return False
    return True


def is_admin(path: str) -> bool:
    return path.lower() == "/admin" or path.lower().startswith("/admin/")


@dataclass
class Checker:
    kind: str  # "strict" | "lenient" | "dead"
    port: int
    tokens: dict[str, str]
    table: RouteTable
    seen: list[Any]  # the upstream's records (conftest's Seen, or Received)
    tally: Counter[str] = field(default_factory=Counter)

    def check(self, probe: Probe) -> None:
        before = len(self.seen)
        outcome = send(self.port, probe, self.tokens)
        got = self.seen[before:]
        # "invalid" is no valid token at all, and "Connection: Authorization" drops the token
        valid = probe.user if probe.user in ROLES else None
        if ("Connection", "Authorization") in probe.headers:
            valid = None
        self.tally["examples"] += 1
        self.tally[f"status {outcome.status}"] += 1

        # (c) never a 5xx, but for an upstream that is down
        if self.kind == "dead":
            assert outcome.status < 500 or outcome.status in (502, 504), outcome
        else:
            assert outcome.status < 500, outcome

        try:
            decided = normalize(probe.target)
        except BadRequest:
            decided = None
        if self.kind == "dead":
            if outcome.status in (502, 504):
                self.tally["forwarded"] += 1
                assert decided is not None, "a path the gateway must refuse was sent upstream"
                assert admits(self.table, valid, probe.method.upper(), decided.path)
            return
        if not got:
            assert outcome.status != 200 or probe.method.upper() == "OPTIONS", \
                "a 200 the upstream did not answer"
            return
        self.tally["forwarded"] += 1

        # (d) one request upstream, and it is the one that was decided on
        assert len(got) == 1, [g.target for g in got]
        (up,) = got
        assert decided is not None, f"{probe.target!r} should have been refused, the upstream got {up.target!r}"
        assert up.target == decided.path_qs
        assert up.method == probe.method.upper()
        assert admits(self.table, valid, probe.method.upper(), decided.path)

        # (a) and (b) on the path as the upstream received it
        try:
            upstream_path = normalize(up.target).path
        except BadRequest:
            raise AssertionError(f"the upstream got a path the gateway refuses: {up.target!r}") from None
        assert admits(self.table, valid, up.method, upstream_path), (valid, up.method, up.target)
        if valid != "bob":
            assert not is_admin(upstream_path), up.target

        # (e) identity and forwarding headers, in every spelling that collapses onto them; a
        # public route does not authenticate, so it sends no identity at all
        headers: dict[str, list[str]] = {}
        for name, value in up.headers:
            headers.setdefault(collapse(name), []).append(value)
        identified = None if admits(self.table, None, up.method, upstream_path) else valid
        assert headers.get("x-auth-user", []) == ([identified] if identified else [])
        assert headers.get("x-auth-roles", []) == ([",".join(ROLES[identified])] if identified else [])
        assert headers.get("x-forwarded-for") == ["127.0.0.1"]
        assert headers.get("x-forwarded-host") == ["gateway.test"]
        assert headers.get("x-forwarded-proto") == ["http"]
        for name in ("authorization", "forwarded", "x-forwarded-uri", "x-forwarded-prefix", "x-real-ip",
                     "x-original-url", "x-rewrite-url", "x-original-uri", "x-http-method-override",
                     "x-http-method", "x-method-override"):
            assert name not in headers, name
        assert all("gw_access" not in v for v in headers.get("cookie", []))

        # (a) and (b) again, on the path as a lenient app reads it: any upstream, read with a
        # single percent-decoding; the lenient upstream, read its own way (decoding twice)
        if valid != "bob":
            self._as_read_leniently(valid, up)

    def _as_read_leniently(self, valid: str | None, up: Any) -> None:
        once = lenient_path(up.target, decodes=1)
        assert admits(self.table, valid, up.method, once) and not is_admin(once), \
            f"an app that decodes once serves {once!r} for {up.target!r} to {valid or 'anonymous'}"
        if self.kind != "lenient":
            return
        theirs = lenient_path(up.target)
        assert admits(self.table, valid, up.method, theirs) and not is_admin(theirs), \
            f"an app that decodes twice serves {theirs!r} for {up.target!r} to {valid or 'anonymous'}"


def run_properties(checker: Checker) -> None:
    """Hypothesis, on this (worker) thread, against the gateway served by the test's loop."""

    @settings(max_examples=MAX_EXAMPLES, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(probe=probes)
    def prop(probe: Probe) -> None:
        checker.check(probe)

    for case in EXAMPLES:
        prop = example(probe=case)(prop)
    prop()


@pytest.mark.parametrize("kind", ["strict", "lenient", "dead"])
async def test_gateway_forwards_only_what_its_table_allows(
    gateway_factory: GatewayFactory, lenient: Lenient, upstream: Upstream, kind: str
) -> None:
    url = {"strict": None, "lenient": lenient.url, "dead": _dead_url()}[kind]
    gw: Gateway = await gateway_factory(_extra_routes(url))
    tokens = {"alice": await gw.token("alice"), "bob": await gw.token("bob"), "invalid": "x.y.z"}
    seen = lenient.seen if kind == "lenient" else upstream.seen
    checker = Checker(kind, gw.port, tokens, RouteTable(gw.config.routes), seen)
    started = time.monotonic()
    await asyncio.to_thread(run_properties, checker)
    print(f"\n{kind}: {dict(checker.tally)} in {time.monotonic() - started:.1f} s")
    # not vacuous: some requests went through, and many were refused
    assert checker.tally["forwarded"] >= 10, checker.tally
    assert checker.tally["forwarded"] <= checker.tally["examples"] - 10, checker.tally


# --- the finding the lenient upstream makes -------------------------------------------------

DOUBLE_DECODED = [
    # (method, target, user): each reaches /admin/... on an upstream that decodes twice
    ("GET", "/static/%252e%252e/admin/users", None),
    ("GET", "/static/..%252fadmin/users", None),
    ("GET", "/%2561dmin/users", "alice"),
    ("GET", "/static/%252e%252e/%2561dmin", None),
]


@pytest.mark.parametrize("method, target, user", DOUBLE_DECODED)
async def test_double_decoding_upstream_sees_admin_paths(
    gateway_factory: GatewayFactory, lenient: Lenient, method: str, target: str, user: str | None
) -> None:
    gw = await gateway_factory(_extra_routes(lenient.url))
    tokens = {"alice": await gw.token("alice")}
    probe = Probe(method, target, (), user)
    outcome = await asyncio.to_thread(send, gw.port, probe, tokens)
    served = [lenient_path(r.target) for r in lenient.seen]
    assert outcome.status in (400, 401, 403) and not any(is_admin(p) for p in served), \
        (outcome.status, [r.target for r in lenient.seen], served, json.loads(outcome.body or b"{}"))
