"""``gateway`` on the command line: parse arguments, call the Python API, map errors to exit
codes. A user error is one line on stderr and exit 1, never a traceback."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import logging
import os
import re
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

from . import config as config_module
from . import logs, users
from .errors import ConfigError, StoreUnavailable, UserError
from .store import Session, Store, open_store

T = TypeVar("T")
security = logging.getLogger("gateway.security")


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    if args.command not in ("run", "demo"):
        logs.setup_commands()
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        out = sys.stdout if args.command == "check" else sys.stderr
        code = 2 if args.command == "routes" else 1  # explain: 1 means refused
        if len(exc.problems) == 1 and args.command != "check":
            print(f"gateway: error: {exc.problems[0]}", file=out)
            return code
        if args.command != "check":
            print(f"gateway: {args.config}: {len(exc.problems)} problems in the config:", file=out)
        for problem in exc.problems:
            print(f"  {problem}", file=out)
        return code
    except UserError as exc:
        print(f"gateway: error: {exc}", file=sys.stderr)
        return 1
    except StoreUnavailable as exc:
        print(f"gateway: error: the store is unavailable ({exc.reason})", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    default_config = os.environ.get("GATEWAY_CONFIG", "gateway.yaml")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-c", "--config", default=default_config,
                        help="config file (default: $GATEWAY_CONFIG, else gateway.yaml)")
    with_store = argparse.ArgumentParser(add_help=False, parents=[common])
    with_store.add_argument("--store", help="store URL; overrides the config's, which is then not read")

    parser = argparse.ArgumentParser(prog="gateway", description="An authenticating reverse proxy.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("run", parents=[common], help="serve")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--workers", type=int, help="processes serving the port (default: the config's, else 1)")
    p.add_argument("--log-format", choices=("json", "text"),
                   help="JSON lines, or text for reading by eye (default: the config's log_format, else json)")
    p.add_argument("--watch-config", action="store_true",
                   help="reload the config when its file changes, as SIGHUP does (a look every second)")
    p.set_defaults(func=_run)

    p = sub.add_parser("check", parents=[common], help="validate the config")
    p.add_argument("--strict", action="store_true", help="exit 1 on warnings too (routes that never match)")
    p.set_defaults(func=_check)

    p = sub.add_parser("routes", help="the route table")
    routes_sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    r = routes_sub.add_parser(
        "explain", parents=[common], help="what the gateway does with one request, and why",
        description="Which route matches METHOD PATH, what it requires, and the decision for a caller. "
                    "Exit status: 0 allowed, 1 refused, 2 usage or config error.")
    r.add_argument("method", metavar="METHOD")
    r.add_argument("path", metavar="PATH", help="the request target as sent, e.g. '/api/x?y=1'")
    r.add_argument("--role", action="append", default=[], help="the caller holds this role (repeatable)")
    r.add_argument("--claim", action="append", default=[], metavar="NAME=VALUE",
                   help="the caller's token has this claim (repeatable; 3, true, false are read as "
                        "number and boolean, '\"3\"' as text)")
    r.add_argument("--authenticated", action="store_true", help="an authenticated caller (even without roles)")
    r.add_argument("--anonymous", action="store_true", help="a caller without a token (the default)")
    r.add_argument("--json", action="store_true", help="print one JSON object")
    r.set_defaults(func=_routes_explain)

    p = sub.add_parser("demo", help="run a demo: an example app behind a gateway, with demo users")
    p.add_argument("--port", type=int, default=8080, help="the gateway's port (0: any free port)")
    p.set_defaults(func=_demo)

    p = sub.add_parser("users", help="manage users")
    users_sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    u = users_sub.add_parser("add", parents=[with_store], help="create a user")
    u.add_argument("name")
    u.add_argument("--role", action="append", default=[], help="a role (repeatable)")
    u.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    u.set_defaults(func=_users_add)
    u = users_sub.add_parser("list", parents=[with_store], help="list users")
    u.set_defaults(func=_users_list)
    for action, helptext in (("remove", "delete a user and end their sessions"),
                             ("disable", "stop a user from signing in and end their sessions"),
                             ("enable", "let a disabled user sign in again")):
        u = users_sub.add_parser(action, parents=[with_store], help=helptext)
        u.add_argument("name")
        u.set_defaults(func=_users_change)
    u = users_sub.add_parser("roles", parents=[with_store],
                             help="set a user's roles (none without --role); taking one away ends their sessions")
    u.add_argument("name")
    u.add_argument("--role", action="append", default=[], help="a role (repeatable)")
    u.set_defaults(func=_users_roles)
    u = users_sub.add_parser("passwd", parents=[with_store], help="set a password and end the user's sessions")
    u.add_argument("name")
    u.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    u.set_defaults(func=_users_passwd)

    p = sub.add_parser("sessions", help="see and end sessions")
    sessions_sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    s = sessions_sub.add_parser("list", parents=[with_store], help="list live sessions")
    s.add_argument("--user")
    s.set_defaults(func=_sessions_list)
    p = sub.add_parser("store", help="the store itself")
    store_sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    m = store_sub.add_parser("migrate", help="copy users and live sessions into an empty store")
    m.add_argument("--from", dest="source", required=True, metavar="URL")
    m.add_argument("--to", dest="target", required=True, metavar="URL")
    m.set_defaults(func=_store_migrate)

    p = sub.add_parser("keys", help="signing keys")
    keys_sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    k = keys_sub.add_parser("generate", parents=[common], help="write a new private key file (PEM, mode 0600)")
    k.add_argument("--algorithm", required=True, choices=("EdDSA", "ES256", "RS256"), type=_algorithm)
    k.add_argument("--kid", help="the key's id (default: ALGORITHM-DATE-RANDOM)")
    k.add_argument("--out", metavar="FILE", help="where to write it (default: KID.pem); never overwritten")
    k.set_defaults(func=_keys_generate)

    s = sessions_sub.add_parser("revoke", parents=[with_store], help="end sessions")
    group = s.add_mutually_exclusive_group(required=True)
    group.add_argument("--user")
    group.add_argument("--session")
    s.set_defaults(func=_sessions_revoke)
    return parser


# --- commands -------------------------------------------------------------------------------


def _run(args: argparse.Namespace) -> int:
    from .server import serve

    cfg = config_module.load(args.config)
    if args.workers is not None and not 1 <= args.workers <= 64:
        raise UserError("--workers must be between 1 and 64")
    if args.port is not None and not 0 <= args.port <= 65535:
        raise UserError("--port must be between 0 and 65535 (0: any free port, one worker only)")
    try:
        serve(cfg, host=args.host, port=args.port, workers=args.workers, log_format=args.log_format,
              watch_config=args.watch_config)
    except OSError as exc:  # the port is taken, or the host is not ours
        host = args.host or cfg.listen.host
        port = args.port if args.port is not None else cfg.listen.port
        raise UserError(f"cannot listen on {host}:{port} ({exc.strerror or exc})") from None
    return 0


def _check(args: argparse.Namespace) -> int:
    from .explain import route_warnings

    cfg = config_module.load(args.config)
    warnings = route_warnings(cfg)
    summary = f"{len(cfg.routes)} routes, {len(cfg.upstreams)} upstreams, store {cfg.store.split(':', 1)[0]}"
    if not warnings:
        print(f"{args.config}: ok ({summary})")
        return 0
    count = f"{len(warnings)} warning{'s' if len(warnings) > 1 else ''}"
    print(f"{args.config}: {count}, failing with --strict:" if args.strict
          else f"{args.config}: ok ({summary}), {count}:")
    for warning in warnings:
        print(f"  warning: {warning}")
    return 1 if args.strict else 0


def _routes_explain(args: argparse.Namespace) -> int:
    from .explain import Caller, explain

    if args.anonymous and (args.role or args.claim or args.authenticated):
        print("gateway: error: --anonymous cannot go with --role, --claim or --authenticated", file=sys.stderr)
        return 2
    try:
        claims = _claims(args.claim)
    except ValueError as exc:
        print(f"gateway: error: {exc}", file=sys.stderr)
        return 2
    authenticated = bool(args.role or args.claim or args.authenticated)
    caller = Caller(roles=tuple(args.role) if authenticated else None, claims=claims)
    result = explain(config_module.load(args.config), args.method, args.path, caller)
    print(json.dumps(result.as_json(), indent=2) if args.json else "\n".join(result.lines()))
    return 0 if result.allowed else 1


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(port=args.port)
    return 0


def _users_add(args: argparse.Namespace) -> int:
    users.check_username(args.name)
    roles = users.check_roles(args.role)
    url = _store_url(args, owned="passwords")
    password = _password(args, confirm=True)

    async def go(store: Store) -> None:
        others = [name for name in await users.look_alikes(store, args.name) if name != args.name]
        if others:
            raise UserError(f"user {others[0]!r} exists, and {args.name!r} differs from it only in case, "
                            "Unicode form or trailing punctuation: many apps would take them for one user")
        await users.add(store, args.name, password, list(roles))

    _with_store(args, go, url, create=True)
    print(f"added user {args.name}" + (f" with roles {', '.join(roles)}" if roles else ""))
    return 0


def _users_list(args: argparse.Namespace) -> int:
    rows = _with_store(args, lambda store: store.list_users())
    _table(["NAME", "ROLES", "STATE", "CREATED"],
           [[u.name, ",".join(u.roles) or "-", "disabled" if u.disabled else "active", _when(u.created_at)]
            for u in rows])
    return 0


def _users_change(args: argparse.Namespace) -> int:
    actions: dict[str, Callable[[Store, str], Awaitable[int]]] = {
        "remove": users.remove, "disable": users.disable, "enable": users.enable}
    action = actions[args.action]
    ended = _with_store(args, lambda store: action(store, args.name))
    _audit(f"user_{_past(args.action)}", user=args.name, **({} if args.action == "enable" else {"ended": ended}))
    suffix = f"; ended {ended} session(s)" if ended else ""
    print(f"{_past(args.action)} user {args.name}{suffix}")
    return 0


def _users_roles(args: argparse.Namespace) -> int:
    roles = users.check_roles(args.role)
    url = _store_url(args, owned="roles")
    ended = _with_store(args, lambda store: users.set_roles(store, args.name, list(roles)), url)
    _audit("roles_changed", user=args.name, roles=list(roles), ended=ended)
    then = f"ended {ended} session(s)" if ended else "their sessions get them at their next refresh"
    print(f"set the roles of {args.name} to {', '.join(roles) or '(none)'}; {then}")
    return 0


def _users_passwd(args: argparse.Namespace) -> int:
    url = _store_url(args, owned="passwords")
    password = _password(args, confirm=True)
    ended = _with_store(args, lambda store: users.passwd(store, args.name, password), url)
    _audit("password_changed", user=args.name, ended=ended)
    print(f"changed the password of {args.name}; ended {ended} session(s)")
    return 0


def _sessions_list(args: argparse.Namespace) -> int:
    now = time.time()
    async def go(store: Store) -> list[Session]:
        if args.user and await store.get_user(args.user) is None:
            raise UserError(f"no user named {args.user!r}")
        return await store.list_sessions(args.user)

    rows = _with_store(args, go)
    live = [s for s in rows if s.revoked_at is None and s.expires_at > now]
    _table(["SESSION", "USER", "CREATED", "LAST USED", "IP", "USER AGENT"],
           [[s.id, s.user, _when(s.created_at), _when(s.last_used_at), s.ip or "-",
             (s.user_agent or "-")[:40]] for s in live])
    return 0


def _sessions_revoke(args: argparse.Namespace) -> int:
    async def go(store: Store) -> tuple[str, int]:
        if args.user:
            if await store.get_user(args.user) is None:
                raise UserError(f"no user named {args.user!r}")
            return args.user, await store.revoke_user_sessions(args.user, time.time(), "admin_revoke")
        session = await store.get_session(args.session)
        if session is None or not await store.revoke_session(args.session, time.time(), "admin_revoke"):
            raise UserError(f"no live session with id {args.session!r}")
        return session.user, 1

    user, ended = _with_store(args, go)
    _audit("sessions_revoked", user=user, sid=args.session, ended=ended)
    print(f"ended {ended} session(s)")
    return 0


def _store_migrate(args: argparse.Namespace) -> int:
    async def go() -> tuple[int, int]:
        source = await open_store(args.source, create=False)
        try:
            target = await open_store(args.target)
            try:
                snapshot = await source.export_state(time.time())
                await target.import_state(snapshot)
                return len(snapshot.users), len(snapshot.sessions)
            finally:
                await target.close()
        finally:
            await source.close()

    users_moved, sessions_moved = asyncio.run(go())
    print(f"copied {users_moved} user(s) and {sessions_moved} live session(s) to {args.target.split('?')[0]}")
    return 0


def _keys_generate(args: argparse.Namespace) -> int:
    from . import keys

    made = keys.generate(args.algorithm, Path(args.out) if args.out else None, args.kid)
    print(f"wrote {made.path} ({made.algorithm} private key, kid {made.kid}, mode 0600; keep it secret)")
    print("add it to tokens.keys (second, to publish it first; see docs/keys.md):")
    print(f"  - {{kid: {made.kid}, algorithm: {made.algorithm}, key_file: {_key_file(made.path, args.config)}}}")
    return 0


def _claims(given: list[str]) -> dict[str, Any]:
    """``--claim NAME=VALUE``s as token claims; a name given twice holds a list."""
    claims: dict[str, Any] = {}
    for item in given:
        name, sep, text = item.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise ValueError(f"--claim {item!r}: expected NAME=VALUE, such as tenant=acme")
        value: str | int | bool = text
        if text in {"true", "false"}:
            value = text == "true"
        elif re.fullmatch(r"-?[0-9]+", text):
            value = int(text)
        elif len(text) >= 2 and text[0] == text[-1] == '"':
            value = text[1:-1]
        if name in claims:
            held = claims[name]
            claims[name] = [*held, value] if isinstance(held, list) else [held, value]
        else:
            claims[name] = value
    return claims


def _algorithm(text: str) -> str:
    """``es256`` is ES256, as in the config (an unknown name is left for argparse to refuse)."""
    return next((a for a in ("EdDSA", "ES256", "RS256") if a.lower() == text.lower()), text)


def _key_file(path: Path, config: str) -> str:
    """``path`` as the config's ``key_file``: relative to the config file's folder when it
    lies inside it, else absolute."""
    key, base = path.resolve(), Path(config).resolve().parent
    shown = str(key.relative_to(base)) if key.is_relative_to(base) else str(key)
    return json.dumps(shown) if not re.fullmatch(r"[A-Za-z0-9._/-]+", shown) else shown


# --- helpers --------------------------------------------------------------------------------


def _store_url(args: argparse.Namespace, *, owned: str | None = None) -> str:
    """The store of ``--store``, else the config's. ``owned`` ("passwords" or "roles"): for
    a command that sets them, which is refused when the config's ``users.source`` decides
    them elsewhere (set in the store, they would change nothing: the next sign-in brings
    the source's)."""
    if args.store:
        return str(args.store)
    cfg = config_module.load(args.config)
    source = cfg.users.source
    if owned == "passwords" and source == "htpasswd":
        raise UserError(f"users.source is htpasswd: users and passwords live in {cfg.users.htpasswd}; "
                        "edit it with htpasswd -B")
    if owned == "roles" and source == "htpasswd":
        raise UserError("users.source is htpasswd: its users have the roles of users.default_roles; "
                        "change them in the config")
    where = _without_credentials(cfg.users.upstream.url) if cfg.users.upstream else "the upstream"
    if owned == "passwords" and source == "upstream":
        raise UserError(f"users.source is upstream: {where} checks users and passwords; change them there")
    if owned == "roles" and source == "upstream":
        raise UserError(f"users.source is upstream: roles come from the answer of {where} at each sign-in "
                        "(users.upstream.roles_field, else users.default_roles); change them there")
    return cfg.store


def _without_credentials(url: str) -> str:
    """``url`` as it may be shown: a ``user:password@`` in it is left out."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def _with_store(args: argparse.Namespace, work: Callable[[Store], Awaitable[T]], url: str | None = None,
                *, create: bool = False) -> T:
    """``work`` done on the store. Only ``create`` (users add) makes a SQLite file that is
    not there yet: for the other commands a missing file is a mistyped path, not an empty
    store."""
    url = url or _store_url(args)

    async def go() -> T:
        store = await open_store(url, create=create)
        try:
            return await work(store)
        finally:
            await store.close()

    return asyncio.run(go())


def _password(args: argparse.Namespace, *, confirm: bool) -> str:
    if args.password_stdin:
        line = sys.stdin.readline()
        password = line[:-1] if line.endswith("\n") else line
    elif sys.stdin.isatty():
        try:
            password = getpass.getpass("Password: ")
            if confirm and getpass.getpass("Password again: ") != password:
                raise UserError("the passwords do not match")
        except EOFError:  # Ctrl-D
            if sys.stderr.isatty():
                print(file=sys.stderr)  # getpass leaves the cursor on its prompt line
            raise UserError("no password given") from None
    else:
        raise UserError("no terminal to ask for a password; pass it on stdin with --password-stdin")
    return users.check_password(password)


def _audit(event: str, **fields: Any) -> None:
    """A security event done from the command line (logs.setup_commands: on stderr)."""
    security.info(event, extra={"fields": {**fields, "by": "cli"}})


def _past(action: str) -> str:
    return {"remove": "removed", "disable": "disabled", "enable": "enabled"}[action]


def _when(timestamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp))


def _table(header: list[str], rows: list[list[Any]]) -> None:
    if not rows:
        print("(none)")
        return
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
