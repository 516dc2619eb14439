"""Typed, frozen configuration.

``load(path)`` reads YAML, replaces ``${VAR}`` / ``${VAR:-default}`` from the environment,
reads ``<key>_file`` secrets, and checks every key. It reports *every* problem at once, each
with its key path and line (``routes[2].access.roles (line 31): expected a list of
strings``), by raising :class:`~gateway.errors.ConfigError`. Nothing here is re-validated
per request: the rest of the gateway trusts a ``Config``.
"""

from __future__ import annotations

import base64
import ipaddress
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml

from .errors import ConfigError
from .store import STORE_URL_FORMS, resolve_url

# --- the shape ------------------------------------------------------------------------------

AccessKind = Literal["public", "authenticated", "rules"]


@dataclass(frozen=True)
class Access:
    """What a request must carry. ``rules`` means: authenticated, and holding any one of
    ``roles`` (when given) and every one of ``claims`` (when given)."""

    kind: AccessKind
    roles: frozenset[str] = frozenset()
    claims: tuple[tuple[str, str | int | bool], ...] = ()

    @property
    def is_public(self) -> bool:
        return self.kind == "public"


PUBLIC = Access("public")
AUTHENTICATED = Access("authenticated")


@dataclass(frozen=True)
class Route:
    index: int
    path: str
    # None: every method. Otherwise the methods listed (HEAD is implied by GET).
    methods: frozenset[str] | None
    # Access per method; "*" is every method not named.
    access: Mapping[str, Access]
    upstream: str
    # Removed from the path before it is forwarded (and put back on the upstream's
    # Location headers and cookie paths); "" for none.
    strip_prefix: str = ""
    cors: Cors | None = None  # answer preflights and allow these other origins
    csrf: bool = False  # refuse cross-site state-changing requests to this route
    forward_token: bool = False  # send the verified access token upstream as a Bearer token


@dataclass(frozen=True)
class Cors:
    origins: frozenset[str]  # exact origins such as https://spa.example.com
    methods: frozenset[str]
    headers: frozenset[str]  # lower-cased request header names a page may send
    credentials: bool = False
    max_age: int = 600
    expose: tuple[str, ...] = ()


@dataclass(frozen=True)
class UpstreamCheck:
    """``users.source: upstream``: credentials are valid when the legacy app's login endpoint
    answers 2xx to them; the user's roles and claims come from its JSON answer."""

    url: str
    timeout: float = 5.0
    body: Literal["json", "form"] = "json"
    username_field: str = "username"
    password_field: str = "password"
    roles_field: str = ""  # a dotted path into the JSON answer, e.g. user.roles; "" for none
    claims: tuple[tuple[str, str], ...] = ()  # claim name -> dotted path into the answer


@dataclass(frozen=True)
class Users:
    source: Literal["store", "htpasswd", "upstream"] = "store"
    htpasswd: str = ""  # the file, for source htpasswd
    upstream: UpstreamCheck | None = None  # for source upstream
    default_roles: tuple[str, ...] = ()  # roles of users from htpasswd, and of new registrations


@dataclass(frozen=True)
class Registration:
    enabled: bool = False
    min_password_length: int = 12
    username_pattern: str = r"[a-z0-9][a-z0-9._-]{2,31}"


@dataclass(frozen=True)
class Throttle:
    """Failed logins per user name and per client address, in a window; over the limit, a
    login waits (``Retry-After``) for a delay that doubles with each further failure, up to
    ``max_delay``. Backing off rather than locking out means nobody can lock a user out for
    good."""

    window: float = 15 * 60
    per_user: int = 5
    per_ip: int = 20
    max_delay: float = 15 * 60


@dataclass(frozen=True)
class LoginPage:
    title: str = "Sign in"
    accent_color: str = "#1f5fbf"
    logo: str = ""  # a data: URL, read from logo_file when the config loads


@dataclass(frozen=True)
class Limits:
    request_body: int = 100 * 1024 * 1024  # bytes a proxied request body may have
    auth_body: int = 16 * 1024  # bytes a body to /auth/* may have


@dataclass(frozen=True)
class WebSockets:
    # An open socket is closed this long after its access token expires (its session
    # being revoked closes it at once).
    expiry_grace: float = 30.0


@dataclass(frozen=True)
class Upstream:
    name: str
    url: str
    timeout: float = 30.0
    connect_timeout: float = 5.0


@dataclass(frozen=True)
class SigningKey:
    """One key of ``tokens.keys``, pinned to its algorithm. HS256 keys carry a ``secret``;
    EdDSA, ES256 and RS256 keys a ``public_key`` and, if they may sign, a ``private_key``
    (cryptography key objects, loaded and checked when the config loads)."""

    kid: str
    algorithm: str
    secret: bytes = field(default=b"", repr=False)
    private_key: Any = field(default=None, repr=False)
    public_key: Any = field(default=None, repr=False)

    @property
    def symmetric(self) -> bool:
        return self.algorithm.startswith("HS")


@dataclass(frozen=True)
class Tokens:
    issuer: str
    audience: str
    keys: tuple[SigningKey, ...]
    access_ttl: float = 15 * 60
    refresh_ttl: float = 14 * 86400
    refresh_idle_ttl: float = 3 * 86400
    reuse_grace: float = 10.0
    leeway: float = 5.0


SameSite = Literal["Strict", "Lax", "None"]


@dataclass(frozen=True)
class Cookie:
    name: str
    same_site: SameSite
    path: str
    domain: str | None = None


@dataclass(frozen=True)
class Cookies:
    secure: bool
    access: Cookie
    refresh: Cookie
    # Names the gateway's cookies had before a rename: never forwarded, expired at logout.
    retired_names: tuple[str, ...] = ()


