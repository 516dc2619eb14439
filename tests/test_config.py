"""The config loader as its user meets it: real files in tmp_path, ``load``/``parse`` called
directly, every problem reported at once with its key path and YAML line."""

from __future__ import annotations

import dataclasses
import os
import secrets
from pathlib import Path

import pytest

from gateway import config
from gateway.config import AUTHENTICATED, PUBLIC, Access
from gateway.errors import ConfigError

SECRET = secrets.token_urlsafe(36)  # 48 characters
ENV = {"GATEWAY_SECRET": SECRET}

BASE = """\
listen: {host: 127.0.0.1, port: 8080}
public_url: https://app.example.com
store: sqlite:gateway.db
upstreams:
  app: {url: "http://127.0.0.1:8000", timeout: 30s}
tokens:
  issuer: https://app.example.com
  audience: app
  keys:
    - {kid: k1, algorithm: HS256, secret: "${GATEWAY_SECRET}"}
cookies:
  secure: true
routes:
  - {path: /static/**, access: public}
  - {path: /admin/**, methods: [GET, POST], access: {roles: [admin]}}
  - {path: /**, access: authenticated, upstream: app}
"""


def vary(old: str, new: str, text: str = BASE) -> str:
    assert old in text, old
    return text.replace(old, new, 1)


def write(directory: Path, text: str, name: str = "gateway.yaml") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(text)
    return path


