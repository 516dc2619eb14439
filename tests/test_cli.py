"""The command line as its user meets it: real ``python -m gateway`` subprocesses, real config
files in tmp_path, a real SQLite store file. User errors are one line and exit 1, never a
traceback."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pty
import queue
import re
import secrets
import select
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bcrypt
import pytest

from gateway import config as config_module
from gateway import users
from gateway.credentials import verify_password
from gateway.revocations import Revocations
from gateway.sessions import Sessions
from gateway.store import Session, User, open_store

SECRET = secrets.token_urlsafe(36)  # 48 characters

CONFIG = """\
listen: {host: 127.0.0.1, port: 8080}
store: sqlite:data/gateway.db
upstreams:
  app: {url: "http://127.0.0.1:9", timeout: 5s}
tokens:
  issuer: gateway-test
  audience: app
  keys:
    - {kid: k1, algorithm: HS256, secret: "${CLI_TEST_SECRET}"}
cookies:
  secure: false
routes:
  - {path: /static/**, access: public}
  - {path: /**, access: authenticated}
"""

BAD_CONFIG = """\
listen: {host: 127.0.0.1, port: [80]}
upstreams:
  app: {url: "http://127.0.0.1:9"}
tokens:
  issuer: gateway-test
  audience: app
  kyes: []
  keys:
    - {kid: k1, secret: "${CLI_TEST_SECRET}"}
cookies:
  secure: "yes"
routes:
  - {path: admin/**, access: public}
"""
BAD_PROBLEMS = ["listen.port (line 1): ", "tokens.kyes (line 7): ", "cookies.secure (line 11): ",
                "routes[0].path (line 13): "]


@dataclass
class Result:
    code: int
    out: str
    err: str

    @property
    def err_lines(self) -> list[str]:
        return [line for line in self.err.splitlines() if line.strip()]


@pytest.fixture
def env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env["CLI_TEST_SECRET"] = SECRET
    env["PYTHONUNBUFFERED"] = "1"
    return env


@pytest.fixture
def cfg_path(tmp_path: Path) -> Path:
    path = tmp_path / "conf" / "gateway.yaml"
    path.parent.mkdir()
    path.write_text(CONFIG)
    return path


@pytest.fixture
def store_url(cfg_path: Path) -> str:
    return f"sqlite://{cfg_path.parent.resolve() / 'data' / 'gateway.db'}"


def gateway(*args: str, env: dict[str, str], stdin: str | None = None, cwd: Path | None = None) -> Result:
    proc = subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        input=stdin,
        stdin=subprocess.DEVNULL if stdin is None else None,  # never a terminal
        capture_output=True, text=True, env=env, cwd=cwd, timeout=60,
    )
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    return Result(proc.returncode, proc.stdout, proc.stderr)


def gateway_all(*calls: tuple[tuple[str, ...], str | None], env: dict[str, str],
                cwd: Path | None = None) -> list[Result]:
    """Independent invocations, run side by side: ``(args, stdin)`` each."""
    procs = [subprocess.Popen([sys.executable, "-m", "gateway", *args], env=env, text=True, cwd=cwd,
                              stdin=subprocess.DEVNULL if stdin is None else subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for args, stdin in calls]
    results = []
    try:
        for proc, (_args, stdin) in zip(procs, calls, strict=True):
            out, err = proc.communicate(stdin, timeout=60)
            results.append(Result(proc.returncode, out, err))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    for result in results:
        assert "Traceback" not in result.out + result.err, result
    return results


def fails_with(result: Result, *words: str) -> str:
    """A user error: exit 1, one line on stderr starting with "gateway: ", nothing on stdout."""
    assert result.code == 1, result
    assert len(result.err_lines) == 1, result.err
    line = result.err_lines[0]
    assert line.startswith("gateway: "), line
    for word in words:
        assert word in line, (word, line)
    assert result.out == ""
    return line


def table(out: str) -> dict[str, list[str]]:
    """``users list`` / ``sessions list`` output: first column -> the other columns."""
    lines = out.splitlines()
    if lines == ["(none)"]:
        return {}
    rows = {}
    for line in lines[1:]:
        cells = re.split(r"\s{2,}", line.strip())
        rows[cells[0]] = cells[1:]
    return rows


# --- gateway check --------------------------------------------------------------------------


def test_check_good_config(cfg_path: Path, env: dict[str, str]) -> None:
    result = gateway("check", "-c", str(cfg_path), env=env)
    assert result.code == 0, result
    assert result.out == f"{cfg_path}: ok (2 routes, 1 upstreams, store sqlite)\n"
    assert result.err == ""


def test_check_bad_config_prints_every_problem(tmp_path: Path, env: dict[str, str]) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(BAD_CONFIG)
    result = gateway("check", "-c", str(path), env=env)
    assert result.code == 1
    printed = [line.strip() for line in (result.out + result.err).splitlines() if line.strip()]
    assert len(printed) == len(BAD_PROBLEMS), printed
    for prefix in BAD_PROBLEMS:
        assert sum(line.startswith(prefix) for line in printed) == 1, (prefix, printed)


def test_check_reports_an_unset_variable(cfg_path: Path, env: dict[str, str]) -> None:
    del env["CLI_TEST_SECRET"]
    result = gateway("check", "-c", str(cfg_path), env=env)
    assert result.code == 1
    assert "tokens.keys[0].secret (line 9): environment variable CLI_TEST_SECRET is not set" in result.out


def test_check_missing_file_is_one_line(tmp_path: Path, env: dict[str, str]) -> None:
    result = gateway("check", "-c", str(tmp_path / "nope.yaml"), env=env)
    assert result.code == 1
    printed = [line for line in (result.out + result.err).splitlines() if line.strip()]
    assert len(printed) == 1, printed
    assert f"{tmp_path / 'nope.yaml'}: config file not found" in printed[0]


def test_other_commands_report_config_problems_without_a_traceback(tmp_path: Path, env: dict[str, str]) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(BAD_CONFIG)
    result = gateway("users", "list", "-c", str(path), env=env)
    assert result.code == 1 and result.out == ""
    assert result.err_lines[0] == f"gateway: {path}: 4 problems in the config:"
    for prefix in BAD_PROBLEMS:
        assert any(line.strip().startswith(prefix) for line in result.err_lines[1:]), prefix


def test_other_commands_report_a_single_config_problem_on_one_line(tmp_path: Path, env: dict[str, str]) -> None:
    result = gateway("users", "list", "-c", str(tmp_path / "nope.yaml"), env=env)
    assert result.code == 1 and result.out == ""
    assert result.err_lines == [f"gateway: error: {tmp_path / 'nope.yaml'}: config file not found"]


def test_gateway_config_variable_is_used_without_c(cfg_path: Path, env: dict[str, str], tmp_path: Path) -> None:
    env["GATEWAY_CONFIG"] = str(cfg_path)
    other = tmp_path / "other.yaml"
    other.write_text(CONFIG.replace("  - {path: /static/**, access: public}\n", ""))
    check, add, check_other = gateway_all((("check",), None),
                                          (("users", "add", "dora", "--password-stdin"), "dora-password-1\n"),
                                          (("check", "-c", str(other)), None), env=env, cwd=tmp_path)
    assert check.code == 0, check
    assert check.out.startswith(f"{cfg_path}: ok (2 routes")
    # the store it names is the one users are written to
    assert add.code == 0, add
    assert asyncio.run(_user(f"sqlite://{cfg_path.parent / 'data' / 'gateway.db'}", "dora")) is not None
    # -c wins over the variable
    assert check_other.out.startswith(f"{other}: ok (1 routes")


def test_gateway_yaml_in_the_working_directory_is_the_default(cfg_path: Path, env: dict[str, str]) -> None:
    result = gateway("check", env=env, cwd=cfg_path.parent)
    assert result.code == 0, result
    assert result.out.startswith("gateway.yaml: ok ")


def test_help(env: dict[str, str]) -> None:
    result, users_help = gateway_all((("--help",), None), (("users", "--help"), None), env=env)
    assert result.code == 0
    assert result.out.startswith("usage: gateway ")
    for command in ("run", "check", "users", "sessions", "demo"):
        assert re.search(rf"^\s+{command}\s", result.out, re.M), command
    result = users_help
    assert result.code == 0
    for action in ("add", "list", "remove", "passwd", "disable", "enable"):
        assert action in result.out


# --- gateway users --------------------------------------------------------------------------


def test_users_life_cycle(cfg_path: Path, env: dict[str, str], store_url: str) -> None:
    # Independent steps run side by side (two CLI processes writing one SQLite file is normal).
    c = ("-c", str(cfg_path))
    result = gateway("users", "add", "alice", "--role", "user", "--role", "ops", "--password-stdin", *c,
                     env=env, stdin="alice-password-1\n")
    assert (result.code, result.out, result.err) == (0, "added user alice with roles user, ops\n", "")
    result, again = gateway_all((("users", "add", "bob", "--password-stdin", *c), "bob-password-1"),
                                (("users", "add", "alice", "--password-stdin", *c), "another-password\n"),
                                env=env)
    assert (result.code, result.out) == (0, "added user bob\n")
    fails_with(again, "user 'alice' already exists")
    assert asyncio.run(_password_ok(store_url, "alice", "alice-password-1"))  # the newline is not part of it
    assert asyncio.run(_password_ok(store_url, "bob", "bob-password-1"))  # no newline: the whole input

    passwd, disable = gateway_all((("users", "passwd", "alice", "--password-stdin", *c), "alice-password-2\n"),
                                  (("users", "disable", "bob", *c), None), env=env)
    assert (passwd.code, passwd.out) == (0, "changed the password of alice; ended 0 session(s)\n")
    assert (disable.code, disable.out) == (0, "disabled user bob\n")
    assert asyncio.run(_password_ok(store_url, "alice", "alice-password-2"))

    listed = gateway("users", "list", *c, env=env)
    assert listed.code == 0
    assert listed.out.splitlines()[0].split() == ["NAME", "ROLES", "STATE", "CREATED"]
    rows = table(listed.out)
    assert list(rows) == ["alice", "bob"]
    assert rows["alice"][:2] == ["user,ops", "active"]
    assert rows["bob"][:2] == ["-", "disabled"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", rows["alice"][2])

    enable, remove = gateway_all((("users", "enable", "bob", *c), None),
                                 (("users", "remove", "alice", *c), None), env=env)
    assert (enable.code, enable.out) == (0, "enabled user bob\n")
    assert (remove.code, remove.out) == (0, "removed user alice\n")

    *missing, listed = gateway_all((("users", "remove", "alice", *c), None),
                                   (("users", "disable", "alice", *c), None),
                                   (("users", "passwd", "alice", "--password-stdin", *c), "whatever-123\n"),
                                   (("users", "list", *c), None),
                                   env=env)
    for result in missing:
        fails_with(result, "no user named 'alice'")
    assert {name: row[:2] for name, row in table(listed.out).items()} == {"bob": ["-", "active"]}


async def _user(store_url: str, name: str | None = None) -> User | None:
    """The user ``name``; without a name, asserts that the store holds no user at all."""
    store = await open_store(store_url)
    try:
        if name is None:
            assert await store.list_users() == []
            return None
        return await store.get_user(name)
    finally:
        await store.close()


async def _password_ok(store_url: str, name: str, password: str) -> bool:
    user = await _user(store_url, name)
    assert user is not None
    return verify_password(user.password_hash, password)


INVALID_NAMES = ["-bob", "bob smith", "", "b" * 65, "bob\n", "bób/x"]


def test_invalid_user_names_and_roles_are_refused(cfg_path: Path, env: dict[str, str], store_url: str) -> None:
    c = ("--password-stdin", "-c", str(cfg_path))
    results = gateway_all(*[(("users", "add", *c, "--", name), "long-enough-1\n") for name in INVALID_NAMES],
                          (("users", "add", "carol", "--role", "user", "--role", "ad min", *c), "long-enough-1\n"),
                          env=env)
    for name, result in zip(INVALID_NAMES, results[:-1], strict=True):
        fails_with(result, f"invalid user name {name!r}")
    fails_with(results[-1], "invalid role 'ad min'")
    asyncio.run(_user(store_url))  # nobody was added


def test_short_password_is_refused(cfg_path: Path, env: dict[str, str], store_url: str) -> None:
    c = ("users", "add", "carol", "--password-stdin", "-c", str(cfg_path))
    for result in gateway_all((c, "short12\n"), (c, ""), env=env):
        fails_with(result, "at least 8 characters")
    asyncio.run(_user(store_url))


def test_password_without_stdin_flag_and_no_terminal_fails_clearly(
    cfg_path: Path, env: dict[str, str], store_url: str
) -> None:
    add, passwd = gateway_all((("users", "add", "carol", "-c", str(cfg_path)), None),
                              (("users", "passwd", "carol", "-c", str(cfg_path)), None), env=env)
    fails_with(add, "no terminal", "--password-stdin")
    fails_with(passwd, "no terminal", "--password-stdin")
    asyncio.run(_user(store_url))


@pytest.mark.parametrize(("key", "where", "roles_where"), [
    ("{source: htpasswd, file: users.htpasswd}",
     "users.source is htpasswd: users and passwords live in {dir}/users.htpasswd; edit it with htpasswd -B",
     "users.source is htpasswd: its users have the roles of users.default_roles; change them in the config"),
    ("{source: upstream, url: 'http://svc:s3cret@127.0.0.1:9/login'}",  # the password is never shown
     "users.source is upstream: http://127.0.0.1:9/login checks users and passwords; change them there",
     "users.source is upstream: roles come from the answer of http://127.0.0.1:9/login at each sign-in "
     "(users.upstream.roles_field, else users.default_roles); change them there"),
])
def test_passwords_and_roles_are_not_set_in_the_store_when_another_source_decides_them(
    cfg_path: Path, env: dict[str, str], store_url: str, key: str, where: str, roles_where: str
) -> None:
    (cfg_path.parent / "users.htpasswd").write_text("ivy:" + bcrypt.hashpw(b"ivy-password-1", bcrypt.gensalt(4)).decode() + "\n")
    c = ("-c", str(cfg_path))
    asyncio.run(_start_sessions(cfg_path, [], add=("ivy",)))  # a row, as a login from the source makes
    cfg_path.write_text(CONFIG + f"users: {key}\n")
    add, passwd, roles, listed, disable = gateway_all(
        (("users", "add", "zed", "--password-stdin", *c), "zed-password-1\n"),
        (("users", "passwd", "ivy", "--password-stdin", *c), "ivy-password-2\n"),
        (("users", "roles", "ivy", "--role", "admin", *c), None),
        (("users", "list", *c), None),
        (("users", "disable", "ivy", *c), None), env=env)
    message = "gateway: error: " + where.format(dir=cfg_path.parent.resolve())
    assert fails_with(add) == message
    assert fails_with(passwd) == message
    assert fails_with(roles) == "gateway: error: " + roles_where.format(dir=cfg_path.parent.resolve())
    assert list(table(listed.out)) == ["ivy"]
    assert (disable.code, disable.out) == (0, "disabled user ivy\n")  # the store's rows still answer
    enable = gateway("users", "enable", "ivy", *c, env=env)
    assert (enable.code, enable.out) == (0, "enabled user ivy\n")
    assert asyncio.run(_password_ok(store_url, "ivy", "ivy-password-1"))  # unchanged
    assert asyncio.run(_user(store_url, "zed")) is None


@pytest.mark.parametrize(("key", "code", "line"), [
    (b"\x04", 1, "gateway: error: no password given"),  # Ctrl-D
    (b"\x03", 130, ""),  # Ctrl-C
])
def test_end_of_input_at_the_password_prompt_is_one_line(
    cfg_path: Path, env: dict[str, str], store_url: str, key: bytes, code: int, line: str
) -> None:
    pid, fd = pty.fork()  # the child's terminal is the pty, where getpass asks
    if pid == 0:
        os.execve(sys.executable, [sys.executable, "-m", "gateway", "users", "add", "erin", "-c", str(cfg_path)], env)
    output = b""
    try:
        output = _read_pty(fd, until=b"Password: ")
        os.write(fd, key)
        output += _read_pty(fd, until=None)
    finally:
        os.close(fd)
        _, status = os.waitpid(pid, 0)
    text = output.decode()
    assert os.waitstatus_to_exitcode(status) == code, text
    assert "Traceback" not in text
    after_prompt = [row.strip() for row in text.split("Password: ", 1)[1].splitlines() if row.strip()]
    assert after_prompt == ([line] if line else []), text
    asyncio.run(_user(store_url))


def _read_pty(fd: int, until: bytes | None, within: float = 20.0) -> bytes:
    """What the terminal shows, up to ``until``, or to the end (None)."""
    got = b""
    deadline = time.monotonic() + within
    while until is None or until not in got:
        remaining = deadline - time.monotonic()
        assert remaining > 0, got
        ready, _, _ = select.select([fd], [], [], remaining)
        if not ready:
            continue
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # EIO: the child has closed its end
            chunk = b""
        if not chunk:
            assert until is None, got
            break
        got += chunk
    return got


def test_only_users_add_makes_a_sqlite_store_that_is_not_there(tmp_path: Path, env: dict[str, str]) -> None:
    missing = tmp_path / "typo" / "usres.db"
    store = ("--store", f"sqlite://{missing}")
    results = gateway_all((("users", "list", *store), None), (("users", "disable", "erin", *store), None),
                          (("users", "roles", "erin", *store), None), (("sessions", "list", *store), None),
                          (("sessions", "revoke", "--user", "erin", *store), None), env=env)
    for result in results:
        fails_with(result, f"no SQLite store at {missing}")
    assert not missing.parent.exists()  # no empty store, nor its directory, made on the way
    added = gateway("users", "add", "erin", "--password-stdin", *store, env=env, stdin="erin-password-1\n")
    assert (added.code, missing.is_file()) == (0, True)


def test_another_programs_sqlite_file_is_refused_and_left_as_it_was(
        cfg_path: Path, env: dict[str, str], tmp_path: Path) -> None:
    theirs = tmp_path / "shop.db"
    with sqlite3.connect(theirs) as db:
        db.execute("CREATE TABLE users (id INTEGER PRIMARY KEY, email TEXT)")
        db.execute("CREATE TABLE orders (id INTEGER PRIMARY KEY, total INTEGER)")
        db.execute("INSERT INTO orders (total) VALUES (42)")
    before = theirs.read_bytes()
    store = ("--store", f"sqlite://{theirs}")
    config = tmp_path / "theirs.yaml"
    config.write_text(CONFIG.replace("store: sqlite:data/gateway.db", f"store: sqlite://{theirs}"))
    why = f"gateway: error: the file at {theirs} is another program's SQLite database (tables: orders, users)"
    *commands, run = gateway_all((("users", "list", *store), None),
                                 (("users", "add", "erin", "--password-stdin", *store), "erin-password-1\n"),
                                 (("run", "-c", str(config)), None), env=env)
    for result in commands:
        fails_with(result, why)
    assert (run.code, run.err_lines) == (1, [f"{why}, not a gateway store; give the store a file of its own"])
    assert theirs.read_bytes() == before  # no table added, the journal mode untouched
    assert not Path(f"{theirs}-wal").exists()


def test_a_store_from_a_newer_gateway_is_refused(env: dict[str, str], tmp_path: Path) -> None:
    newer = tmp_path / "newer.db"
    with sqlite3.connect(newer) as db:
        db.execute("CREATE TABLE users (name TEXT PRIMARY KEY)")
        db.execute("PRAGMA user_version = 999")
    fails_with(gateway("users", "list", "--store", f"sqlite://{newer}", env=env),
               "the store's schema (version 999) is newer than this gateway knows")


def test_users_add_refuses_a_name_that_looks_like_an_existing_one(cfg_path: Path, env: dict[str, str],
                                                                  store_url: str) -> None:
    c = ("--password-stdin", "-c", str(cfg_path))
    assert gateway("users", "add", "carol", *c, env=env, stdin="carol-password-1\n").code == 0
    for name in ("Carol", "CAROL", "carol.", "carol-"):
        fails_with(gateway("users", "add", name, *c, env=env, stdin="carol-password-2\n"),
                   f"user 'carol' exists, and {name!r} differs from it only in case")
        assert asyncio.run(_user(store_url, name)) is None
    assert gateway("users", "add", "carol2", *c, env=env, stdin="carol-password-2\n").code == 0


def test_sessions_list_of_no_such_user_is_an_error(cfg_path: Path, env: dict[str, str]) -> None:
    asyncio.run(_start_sessions(cfg_path, [], add=("alice",)))
    c = ("-c", str(cfg_path))
    nobody, alice = gateway_all((("sessions", "list", "--user", "nobody", *c), None),
                                (("sessions", "list", "--user", "alice", *c), None), env=env)
    fails_with(nobody, "no user named 'nobody'")
    assert (alice.code, alice.out) == (0, "(none)\n")  # a user without sessions is no error


def test_store_option_works_without_a_config_file(tmp_path: Path, env: dict[str, str]) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()  # no gateway.yaml here, and no GATEWAY_CONFIG
    db = tmp_path / "stores" / "users.db"
    store = f"sqlite://{db}"
    result = gateway("users", "add", "erin", "--role", "admin", "--password-stdin", "--store", store,
                     env=env, stdin="erin-password-1\n", cwd=empty)
    assert (result.code, result.out) == (0, "added user erin with roles admin\n")
    assert db.is_file()
    listed, sessions, without = gateway_all((("users", "list", "--store", store), None),
                                            (("sessions", "list", "--store", store), None),
                                            (("users", "list"), None), env=env, cwd=empty)
    assert table(listed.out)["erin"][:2] == ["admin", "active"]
    assert sessions.out == "(none)\n"
    # without --store, the missing gateway.yaml is the error
    assert without.code == 1 and "gateway.yaml: config file not found" in without.err


def test_unsupported_store_option_is_one_line(tmp_path: Path, env: dict[str, str]) -> None:
    fails_with(gateway("users", "list", "--store", "mongodb://localhost/0", env=env, cwd=tmp_path),
               "unsupported store URL 'mongodb'", "sqlite:///ABSOLUTE/PATH.db")


def test_relative_store_option_is_relative_to_the_working_directory(tmp_path: Path, env: dict[str, str]) -> None:
    added = gateway("users", "add", "dave", "--password-stdin", "--store", "sqlite:sub/rel.db",
                    env=env, cwd=tmp_path, stdin="dave-password-1\n")
    assert added.code == 0, added
    assert (tmp_path / "sub" / "rel.db").exists()
    listed = gateway("users", "list", "--store", "sqlite:sub/rel.db", env=env, cwd=tmp_path)
    assert "dave" in listed.out


# --- gateway sessions -----------------------------------------------------------------------


async def _start_sessions(cfg_path: Path, who: list[tuple[str, str, str]],
                          add: tuple[str, ...] = ()) -> list[Session]:
    cfg = config_module.load(cfg_path, env={"CLI_TEST_SECRET": SECRET})
    store = await open_store(cfg.store)
    try:
        for name in add:
            await users.add(store, name, f"{name}-password-1", ["user"])
        sessions = Sessions(store, cfg.tokens, time.time, Revocations(store, time.time, horizon=3600))
        started = []
        for name, ip, agent in who:
            user = await store.get_user(name)
            assert user is not None
            session, _refresh = await sessions.start(user, ip, agent)
            started.append(session)
        return started
    finally:
        await store.close()


def test_sessions_list_and_revoke(cfg_path: Path, env: dict[str, str]) -> None:
    c = ("-c", str(cfg_path))
    a1, a2, b1 = asyncio.run(_start_sessions(cfg_path, [
        ("alice", "203.0.113.7", "Firefox/128.0"),
        ("alice", "198.51.100.2", "curl/8.5"),
        ("bob", "192.0.2.1", "Safari/17"),
    ], add=("alice", "bob")))

    result, everyone = gateway_all((("sessions", "list", "--user", "alice", *c), None),
                                   (("sessions", "list", *c), None), env=env)
    assert result.code == 0
    assert result.out.splitlines()[0].split() == ["SESSION", "USER", "CREATED", "LAST", "USED", "IP", "USER", "AGENT"]
    rows = table(result.out)
    assert set(rows) == {a1.id, a2.id}
    assert rows[a1.id][0] == "alice" and rows[a1.id][-2:] == ["203.0.113.7", "Firefox/128.0"]
    assert rows[a2.id][-2:] == ["198.51.100.2", "curl/8.5"]
    assert set(table(everyone.out)) == {a1.id, a2.id, b1.id}

    result = gateway("sessions", "revoke", "--user", "alice", *c, env=env)
    assert (result.code, result.out) == (0, "ended 2 session(s)\n")
    alice, everyone = gateway_all((("sessions", "list", "--user", "alice", *c), None),
                                  (("sessions", "list", *c), None), env=env)
    assert alice.out == "(none)\n"
    assert set(table(everyone.out)) == {b1.id}

    # "--session=ID": an id may begin with "-", which argparse would take for an option
    result = gateway("sessions", "revoke", f"--session={b1.id}", *c, env=env)
    assert (result.code, result.out) == (0, "ended 1 session(s)\n")
    [event] = [json.loads(line) for line in result.err_lines]
    assert {k: event[k] for k in ("event", "user", "sid", "ended", "by")} == {
        "event": "sessions_revoked", "user": "bob", "sid": b1.id, "ended": 1, "by": "cli"}
    again, alice_again, nobody, listed = gateway_all((("sessions", "revoke", f"--session={b1.id}", *c), None),
                                                     (("sessions", "revoke", "--user", "alice", *c), None),
                                                     (("sessions", "revoke", "--user", "nobody", *c), None),
                                                     (("sessions", "list", *c), None), env=env)
    fails_with(again, f"no live session with id {b1.id!r}")
    assert (alice_again.code, alice_again.out) == (0, "ended 0 session(s)\n")  # nothing to end is no error
    fails_with(nobody, "no user named 'nobody'")  # as users disable nobody says
    assert listed.out == "(none)\n"


def test_users_roles_sets_them_and_ends_sessions_only_when_one_is_taken_away(
    cfg_path: Path, env: dict[str, str], store_url: str
) -> None:
    c = ("-c", str(cfg_path))
    asyncio.run(_start_sessions(cfg_path, [("alice", "203.0.113.7", "a"), ("alice", "203.0.113.7", "b")],
                                add=("alice",)))  # alice has the role user
    added = gateway("users", "roles", "alice", "--role", "user", "--role", "admin", *c, env=env)
    assert (added.code, added.out) == (
        0, "set the roles of alice to user, admin; their sessions get them at their next refresh\n")
    [event] = [json.loads(line) for line in added.err_lines]
    assert {k: event[k] for k in ("event", "user", "roles", "ended", "by")} == {
        "event": "roles_changed", "user": "alice", "roles": ["user", "admin"], "ended": 0, "by": "cli"}
    assert len(table(gateway("sessions", "list", "--user", "alice", *c, env=env).out)) == 2

    taken = gateway("users", "roles", "alice", "--role", "admin", *c, env=env)  # user taken away
    assert (taken.code, taken.out) == (0, "set the roles of alice to admin; ended 2 session(s)\n")
    assert gateway("sessions", "list", "--user", "alice", *c, env=env).out == "(none)\n"
    user = asyncio.run(_user(store_url, "alice"))
    assert user is not None and user.roles == ("admin",)

    none, nobody, bad = gateway_all((("users", "roles", "alice", *c), None),
                                    (("users", "roles", "nobody", "--role", "user", *c), None),
                                    (("users", "roles", "alice", "--role", "ad min", *c), None), env=env)
    assert (none.code, none.out) == (0, "set the roles of alice to (none); their sessions get them at their next refresh\n")
    fails_with(nobody, "no user named 'nobody'")
    fails_with(bad, "invalid role 'ad min'")
    assert table(gateway("users", "list", *c, env=env).out)["alice"][0] == "-"


def test_user_changes_end_their_sessions(cfg_path: Path, env: dict[str, str]) -> None:
    c = ("-c", str(cfg_path))
    asyncio.run(_start_sessions(cfg_path, [("alice", "203.0.113.7", "a"), ("alice", "203.0.113.7", "b")],
                                add=("alice",)))
    result = gateway("users", "passwd", "alice", "--password-stdin", *c, env=env, stdin="alice-password-2\n")
    assert result.out == "changed the password of alice; ended 2 session(s)\n"
    asyncio.run(_start_sessions(cfg_path, [("alice", "203.0.113.7", "c")]))
    assert gateway("users", "disable", "alice", *c, env=env).out == "disabled user alice; ended 1 session(s)\n"
    asyncio.run(_start_sessions(cfg_path, [("alice", "203.0.113.7", "d")]))
    assert gateway("users", "remove", "alice", *c, env=env).out == "removed user alice; ended 1 session(s)\n"
    assert asyncio.run(_live_sessions(cfg_path)) == []


async def _live_sessions(cfg_path: Path) -> list[Session]:
    store = await open_store(config_module.load(cfg_path, env={"CLI_TEST_SECRET": SECRET}).store)
    try:
        return [s for s in await store.list_sessions() if s.revoked_at is None]
    finally:
        await store.close()


# --- gateway run ----------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _wait_until_healthy(proc: subprocess.Popen[str], url: str, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the gateway exited with {proc.returncode}"
        try:
            if _get(url + "/healthz", timeout=0.5)[0] == 200:
                return
        except OSError:
            pass  # not listening yet
        time.sleep(0.05)  # polling interval of a bounded readiness wait
    pytest.fail(f"{url}/healthz did not answer 200 within {within}s")


def test_run_on_a_busy_port_is_one_line(cfg_path: Path, env: dict[str, str]) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = gateway("run", "-c", str(cfg_path), "--port", str(port), env=env)
    assert result.code == 1
    assert len(result.err_lines) == 1, result.err
    assert result.err_lines[0].startswith(f"gateway: error: cannot listen on 127.0.0.1:{port}")


@pytest.mark.parametrize("port", ["65536", "99999", "-1"])
def test_run_refuses_a_port_out_of_range(cfg_path: Path, env: dict[str, str], port: str) -> None:
    # (99999 would otherwise be listened on as 99999 mod 65536, and -1 fail late)
    fails_with(gateway("run", "-c", str(cfg_path), f"--port={port}", env=env),
               "gateway: error: --port must be between 0 and 65535")


@pytest.mark.slow
def test_run_serves_until_sigterm(cfg_path: Path, env: dict[str, str]) -> None:
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "run", "-c", str(cfg_path), "--port", str(port)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_until_healthy(proc, url)
        status, body = _get(url + "/readyz")
        assert (status, json.loads(body)) == (200, {"status": "ready"})
        status, body = _get(url + "/anything")
        assert (status, json.loads(body)["error"]) == (401, "unauthorized")
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert "Traceback" not in out + err
    events = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert events[0]["event"] == "starting" and events[0]["port"] == port
    assert {"request"} <= {e["event"] for e in events}
    assert [(e["event"], e["signal"]) for e in events[-2:]] == [("stopping", "SIGTERM"), ("stopped", "SIGTERM")]


@contextlib.contextmanager
def _running_on_port_0(cfg_path: Path, env: dict[str, str]) -> Iterator[list[dict[str, Any]]]:
    """``gateway run --port 0``, up to its ``listening`` line: the JSON lines so far."""
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "run", "-c", str(cfg_path), "--port", "0"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        assert proc.stdout is not None
        deadline, out, events = time.monotonic() + 15, b"", []
        while not any(e["event"] == "listening" for e in events):
            assert time.monotonic() < deadline and proc.poll() is None, "no listening line"
            if select.select([proc.stdout], [], [], 0.5)[0]:
                out += os.read(proc.stdout.fileno(), 65536)
                events = [json.loads(line) for line in out.decode().splitlines(keepends=True)
                          if line.startswith("{") and line.endswith("\n")]
        yield events
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=10)
    assert proc.returncode == 0


@pytest.mark.slow
def test_run_on_port_0_logs_the_port_it_got(cfg_path: Path, env: dict[str, str]) -> None:
    with _running_on_port_0(cfg_path, env) as events:
        [listening] = [e for e in events if e["event"] == "listening"]
        [url] = listening["urls"]
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+", url) and not url.endswith(":0")
        status, body = _get(url + "/readyz")
        assert (status, json.loads(body)) == (200, {"status": "ready"})


@pytest.mark.slow
def test_run_says_when_it_makes_a_new_sqlite_store(cfg_path: Path, env: dict[str, str]) -> None:
    # a mistyped path is then seen for what it is: a new, empty store
    store = cfg_path.parent.resolve() / "data" / "gateway.db"
    assert not store.exists()
    with _running_on_port_0(cfg_path, env) as events:
        assert [e["path"] for e in events if e["event"] == "store_created"] == [str(store)]
    with _running_on_port_0(cfg_path, env) as events:
        assert [e for e in events if e["event"] == "store_created"] == []


# --- gateway demo ---------------------------------------------------------------------------


@pytest.mark.slow
def test_demo_works_and_cleans_up(env: dict[str, str], tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "demo", "--port", "0"], cwd=tmp_path,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        printed = ""
        deadline = time.monotonic() + 15
        while "Press Ctrl-C to stop" not in printed:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"no instructions within 15s: {printed!r}"
            try:
                line = lines.get(timeout=remaining)
            except queue.Empty:
                continue
            assert line is not None, f"the demo exited ({proc.wait()}): {printed!r} {proc.stderr.read()!r}"
            printed += line
        url = re.search(r"gateway demo is running at (http://127\.0\.0\.1:\d+)", printed).group(1)  # type: ignore[union-attr]
        password = re.search(r"alice / (\S+)", printed).group(1)  # type: ignore[union-attr]
        config_path = Path(re.search(r"Config: (\S+gateway\.yaml)", printed).group(1))  # type: ignore[union-attr]
        assert config_path.is_file()
        demo_dir = config_path.parent

        request = urllib.request.Request(
            url + "/auth/login", data=json.dumps({"username": "alice", "password": password}).encode(),
            headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(request, timeout=5) as resp:
            login = json.loads(resp.read())
        assert login["token_type"] == "Bearer"
        request = urllib.request.Request(url + "/whoami",
                                         headers={"Authorization": f"Bearer {login['access_token']}"})
        with urllib.request.urlopen(request, timeout=5) as resp:
            assert json.loads(resp.read()) == {"user": "alice", "roles": "user"}
        assert _get(url + "/whoami")[0] == 401

        proc.terminate()
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        reader.join(timeout=5)
    err = proc.stderr.read() if proc.stderr else ""
    assert proc.returncode == 0, err
    assert "Traceback" not in printed + err
    assert not demo_dir.exists(), f"{demo_dir} was left behind"
    rest = []
    while (line := lines.get(timeout=5)) is not None:
        rest.append(line)
    assert f"gateway demo stopped; deleted {demo_dir}\n" in rest


def test_store_migrate_moves_users_to_redis(tmp_path: Path, env: dict[str, str], redis_url: str) -> None:
    import redis  # noqa: PLC0415

    prefix = f"gwtest:{secrets.token_hex(6)}:"
    target = f"{redis_url}?key_prefix={prefix}"
    source = f"sqlite:{tmp_path / 'from.db'}"
    try:
        assert gateway("users", "add", "dora", "--role", "ops", "--password-stdin", "--store", source,
                       env=env, stdin="dora-password-1\n").code == 0
        moved = gateway("store", "migrate", "--from", source, "--to", target, env=env)
        assert moved.code == 0, moved
        assert moved.out == f"copied 1 user(s) and 0 live session(s) to {redis_url}\n"
        listed = gateway("users", "list", "--store", target, env=env)
        assert "dora  ops" in listed.out
        fails_with(gateway("store", "migrate", "--from", source, "--to", target, env=env), "already has users")
    finally:
        client = redis.Redis.from_url(redis_url)
        keys = list(client.scan_iter(match=f"{prefix}*"))
        if keys:
            client.delete(*keys)


def test_store_migrate_from_a_missing_sqlite_file_is_refused(tmp_path: Path, env: dict[str, str]) -> None:
    missing, target = tmp_path / "nonexistent.db", tmp_path / "to.db"
    result = gateway("store", "migrate", "--from", "sqlite:nonexistent.db", "--to", f"sqlite:{target}",
                     env=env, cwd=tmp_path)
    fails_with(result, f"no SQLite store at {missing}")
    assert not missing.exists()  # not made, empty, on the way
