"""The path and header cases of the hostile-input catalogue, each with its Correct answer.

One row per input, named by its case. The fixture is the catalogue's: /static/** public,
/admin/** (GET, POST) for role admin, /** authenticated; alice has role user, bob admin.
Requests go out as raw bytes, never through a client library that tidies the path.
SEC-23/24 (framing) are in test_smuggling.py, SEC-58's auth-body limits in
test_auth_api.py, the properties over generated inputs in test_properties.py.
"""

from __future__ import annotations

import asyncio
from typing import NamedTuple

import pytest

from conftest import Gateway, Upstream, raw_get, raw_request


class Case(NamedTuple):
    case: str
    target: str
    anonymous: int  # API client without a token
    alice: int  # role user
    bob: int  # role admin
    forwarded: str | None  # the request-target the upstream sees when bob is let through


SAME = "/admin/users"
CASES = [
    # SEC-01: dot-dot out of a public prefix; clamped at root
    Case("SEC-01", "/static/../admin/users", 401, 403, 200, SAME),
    Case("SEC-01", "/static/x/../../admin/users", 401, 403, 200, SAME),
    Case("SEC-01", "/admin/../admin/users", 401, 403, 200, SAME),
    Case("SEC-01", "/../admin/users", 401, 403, 200, SAME),
    # SEC-02: percent-encoded dot segments; an escaped escape is refused, never decoded twice
    Case("SEC-02", "/static/%2e%2e/admin/users", 401, 403, 200, SAME),
    Case("SEC-02", "/static/%2E%2E/admin/users", 401, 403, 200, SAME),
    Case("SEC-02", "/static/.%2e/admin/users", 401, 403, 200, SAME),
    Case("SEC-02", "/static/%2e./admin/users", 401, 403, 200, SAME),
    Case("SEC-02", "/static/%252e%252e/admin/users", 400, 400, 400, None),
    # SEC-03: encoded slash and backslash
    Case("SEC-03", "/admin%2Fusers", 400, 400, 400, None),
    Case("SEC-03", "/admin%2fusers", 400, 400, 400, None),
    Case("SEC-03", "/static/..%2Fadmin/users", 400, 400, 400, None),
    Case("SEC-03", "/static/..%5Cadmin/users", 400, 400, 400, None),
    Case("SEC-03", "/static\\..\\admin\\users", 400, 400, 400, None),
    Case("SEC-03", "/%2fadmin/users", 400, 400, 400, None),
    # SEC-04: repeated slashes, never an authority
    Case("SEC-04", "//admin/users", 401, 403, 200, SAME),
    Case("SEC-04", "/admin//users", 401, 403, 200, SAME),
    Case("SEC-04", "///admin///users", 401, 403, 200, SAME),
    Case("SEC-04", "/static//../admin/users", 401, 403, 200, SAME),
    # SEC-06: case variants of a protected prefix still need the role
    Case("SEC-06", "/ADMIN/users", 401, 403, 200, "/ADMIN/users"),
    Case("SEC-06", "/Admin/users", 401, 403, 200, "/Admin/users"),
    Case("SEC-06", "/aDmIn/users", 401, 403, 200, "/aDmIn/users"),
    # ... and so do names with the dots or spaces Windows and IIS drop from a name's end
    Case("SEC-06", "/admin./users", 401, 403, 200, "/admin./users"),
    Case("SEC-06", "/admin%20/users", 401, 403, 200, "/admin%20/users"),
    Case("SEC-06", "/Admin.%20./users", 401, 403, 200, "/Admin.%20./users"),
    # ... and so do letters that an upstream's case mapping or NFKC turns into ASCII ones
    *(Case("SEC-06", t, 400, 400, 400, None) for t in (
        "/adm%C4%B1n/users", "/adm%C4%B0n/users", "/%EF%BD%81dmin/users", "/static/%EF%BC%8E%EF%BC%8E/admin")),
    # SEC-07: path parameters
    Case("SEC-07", "/admin;jsessionid=x/users", 400, 400, 400, None),
    Case("SEC-07", "/admin;/users", 400, 400, 400, None),
    Case("SEC-07", "/static/..;/admin/users", 400, 400, 400, None),
    Case("SEC-07", "/admin%3Busers", 400, 400, 400, None),
    Case("SEC-07", "/admin;x/users", 400, 400, 400, None),
    # SEC-09: NUL, control characters, malformed escapes, invalid and overlong UTF-8
    *(Case("SEC-09", t, 400, 400, 400, None) for t in (
        "/admin/users%00.css", "/static/x%00/../../admin/users", "/admin%0a/users", "/admin%09/users",
        "/admin%7f", "/admin/%", "/admin/%zz", "/admin/%ff", "/admin/%c0%ae%c0%ae/")),
    # SEC-11: the query and fragments never take part in matching
    Case("SEC-11", "/admin/users?x=/static/a", 401, 403, 200, "/admin/users?x=/static/a"),
    Case("SEC-11", "/admin/users?/static", 401, 403, 200, "/admin/users?/static"),
    Case("SEC-11", "/admin/users#/static/x", 400, 400, 400, None),
    Case("SEC-11", "/admin/users%23/static/x", 401, 403, 200, "/admin/users%23/static/x"),
    Case("SEC-11", "/admin/users?x=1#y", 400, 400, 400, None),
]