def load(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> config.Config:
    return config.load(write(tmp_path, text), env=ENV if env is None else env)


def problems(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text, env)
    assert info.value.problems, "a ConfigError must carry its problems"
    return info.value.problems


def line_of(text: str, needle: str, nth: int = 1) -> int:
    """The 1-based line of the nth line of ``text`` containing ``needle``."""
    hits = [n for n, line in enumerate(text.splitlines(), 1) if needle in line]
    assert len(hits) >= nth, (needle, hits)
    return hits[nth - 1]


def only(found: list[str], path: str, line: int | None = None) -> str:
    """The single problem of ``found``; it must start with ``path`` and its line."""
    assert len(found) == 1, found
    prefix = f"{path} (line {line}): " if line is not None else f"{path} "
    assert found[0].startswith(prefix), (found[0], prefix)
    return found[0]


# --- the base config ------------------------------------------------------------------------


def test_base_config_loads_with_its_values_and_defaults(tmp_path: Path) -> None:
    cfg = load(tmp_path, BASE)
    assert cfg.listen == config.Listen(host="127.0.0.1", port=8080)
    assert cfg.public_url == "https://app.example.com"
    assert cfg.source == str(tmp_path / "gateway.yaml")
    assert dict(cfg.upstreams) == {"app": config.Upstream("app", "http://127.0.0.1:8000", 30.0, 5.0)}
    assert cfg.tokens.keys == (config.SigningKey("k1", "HS256", SECRET.encode()),)
    assert (cfg.tokens.issuer, cfg.tokens.audience) == ("https://app.example.com", "app")
    assert (cfg.tokens.access_ttl, cfg.tokens.refresh_ttl, cfg.tokens.refresh_idle_ttl,
            cfg.tokens.reuse_grace, cfg.tokens.leeway) == (900, 14 * 86400, 3 * 86400, 10, 5)
    assert cfg.cookies == config.Cookies(
        secure=True,
        access=config.Cookie("__Host-gw_access", "Lax", "/"),  # secure, Path=/, no Domain: __Host-
        refresh=config.Cookie("__Host-gw_refresh", "Strict", "/"),
    )
    assert cfg.auth_prefix == "/auth"
    assert cfg.identity_headers == (("X-Auth-User", "sub"), ("X-Auth-Roles", "roles"))
    assert [(r.index, r.path, r.methods, dict(r.access), r.upstream) for r in cfg.routes] == [
        (0, "/static/**", None, {"*": PUBLIC}, "app"),
        (1, "/admin/**", frozenset({"GET", "POST"}), {"*": Access("rules", roles=frozenset({"admin"}))}, "app"),
        (2, "/**", None, {"*": AUTHENTICATED}, "app"),
    ]


def test_parse_reads_text_without_a_file() -> None:
    cfg = config.parse(BASE.replace("store: sqlite:gateway.db", "store: sqlite:///var/lib/gw.db"),
                       env=ENV)
    assert cfg.store == "sqlite:///var/lib/gw.db"
    assert cfg.source == "<memory>"


def test_missing_file_is_one_problem(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        config.load(tmp_path / "nope.yaml", env=ENV)
    assert info.value.problems == [f"{tmp_path / 'nope.yaml'}: config file not found"]


def test_config_is_frozen(tmp_path: Path) -> None:
    cfg = load(tmp_path, BASE)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.store = "sqlite:///elsewhere.db"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.listen.port = 1  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.tokens.access_ttl = 1  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.tokens.keys[0].secret = b"x"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.routes[0].path = "/"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.cookies.access.name = "x"  # type: ignore[misc]
    assert isinstance(cfg.routes, tuple) and isinstance(cfg.tokens.keys, tuple)
    assert SECRET not in repr(cfg)


# --- environment variables ------------------------------------------------------------------


def test_variables_are_replaced_inside_strings_and_typed_keys(tmp_path: Path) -> None:
    text = vary("listen: {host: 127.0.0.1, port: 8080}", 'listen: {host: "${HOST}", port: "${PORT}"}')
    text = vary("issuer: https://app.example.com", 'issuer: "https://${DOMAIN}/id"', text)
    text = vary("secure: true", 'secure: "${SECURE}"', text)
    text = vary("timeout: 30s", 'timeout: "${TIMEOUT}"', text)
    cfg = load(tmp_path, text, {**ENV, "HOST": "::1", "PORT": "9090", "DOMAIN": "id.example.com",
                                "SECURE": "true", "TIMEOUT": "45s"})
    assert cfg.listen == config.Listen(host="::1", port=9090)
    assert cfg.tokens.issuer == "https://id.example.com/id"
    assert cfg.cookies.secure is True
    assert cfg.upstreams["app"].timeout == 45


@pytest.mark.parametrize(("env", "expected"), [
    ({}, "fallback"),               # unset: the default
    ({"AUD": ""}, "fallback"),      # set but empty: the default, as in the shell's ${VAR:-x}
    ({"AUD": "given"}, "given"),
])
def test_default_applies_when_unset_or_empty(tmp_path: Path, env: dict[str, str], expected: str) -> None:
    cfg = load(tmp_path, vary("audience: app", 'audience: "${AUD:-fallback}"'), {**ENV, **env})
    assert cfg.tokens.audience == expected


def test_unset_variable_without_default_is_reported_with_its_key_path(tmp_path: Path) -> None:
    text = vary("audience: app", 'audience: "${AUDIENCE}"')
    only(problems(tmp_path, text), "tokens.audience", line_of(text, "audience:"))
    assert "AUDIENCE is not set" in problems(tmp_path, text)[0]


def test_unset_secret_variable_is_one_problem(tmp_path: Path) -> None:
    found = problems(tmp_path, BASE, env={})
    only(found, "tokens.keys[0].secret", line_of(BASE, "kid: k1"))
    assert found[0].endswith("environment variable GATEWAY_SECRET is not set")


def test_unset_variable_in_a_list_is_reported_with_its_index(tmp_path: Path) -> None:
    text = vary("store:", 'trusted_proxies: ["10.0.0.0/8", "${PROXY_NET}"]\nstore:')
    cfg = load(tmp_path, text, {**ENV, "PROXY_NET": "192.0.2.0/24"})
    assert [str(n) for n in cfg.trusted_proxies] == ["10.0.0.0/8", "192.0.2.0/24"]
    found = problems(tmp_path, text)
    assert found[0].startswith(f"trusted_proxies[1] (line {line_of(text, 'trusted_proxies')}): ")
    assert "PROXY_NET is not set" in found[0]
    assert all(p.startswith("trusted_proxies[1] ") for p in found), found


# --- secrets from files ---------------------------------------------------------------------


@pytest.mark.parametrize("ending", ["\n", "\r\n", ""])
def test_secret_file_is_read_relative_to_the_config_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ending: str
) -> None:
    conf = tmp_path / "etc" / "gateway"
    (conf / "keys").mkdir(parents=True)
    (conf / "keys" / "signing.secret").write_text(SECRET + ending, newline="")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the working directory must not matter
    text = vary('secret: "${GATEWAY_SECRET}"', "secret_file: keys/signing.secret")
    cfg = config.load(write(conf, text), env={})
    assert cfg.tokens.keys[0].secret == SECRET.encode()


def test_secret_file_may_be_absolute(tmp_path: Path) -> None:
    secret_path = tmp_path / "abs" / "signing.secret"
    secret_path.parent.mkdir()
    secret_path.write_text(SECRET + "\n")
    cfg = load(tmp_path / "conf", vary('secret: "${GATEWAY_SECRET}"', f'secret_file: "{secret_path}"'))
    assert cfg.tokens.keys[0].secret == SECRET.encode()


def test_secret_and_secret_file_together_is_a_problem(tmp_path: Path) -> None:
    (tmp_path / "signing.secret").write_text(SECRET)
    text = vary('secret: "${GATEWAY_SECRET}"', 'secret: "${GATEWAY_SECRET}", secret_file: signing.secret')
    found = only(problems(tmp_path, text), "tokens.keys[0].secret", line_of(text, "kid: k1"))
    assert "not both" in found


def test_missing_secret_file_is_a_problem(tmp_path: Path) -> None:
    text = vary('secret: "${GATEWAY_SECRET}"', "secret_file: nope.secret")
    found = only(problems(tmp_path, text), "tokens.keys[0].secret_file", line_of(text, "kid: k1"))
    assert "cannot read nope.secret" in found


def test_secret_file_that_is_a_directory_is_a_problem(tmp_path: Path) -> None:
    (tmp_path / "keys").mkdir()
    text = vary('secret: "${GATEWAY_SECRET}"', "secret_file: keys")
    found = only(problems(tmp_path, text), "tokens.keys[0].secret_file", line_of(text, "kid: k1"))
    assert "cannot read keys" in found


def test_empty_secret_file_is_a_problem(tmp_path: Path) -> None:
    (tmp_path / "signing.secret").write_text("\n")
    text = vary('secret: "${GATEWAY_SECRET}"', "secret_file: signing.secret")
    only(problems(tmp_path, text), "tokens.keys[0].secret", line_of(text, "kid: k1"))


# --- weak secrets ---------------------------------------------------------------------------


@pytest.mark.parametrize(("secret", "why"), [
    ("Kx7-pQ2_vR9zT4wY1mN8", "is 20 bytes; HS256 needs at least 32"),
    ("changeme", "well-known placeholder"),
    ("secret", "well-known placeholder"),
    ("Secret", "well-known placeholder"),
    ("your-256-bit-secret", "well-known placeholder"),
    ("a" * 40, "almost no variety"),
    ("abcabcabc" * 5, "almost no variety"),
    ("", "empty"),
])
def test_weak_hs256_secret_is_refused(tmp_path: Path, secret: str, why: str) -> None:
    found = only(problems(tmp_path, BASE, {"GATEWAY_SECRET": secret}),
                 "tokens.keys[0].secret", line_of(BASE, "kid: k1"))
    assert why in found
    if secret:
        assert secret not in found.split(": ", 1)[1]  # a problem never echoes the secret


def test_empty_default_for_a_secret_is_refused(tmp_path: Path) -> None:
    text = vary('"${GATEWAY_SECRET}"', '"${GATEWAY_SECRET:-}"')
    only(problems(tmp_path, text, env={}), "tokens.keys[0].secret", line_of(text, "kid: k1"))


def test_strong_secret_of_exactly_32_bytes_is_accepted(tmp_path: Path) -> None:
    secret = secrets.token_hex(16)  # 32 characters
    assert load(tmp_path, BASE, {"GATEWAY_SECRET": secret}).tokens.keys[0].secret == secret.encode()


# --- durations ------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "seconds"), [
    ("500ms", 0.5), ("30s", 30), ("15m", 900), ("12h", 43200), ("14d", 1209600), ("0s", 0),
])
def test_parse_duration(text: str, seconds: float) -> None:
    assert config.parse_duration(text) == seconds


