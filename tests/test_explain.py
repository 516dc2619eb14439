"""``gateway routes explain`` and the route warnings of ``gateway check``: each case a
sentence. Most go through the Python API; a few through real ``python -m gateway``
subprocesses; and a table of requests is sent to a real gateway too, to see that what is
explained is what is done."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from processes import free_port

from gateway import config as config_module
from gateway.config import AUTHENTICATED, PUBLIC, Access, Route
from gateway.explain import Caller, explain, route_warnings
from gateway.routes import shadowed

from conftest import Gateway, GatewayFactory, raw_request

SECRET = "explain-test-secret-0123456789abcdef0123456789"
ANONYMOUS = Caller()
USER = Caller(roles=("user",))
ADMIN = Caller(roles=("admin",))

CONFIG = {
    "store": "sqlite:data/gateway.db",
    "upstreams": {"app": {"url": "http://127.0.0.1:8000"}, "api": {"url": "http://127.0.0.1:9000"}},
    "tokens": {"issuer": "t", "audience": "app", "keys": [{"kid": "k1", "algorithm": "HS256", "secret": SECRET}]},
    "cookies": {"secure": False},
    "routes": [
        {"path": "/static/**", "access": "public", "upstream": "app"},
        {"path": "/admin/**", "methods": ["GET", "POST"], "access": {"roles": ["admin"]}, "upstream": "app"},
        {"path": "/files/*", "access": {"GET": "public", "*": "authenticated"}, "upstream": "app"},
        {"path": "/api/**", "upstream": "api", "strip_prefix": "/api", "access": {"claims": {"tenant": "acme"}},
         "cors": {"origins": ["https://spa.example.com"]}},
        {"path": "/**", "access": "authenticated", "upstream": "app"},
    ],
}


@pytest.fixture(scope="module")
def config_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("explain") / "gateway.yaml"
    path.write_text(yaml.safe_dump(CONFIG))
    return path


@pytest.fixture(scope="module")
def config(config_file: Path) -> config_module.Config:
    return config_module.load(config_file)


PARSER = ("the HTTP parser refuses the request line before the gateway sees it (Invalid method encountered; "
          "methods are case-sensitive, and only the ones it knows are taken)")


@dataclass(frozen=True)
class Row:
    sentence: str
    method: str
    target: str
    caller: Caller
    index: int | None  # the route that matched
    status: int  # 200: allowed
    code: str | None
    why: str  # for an allowed request: the upstream URL (or, for the gateway's own, its note)


ROWS = [
    Row("a public route lets anyone in, and says where the request goes",
        "GET", "/static/app.js", ANONYMOUS, 0, 200, None, "http://127.0.0.1:8000/static/app.js"),
    Row("the path is normalized before it is matched: dot segments cannot climb out of /static",
        "GET", "/static/%2e%2e/admin/users", USER, 1, 403, "forbidden", "needs role admin; caller has [user]"),
    Row("a caller holding the role is let through",
        "GET", "/admin/users", ADMIN, 1, 200, None, "http://127.0.0.1:8000/admin/users"),
    Row("protective routes match in any case",
        "GET", "/ADMIN/users", USER, 1, 403, "forbidden", "needs role admin; caller has [user]"),
    Row("a method the route does not list is 405 and never falls through to /**",
        "DELETE", "/admin/users", ADMIN, 1, 405, "method_not_allowed",
        "method DELETE not allowed on routes[1] (GET, HEAD, POST)"),
    Row("a method named by _method in the query must be allowed too",
        "POST", "/admin/x?_method=DELETE", ADMIN, 1, 405, "method_not_allowed",
        "method DELETE (named by _method in the query) not allowed on routes[1] (GET, HEAD, POST)"),
    Row("a method override that needs other access is refused rather than guessed at",
        "GET", "/files/a?_method=PUT", ANONYMOUS, 2, 400, "ambiguous_method",
        "the query names _method=PUT, which needs authenticated on routes[2] while GET needs public "
        "(refused rather than guessed at)"),
    Row("per-method access: GET is public there, and HEAD is GET",
        "HEAD", "/files/a", ANONYMOUS, 2, 200, None, "http://127.0.0.1:8000/files/a"),
    Row("per-method access: anything else needs a token",
        "PUT", "/files/a", ANONYMOUS, 2, 401, "unauthorized", "routes[2] needs a token (authenticated); caller is anonymous"),
    Row("an anonymous GET is told that a browser would be sent to sign in",
        "GET", "/home", ANONYMOUS, 4, 401, "unauthorized",
        "routes[4] needs a token (authenticated); caller is anonymous (a browser navigation gets a 302 to "
        "the sign-in page instead)"),
    Row("a claim rule is met by an equal claim, and strip_prefix shows in the upstream URL",
        "GET", "/api/v1/items?x=1", Caller(roles=(), claims={"tenant": "acme"}), 3, 200, None,
        "http://127.0.0.1:9000/v1/items?x=1"),
    Row("a claim rule names the claim wanted and the one held",
        "GET", "/api/v1/items", Caller(roles=("user",), claims={"tenant": "other"}), 3, 403, "forbidden",
        "claim tenant=acme required; caller has tenant=other"),
    Row("a missing claim is said to be missing",
        "GET", "/api/v1/items", USER, 3, 403, "forbidden", "claim tenant=acme required; caller has no tenant claim"),
    Row("an encoded slash is refused before any route is looked at",
        "GET", "/admin%2Fusers", ADMIN, None, 400, "ambiguous_path", "An encoded '/', '\\' or ';' is not allowed in the path."),
    Row("a target that is not a path is refused",
        "OPTIONS", "*", ADMIN, None, 400, "invalid_path", "The request target must be a path."),
    Row("a target the HTTP parser cannot read is refused before the gateway sees it",
        "GET", "admin", ADMIN, None, 400, "invalid_request",
        "the HTTP parser refuses the request line before the gateway sees it (Invalid characters in url; "
        "methods are case-sensitive, and only the ones it knows are taken)"),
    Row("a method is taken as written: a lower-case one is refused by the HTTP parser, whatever the role",
        "get", "/admin/x", ADMIN, None, 400, "invalid_request", PARSER),
    Row("a method the HTTP parser does not know is refused too",
        "FOO", "/x", USER, None, 400, "invalid_request", PARSER),
    Row("a method it knows goes to the routes like any other (here /**, any method)",
        "PROPFIND", "/home", USER, 4, 200, None, "http://127.0.0.1:8000/home"),
    Row("...and a route listing its methods answers 405 to the others",
        "M-SEARCH", "/admin/x", ADMIN, 1, 405, "method_not_allowed",
        "method M-SEARCH not allowed on routes[1] (GET, HEAD, POST)"),
    Row("CONNECT is answered 404: the gateway tunnels nothing",
        "CONNECT", "/home", ADMIN, None, 404, "not_found",
        "CONNECT is answered 404 before any route is looked at (the gateway tunnels nothing)"),
    Row("the gateway's own endpoints are reported as such",
        "POST", "/auth/login", ANONYMOUS, None, 200, None,
        "the gateway answers it (its own rules apply, e.g. /auth/me needs a token)"),
    Row("an own endpoint has its own methods",
        "DELETE", "/auth/login", ANONYMOUS, None, 405, "method_not_allowed",
        "method DELETE not allowed on /auth/login (GET, HEAD, POST)"),
    Row("the auth prefix belongs to the gateway, in any case",
        "GET", "/AUTH/nothing", ADMIN, None, 404, "not_found", "/auth belongs to the gateway, which serves nothing at /AUTH/nothing"),
    Row("/metrics is the gateway's (served on the main listener by default), not /**'s",
        "GET", "/metrics", ANONYMOUS, None, 200, None,
        "the gateway answers it (its own rules apply, e.g. /auth/me needs a token)"),
    Row("the metrics path in another spelling is kept from the routes too, and answered 404",
        "GET", "/METRICS/", ADMIN, None, 404, "not_found",
        "/METRICS/ is another spelling of the metrics path: only /metrics itself is served, the others get 404, "
        "whatever the routes say"),
    Row("the health endpoint is the gateway's, not /**'s",
        "GET", "/healthz", ANONYMOUS, None, 200, None,
        "the gateway answers it (its own rules apply, e.g. /auth/me needs a token)"),
]


@pytest.mark.parametrize("row", ROWS, ids=[r.sentence for r in ROWS])
def test_explain(config: config_module.Config, row: Row) -> None:
    ex = explain(config, row.method, row.target, row.caller)
    assert (ex.route.index if ex.route else None) == row.index
    if row.index is not None:
        assert ex.route is not None and ex.route.path == CONFIG["routes"][row.index]["path"]  # type: ignore[index]
    assert (ex.allowed, ex.status, ex.code) == (row.status == 200, row.status, row.code)
    assert (ex.upstream_url or ex.why) == row.why


def test_a_preflight_is_noted_with_what_the_route_allows(config: config_module.Config) -> None:
    ex = explain(config, "OPTIONS", "/api/x", ANONYMOUS)
    assert ex.notes == ["a CORS preflight here is answered by the gateway without a token: origins "
                        "https://spa.example.com; methods GET, HEAD, POST"]
    assert explain(config, "OPTIONS", "/home", ANONYMOUS).notes == [
        "a CORS preflight here (OPTIONS with Origin and Access-Control-Request-Method) is refused: "
        "403 cors_denied (routes[4] has no cors)"]


# --- on the command line --------------------------------------------------------------------


def gateway(*args: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "gateway", *args], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=60)
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    return proc


def test_cli_refused_prints_each_step_and_exits_1(config_file: Path) -> None:
    proc = gateway("routes", "explain", "-c", str(config_file), "GET", "/static/../admin//users", "--role", "user")
    assert proc.returncode == 1
    assert proc.stdout.splitlines() == [
        "request   GET /static/../admin//users",
        "path      /admin/users  (normalized)",
        "route     routes[1] /admin/**  methods: GET, HEAD, POST  upstream: app",
        "access    GET: authenticated with role admin",
        "caller    authenticated, roles [user]",
        "decision  refused: 403 forbidden: needs role admin; caller has [user]",
    ]


def test_the_query_is_shown_apart_from_the_path(config: config_module.Config) -> None:
    lines = explain(config, "GET", "/admin?x=1", ADMIN).lines()
    assert lines[:3] == ["request   GET /admin?x=1",
                         "path      /admin",
                         "query     x=1  (forwarded as sent; takes no part in route matching)"]
    lines = explain(config, "GET", "/static/../admin?x=1", ADMIN).lines()
    assert lines[1:3] == ["path      /admin  (normalized)",
                          "query     x=1  (forwarded as sent; takes no part in route matching)"]
    assert not any(line.startswith("query") for line in explain(config, "GET", "/admin", ADMIN).lines())
    assert explain(config, "GET", "/admin?x=1", ADMIN).as_json()["query"] == "x=1"


def test_cli_allowed_exits_0_and_json_has_the_fields(config_file: Path) -> None:
    proc = gateway("routes", "explain", "-c", str(config_file), "POST", "/api/a?b=1", "--claim", "tenant=acme",
                   "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["route"] == {"index": 3, "pattern": "/api/**", "methods": None, "upstream": "api",
                            "strip_prefix": "/api", "access": "authenticated with claim tenant=acme"}
    assert out["caller"] == {"anonymous": False, "roles": [], "claims": {"tenant": "acme"}}
    assert (out["decision"], out["status"], out["code"]) == ("allowed", 200, None)
    assert out["upstream_url"] == "http://127.0.0.1:9000/a?b=1"
    assert (out["path"], out["query"]) == ("/api/a", "b=1")


@pytest.mark.parametrize("args, message", [
    (["GET", "/", "--anonymous", "--role", "admin"], "gateway: error: --anonymous cannot go with --role, --claim or --authenticated"),
    (["GET", "/", "--claim", "tenant"], "gateway: error: --claim 'tenant': expected NAME=VALUE, such as tenant=acme"),
])
def test_cli_usage_errors_exit_2_with_one_line(config_file: Path, args: list[str], message: str) -> None:
    proc = gateway("routes", "explain", "-c", str(config_file), *args)
    assert (proc.returncode, proc.stdout, proc.stderr) == (2, "", message + "\n")


def test_cli_config_error_exits_2(tmp_path: Path) -> None:
    proc = gateway("routes", "explain", "-c", str(tmp_path / "nope.yaml"), "GET", "/")
    assert proc.returncode == 2
    assert proc.stderr.startswith("gateway: error: ") and len(proc.stderr.splitlines()) == 1


# --- what is explained is what is done ------------------------------------------------------


AGREEMENT = [  # (method, target, who): sent to a real gateway and explained, the same answer
    ("GET", "/static/x.js", None), ("GET", "/static/%2e%2e/admin/x", "alice"), ("GET", "/admin/x", "bob"),
    ("GET", "/Admin/x", "alice"), ("DELETE", "/admin/x", "bob"), ("POST", "/admin/x?_method=DELETE", "bob"),
    ("GET", "/team/x", "alice"), ("GET", "/team/x", "bob"), ("GET", "/home", None), ("GET", "/home", "alice"),
    ("GET", "/a%2fb", "alice"), ("GET", "/auth/nothing", "alice"), ("GET", "/healthz", None),
    # methods as the HTTP parser takes them: case-sensitive, and only those it knows
    ("get", "/admin/x", "bob"), ("Get", "/home", "alice"), ("FOO", "/x", "alice"), ("DESCRIBE", "/x", "bob"),
    ("PROPFIND", "/home", "alice"), ("M-SEARCH", "/home", "alice"), ("PROPFIND", "/admin/x", "bob"),
    ("PURGE", "/static/x", None), ("CONNECT", "/home", "alice"), ("CONNECT", "example.com:443", None),
    ("GET", "admin", None), ("OPTIONS", "*", None), ("GET", "*", None),
]
METRICS_PATHS = [(method, target, who) for method in ("GET", "POST", "PROPFIND")
                 for target in ("/metrics", "/METRICS", "/Metrics", "/metrics/", "//metrics", "/%6detrics",
                                "/metrics.txt")
                 for who in (None, "alice")]
CLAIMS = {"alice": Caller(roles=("user",), claims={"sub": "alice"}),
          "bob": Caller(roles=("admin",), claims={"sub": "bob"})}


async def _agree(gw: Gateway, requests: list[tuple[str, str, str | None]]) -> None:
    """Each request, sent as raw bytes to ``gw`` and explained: the same status and code."""
    tokens = {who: await gw.token(who) for who in CLAIMS}
    for method, target, who in requests:
        auth = [f"Authorization: Bearer {tokens[who]}"] if who else []
        lines = [f"{method} {target} HTTP/1.1", "Host: gateway.test", "Accept: application/json",
                 "Connection: close", *auth]
        answer = await raw_request(gw.port, ("\r\n".join(lines) + "\r\n\r\n").encode())
        ex = explain(gw.config, method, target, CLAIMS[who] if who else ANONYMOUS)
        status = answer.status if answer.status >= 400 else 200
        code = json.loads(answer.body)["error"] if answer.status >= 400 else None
        assert (method, target, who, ex.status, ex.code) == (method, target, who, status, code)
        if answer.status < 400 and ex.route is not None:
            assert json.loads(answer.body)["target"] == ex.upstream_url.removeprefix(gw.config.upstreams["app"].url)  # type: ignore[union-attr]


async def test_explain_agrees_with_the_running_gateway(gateway_factory: GatewayFactory) -> None:
    await _agree(await gateway_factory(), AGREEMENT)


@pytest.mark.parametrize("metrics", [{}, {"listen": "ADMIN"}, {"enabled": False}],
                         ids=["on the main listener", "on an admin listener", "disabled"])
async def test_explain_agrees_on_the_metrics_path(gateway_factory: GatewayFactory, metrics: dict[str, Any]) -> None:
    if metrics.get("listen") == "ADMIN":
        metrics = {"listen": f"127.0.0.1:{free_port()}"}
    gw = await gateway_factory(lambda raw: raw.update(metrics=metrics))
    await _agree(gw, METRICS_PATHS)
    if "listen" in metrics:
        ex = explain(gw.config, "GET", "/metrics", ANONYMOUS)
        assert ex.notes == [f"GET /metrics is served only on the admin listener, {metrics['listen']} (metrics.listen)"]


# --- routes that never match ----------------------------------------------------------------


ADMIN_ONLY = Access("rules", roles=frozenset({"admin"}))


def route(i: int, path: str, access: Access = AUTHENTICATED, methods: set[str] | None = None,
          per_method: dict[str, Access] | None = None) -> Route:
    return Route(index=i, path=path, methods=frozenset(methods) if methods else None,
                 access=per_method or {"*": access}, upstream="app")


SHADOWS: list[tuple[str, list[Route], list[tuple[int, int] | tuple[int, int, str]]]] = [
    ("/api/** before /api/users/* takes all of it",
     [route(0, "/api/**"), route(1, "/api/users/*")], [(1, 0)]),
    ("/x/* before /x/a takes it, whatever the methods (methods never fall through)",
     [route(0, "/x/*", methods={"GET"}), route(1, "/x/a", methods={"DELETE"})], [(1, 0)]),
    ("/** takes everything after it",
     [route(0, "/**"), route(1, "/a"), route(2, "/b/**")], [(1, 0), (2, 0)]),
    ("the same pattern twice: the second never matches",
     [route(0, "/a/*"), route(1, "/a/*", ADMIN_ONLY)], [(1, 0)]),
    ("/api/** takes /api itself too",
     [route(0, "/api/**"), route(1, "/api")], [(1, 0)]),
    ("a protective route matches in any case, so it takes a later public route's other spelling",
     [route(0, "/Docs/**"), route(1, "/docs/a", PUBLIC)], [(1, 0)]),
    ("a case-sensitive public route does not take a later protective route's other spellings",
     [route(0, "/docs/**", PUBLIC), route(1, "/docs/a")], [(1, 0, "other case only")]),
    ("...nor a protective route spelled in another case",
     [route(0, "/docs/**", PUBLIC), route(1, "/DOCS/a")], []),
    ("...unless its prefix has no letters to differ in case",
     [route(0, "/1/**", PUBLIC), route(1, "/1/a")], [(1, 0)]),
    ("specific before general is the intended order: nothing is shadowed",
     [route(0, "/api/users/*"), route(1, "/api/**"), route(2, "/**")], []),
    ("/x/* takes neither /x/** (deeper paths) nor /x (no segment), but /x/** takes /x",
     [route(0, "/x/*"), route(1, "/x/**"), route(2, "/x")], [(2, 1)]),
    ("/x/a/** and /x/ab are different paths",
     [route(0, "/x/a/**"), route(1, "/x/ab"), route(2, "/x/a/b")], [(2, 0)]),
    ("an exact route with a trailing slash is another path",
     [route(0, "/docs"), route(1, "/docs/")], []),
]


@pytest.mark.parametrize("sentence, routes, expected", SHADOWS, ids=[s[0] for s in SHADOWS])
def test_shadowed(sentence: str, routes: list[Route], expected: list[tuple[int, int] | tuple[int, int, str]]) \
        -> None:
    assert [(s.route.index, s.by.index, "other case only") if s.other_case_only else (s.route.index, s.by.index)
            for s in shadowed(tuple(routes))] == expected


def _with_routes(config_file: Path, routes: list[dict[str, Any]]) -> Path:
    raw = {**CONFIG, "routes": routes}
    path = config_file.with_name("warned.yaml")
    path.write_text(yaml.safe_dump(raw))
    return path


WARNED_ROUTES: list[dict[str, Any]] = [
    {"path": "/api/**", "access": "public", "upstream": "app"},
    {"path": "/api/admin/*", "access": {"roles": ["admin"]}, "upstream": "app"},
    {"path": "/admin/**", "methods": ["GET"], "access": {"roles": ["admin"]}, "upstream": "app"},
    {"path": "/admin/users", "methods": ["DELETE", "GET"], "access": {"roles": ["admin"]}, "upstream": "app"},
    {"path": "/healthz", "access": "public", "upstream": "app"},
    {"path": "/Auth/**", "access": "public", "upstream": "app"},
    {"path": "/**", "access": "authenticated", "upstream": "app"},
]
WARNINGS = [
    "routes[1] /api/admin/* is matched only when spelled in another case: routes[0] /api/** comes first "
    "and matches it as written (public routes match case-sensitively); those requests get its access "
    "(public), not authenticated with role admin",
    "routes[3] /admin/users is never matched: routes[2] /admin/** comes first and matches every path it "
    "would; requests for DELETE get 405 there (methods never fall through)",
    "routes[4] /healthz is never matched: /healthz is served by the gateway itself",
    "routes[5] /Auth/** is never matched: /auth and everything below it belong to the gateway",
]


def test_route_warnings_name_both_routes_and_the_consequence(config_file: Path) -> None:
    assert route_warnings(config_module.load(_with_routes(config_file, WARNED_ROUTES))) == WARNINGS


def test_route_warnings_come_in_route_order(config_file: Path) -> None:
    routes = [{"path": "/healthz", "access": "public", "upstream": "app"},
              {"path": "/x/**", "access": "authenticated", "upstream": "app"},
              {"path": "/x/a", "access": "authenticated", "upstream": "app"},
              {"path": "/auth/me", "access": "public", "upstream": "app"}]
    warnings = route_warnings(config_module.load(_with_routes(config_file, routes)))
    assert [w.split(" ", 1)[0] for w in warnings] == ["routes[0]", "routes[2]", "routes[3]"]


def test_check_prints_warnings_and_fails_only_with_strict(config_file: Path) -> None:
    path = _with_routes(config_file, WARNED_ROUTES)
    proc = gateway("check", "-c", str(path))
    assert proc.returncode == 0
    assert proc.stdout.splitlines() == [f"{path}: ok (7 routes, 2 upstreams, store sqlite), 4 warnings:",
                                        *(f"  warning: {w}" for w in WARNINGS)]
    strict = gateway("check", "--strict", "-c", str(path))
    assert strict.returncode == 1
    assert strict.stdout.splitlines()[0] == f"{path}: 4 warnings, failing with --strict:"
    clean = gateway("check", "--strict", "-c", str(config_file))
    assert (clean.returncode, clean.stdout) == (0, f"{config_file}: ok (5 routes, 2 upstreams, store sqlite)\n")


def test_run_logs_the_warnings_at_start(config_file: Path) -> None:
    path = _with_routes(config_file, WARNED_ROUTES)
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "run", "-c", str(path), "--host", "127.0.0.1",
                             "--port", "0"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = threading.Timer(30, proc.kill)  # a gateway that never logs ends the loop below
    deadline.start()
    try:
        logged: list[str] = []
        assert proc.stdout is not None
        for line in proc.stdout:
            event = json.loads(line) if line.startswith("{") else {}
            if event.get("event") == "route_never_matched":
                logged.append(event["why"])
            if len(logged) == len(WARNINGS) or event.get("event") not in {"starting", "route_never_matched"}:
                break
        assert logged == WARNINGS
    finally:
        deadline.cancel()
        proc.terminate()
        proc.wait(timeout=30)