@pytest.mark.parametrize("row", CASES, ids=lambda c: f"{c.case} {c.target}")
async def test_path_cases(gw: Gateway, upstream: Upstream, row: Case) -> None:
    tokens = {"alice": await gw.token("alice"), "bob": await gw.token("bob")}
    for who, expected in (("anonymous", row.anonymous), ("alice", row.alice), ("bob", row.bob)):
        auth = [f"Authorization: Bearer {tokens[who]}"] if who in tokens else []
        answer = await raw_request(gw.port, raw_get(row.target, *auth))
        assert answer.status == expected, (who, answer.status, answer.body)
        if expected == 400:
            assert b'"error": "' in answer.body  # a JSON error code, never a 500
        if expected != 200:
            assert upstream.seen == [], (who, [s.target for s in upstream.seen])
    if row.forwarded is not None:
        assert [s.target for s in upstream.seen] == [row.forwarded]


async def test_browser_navigation_gets_a_safe_next(gw: Gateway, upstream: Upstream) -> None:
    # SEC-01 and SEC-54: the next the gateway builds is the normalized, authorized path
    for target, next_path in (("/static/../admin/users", "/admin/users"), ("//evil.example/x", "/evil.example/x"),
                              ("/admin/users?a=1", "/admin/users%3Fa%3D1")):
        answer = await raw_request(gw.port, raw_get(target, "Accept: text/html"))
        assert answer.status == 302
        assert answer.header("Location") == f"/auth/login?next={next_path}"
    assert upstream.seen == []


SEC_13 = [  # path, method: what alice and bob get; nothing falls through to /**
    ("DELETE", 405, 405), ("PUT", 405, 405), ("PATCH", 405, 405), ("OPTIONS", 405, 405),
    ("HEAD", 403, 200), ("GET", 403, 200), ("POST", 403, 200),
]


@pytest.mark.parametrize("method, alice, bob", SEC_13)
async def test_sec13_methods_never_fall_through(gw: Gateway, upstream: Upstream, method: str,
                                                alice: int, bob: int) -> None:
    for who, expected in (("alice", alice), ("bob", bob)):
        token = await gw.token(who)
        data = (f"{method} /admin/users/7 HTTP/1.1\r\nHost: gateway.test\r\nConnection: close\r\n"
                f"Content-Length: 0\r\nAuthorization: Bearer {token}\r\n\r\n").encode()
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        writer.write(data)
        status_line = await asyncio.wait_for(reader.readline(), 5)
        writer.close()
        assert int(status_line.split()[1]) == expected, (who, status_line)
    assert len(upstream.seen) == (1 if bob == 200 else 0)
    if upstream.seen:
        assert upstream.seen[0].method == method


async def test_sec17_sec18_identity_headers_are_the_gateways_alone(gw: Gateway, upstream: Upstream) -> None:
    alice = await gw.token("alice")
    spoofs = ["X-Auth-User: bob", "X-Auth-Roles: admin", "X-Auth-User: root", "x-auth-user: bob",
              "X-Auth-Roles: user, admin", "X_Auth_User: bob", "X.Auth.Roles: admin"]
    assert (await raw_request(gw.port, raw_get("/profile", f"Authorization: Bearer {alice}", *spoofs))).status == 200
    protected = upstream.seen[-1]
    assert protected.header("X-Auth-User") == ["alice"] and protected.header("X-Auth-Roles") == ["user"]
    assert not [k for k, _ in protected.headers if "_" in k or "." in k]
    for target in ("/static/app.js", "/healthz"):  # public routes and the gateway's own
        assert (await raw_request(gw.port, raw_get(target, *spoofs))).status == 200
    public = upstream.seen[-1]
    assert public.target == "/static/app.js"
    assert not [k for k, _ in public.headers if k.lower().replace("_", "-").replace(".", "-").startswith("x-auth")]


@pytest.mark.parametrize("header", [
    "X-Forwarded-Uri: /static/ok", "X-Original-URL: /static/", "X-Rewrite-URL: /static/",
    "X-Forwarded-Prefix: /static", "X-Forwarded-Host: evil.example", "Forwarded: for=10.0.0.1;host=evil.example",
])
async def test_sec20_forwarding_headers_never_steer_the_decision(gw: Gateway, upstream: Upstream, header: str) -> None:
    assert (await raw_request(gw.port, raw_get("/admin/users", header))).status == 401
    bob = await gw.token("bob")
    assert (await raw_request(gw.port, raw_get("/admin/users", header, f"Authorization: Bearer {bob}"))).status == 200
    seen = upstream.seen[-1]
    name = header.split(":")[0]
    assert seen.header(name) == ([] if name != "X-Forwarded-Host" else ["gateway.test"])


@pytest.mark.parametrize("connection, status", [
    ("close, X-Auth-User", 200), ("keep-alive, X-Auth-Roles, X-Forwarded-For", 200), ("Authorization", 401),
])
async def test_sec21_connection_cannot_remove_what_the_gateway_adds(
    gw: Gateway, upstream: Upstream, connection: str, status: int
) -> None:
    alice = await gw.token("alice")
    answer = await raw_request(gw.port, raw_get("/profile", f"Authorization: Bearer {alice}",
                                                f"Connection: {connection}"))
    assert answer.status == status
    if status == 200:
        seen = upstream.seen[-1]
        assert seen.header("X-Auth-User") == ["alice"] and seen.header("X-Auth-Roles") == ["user"]
        assert seen.header("X-Forwarded-For") == ["127.0.0.1"]
    else:
        assert upstream.seen == []