def test_durations_in_the_config(tmp_path: Path) -> None:
    text = vary("timeout: 30s", "timeout: 500ms, connect_timeout: 2s")
    text = vary("  keys:", "  access_ttl: 5m\n  refresh_ttl: 30d\n  refresh_idle_ttl: 12h\n"
                "  reuse_grace: 30s\n  leeway: 0s\n  keys:", text)
    cfg = load(tmp_path, text)
    assert (cfg.upstreams["app"].timeout, cfg.upstreams["app"].connect_timeout) == (0.5, 2)
    assert (cfg.tokens.access_ttl, cfg.tokens.refresh_ttl, cfg.tokens.refresh_idle_ttl,
            cfg.tokens.reuse_grace, cfg.tokens.leeway) == (300, 30 * 86400, 43200, 30, 0)


@pytest.mark.parametrize("bad", ['"15"', "15 minutes", "1.5h", "15", "-5m", "15M", "m", "[15m]"])
def test_bad_duration_is_a_problem_naming_its_key(tmp_path: Path, bad: str) -> None:
    text = vary("  keys:", f"  access_ttl: {bad}\n  keys:")
    found = only(problems(tmp_path, text), "tokens.access_ttl", line_of(text, "access_ttl"))
    assert "duration like 30s, 15m, 12h, 14d" in found