@dataclass(frozen=True)
class Listen:
    host: str = "0.0.0.0"
    port: int = 8080


@dataclass(frozen=True)
class Metrics:
    enabled: bool = True
    # A listener of its own for GET /metrics (the main listener then answers it 404).
    listen: Listen | None = None


@dataclass(frozen=True)
class Config:
    listen: Listen
    public_url: str | None
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
    store: str
    auth_prefix: str
    upstreams: Mapping[str, Upstream]
    tokens: Tokens
    cookies: Cookies
    identity_headers: tuple[tuple[str, str], ...]
    routes: tuple[Route, ...]
    limits: Limits = Limits()
    websockets: WebSockets = WebSockets()
    login_page: LoginPage = LoginPage()
    auth_cors: Cors | None = None  # other origins that may use /auth/* (an SPA elsewhere)
    workers: int = 1  # processes serving the one port
    users: Users = Users()
    registration: Registration = Registration()
    throttle: Throttle = Throttle()
    metrics: Metrics = Metrics()
    log_format: str = "json"  # or "text", for reading by eye while developing
    shutdown_timeout: float = 10.0  # how long requests in flight may take to finish on SIGTERM
    source: str = "<memory>"


# --- loading --------------------------------------------------------------------------------

_DURATION = re.compile(r"^(\d+)(ms|s|m|h|d)$")
_SIZE = re.compile(r"^(\d+)\s*([kmg]?)b?$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")  # RFC 9110 token: header and method names
_KID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_COOKIE_NAME = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]{1,64}$")
_ROLE = re.compile(r"^[A-Za-z0-9._:@-]{1,64}$")
_SEGMENT = re.compile(r"^[A-Za-z0-9._~!$&'()+,=:@%-]+$")
_HMAC_MIN_BYTES = {"HS256": 32}
# Claims the gateway sets and checks itself in access tokens: a user's own claims
# (users.claims) never take these names.
RESERVED_CLAIMS = frozenset({"iss", "aud", "sub", "iat", "exp", "nbf", "jti", "sid", "roles"})
ALGORITHMS = ("HS256", "EdDSA", "ES256", "RS256")
LOG_FORMATS = ("json", "text")
# Values that appear in examples and tutorials. A token signed with one of them can be
# forged by anyone who has read the same page.
_PLACEHOLDER_SECRETS = {
    "secret", "changeme", "change-me", "change_me", "changeit", "password", "your-secret",
    "your-256-bit-secret", "your_jwt_secret", "jwt-secret", "supersecret", "replace-me",
    "example", "test", "default",
}
_TOP_KEYS = {
    "listen", "public_url", "trusted_proxies", "store", "auth_prefix", "upstreams", "tokens",
    "cookies", "users", "identity_headers", "routes", "limits", "websockets", "login_page",
    "auth_cors", "workers", "registration", "throttle", "shutdown_timeout", "metrics", "log_format",
}
_ORIGIN = re.compile(r"^https?://[A-Za-z0-9.-]+(:\d{1,5})?$")
_COLOR = re.compile(r"^#(?:[0-9a-fA-F]{3}|[0-9a-fA-F]{6})$")
_LOGO_TYPES = {".png": "image/png", ".svg": "image/svg+xml", ".jpg": "image/jpeg",
               ".jpeg": "image/jpeg", ".webp": "image/webp", ".gif": "image/gif"}
