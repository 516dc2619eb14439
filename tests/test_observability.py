"""Metrics, the access log, request ids and security events, read from a real gateway.

Counters belong to the process, and other tests count into them too: each test scrapes
before and after, and asserts the exact difference. A request is counted once its answer
has been sent, so scrapes poll (with a deadline) until the expected count arrives; the
scrapes themselves (route ``metrics``) are left out of the comparisons.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import re
import secrets
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from processes import free_port, start_gateway, stop, until_healthy
from prometheus_client.parser import text_string_to_metric_families

from gateway import config as config_module
from gateway.errors import ConfigError
from gateway.logs import JsonFormatter, TextFormatter
from gateway.reload import restart_needed
from gateway.sessions import hash_token
from gateway.store import Session, open_store

from conftest import (
    PASSWORDS,
    Gateway,
    GatewayFactory,
    Upstream,
    add_test_users,
    base_config,
    raw_get,
    raw_request,
)

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


async def scrape(http: aiohttp.ClientSession, url: str) -> Samples:
    async with http.get(url) as resp:
        assert resp.status == 200, await resp.text()
        assert resp.headers["Content-Type"].startswith("text/plain; version=")
        return parse(await resp.text())


def changes(before: Samples, after: Samples, name: str, *, skip_metrics_route: bool = True) -> dict[tuple[str, ...], float]:
    """How each series of ``name`` moved, by its label values (sorted by label name)."""
    out = {}
    for (sample, labels), value in after.items():
        if sample != name or (skip_metrics_route and ("route", "metrics") in labels):
            continue
        moved = value - before.get((sample, labels), 0.0)
        if moved:
            out[tuple(v for _, v in sorted(labels))] = moved
    return out


async def settled(http: aiohttp.ClientSession, url: str, before: Samples, name: str,
                  expected: dict[tuple[str, ...], float], seconds: float = 10) -> Samples:
    """Scrape until ``name`` has moved by ``expected`` (or the deadline passes); the last scrape."""
    deadline = time.monotonic() + seconds
    while True:
        after = await scrape(http, url)
        if changes(before, after, name) == expected or time.monotonic() > deadline:
            return after
        await asyncio.sleep(0.02)


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# --- metrics --------------------------------------------------------------------------------


async def test_requests_counted_by_route_and_status_class(gw: Gateway) -> None:
    metrics_url = f"{gw.url}/metrics"
    before = await scrape(gw.http, metrics_url)
    for _ in range(2):
        async with gw.http.get(f"{gw.url}/static/app.js") as resp:  # route 0: public
            assert resp.status == 200
    async with gw.http.get(f"{gw.url}/profile") as resp:  # route 3, no token
        assert resp.status == 401
    async with gw.http.get(f"{gw.url}/healthz") as resp:
        assert resp.status == 200
    expected = {("0", "2xx"): 2, ("3", "4xx"): 1, ("health", "2xx"): 1}
    after = await settled(gw.http, metrics_url, before, "gateway_requests_total", expected)
    assert changes(before, after, "gateway_requests_total") == expected
    assert changes(before, after, "gateway_request_duration_seconds_count") == {("0",): 2, ("3",): 1, ("health",): 1}
    assert changes(before, after, "gateway_auth_failures_total") == {("missing",): 1}
    # the scrape counts itself too, under its own name
    assert value(after, "gateway_requests_total", route="metrics", status_class="2xx") > \
        value(before, "gateway_requests_total", route="metrics", status_class="2xx")


async def test_auth_failures_by_reason(gw: Gateway) -> None:
    token = await gw.token("alice")
    forged = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
    before = await scrape(gw.http, f"{gw.url}/metrics")
    cases = {"malformed": "not-a-jwt", "bad_signature": forged}
    for token_sent in cases.values():
        async with gw.http.get(f"{gw.url}/profile", headers=bearer(token_sent)) as resp:
            assert resp.status == 401
    gw.clock.advance(16 * 60)  # past access_ttl and leeway
    async with gw.http.get(f"{gw.url}/profile", headers=bearer(token)) as resp:
        assert resp.status == 401
    # a page load without a session is sent to sign in: refused all the same
    async with gw.http.get(f"{gw.url}/profile", headers={"Accept": "text/html"}, allow_redirects=False) as resp:
        assert resp.status == 302
    expected = {("malformed",): 1, ("bad_signature",): 1, ("expired",): 1, ("missing",): 1}
    after = await settled(gw.http, f"{gw.url}/metrics", before, "gateway_requests_total",
                          {("3", "4xx"): 3, ("3", "3xx"): 1})
    assert changes(before, after, "gateway_auth_failures_total") == expected


async def test_unmatched_path_is_route_none(gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory(lambda raw: raw["routes"].pop())  # no catch-all
    before = await scrape(gw.http, f"{gw.url}/metrics")
    async with gw.http.get(f"{gw.url}/nowhere") as resp:
        assert resp.status == 404
    expected = {("none", "4xx"): 1}
    after = await settled(gw.http, f"{gw.url}/metrics", before, "gateway_requests_total", expected)
    assert changes(before, after, "gateway_requests_total") == expected


async def test_logins_refreshes_and_live_sessions(gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory(lambda raw: raw.update(throttle={"per_user": 3}))
    url = f"{gw.url}/metrics"
    before = await scrape(gw.http, url)
    assert value(before, "gateway_active_sessions") == 0
    first = await gw.login("alice")
    assert value(await scrape(gw.http, url), "gateway_active_sessions") == 1
    async with gw.http.post(f"{gw.url}/auth/refresh", headers={"Cookie": f"gw_refresh={first['refresh_token']}"}) as resp:
        assert resp.status == 200
    async with gw.http.post(f"{gw.url}/auth/refresh", headers={"Cookie": "gw_refresh=not-a-token"}) as resp:
        assert resp.status == 401
    gw.clock.advance(11)  # past reuse_grace: presenting the first token again is a replay
    async with gw.http.post(f"{gw.url}/auth/refresh", headers={"Cookie": f"gw_refresh={first['refresh_token']}"}) as resp:
        assert resp.status == 401
        assert (await resp.json())["error"] == "refresh_token_reused"
    assert value(await scrape(gw.http, url), "gateway_active_sessions") == 0  # the replay ended it
    for _ in range(3):
        async with gw.http.post(f"{gw.url}/auth/login", json={"username": "bob", "password": "wrong-password"}) as resp:
            assert resp.status == 401
    async with gw.http.post(f"{gw.url}/auth/login", json={"username": "bob", "password": PASSWORDS["bob"]}) as resp:
        assert resp.status == 429  # throttled, however right the password
    await gw.login("carol")
    await gw.login("alice")
    after = await scrape(gw.http, url)
    assert changes(before, after, "gateway_logins_total") == {("ok",): 3, ("failed",): 3, ("throttled",): 1}
    assert changes(before, after, "gateway_refresh_total") == {("rotated",): 1, ("invalid",): 1, ("reused",): 1}
    assert value(after, "gateway_active_sessions") == 2


async def test_upstream_errors_by_kind(gateway_factory: GatewayFactory, upstream: Upstream) -> None:
    def down(raw: dict[str, Any]) -> None:
        raw["upstreams"]["gone"] = {"url": f"http://127.0.0.1:{free_port()}"}  # nothing listens
        raw["routes"].insert(0, {"path": "/gone/**", "access": "public", "upstream": "gone"})
        raw["routes"].insert(0, {"path": "/slow", "access": "public", "upstream": "app"})
        for route in raw["routes"]:
            route.setdefault("upstream", "app")
        raw["upstreams"]["app"]["timeout"] = "200ms"

    gw = await gateway_factory(down)
    before = await scrape(gw.http, f"{gw.url}/metrics")
    async with gw.http.get(f"{gw.url}/gone/x") as resp:
        assert resp.status == 502
    async with gw.http.get(f"{gw.url}/slow") as resp:  # the upstream holds /slow
        assert resp.status == 504
    after = await settled(gw.http, f"{gw.url}/metrics", before, "gateway_requests_total",
                          {("1", "5xx"): 1, ("0", "5xx"): 1})
    assert changes(before, after, "gateway_upstream_errors_total") == {("connect",): 1, ("timeout",): 1}


async def test_admin_listener(gateway_factory: GatewayFactory, upstream: Upstream) -> None:
    port = free_port()
    gw = await gateway_factory(lambda raw: raw.update(metrics={"listen": f"127.0.0.1:{port}"}))
    admin = f"http://127.0.0.1:{port}"
    token = await gw.token()
    seen = len(upstream.seen)
    # never the routes' /**, in any spelling of the path, with a token or without
    for path in ("/metrics", "/METRICS", "/Metrics", "/metrics/", "/METRICS/", "//metrics", "/%6detrics",
                 "/./metrics"):
        for method in ("GET", "POST", "PROPFIND"):
            for headers in ({}, bearer(token)):
                answer = await raw_request(gw.port, raw_get(path, *(f"{k}: {v}" for k, v in headers.items()))
                                           .replace(b"GET ", f"{method} ".encode(), 1))
                assert (path, method, answer.status) == (path, method, 404)
                assert json.loads(answer.body)["error"] == "not_found"
    assert upstream.seen[seen:] == []
    before = await scrape(gw.http, f"{admin}/metrics")
    async with gw.http.get(f"{gw.url}/static/x") as resp:
        assert resp.status == 200
    expected = {("0", "2xx"): 1}
    after = await settled(gw.http, f"{admin}/metrics", before, "gateway_requests_total", expected)
    assert changes(before, after, "gateway_requests_total") == expected
    async with gw.http.get(f"{admin}/healthz") as resp:  # the admin listener serves /metrics only
        assert resp.status == 404
    async with gw.http.post(f"{admin}/metrics") as resp:
        assert resp.status == 405


async def test_metrics_disabled_leaves_the_path_to_the_routes(gateway_factory: GatewayFactory, upstream: Upstream) -> None:
    gw = await gateway_factory(lambda raw: raw.update(metrics={"enabled": False}))
    async with gw.http.get(f"{gw.url}/metrics") as resp:
        assert resp.status == 401  # /** wants a token, like any path
    async with gw.http.get(f"{gw.url}/metrics", headers=bearer(await gw.token())) as resp:
        assert resp.status == 200
    assert upstream.seen[-1].target == "/metrics"


async def test_metrics_on_the_main_listener_only_at_the_exact_path(gw: Gateway, upstream: Upstream) -> None:
    token = await gw.token()
    async with gw.http.get(f"{gw.url}/metrics") as resp:
        assert resp.status == 200
        assert "gateway_requests_total" in await resp.text()
    seen = len(upstream.seen)
    for path in ("/METRICS", "/Metrics", "/metrics/"):  # kept from the routes, as the auth prefix is
        answer = await raw_request(gw.port, raw_get(path, f"Authorization: Bearer {token}"))
        assert (path, answer.status, json.loads(answer.body)["error"]) == (path, 404, "not_found")
    assert upstream.seen[seen:] == []
    async with gw.http.get(f"{gw.url}/metrics.txt", headers=bearer(token)) as resp:  # another path
        assert resp.status == 200
    assert upstream.seen[-1].target == "/metrics.txt"


# --- config ---------------------------------------------------------------------------------


@pytest.mark.parametrize("section, problem", [
    ({"metrics": {"listen": "9100"}}, "metrics.listen: '9100' is not HOST:PORT"),
    ({"metrics": {"listen": "::1:9100"}}, "metrics.listen: '::1:9100' is not HOST:PORT"),
    ({"metrics": {"listen": "127.0.0.1:70000"}}, "metrics.listen: '127.0.0.1:70000' is not HOST:PORT"),
    ({"metrics": {"enabled": "yes"}}, "metrics.enabled: expected true or false"),
    ({"metrics": {"path": "/m"}}, "metrics.path: unknown key"),
    ({"log_format": "xml"}, "log_format: must be one of: json, text"),
])
def test_config_problems(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, section: dict[str, Any], problem: str) -> None:
    monkeypatch.setenv("TEST_GATEWAY_SECRET", secrets.token_urlsafe(48))
    raw = base_config("http://127.0.0.1:9", tmp_path / "g.db") | section
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError) as refused:
        config_module.load(path)
    problems = [re.sub(r" \(line \d+\)", "", p) for p in refused.value.problems]
    assert any(p.startswith(problem) for p in problems), problems


def test_config_values(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_GATEWAY_SECRET", secrets.token_urlsafe(48))
    raw = base_config("http://127.0.0.1:9", tmp_path / "g.db") | {
        "metrics": {"listen": "[::1]:9100"}, "log_format": "text"}
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump(raw))
    cfg = config_module.load(path)
    assert cfg.metrics == config_module.Metrics(enabled=True, listen=config_module.Listen("::1", 9100))
    assert cfg.log_format == "text"
    path.write_text(yaml.safe_dump(base_config("http://127.0.0.1:9", tmp_path / "g.db")))
    cfg = config_module.load(path)
    assert (cfg.metrics, cfg.log_format) == (config_module.Metrics(enabled=True, listen=None), "json")


def test_log_format_and_metrics_listener_change_only_on_a_restart(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_GATEWAY_SECRET", secrets.token_urlsafe(48))
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump(base_config("http://127.0.0.1:9", tmp_path / "g.db")))
    cfg = config_module.load(path)
    admin = config_module.Metrics(listen=config_module.Listen("127.0.0.1", 9100))
    assert restart_needed(cfg, dataclasses.replace(cfg, log_format="text")) == ["log_format"]
    assert restart_needed(cfg, dataclasses.replace(cfg, metrics=admin)) == ["metrics.listen"]
    assert restart_needed(cfg, dataclasses.replace(cfg, metrics=config_module.Metrics(enabled=False))) == []


# --- the access log and request ids ---------------------------------------------------------

ACCESS_FIELDS = {"time", "level", "logger", "event", "pid", "request_id", "method", "path", "route",
                 "upstream", "status", "duration_ms", "user", "error", "ip", "bytes_in", "bytes_out"}


def lines(caplog: pytest.LogCaptureFixture, name: str | None = None) -> list[dict[str, Any]]:
    formatter = JsonFormatter()
    return [json.loads(formatter.format(r)) for r in caplog.records
            if r.name.startswith("gateway") and (name is None or r.name == name)]


async def test_access_log_has_every_field_and_no_secret(gw: Gateway, caplog: pytest.LogCaptureFixture,
                                                        upstream: Upstream) -> None:
    caplog.set_level(logging.INFO)
    password = PASSWORDS["alice"]
    login_body = json.dumps({"username": "alice", "password": password}).encode()
    async with gw.http.post(f"{gw.url}/auth/login?next=/private-next-value&password={password}",
                            data=login_body, headers={"Content-Type": "application/json"}) as resp:
        assert resp.status == 200
        token, refresh = (await resp.json())["access_token"], resp.cookies["gw_refresh"].value
    cookie_value = "theirs-" + secrets.token_hex(8)
    async with gw.http.post(f"{gw.url}/items?q=private-query-value", data=b"x" * 1000, headers={
            **bearer(token), "Cookie": f"app_session={cookie_value}; gw_refresh={refresh}"}) as resp:
        assert resp.status == 200
        answer = await resp.read()
    async with gw.http.post(f"{gw.url}/auth/refresh", headers={"Cookie": f"gw_refresh={refresh}"}) as resp:
        assert resp.status == 200
    access = lines(caplog, "gateway.access")
    assert [(a["method"], a["path"], a["route"], a["status"]) for a in access] == [
        ("POST", "/auth/login", "auth", 200), ("POST", "/items", "3", 200), ("POST", "/auth/refresh", "auth", 200)]
    for line in access:
        assert set(line) == ACCESS_FIELDS
        assert line["event"] == "request" and line["duration_ms"] >= 0 and line["bytes_out"] > 0
    login, proxied, _ = access
    assert (login["user"], login["bytes_in"], login["upstream"]) == (None, len(login_body), None)
    assert (proxied["user"], proxied["upstream"], proxied["bytes_in"]) == ("alice", "app", 1000)
    assert proxied["bytes_out"] > len(answer)  # the body and its headers
    text = "\n".join(json.dumps(line) for line in lines(caplog))
    for secret in (password, token, refresh, cookie_value, "private-next-value", "private-query-value"):
        assert secret not in text


async def test_request_id_generated_passed_upstream_and_returned(gw: Gateway, upstream: Upstream,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    async with gw.http.get(f"{gw.url}/static/a") as resp:
        generated = resp.headers["X-Request-ID"]
    assert len(generated) == 32 and int(generated, 16) >= 0
    assert upstream.seen[-1].header("X-Request-ID") == [generated]
    async with gw.http.get(f"{gw.url}/static/a") as resp:
        assert resp.headers["X-Request-ID"] != generated  # one per request
    async with gw.http.get(f"{gw.url}/profile") as resp:  # a refusal carries one too
        assert resp.status == 401 and len(resp.headers["X-Request-ID"]) == 32
    assert [line["request_id"] for line in lines(caplog, "gateway.access")][0] == generated


async def test_request_id_from_a_client_is_not_believed(gw: Gateway, upstream: Upstream) -> None:
    async with gw.http.get(f"{gw.url}/static/a", headers={"X-Request-ID": "chosen-by-client",
                                                          "X_Request_ID": "another-spelling"}) as resp:
        ours = resp.headers["X-Request-ID"]
    assert ours != "chosen-by-client"
    sent = [v for k, v in upstream.seen[-1].headers if k.lower().replace("_", "-") == "x-request-id"]
    assert sent == [ours]


@pytest.mark.parametrize("sent, kept", [
    ("req-123.abc", True),
    ("A" * 128, True),
    ("A" * 129, False),
    ("has space", False),
    ("caf\u00e9", False),
    ("", False),
])
async def test_request_id_from_a_trusted_proxy(gateway_factory: GatewayFactory, upstream: Upstream,
                                               sent: str, kept: bool) -> None:
    gw = await gateway_factory(lambda raw: raw.update(trusted_proxies=["127.0.0.1/32"]))
    async with gw.http.get(f"{gw.url}/static/a", headers={"X-Request-ID": sent.encode().decode("latin-1")}) as resp:
        returned = resp.headers["X-Request-ID"]
    assert (returned == sent) is kept
    assert upstream.seen[-1].header("X-Request-ID") == [returned]


async def test_two_request_ids_from_a_trusted_proxy_are_replaced(gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory(lambda raw: raw.update(trusted_proxies=["127.0.0.1/32"]))
    async with gw.http.get(f"{gw.url}/static/a", headers=[("X-Request-ID", "a"), ("X-Request-ID", "b")]) as resp:
        assert resp.headers["X-Request-ID"] not in ("a", "b")


def test_text_format_is_one_readable_line() -> None:
    record = logging.LogRecord("gateway.access", logging.INFO, __file__, 1, "request", (), None)
    record.fields = {"method": "GET", "path": "/a b", "status": 200, "user": None, "roles": ["x", "y"]}
    line = TextFormatter().format(record)
    assert line.endswith(' INFO    gateway.access request method=GET path="/a b" status=200 roles=["x","y"]')


@pytest.mark.parametrize("value, written", [
    ("bob\x1b[2K\x1b[1A\x1b[32mINFO\x1b[0m\b\bfake\x07", '"bob\\u001b[2K\\u001b[1A\\u001b[32mINFO\\u001b[0m\\b\\bfake\\u0007"'),
    ("bob status=200", '"bob status=200"'),
    ("a=b", '"a=b"'),
    ('say"hi', '"say\\"hi"'),
    ("line\nbreak", '"line\\nbreak"'),
    ("caf\u00e9", '"caf\\u00e9"'),
    ("", '""'),
    ("bob@example.com", "bob@example.com"),
])
def test_text_format_quotes_what_could_forge_a_line(value: str, written: str) -> None:
    record = logging.LogRecord("gateway.security", logging.INFO, __file__, 1, "login_failed", (), None)
    record.fields = {"user": value}
    line = TextFormatter().format(record)
    assert line.endswith(f" login_failed user={written}") and "\n" not in line and "\x1b" not in line


# --- security events ------------------------------------------------------------------------


async def test_security_events(gateway_factory: GatewayFactory, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    gw = await gateway_factory(lambda raw: raw.update(throttle={"per_user": 1}))
    async with gw.http.post(f"{gw.url}/auth/login", json={"username": "bob", "password": "wrong-password"}) as resp:
        assert resp.status == 401
    async with gw.http.post(f"{gw.url}/auth/login", json={"username": "bob", "password": "wrong-password"}) as resp:
        assert resp.status == 429
    first = await gw.login("alice")
    async with gw.http.post(f"{gw.url}/auth/refresh", headers={"Cookie": f"gw_refresh={first['refresh_token']}"}):
        pass
    gw.clock.advance(11)
    async with gw.http.post(f"{gw.url}/auth/refresh", headers={"Cookie": f"gw_refresh={first['refresh_token']}"}):
        pass
    second = await gw.login("alice")
    async with gw.http.post(f"{gw.url}/auth/logout", headers=bearer(second["access_token"])) as resp:
        assert resp.status == 204
    third = await gw.login("alice")
    async with gw.http.post(f"{gw.url}/auth/logout-all", headers=bearer(third["access_token"])) as resp:
        assert resp.status == 204
    events = [(line["event"], line.get("user"), line.get("reason"))
              for line in lines(caplog, "gateway.security")]
    assert events == [
        ("login_failed", "bob", "bad_password"),
        ("login_throttled", "bob", None),
        ("login_succeeded", "alice", None),
        ("refresh_token_reused", "alice", None),
        ("login_succeeded", "alice", None),
        ("logout", None, None),
        ("login_succeeded", "alice", None),
        ("logout_all", "alice", None),
    ]
    text = "\n".join(json.dumps(line) for line in lines(caplog))
    assert "wrong-password" not in text and first["refresh_token"] not in text


async def test_security_events_from_the_command_line(tmp_path: Path) -> None:
    db = f"sqlite:{tmp_path / 'gateway.db'}"
    store = await open_store(db)
    await add_test_users(store)
    for sid in ("s1", "s2"):
        await store.create_session(Session(id=sid, user="alice", created_at=time.time(), last_used_at=time.time(),
                                           expires_at=time.time() + 3600), hash_token(sid))
    await store.close()

    def gateway(*args: str, stdin: str | None = None) -> list[dict[str, Any]]:
        done = subprocess.run([sys.executable, "-m", "gateway", *args, "--store", db], input=stdin,
                              capture_output=True, text=True, timeout=60, check=True)
        assert done.stdout.startswith(("ended", "changed", "disabled", "enabled"))  # the answer stays on stdout
        return [json.loads(line) for line in done.stderr.splitlines()]

    [revoked] = gateway("sessions", "revoke", "--session", "s1")
    [changed] = gateway("users", "passwd", "alice", "--password-stdin", stdin="another-password-9\n")
    [disabled] = gateway("users", "disable", "bob")
    [enabled] = gateway("users", "enable", "bob")
    assert (enabled["event"], enabled["user"], enabled["by"]) == ("user_enabled", "bob", "cli")
    assert [(e["logger"], e["event"], e["user"], e["ended"], e["by"]) for e in (revoked, changed, disabled)] == [
        ("gateway.security", "sessions_revoked", "alice", 1, "cli"),  # the session's user
        ("gateway.security", "password_changed", "alice", 1, "cli"),
        ("gateway.security", "user_disabled", "bob", 0, "cli"),
    ]
    assert revoked["sid"] == "s1" and "another-password-9" not in json.dumps(changed)


# --- several workers ------------------------------------------------------------------------

CONFIG = """\
listen: {{host: 127.0.0.1, port: {port}}}
store: "sqlite:///{db}"
upstreams: {{app: {{url: "{upstream}", timeout: 5s}}}}
tokens:
  issuer: observe
  audience: observe
  keys: [{{kid: k1, algorithm: HS256, secret: "{secret}"}}]