def test_duration_out_of_range_is_a_problem(tmp_path: Path) -> None:
    text = vary("  keys:", "  access_ttl: 2d\n  keys:")
    found = only(problems(tmp_path, text), "tokens.access_ttl", line_of(text, "access_ttl"))
    assert found.endswith("must be between 1s and 1d")


def test_idle_ttl_longer_than_refresh_ttl_is_a_problem(tmp_path: Path) -> None:
    text = vary("  keys:", "  refresh_ttl: 1d\n  refresh_idle_ttl: 2d\n  keys:")
    only(problems(tmp_path, text), "tokens.refresh_idle_ttl")


# --- unknown keys and wrong types -----------------------------------------------------------


@pytest.mark.parametrize(("old", "new", "path", "needle"), [
    ("cookies:", "listne: {port: 1}\ncookies:", "listne", "listne"),
    ("  keys:", "  kyes: []\n  keys:", "tokens.kyes", "kyes"),
    ("timeout: 30s", "timeout: 30s, timout: 5s", "upstreams.app.timout", "timout"),
    ("secure: true", "secure: true\n  access: {smae_site: lax}", "cookies.access.smae_site", "smae_site"),
    ("{path: /admin/**,", "{path: /admin/**, acess: public,", "routes[1].acess", "acess"),
    ("access: {roles: [admin]}", "access: {roles: [admin], rolez: [x]}", "routes[1].access.rolez", "rolez"),
    ("algorithm: HS256,", "algorithm: HS256, kdi: k2,", "tokens.keys[0].kdi", "kdi"),
])
def test_unknown_key_is_a_problem_with_its_path(tmp_path: Path, old: str, new: str, path: str,
                                                 needle: str) -> None:
    text = vary(old, new)
    found = only(problems(tmp_path, text), path, line_of(text, needle))
    assert "unknown key (expected one of: " in found


def test_unknown_key_on_its_own_line_points_at_the_key(tmp_path: Path) -> None:
    text = vary("  keys:", "  kyes:\n    - a\n  keys:")
    only(problems(tmp_path, text), "tokens.kyes", line_of(text, "kyes:"))