METHODS_KNOWN = {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"}


def parse_duration(text: str) -> float:
    """``30s``, ``15m``, ``12h``, ``14d`` (and ``500ms``) as seconds; ValueError otherwise."""
    m = _DURATION.match(text.strip())
    if not m:
        raise ValueError(text)
    return int(m.group(1)) * _UNITS[m.group(2)]


def parse_size(text: str) -> int:
    """``512``, ``16k``, ``100m``, ``2g`` (binary units, an optional ``b``) as bytes."""
    m = _SIZE.match(text.strip())
    if not m:
        raise ValueError(text)
    return int(m.group(1)) * _SIZE_UNITS[m.group(2).lower()]


MAX_CONFIG_BYTES = 256 * 1024  # a real config is a few KiB; parsing YAML costs ~10 s per MiB


def load(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> Config:
    p = Path(path)
    try:
        if not p.is_file() and p.exists():  # a FIFO or a device would block the read
            raise ConfigError([f"{p}: not a regular file"])
        with p.open("rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
        if len(raw) > MAX_CONFIG_BYTES:
            raise ConfigError([f"{p}: over {MAX_CONFIG_BYTES // 1024} KiB; a config is a few KiB"])
        text = raw.decode("utf-8")
    except FileNotFoundError:
        raise ConfigError([f"{p}: config file not found"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"{p}: cannot read: {exc.__class__.__name__}"]) from None
    return parse(text, base_dir=p.parent, env=os.environ if env is None else env, source=str(p))


def parse(
    text: str,
    *,
    base_dir: Path = Path("."),
    env: Mapping[str, str] | None = None,
    source: str = "<memory>",
) -> Config:
    r = _Reader(base_dir, os.environ if env is None else env)
    try:
        data, r.lines = _compose(text, r)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise ConfigError([f"{source}{where}: not valid YAML: {getattr(exc, 'problem', exc)}"]) from None
    except RecursionError:  # an alias inside itself (&a [*a]), or absurd nesting
        raise ConfigError([f"{source}: not valid YAML: an alias refers to itself"]) from None
    if data is None:
        data = {}
    cfg = _config(r, data, source)
    if r.problems:
        raise ConfigError(r.problems)
    assert cfg is not None
    return cfg


def _compose(text: str, r: _Reader) -> tuple[Any, dict[str, int]]:
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        lines: dict[str, int] = {}
        if node is None:
            return None, lines
        _index_lines(node, "", lines, r)
        return loader.construct_document(node), lines
    finally:
        loader.dispose()


def _index_lines(node: yaml.Node, path: str, lines: dict[str, int], r: _Reader,
                 walked: set[int] | None = None) -> None:
    """The line of every key path. A node reached again through an alias is not walked
    again: its keys are reported at the anchor's lines, and nested aliases (a "billion
    laughs" of a few hundred bytes) cost one walk, not one per expansion."""
    lines[path] = node.start_mark.line + 1
    walked = set() if walked is None else walked
    if id(node) in walked:
        return
    walked.add(id(node))
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key_node, value_node in node.value:
            key = str(key_node.value)
            sub = _join(path, key)
            if key in seen:
                r.problems.append(f"{sub} (line {key_node.start_mark.line + 1}): key given twice")
            seen.add(key)
            _index_lines(value_node, sub, lines, r, walked)
            lines[sub] = key_node.start_mark.line + 1  # the key's line: a block value starts below it
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _index_lines(item, f"{path}[{i}]", lines, r, walked)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


class _Reader:
    """Collects problems; every accessor reports and returns a placeholder on a bad value, so
    that one pass finds everything."""

    def __init__(self, base_dir: Path, env: Mapping[str, str]) -> None:
        self.base_dir = base_dir
        self.env = env
        self.lines: dict[str, int] = {}
        self.problems: list[str] = []

    def problem(self, path: str, message: str) -> None:
        line = self.lines.get(path)
        if line is None:  # a missing key: point at its parent
            parent = path.rsplit(".", 1)[0] if "." in path else ""
            line = self.lines.get(parent) if parent else None
        where = f"{path or '<top>'}" + (f" (line {line})" if line else "")
        self.problems.append(f"{where}: {message}")

    def expand(self, value: Any, path: str) -> Any:
        if not isinstance(value, str) or "$" not in value:
            return value

        def sub(m: re.Match[str]) -> str:
            name, default = m.group(1), m.group(2)
            got = self.env.get(name)
            if got is None or (got == "" and default is not None):
                if default is None:
                    self.problem(path, f"environment variable {name} is not set")
                    return ""
                return default
            return got

        return _ENV.sub(sub, value)

    def section(self, value: Any, path: str, keys: set[str]) -> _Section:
        if value is None:
            value = {}
        if not isinstance(value, dict):
            self.problem(path, "expected a mapping")
            value = {}
        for key in value:
            if str(key) not in keys:
                choices = ", ".join(sorted(keys))
                self.problem(_join(path, str(key)), f"unknown key (expected one of: {choices})")
        return _Section(self, value, path)


class _Section:
    def __init__(self, r: _Reader, data: dict[Any, Any], path: str) -> None:
        self.r, self.data, self.path = r, data, path

    def has(self, key: str) -> bool:
        return key in self.data

    def at(self, key: str) -> str:
        return _join(self.path, key)

    def raw(self, key: str, default: Any = None) -> Any:
        return self.r.expand(self.data.get(key, default), self.at(key))

    def require(self, key: str) -> Any:
        if key not in self.data or self.data[key] is None:
            self.r.problem(self.at(key), "is required")
            return None
        return self.raw(key)

    def text(
        self,
        key: str,
        default: str | None = None,
        *,
        required: bool = False,
        pattern: re.Pattern[str] | None = None,
        choices: tuple[str, ...] = (),
    ) -> str:
        value = self.require(key) if required else self.raw(key, default)
        if value is None:
            return default or ""
        if not isinstance(value, str):
            self.r.problem(self.at(key), f"expected a string, got {_kind(value)}")
            return default or ""
        if choices and value.lower() not in {c.lower() for c in choices}:
            self.r.problem(self.at(key), f"must be one of: {', '.join(choices)}")
            return default or ""
        if pattern is not None and not pattern.fullmatch(value):
            self.r.problem(self.at(key), f"{value!r} is not a valid value")
            return default or ""
        return value

    def integer(self, key: str, default: int, *, lo: int, hi: int) -> int:
        value = self.raw(key, default)
        if isinstance(value, str) and value.strip().isdigit():  # e.g. from ${PORT}
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            self.r.problem(self.at(key), f"expected an integer, got {_kind(value)}")
            return default
        if not lo <= value <= hi:
            self.r.problem(self.at(key), f"must be between {lo} and {hi}")
            return default
        return value

    def flag(self, key: str, default: bool) -> bool:
        value = self.raw(key, default)
        if isinstance(value, str) and value.lower() in {"true", "false"}:
            value = value.lower() == "true"
        if not isinstance(value, bool):
            self.r.problem(self.at(key), f"expected true or false, got {_kind(value)}")
            return default
        return value

    def duration(self, key: str, default: float, *, lo: float = 0, hi: float = 366 * 86400) -> float:
        value = self.raw(key)
        if value is None:
            return default
        if not isinstance(value, str):
            self.r.problem(self.at(key), f"expected a duration like 30s, 15m, 12h, 14d, got {_kind(value)}")
            return default
        try:
            seconds = parse_duration(value)
        except ValueError:
            self.r.problem(self.at(key), f"{value!r} is not a duration like 30s, 15m, 12h, 14d")
            return default
        if not lo <= seconds <= hi:
            self.r.problem(self.at(key), f"must be between {_fmt(lo)} and {_fmt(hi)}")
            return default
        return seconds

    def size(self, key: str, default: int, *, lo: int, hi: int) -> int:
        value = self.raw(key)
        if value is None:
            return default
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        try:
            size = parse_size(value) if isinstance(value, str) else -1
        except ValueError:
            size = -1
        if size < 0:
            self.r.problem(self.at(key), f"expected a size like 16k, 100m or 2g, got {value!r}")
            return default
        if not lo <= size <= hi:
            self.r.problem(self.at(key), f"must be between {lo} and {hi} bytes")
            return default
        return size

    def secret(self, key: str) -> bytes:
        """``key: value`` or ``key_file: PATH`` (read relative to the config file)."""
        file_key = f"{key}_file"
        if self.has(key) and self.has(file_key):
            self.r.problem(self.at(key), f"give either {key} or {file_key}, not both")
            return b""
        if self.has(file_key):
            name = self.text(file_key)
            if not name:
                return b""
            path = self.r.base_dir / name
            try:
                data = path.read_bytes()
            except OSError as exc:
                self.r.problem(self.at(file_key), f"cannot read {name}: {exc.strerror or exc}")
                return b""
            data = data[:-2] if data.endswith(b"\r\n") else data.removesuffix(b"\n")
            if not data:
                self.r.problem(self.at(key), f"is empty ({name})")
            return data
        before = len(self.r.problems)
        value = self.text(key, required=True)
        if not value and len(self.r.problems) == before:  # not already reported (unset, missing)
            self.r.problem(self.at(key), "is empty")
        return value.encode()

    def sequence(self, key: str) -> list[Any]:
        value = self.data.get(key)
        if value is None:
            return []
        if not isinstance(value, list):
            self.r.problem(self.at(key), f"expected a list, got {_kind(value)}")
            return []
        return value

    def strings(self, key: str, *, pattern: re.Pattern[str] | None = None) -> list[str]:
        out = []
        for i, item in enumerate(self.sequence(key)):
            item = self.r.expand(item, f"{self.at(key)}[{i}]")
            if not isinstance(item, str) or (pattern is not None and not pattern.fullmatch(item)):
                self.r.problem(f"{self.at(key)}[{i}]", f"{item!r} is not a valid value")
                continue
            out.append(item)
        return out

    def mapping(self, key: str) -> Iterator[tuple[str, Any, str]]:
        value = self.data.get(key)
        if value is None:
            return
        if not isinstance(value, dict):
            self.r.problem(self.at(key), f"expected a mapping, got {_kind(value)}")
            return
        for k, v in value.items():
            yield str(k), v, _join(self.at(key), str(k))


def _kind(value: Any) -> str:
    if value is None:
        return "nothing"
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string",
            list: "a list", dict: "a mapping"}.get(type(value), type(value).__name__)


def _fmt(seconds: float) -> str:
    for unit in ("d", "h", "m", "s"):
        if seconds >= _UNITS[unit] and seconds % _UNITS[unit] == 0:
            return f"{int(seconds // _UNITS[unit])}{unit}"
    return f"{seconds}s"


# --- sections -------------------------------------------------------------------------------


def _config(r: _Reader, data: Any, source: str) -> Config | None:
    top = r.section(data, "", _TOP_KEYS)
    listen_s = r.section(top.raw("listen"), "listen", {"host", "port"})
    listen = Listen(host=listen_s.text("host", "0.0.0.0"), port=listen_s.integer("port", 8080, lo=1, hi=65535))
    public_url = _public_url(top)
    auth_prefix = top.text("auth_prefix", "/auth")
    if not re.fullmatch(r"^(/[A-Za-z0-9._~-]+)+$", auth_prefix):
        r.problem("auth_prefix", "must be a path such as /auth")
        auth_prefix = "/auth"
    upstreams = _upstreams(r, top)
    tokens = _tokens(r, top)
    cookies = _cookies(r, top, auth_prefix, public_url)
    users = _users(r, top)
    registration = _registration(r, top)
    if registration.enabled and users.source != "store":
        r.problem("registration.enabled", f"needs users.source: store (users come from {users.source})")
    throttle_s = r.section(top.raw("throttle"), "throttle", {"window", "per_user", "per_ip", "max_delay"})
    throttle = Throttle(window=throttle_s.duration("window", Throttle.window, lo=1, hi=86400),
                        per_user=throttle_s.integer("per_user", Throttle.per_user, lo=1, hi=1000),
                        per_ip=throttle_s.integer("per_ip", Throttle.per_ip, lo=1, hi=100000),
                        max_delay=throttle_s.duration("max_delay", Throttle.max_delay, lo=1, hi=86400))
    identity_headers = _identity_headers(top)
    routes = _routes(r, top, upstreams)
    limits_s = r.section(top.raw("limits"), "limits", {"request_body", "auth_body"})
    limits = Limits(request_body=limits_s.size("request_body", Limits.request_body, lo=0, hi=2**50),
                    auth_body=limits_s.size("auth_body", Limits.auth_body, lo=1024, hi=1024**2))
    ws = r.section(top.raw("websockets"), "websockets", {"expiry_grace"})
    websockets = WebSockets(expiry_grace=ws.duration("expiry_grace", WebSockets.expiry_grace, hi=86400))
    login_page = _login_page(r, top)
    auth_cors = _cors(r, top.raw("auth_cors"), "auth_cors", frozenset({"GET", "POST", "DELETE"})) \
        if top.has("auth_cors") else None
    return Config(
        listen=listen,
        public_url=public_url,
        trusted_proxies=_networks(top),
        store=_store(r, top),
        auth_prefix=auth_prefix,
        upstreams=upstreams,
        tokens=tokens,
        cookies=cookies,
        identity_headers=identity_headers,
        routes=routes,
        limits=limits,
        websockets=websockets,
        login_page=login_page,
        auth_cors=auth_cors,
        workers=top.integer("workers", 1, lo=1, hi=64),
        users=users,
        registration=registration,
        throttle=throttle,
        metrics=_metrics(r, top),
        log_format=top.text("log_format", "json", choices=LOG_FORMATS).lower(),
        shutdown_timeout=top.duration("shutdown_timeout", Config.shutdown_timeout, hi=3600),
        source=source,
    )


def _metrics(r: _Reader, top: _Section) -> Metrics:
    m = r.section(top.raw("metrics"), "metrics", {"enabled", "listen"})
    text = m.text("listen", "")
    listen = None
    if text:
        listen = parse_host_port(text)
        if listen is None:
            r.problem(m.at("listen"), f"{text!r} is not HOST:PORT (e.g. 127.0.0.1:9100, [::1]:9100)")
    return Metrics(enabled=m.flag("enabled", True), listen=listen)


def parse_host_port(text: str) -> Listen | None:
    """``HOST:PORT``, with an IPv6 host in brackets; None when it is not one."""
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        return None  # an IPv6 address without brackets: where does it end?
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        return None
    return Listen(host=host, port=int(port))


def _public_url(top: _Section) -> str | None:
    url = top.text("public_url", "")
    if not url:
        return None
    parts = urlsplit(url)
    if parts.scheme not in {"http", "https"} or not parts.hostname or parts.path not in {"", "/"} \
            or parts.query or parts.fragment:
        top.r.problem("public_url", "must be an http(s) origin such as https://app.example.com")
        return None
    return f"{parts.scheme}://{parts.netloc}"


def _networks(top: _Section) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    out = []
    for i, item in enumerate(top.sequence("trusted_proxies")):
        path = f"trusted_proxies[{i}]"
        before = len(top.r.problems)
        value = top.r.expand(item, path)
        if len(top.r.problems) > before:
            continue  # an unset variable, already reported
        try:
            out.append(ipaddress.ip_network(str(value), strict=False))
        except ValueError:
            top.r.problem(path, f"{item!r} is not an IP address or CIDR")
    return tuple(out)


def _store(r: _Reader, top: _Section) -> str:
    url = top.text("store", "sqlite:gateway.db")
    # A relative path is relative to the config file, so `gateway -c dir/gateway.yaml` finds
    # the same store whatever the working directory.
    resolved = resolve_url(url, r.base_dir)
    if resolved is None:
        r.problem("store", f"expected {STORE_URL_FORMS}")
        return url
    return resolved


def _upstreams(r: _Reader, top: _Section) -> dict[str, Upstream]:
    out: dict[str, Upstream] = {}
    for name, value, path in top.mapping("upstreams"):
        if not re.fullmatch(r"^[A-Za-z0-9_-]{1,64}$", name):
            r.problem(path, "upstream names use letters, digits, _ and -")
        s = r.section(value, path, {"url", "timeout", "connect_timeout"})
        url = s.text("url", required=True)
        parts = urlsplit(url)
        if url and (parts.scheme not in {"http", "https"} or not parts.hostname):
            r.problem(s.at("url"), "must be an http:// or https:// URL")
        elif url and (parts.path not in {"", "/"} or parts.query):
            r.problem(s.at("url"), "must be an origin without a path, such as http://127.0.0.1:8000")
        out[name] = Upstream(
            name=name,
            url=f"{parts.scheme}://{parts.netloc}",
            timeout=s.duration("timeout", 30.0, lo=0.001, hi=3600),
            connect_timeout=s.duration("connect_timeout", 5.0, lo=0.001, hi=300),
        )
    if not out:
        r.problem("upstreams", "at least one upstream is required")
    return out


def _tokens(r: _Reader, top: _Section) -> Tokens:
    s = r.section(top.raw("tokens"), "tokens", {
        "issuer", "audience", "keys", "access_ttl", "refresh_ttl", "refresh_idle_ttl",
        "reuse_grace", "leeway",
    })
    if not top.has("tokens"):
        r.problem("tokens", "is required (issuer, audience, keys)")
    keys: list[SigningKey] = []
    for i, item in enumerate(s.sequence("keys")):
        path = f"tokens.keys[{i}]"
        k = r.section(item, path, {"kid", "algorithm", "secret", "secret_file", "key_file"})
        kid = k.text("kid", required=True, pattern=_KID)
        algorithm = k.text("algorithm", "HS256", choices=ALGORITHMS)
        algorithm = next(a for a in ALGORITHMS if a.lower() == algorithm.lower()) if algorithm else "HS256"
        if algorithm in _HMAC_MIN_BYTES:
            if k.has("key_file"):
                r.problem(k.at("key_file"), f"{algorithm} takes a secret, not a key file")
            secret = k.secret("secret")
            _check_secret(r, k.at("secret"), secret, algorithm)
            key = SigningKey(kid=kid, algorithm=algorithm, secret=secret)
        else:
            for wrong in ("secret", "secret_file"):
                if k.has(wrong):
                    r.problem(k.at(wrong), f"{algorithm} takes a key_file (PEM), not a secret")
            key = _asymmetric_key(r, k, kid, algorithm, signs=not keys)
        if kid and any(other.kid == kid for other in keys):
            r.problem(k.at("kid"), f"kid {kid!r} is used by an earlier key")
        keys.append(key)
    if top.has("tokens") and not keys:
        r.problem("tokens.keys", "at least one key is required; the first one signs")
    access_ttl = s.duration("access_ttl", 15 * 60, lo=1, hi=86400)
    refresh_ttl = s.duration("refresh_ttl", 14 * 86400, lo=60, hi=366 * 86400)
    idle = s.duration("refresh_idle_ttl", min(3 * 86400, refresh_ttl), lo=60, hi=366 * 86400)
    if idle > refresh_ttl:
        r.problem("tokens.refresh_idle_ttl", "must not be longer than tokens.refresh_ttl")
    if access_ttl > refresh_ttl:
        r.problem("tokens.access_ttl", "must not be longer than tokens.refresh_ttl")
    return Tokens(
        issuer=s.text("issuer", required=top.has("tokens")),
        audience=s.text("audience", required=top.has("tokens")),
        keys=tuple(keys),
        access_ttl=access_ttl,
        refresh_ttl=refresh_ttl,
        refresh_idle_ttl=idle,
        reuse_grace=s.duration("reuse_grace", 10, lo=0, hi=300),
        leeway=s.duration("leeway", 5, lo=0, hi=60),
    )


def _asymmetric_key(r: _Reader, k: _Section, kid: str, algorithm: str, *, signs: bool) -> SigningKey:
    """A PEM key file: a private key (which may sign), or, for a key kept only to verify
    tokens signed before a rotation, a public key. Its type must fit the algorithm."""
    from cryptography.hazmat.primitives import serialization  # noqa: PLC0415
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa  # noqa: PLC0415

    name = k.text("key_file", required=True)
    if not name:
        return SigningKey(kid=kid, algorithm=algorithm)
    try:
        data = (r.base_dir / name).read_bytes()
    except OSError as exc:
        r.problem(k.at("key_file"), f"cannot read {name}: {exc.strerror or exc}")
        return SigningKey(kid=kid, algorithm=algorithm)
    private: Any = None
    try:
        private = serialization.load_pem_private_key(data, password=None)
        public: Any = private.public_key()
    except (ValueError, TypeError):
        try:
            public = serialization.load_pem_public_key(data)
        except (ValueError, TypeError):
            r.problem(k.at("key_file"), f"{name} is not an unencrypted PEM private or public key")
            return SigningKey(kid=kid, algorithm=algorithm)
    fits = {
        "EdDSA": isinstance(public, ed25519.Ed25519PublicKey),
        "ES256": isinstance(public, ec.EllipticCurvePublicKey) and isinstance(public.curve, ec.SECP256R1),
        "RS256": isinstance(public, rsa.RSAPublicKey) and public.key_size >= 2048,
    }[algorithm]
    if not fits:
        wanted = {"EdDSA": "an Ed25519 key", "ES256": "a P-256 EC key", "RS256": "an RSA key of 2048 bits or more"}
        r.problem(k.at("key_file"), f"{name} is not {wanted[algorithm]} (generate one with: "
                                    f"gateway keys generate --algorithm {algorithm})")
    elif signs and private is None:
        r.problem(k.at("key_file"), f"{name} is a public key, but the first key signs: it needs the private key")
    return SigningKey(kid=kid, algorithm=algorithm, private_key=private, public_key=public)


def _users(r: _Reader, top: _Section) -> Users:
    s = r.section(top.raw("users"), "users", {"source", "file", "url", "timeout", "body", "username_field",
                                              "password_field", "roles_field", "claims", "default_roles"})
    source = s.text("source", "store", choices=("store", "htpasswd", "upstream")).lower()
    roles = tuple(s.strings("default_roles", pattern=_ROLE))
    if source == "htpasswd":
        name = s.text("file", required=True)
        path = str((r.base_dir / name).resolve()) if name else ""
        if name and not Path(path).is_file():
            r.problem(s.at("file"), f"no such file: {name}")
        elif name:
            from . import htpasswd  # noqa: PLC0415 (only this source reads one)

            try:
                htpasswd.load(path)
            except htpasswd.HtpasswdError as exc:
                r.problem(s.at("file"), f"{name}: {exc}")
        return Users(source="htpasswd", htpasswd=path, default_roles=roles)
    if source == "upstream":
        url = s.text("url", required=True)
        parts = urlsplit(url)
        if url and (parts.scheme not in {"http", "https"} or not parts.hostname):
            r.problem(s.at("url"), "must be an http:// or https:// URL")
        claims = []
        for claim, where, cpath in s.mapping("claims"):
            if not isinstance(where, str) or not where:
                r.problem(cpath, "expected a dotted path into the answer, such as user.email")
            elif claim in RESERVED_CLAIMS:
                r.problem(cpath, f"{claim} is a claim the gateway sets itself; "
                                 f"choose another name (not one of {', '.join(sorted(RESERVED_CLAIMS))})")
            else:
                claims.append((claim, where))
        check = UpstreamCheck(
            url=url, timeout=s.duration("timeout", 5.0, lo=0.01, hi=60),
            body=s.text("body", "json", choices=("json", "form")).lower(),  # type: ignore[arg-type]
            username_field=s.text("username_field", "username"),
            password_field=s.text("password_field", "password"),
            roles_field=s.text("roles_field", ""), claims=tuple(claims))
        return Users(source="upstream", upstream=check, default_roles=roles)
    for key in ("file", "url", "timeout", "body", "username_field", "password_field", "roles_field", "claims"):
        if s.has(key):
            r.problem(s.at(key), f"is for users.source htpasswd or upstream, not {source}")
    return Users(source="store", default_roles=roles)


def _registration(r: _Reader, top: _Section) -> Registration:
    s = r.section(top.raw("registration"), "registration", {"enabled", "min_password_length",
                                                            "username_pattern"})
    pattern = s.text("username_pattern", Registration.username_pattern)
    try:
        re.compile(pattern)
    except re.error as exc:
        r.problem(s.at("username_pattern"), f"is not a regular expression: {exc}")
        pattern = Registration.username_pattern
    return Registration(enabled=s.flag("enabled", False),
                        min_password_length=s.integer("min_password_length", 12, lo=8, hi=128),
                        username_pattern=pattern)


def _check_secret(r: _Reader, path: str, secret: bytes, algorithm: str) -> None:
    if not secret:
        return  # already reported: missing, unset variable or unreadable file
    need = _HMAC_MIN_BYTES.get(algorithm, 32)
    if secret.strip().lower().decode("utf-8", "replace") in _PLACEHOLDER_SECRETS:
        r.problem(path, "is a well-known placeholder; generate one with: openssl rand -base64 48")
    elif len(secret) < need:
        r.problem(path, f"is {len(secret)} bytes; {algorithm} needs at least {need} "
                        "(generate one with: openssl rand -base64 48)")
    elif len(set(secret)) < 8:
        r.problem(path, "has almost no variety; generate one with: openssl rand -base64 48")


def _unprefixed(name: str) -> str:
    return name.removeprefix("__Host-").removeprefix("__Secure-")


def _cookies(r: _Reader, top: _Section, auth_prefix: str, public_url: str | None) -> Cookies:
    s = r.section(top.raw("cookies"), "cookies", {"secure", "access", "refresh", "retired_names"})
    secure = s.flag("secure", True)
    if not secure and public_url and public_url.startswith("https://"):
        r.problem("cookies.secure", "must be true when public_url is https")

    def cookie(key: str, name: str, same_site: str, path: str) -> Cookie:
        c = r.section(s.raw(key), s.at(key), {"name", "same_site", "path", "domain"})
        site = c.text("same_site", same_site, choices=("strict", "lax", "none")).capitalize()
        if site == "None" and not secure:
            r.problem(c.at("same_site"), "none needs cookies.secure: true (browsers refuse it otherwise)")
        domain = c.text("domain", "") or None
        name = c.text("name", name, pattern=_COOKIE_NAME)
        path = c.text("path", path, pattern=re.compile(r"^/[A-Za-z0-9._~/-]*$"))
        if secure and path == "/" and domain is None and not name.startswith("__"):
            # __Host-: the browser takes it only from this exact host, over HTTPS, for the
            # whole site, so a sibling subdomain cannot plant or overwrite it.
            name = "__Host-" + name
        elif secure and not name.startswith("__"):
            # __Secure- where __Host- cannot be (another path, a domain): no plain-HTTP page
            # can plant it. A sibling subdomain over HTTPS still could; two refresh cookies
            # are refused (auth_api.refresh), never one of them guessed at.
            name = "__Secure-" + name
        return Cookie(name=name, same_site=site, path=path, domain=domain)  # type: ignore[arg-type]

    access = cookie("access", "gw_access", "lax", "/")
    # Path=/ (not the auth prefix) so that the gateway can renew an expired access token on
    # any request of the browser's (README: "Browsers"), and so that it can be __Host-.
    refresh = cookie("refresh", "gw_refresh", "strict", "/")
    if not (auth_prefix + "/").startswith(refresh.path.rstrip("/") + "/"):
        r.problem("cookies.refresh.path", f"must cover {auth_prefix}, where the refresh endpoint is")
    if _unprefixed(access.name) == _unprefixed(refresh.name):
        r.problem("cookies.refresh.name", "must differ from cookies.access.name")
    retired = tuple(dict.fromkeys(s.strings("retired_names", pattern=_COOKIE_NAME)))
    return Cookies(secure=secure, access=access, refresh=refresh, retired_names=retired)


# identity_headers when the config has none; their names are stripped from clients always
DEFAULT_IDENTITY_HEADERS = (("X-Auth-User", "sub"), ("X-Auth-Roles", "roles"))


def _identity_headers(top: _Section) -> tuple[tuple[str, str], ...]:
    if not top.has("identity_headers"):
        return DEFAULT_IDENTITY_HEADERS
    out = []
    for header, claim, path in top.mapping("identity_headers"):
        if not _TOKEN.fullmatch(header):
            top.r.problem(path, "is not a valid header name")
        elif header.lower() in {"host", "authorization", "cookie", "content-length", "transfer-encoding"}:
            top.r.problem(path, "cannot carry identity")
        if not isinstance(claim, str) or not re.fullmatch(r"^[A-Za-z_][A-Za-z0-9_]*$", claim):
            top.r.problem(path, "expected a claim name such as sub or roles")
            continue
        out.append((header, claim))
    return tuple(out)


# --- routes ---------------------------------------------------------------------------------


def _routes(r: _Reader, top: _Section, upstreams: Mapping[str, Upstream]) -> tuple[Route, ...]:
    items = top.sequence("routes")
    if not items and not top.has("routes"):
        r.problem("routes", "at least one route is required (a request that matches none is denied)")
    out = []
    for i, item in enumerate(items):
        path = f"routes[{i}]"
        s = r.section(item, path, {"path", "methods", "access", "upstream", "strip_prefix", "cors", "csrf",
                                   "forward_token"})
        pattern = s.text("path", required=True)
        if pattern:
            error = check_pattern(pattern)
            if error:
                r.problem(s.at("path"), error)
        methods = None
        if s.has("methods"):
            methods = frozenset(m.upper() for m in s.strings("methods", pattern=_TOKEN))
            if not methods:
                r.problem(s.at("methods"), "expected a non-empty list of methods")
        access = _route_access(r, s.raw("access", "authenticated"), s.at("access"))
        upstream = s.text("upstream", next(iter(upstreams)) if len(upstreams) == 1 else None,
                         required=len(upstreams) > 1)
        if upstream and upstreams and upstream not in upstreams:
            r.problem(s.at("upstream"), f"no upstream named {upstream!r} (have: {', '.join(upstreams)})")
        strip = s.text("strip_prefix", "")
        if strip and not _is_prefix_of_pattern(strip, pattern):
            r.problem(s.at("strip_prefix"), f"must be a leading part of the route's path, such as "
                                            f"{pattern.rsplit('/', 1)[0] or '/app'!r}")
            strip = ""
        cors = _cors(r, s.raw("cors"), s.at("cors"), methods) if s.has("cors") else None
        out.append(Route(index=i, path=pattern, methods=methods, access=access, upstream=upstream,
                         strip_prefix=strip.rstrip("/"), cors=cors, csrf=s.flag("csrf", False),
                         forward_token=s.flag("forward_token", False)))
    return tuple(out)


def _cors(r: _Reader, value: Any, path: str, route_methods: frozenset[str] | None) -> Cors:
    c = r.section(value, path, {"origins", "methods", "headers", "credentials", "max_age", "expose"})
    origins = frozenset(o.rstrip("/") for o in c.strings("origins", pattern=_ORIGIN))
    if not origins:
        r.problem(c.at("origins"), "expected a list of origins such as https://spa.example.com "
                                   "(a wildcard is never allowed)")
    methods = frozenset(m.upper() for m in c.strings("methods", pattern=_TOKEN)) or \
        (route_methods or frozenset({"GET", "HEAD", "POST"}))
    headers = frozenset(h.lower() for h in c.strings("headers", pattern=_TOKEN)) or \
        frozenset({"authorization", "content-type"})
    return Cors(origins=origins, methods=methods, headers=headers,
                credentials=c.flag("credentials", False),
                max_age=int(c.duration("max_age", 600, hi=86400)),
                expose=tuple(c.strings("expose", pattern=_TOKEN)))


def _login_page(r: _Reader, top: _Section) -> LoginPage:
    s = r.section(top.raw("login_page"), "login_page", {"title", "accent_color", "logo_file"})
    title = s.text("title", LoginPage.title)
    if len(title) > 100:
        r.problem(s.at("title"), "must be at most 100 characters")
    logo = ""
    name = s.text("logo_file", "")
    if name:
        kind = _LOGO_TYPES.get(Path(name).suffix.lower())
        try:
            data = (r.base_dir / name).read_bytes()
        except OSError as exc:
            r.problem(s.at("logo_file"), f"cannot read {name}: {exc.strerror or exc}")
            data = b""
        if kind is None:
            r.problem(s.at("logo_file"), f"must be one of: {', '.join(sorted(_LOGO_TYPES))}")
        elif len(data) > 64 * 1024:
            r.problem(s.at("logo_file"), "must be at most 64 KiB (it is sent inline with the page)")
        elif data:
            logo = f"data:{kind};base64,{base64.b64encode(data).decode()}"
    return LoginPage(title=title, logo=logo,
                     accent_color=s.text("accent_color", LoginPage.accent_color, pattern=_COLOR))


def _is_prefix_of_pattern(prefix: str, pattern: str) -> bool:
    """``/app`` is a leading part of ``/app/**`` and ``/app/api/*``; ``/ap`` is not."""
    if not prefix.startswith("/") or prefix == "/" or "*" in prefix or check_pattern(prefix):
        return False
    literal = pattern.split("*", 1)[0].rstrip("/")
    return literal == prefix.rstrip("/") or literal.startswith(prefix.rstrip("/") + "/")


def check_pattern(pattern: str) -> str | None:
    """Why a route path pattern is not valid, or None. Patterns are ``/exact``, ``/x/*``
    (one segment) and ``/x/**`` (any depth, and ``/x`` itself), written in normalized form."""
    if not pattern.startswith("/"):
        return "must start with /"
    if pattern == "/":
        return None
    segments = pattern[1:].split("/")
    for n, seg in enumerate(segments):
        last = n == len(segments) - 1
        if seg in {"*", "**"}:
            if not last:
                return "* and ** may only be the last segment"
            continue
        if last and seg == "":
            continue  # a trailing slash, as in /docs/
        if seg in {"", ".", ".."} or not _SEGMENT.fullmatch(seg) or "*" in seg:
            return f"segment {seg!r} is not allowed (use /exact, /prefix/* or /prefix/**)"
    return None


def _route_access(r: _Reader, value: Any, path: str) -> Mapping[str, Access]:
    if isinstance(value, dict) and value and all(
        str(k) == "*" or str(k).upper() in METHODS_KNOWN or (str(k).isupper() and _TOKEN.fullmatch(str(k)))
        for k in value
    ):
        per_method = {}
        for method, sub in value.items():
            key = "*" if str(method) == "*" else str(method).upper()
            per_method[key] = _access(r, sub, _join(path, str(method)))
        return per_method
    return {"*": _access(r, value, path)}


def _access(r: _Reader, value: Any, path: str) -> Access:
    value = r.expand(value, path)
    if value == "public":
        return PUBLIC
    if value == "authenticated":
        return AUTHENTICATED
    if not isinstance(value, dict):
        r.problem(path, "expected public, authenticated, {roles: [...]} or {claims: {...}}")
        return AUTHENTICATED
    s = r.section(value, path, {"roles", "claims"})
    roles = frozenset(s.strings("roles", pattern=_ROLE))
    if s.has("roles") and not roles:
        r.problem(s.at("roles"), "expected a non-empty list of role names")
    claims = []
    for name, want, cpath in s.mapping("claims"):
        if isinstance(want, (str, int, bool)) and not isinstance(want, float):
            claims.append((name, want))
        else:
            r.problem(cpath, "expected a string, number or boolean")
    if not s.has("roles") and not s.has("claims"):
        r.problem(path, "expected roles or claims")
    return Access("rules", roles=roles, claims=tuple(claims))