cookies: {{secure: false}}
routes: [{{path: /**, access: authenticated}}]
workers: 2
"""


def _served_by(log: Path, path: str) -> set[int]:
    return {line["pid"] for line in map(json.loads, log.read_text().splitlines())
            if line.get("event") == "request" and line.get("path") == path}


async def _until(check: Callable[[], Any], seconds: float = 15) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, "not within the deadline"
        await asyncio.sleep(0.05)


@pytest.mark.slow
async def test_two_workers_one_scrape_counts_both(tmp_path: Path, whoami_url: str,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    db = tmp_path / "gateway.db"
    store = await open_store(f"sqlite:{db}")
    await add_test_users(store)
    await store.close()
    port = free_port()
    config = tmp_path / "gateway.yaml"
    config.write_text(CONFIG.format(port=port, db=str(db).lstrip("/"), upstream=whoami_url,
                                    secret=secrets.token_urlsafe(48)))
    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setenv("TMPDIR", str(temp))  # where the supervisor makes its metrics directory
    url, log = f"http://127.0.0.1:{port}", tmp_path / "gateway.log"
    proc = start_gateway(config, log=log)
    # a new connection for every request, so that the kernel spreads them over the workers
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True),
                                     cookie_jar=aiohttp.DummyCookieJar()) as http:
        try:
            await until_healthy(http, url, proc)
            assert [p.name for p in temp.iterdir()][0].startswith("gateway-metrics-")
            async with http.post(f"{url}/auth/login", json={"username": "alice", "password": PASSWORDS["alice"]}) as resp:
                token = (await resp.json())["access_token"]
            sent = 0
            while len(_served_by(log, "/profile")) < 2 or sent < 20:
                async with http.get(f"{url}/profile", headers=bearer(token)) as resp:
                    assert resp.status == 200
                sent += 1
                assert sent < 500, "the requests never reached both workers"
            await _until(lambda: len([1 for line in log.read_text().splitlines() if '"/profile"' in line]) == sent)
            for _ in range(4):  # whichever worker answers the scrape, it reports both
                samples = await scrape(http, f"{url}/metrics")
                assert value(samples, "gateway_requests_total", route="0", status_class="2xx") == sent
                assert value(samples, "gateway_request_duration_seconds_count", route="0") == sent
                assert value(samples, "gateway_logins_total", outcome="ok") == 1
                assert value(samples, "gateway_active_sessions") == 1
            assert len(_served_by(log, "/metrics")) >= 1
        finally:
            assert stop(proc) == 0
    assert list(temp.iterdir()) == []  # the metrics directory goes with the supervisor
    assert not os.environ.get("PROMETHEUS_MULTIPROC_DIR")  # (this process never had one)