@pytest.mark.parametrize(("old", "new", "path", "message"), [
    ("port: 8080", "port: [80, 81]", "listen.port", "expected an integer, got a list"),
    ("port: 8080", "port: 70000", "listen.port", "must be between 1 and 65535"),
    ("port: 8080", "port: true", "listen.port", "expected an integer, got a boolean"),
    ("secure: true", 'secure: "yes"', "cookies.secure", "expected true or false, got a string"),
    ("secure: true", "secure: 1", "cookies.secure", "expected true or false, got a number"),
    ("issuer: https://app.example.com", "issuer: [a]", "tokens.issuer", "expected a string, got a list"),
    ("listen: {host: 127.0.0.1, port: 8080}", "listen: 8080", "listen", "expected a mapping"),
    ("public_url: https://app.example.com", "public_url: https://app.example.com/app",
     "public_url", "must be an http(s) origin"),
])
def test_wrong_type_is_a_problem(tmp_path: Path, old: str, new: str, path: str, message: str) -> None:
    text = vary(old, new)
    found = only(problems(tmp_path, text), path, line_of(text, new.split(":")[0]))
    assert message in found


def test_routes_must_be_a_list(tmp_path: Path) -> None:
    text = BASE.split("routes:")[0] + "routes: {path: /**}\n"
    found = problems(tmp_path, text)
    assert any(p.startswith(f"routes (line {line_of(text, 'routes:')}): expected a list") for p in found), found


def test_empty_file_lists_what_is_required(tmp_path: Path) -> None:
    found = problems(tmp_path, "")
    assert sorted(p.split(":")[0] for p in found) == ["routes", "tokens", "upstreams"]


def test_a_document_that_is_not_a_mapping_is_a_problem(tmp_path: Path) -> None:
    found = problems(tmp_path, "- a\n- b\n")
    assert found[0].startswith("<top> (line 1): expected a mapping")


# --- routes ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("pattern", "message"), [
    ("admin/**", "must start with /"),
    ("/a/**/b", "* and ** may only be the last segment"),
    ("/a/*/b", "* and ** may only be the last segment"),
    ("/a/../b", "segment '..' is not allowed"),
    ("/a/./b", "segment '.' is not allowed"),
    ("/a//b", "segment '' is not allowed"),
    ("/a*", "segment 'a*' is not allowed"),
    ("/a/b**", "segment 'b**' is not allowed"),
    ('"/admin\\n"', "is not allowed"),
])
def test_bad_route_pattern_is_a_problem(tmp_path: Path, pattern: str, message: str) -> None:
    text = vary("{path: /admin/**,", f"{{path: {pattern},")
    found = only(problems(tmp_path, text), "routes[1].path", line_of(text, "methods"))
    assert message in found


@pytest.mark.parametrize("pattern", ["/", "/exact", "/docs/", "/x/*", "/x/**", "/**", "/a-b/c_d/~e.f"])
def test_good_route_patterns(tmp_path: Path, pattern: str) -> None:
    cfg = load(tmp_path, vary("{path: /admin/**,", f"{{path: {pattern!r},"))
    assert cfg.routes[1].path == pattern


def test_unknown_upstream_on_a_route_is_a_problem(tmp_path: Path) -> None:
    text = vary("upstream: app}", "upstream: ap}")
    found = only(problems(tmp_path, text), "routes[2].upstream", line_of(text, "upstream: ap}"))
    assert "no upstream named 'ap' (have: app)" in found


def test_with_two_upstreams_every_route_names_one(tmp_path: Path) -> None:
    text = vary("  app: {url:", '  api: {url: "http://127.0.0.1:9000"}\n  app: {url:')
    found = problems(tmp_path, text)
    assert sorted(found) == sorted([
        f"routes[0].upstream (line {line_of(text, '/static/**')}): is required",
        f"routes[1].upstream (line {line_of(text, '/admin/**')}): is required",
    ])
    cfg = load(tmp_path, text.replace("access: public}", "access: public, upstream: api}")
               .replace("[admin]}}", "[admin]}, upstream: api}"))
    assert [r.upstream for r in cfg.routes] == ["api", "api", "app"]
    assert cfg.upstreams["api"].url == "http://127.0.0.1:9000"


@pytest.mark.parametrize(("access", "expected"), [
    ("public", {"*": PUBLIC}),
    ("authenticated", {"*": AUTHENTICATED}),
    ("{roles: [admin, ops]}", {"*": Access("rules", roles=frozenset({"admin", "ops"}))}),
    ("{claims: {team: blue, level: 3, staff: true}}",
     {"*": Access("rules", claims=(("team", "blue"), ("level", 3), ("staff", True)))}),
    ("{roles: [admin], claims: {team: blue}}",
     {"*": Access("rules", roles=frozenset({"admin"}), claims=(("team", "blue"),))}),
    ('{GET: public, "*": authenticated}', {"GET": PUBLIC, "*": AUTHENTICATED}),
    ("{get: public, POST: {roles: [admin]}}",
     {"GET": PUBLIC, "POST": Access("rules", roles=frozenset({"admin"}))}),
])
def test_access_forms(tmp_path: Path, access: str, expected: dict[str, Access]) -> None:
    cfg = load(tmp_path, vary("access: {roles: [admin]}", f"access: {access}"))
    assert dict(cfg.routes[1].access) == expected


def test_access_defaults_to_authenticated_and_methods_are_upper_case(tmp_path: Path) -> None:
    cfg = load(tmp_path, vary("methods: [GET, POST], access: {roles: [admin]}", "methods: [get, Post]"))
    assert dict(cfg.routes[1].access) == {"*": AUTHENTICATED}
    assert cfg.routes[1].methods == frozenset({"GET", "POST"})


@pytest.mark.parametrize(("access", "path", "message"), [
    ("{roles: []}", "routes[1].access.roles", "expected a non-empty list of role names"),
    ("everyone", "routes[1].access", "expected public, authenticated, {roles: [...]} or {claims: {...}}"),
    ("{}", "routes[1].access", "expected roles or claims"),
    ("{claims: {level: 1.5}}", "routes[1].access.claims.level", "expected a string, number or boolean"),
    ("{GET: public, POST: everyone}", "routes[1].access.POST", "expected public, authenticated"),
])
def test_bad_access_is_a_problem(tmp_path: Path, access: str, path: str, message: str) -> None:
    text = vary("access: {roles: [admin]}", f"access: {access}")
    found = only(problems(tmp_path, text), path, line_of(text, "/admin/**"))
    assert message in found


def test_empty_methods_list_is_a_problem(tmp_path: Path) -> None:
    text = vary("methods: [GET, POST]", "methods: []")
    only(problems(tmp_path, text), "routes[1].methods", line_of(text, "/admin/**"))


# --- every problem at once, with lines ------------------------------------------------------

FOUR_MISTAKES = """\
listen:
  host: 127.0.0.1
  port: [80]
upstreams:
  app: {url: "http://127.0.0.1:8000"}
tokens:
  issuer: https://app.example.com
  audience: app
  access_ttl: 15 minutes
  keys:
    - kid: k1
      secret: "${GATEWAY_SECRET}"
cookies:
  secure: false
routes:
  - path: /static/**
    access: public
  - path: admin/**
    access:
      roles: [admin]
      rolez: [ops]
"""


def test_every_problem_is_reported_at_once_with_path_and_line(tmp_path: Path) -> None:
    found = problems(tmp_path, FOUR_MISTAKES)
    expected = {
        "listen.port": line_of(FOUR_MISTAKES, "port: [80]"),
        "tokens.access_ttl": line_of(FOUR_MISTAKES, "access_ttl"),
        "routes[1].path": line_of(FOUR_MISTAKES, "admin/**"),
        "routes[1].access.rolez": line_of(FOUR_MISTAKES, "rolez"),
    }
    assert len(found) == 4, found
    assert sorted(p.split(" (line ")[0] for p in found) == sorted(expected)
    for path, line in expected.items():
        assert any(p.startswith(f"{path} (line {line}): ") for p in found), (path, line, found)


def test_a_problem_with_a_block_value_points_at_its_key(tmp_path: Path) -> None:
    text = FOUR_MISTAKES.replace("      roles: [admin]\n      rolez: [ops]\n", "      rolez: [ops]\n")
    found = problems(tmp_path, text)
    assert f"routes[1].access (line {line_of(text, '    access:', 2)}): expected roles or claims" in found


def test_missing_required_key_points_at_its_parent(tmp_path: Path) -> None:
    text = vary("  - {path: /static/**, access: public}", "  - {access: public}")
    only(problems(tmp_path, text), "routes[0].path", line_of(text, "{access: public}"))


def test_duplicated_key_is_a_problem(tmp_path: Path) -> None:
    text = vary("  audience: app", "  audience: app\n  audience: other")
    found = only(problems(tmp_path, text), "tokens.audience", line_of(text, "audience: other"))
    assert "given twice" in found


def test_duplicated_top_level_key_is_a_problem(tmp_path: Path) -> None:
    text = BASE + "store: sqlite:other.db\n"
    only(problems(tmp_path, text), "store", line_of(text, "other.db"))


@pytest.mark.parametrize(("old", "new", "needle"), [
    ("  audience: app", "  audience: app: other", "app: other"),
    ("  keys:", "  keys: [", "kid: k1"),  # the parser notices on the next line
    ("cookies:", "cookies:\n\tsecure: true", "\tsecure"),
    ("listen: {host: 127.0.0.1, port: 8080}", "listen: {host: 127.0.0.1, port: 8080", None),
])
def test_invalid_yaml_is_one_clear_problem_with_a_line(tmp_path: Path, old: str, new: str,
                                                        needle: str | None) -> None:
    text = vary(old, new)
    found = problems(tmp_path, text)
    assert len(found) == 1, found
    assert found[0].startswith(f"{tmp_path / 'gateway.yaml'} (line ")
    assert "not valid YAML" in found[0]
    if needle is not None:
        assert f"(line {line_of(text, needle)})" in found[0]


def test_a_self_referencing_alias_is_a_problem_not_a_crash(tmp_path: Path) -> None:
    found = problems(tmp_path, BASE + "x: &a [*a]\n")
    assert len(found) == 1 and found[0].startswith("x (line ") and "unknown key" in found[0], found
    found = problems(tmp_path, BASE + "trusted_proxies: &a [*a]\n")
    assert len(found) == 1 and found[0].startswith("trusted_proxies[0] (line "), found


def test_nested_aliases_cost_one_walk_not_one_per_expansion(tmp_path: Path) -> None:
    # a few hundred bytes that expand to 10**9 strings: the line index walks each node once
    levels = "abcdefghi"
    anchors = [f"a: &a [{', '.join(['x'] * 10)}]"] + [
        f"{cur}: &{cur} [{', '.join(['*' + prev] * 10)}]" for prev, cur in zip(levels, levels[1:], strict=False)]
    found = problems(tmp_path, BASE + "x_lol: {" + ", ".join(anchors) + "}\n")
    assert len(found) == 1 and found[0].startswith("x_lol (line ") and "unknown key" in found[0], found


def test_a_config_file_over_the_size_limit_or_not_a_file_is_refused_unread(tmp_path: Path) -> None:
    from gateway.config import MAX_CONFIG_BYTES
    from gateway.config import load as load_file

    big = tmp_path / "big.yaml"
    big.write_text(BASE + "#" * MAX_CONFIG_BYTES + "\n")
    with pytest.raises(ConfigError) as caught:
        load_file(big)
    assert caught.value.problems == [f"{big}: over 256 KiB; a config is a few KiB"]
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)  # reading it would wait for a writer forever
    with pytest.raises(ConfigError) as caught:
        load_file(fifo)
    assert caught.value.problems == [f"{fifo}: not a regular file"]


# --- cookies --------------------------------------------------------------------------------


def test_insecure_cookies_with_an_https_public_url_are_refused(tmp_path: Path) -> None:
    text = vary("secure: true", "secure: false")
    found = only(problems(tmp_path, text), "cookies.secure", line_of(text, "secure: false"))
    assert "must be true when public_url is https" in found


def test_insecure_cookies_with_an_http_public_url_are_allowed(tmp_path: Path) -> None:
    text = vary("public_url: https://", "public_url: http://", vary("secure: true", "secure: false"))
    cfg = load(tmp_path, text)
    assert cfg.cookies.secure is False and cfg.public_url == "http://app.example.com"


def test_same_site_none_needs_secure(tmp_path: Path) -> None:
    text = vary("public_url: https://app.example.com\n", "")
    text = vary("secure: true", "secure: false\n  access: {same_site: none}", text)
    found = only(problems(tmp_path, text), "cookies.access.same_site", line_of(text, "same_site"))
    assert "none needs cookies.secure: true" in found
    cfg = load(tmp_path, text.replace("secure: false", "secure: true"))
    assert cfg.cookies.access.same_site == "None"


def test_cookie_problems(tmp_path: Path) -> None:
    text = vary("secure: true", "secure: true\n  access: {name: gw}\n  refresh: {name: gw, path: /api}")
    found = problems(tmp_path, text)
    assert sorted(p.split(" (line ")[0] for p in found) == ["cookies.refresh.name", "cookies.refresh.path"]


# --- the store ------------------------------------------------------------------------------


def test_relative_sqlite_store_is_relative_to_the_config_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = config.load(write(Path("conf"), vary("sqlite:gateway.db", "sqlite:data/gw.db")), env=ENV)
    assert cfg.store == f"sqlite://{tmp_path.resolve() / 'conf' / 'data' / 'gw.db'}"


def test_store_defaults_to_gateway_db_next_to_the_config(tmp_path: Path) -> None:
    cfg = load(tmp_path, vary("store: sqlite:gateway.db\n", ""))
    assert cfg.store == f"sqlite://{tmp_path.resolve() / 'gateway.db'}"


def test_absolute_sqlite_store_is_kept(tmp_path: Path) -> None:
    cfg = load(tmp_path, vary("sqlite:gateway.db", "sqlite:///var/lib/gateway/gw.db"))
    assert cfg.store == "sqlite:///var/lib/gateway/gw.db"


@pytest.mark.parametrize("url", ["postgres://db/gw", "sqlite://host/gw.db", "sqlite:", "gateway.db", "redis://"])
def test_unsupported_store_is_a_problem(tmp_path: Path, url: str) -> None:
    text = vary("sqlite:gateway.db", f'"{url}"')
    found = only(problems(tmp_path, text), "store", line_of(text, "store:"))
    assert "expected sqlite:///ABSOLUTE/PATH.db, sqlite:RELATIVE/PATH.db or redis://HOST:PORT/DB" in found


@pytest.mark.parametrize("url", ["redis://localhost:6379/0", "rediss://:pw@cache:6380/2?key_prefix=app1:",
                                 "unix:///run/redis.sock"])
def test_redis_store_urls_are_taken_as_they_are(tmp_path: Path, url: str) -> None:
    assert load(tmp_path, vary("sqlite:gateway.db", f'"{url}"')).store == url


# --- names that must be exactly right -------------------------------------------------------


@pytest.mark.parametrize(("old", "new", "path"), [
    ("kid: k1,", 'kid: "k1\\n",', "tokens.keys[0].kid"),
    ("secure: true", 'secure: true\n  access: {path: "/app\\n"}', "cookies.access.path"),
    ("[GET, POST]", '[GET, "POST\\n"]', "routes[1].methods[1]"),
])
def test_a_trailing_newline_does_not_slip_through(tmp_path: Path, old: str, new: str, path: str) -> None:
    found = problems(tmp_path, vary(old, new))
    assert any(p.startswith(f"{path} ") for p in found), found


def test_an_upstream_claim_may_not_take_a_name_the_gateway_sets(tmp_path: Path) -> None:
    text = BASE + """\
users:
  source: upstream
  url: http://127.0.0.1:8000/api/login
  claims: {tenant: user.tenant, sub: user.name, roles: user.groups}
"""
    found = problems(tmp_path, text)
    assert sorted(p.split(" ")[0] for p in found) == ["users.claims.roles", "users.claims.sub"]
    assert all("a claim the gateway sets itself" in p for p in found)
    cfg = load(tmp_path, text.replace(", sub: user.name, roles: user.groups", ""))
    assert cfg.users.upstream is not None and cfg.users.upstream.claims == (("tenant", "user.tenant"),)
