"""The embedded store: one SQLite file in WAL mode, through aiosqlite.

One connection per process. Statements of one operation run under a lock, inside
``BEGIN IMMEDIATE`` when they write, so an operation is atomic against other coroutines of
this process and against other processes sharing the file. ``synchronous=NORMAL`` in WAL
mode keeps every committed transaction across a crash of the process (``kill -9``); a power
loss may lose the last moments.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiosqlite

from ..errors import StoreUnavailable, UserError
from . import (
    Failures,
    Link,
    RefreshRules,
    Revocation,
    Rotation,
    Session,
    Snapshot,
    User,
    claims_from_json,
    judge_refresh,
)

# Each entry moves the schema up one version (PRAGMA user_version). Never edit a released
# entry; append a new one.
MIGRATIONS: list[list[str]] = [
    [
        """CREATE TABLE users (
            name TEXT PRIMARY KEY,
            password_hash TEXT NOT NULL,
            roles TEXT NOT NULL DEFAULT '[]',
            disabled INTEGER NOT NULL DEFAULT 0,
            created_at REAL NOT NULL
        )""",
        """CREATE TABLE sessions (
            id TEXT PRIMARY KEY,
            user TEXT NOT NULL,
            created_at REAL NOT NULL,
            last_used_at REAL NOT NULL,
            expires_at REAL NOT NULL,
            generation INTEGER NOT NULL,
            revoked_at REAL,
            revoked_reason TEXT,
            ip TEXT NOT NULL DEFAULT '',
            user_agent TEXT NOT NULL DEFAULT '',
            chain_key BLOB NOT NULL
        )""",
        "CREATE INDEX sessions_by_user ON sessions (user)",
        """CREATE TABLE refresh_tokens (
            hash BLOB PRIMARY KEY,
            session_id TEXT NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
            generation INTEGER NOT NULL,
            used_at REAL,
            successor BLOB
        ) WITHOUT ROWID""",
        # Using a token links in its successor and moves the session on, inside the one
        # UPDATE that marks it used: a rotation is a single atomic statement (see
        # rotate_refresh), which no other process can interleave with.
        """CREATE TRIGGER refresh_token_used AFTER UPDATE OF used_at ON refresh_tokens
           WHEN OLD.used_at IS NULL AND NEW.used_at IS NOT NULL AND NEW.successor IS NOT NULL
           BEGIN
             INSERT INTO refresh_tokens (hash, session_id, generation)
               VALUES (NEW.successor, NEW.session_id, NEW.generation + 1);
             UPDATE sessions SET generation = NEW.generation + 1, last_used_at = NEW.used_at
               WHERE id = NEW.session_id;
           END""",
        "CREATE INDEX refresh_tokens_by_session ON refresh_tokens (session_id)",
        "CREATE INDEX sessions_by_expiry ON sessions (expires_at)",
        "CREATE INDEX sessions_by_last_use ON sessions (last_used_at)",
        "CREATE INDEX sessions_by_revocation ON sessions (revoked_at)",
        # Every revocation, in the order it was committed, for the revocation views of all
        # processes sharing this file. A trigger writes it, so that no path that ends a
        # session (logout, reuse, an operator) can forget to.
        """CREATE TABLE revocations (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            session_id TEXT NOT NULL,
            revoked_at REAL NOT NULL
        )""",
        "CREATE INDEX revocations_by_time ON revocations (revoked_at)",
        """CREATE TRIGGER session_revoked AFTER UPDATE OF revoked_at ON sessions
           WHEN OLD.revoked_at IS NULL AND NEW.revoked_at IS NOT NULL
           BEGIN
             INSERT INTO revocations (session_id, revoked_at) VALUES (NEW.id, NEW.revoked_at);
           END""",
    ],
    [
        """CREATE TABLE login_failures (
            key TEXT PRIMARY KEY,
            count INTEGER NOT NULL,
            last_at REAL NOT NULL,
            window_ends REAL NOT NULL
        ) WITHOUT ROWID""",
        "CREATE INDEX login_failures_by_end ON login_failures (window_ends)",
    ],
    ["ALTER TABLE users ADD COLUMN claims TEXT NOT NULL DEFAULT '[]'"],
]
PURGE_BATCH = 500
SCHEMA_VERSION = len(MIGRATIONS)

_SESSION_COLUMNS = ("id, user, created_at, last_used_at, expires_at, generation, revoked_at, "
                    "revoked_reason, ip, user_agent, chain_key")
_SESSION_WIDTH = len(_SESSION_COLUMNS.split(","))
_USER_COLUMNS = "u.name, u.password_hash, u.roles, u.disabled, u.created_at, u.claims"
_USERS = "SELECT name, password_hash, roles, disabled, created_at, claims FROM users"


class SQLiteStore:
    def __init__(self, db: aiosqlite.Connection) -> None:
        self._db = db
        self._lock = asyncio.Lock()

    @classmethod
    async def open(cls, path: str) -> SQLiteStore:
        try:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            db = await aiosqlite.connect(path, isolation_level=None)  # we issue BEGIN ourselves
        except (OSError, sqlite3.Error) as exc:
            raise UserError(f"cannot open the store at {path}: {exc}") from None
        store = cls(db)
        try:
            await store._refuse_another_programs_file(path)
            for pragma in ("busy_timeout=5000", "journal_mode=WAL", "synchronous=NORMAL",
                           "foreign_keys=ON"):
                await db.execute(f"PRAGMA {pragma}")
            await store._migrate()
        except (sqlite3.DatabaseError, StoreUnavailable) as exc:  # (the latter wraps the former)
            await db.close()
            cause = exc.__cause__ if isinstance(exc, StoreUnavailable) else exc
            raise UserError(f"cannot use the store at {path}: {cause}") from None
        except BaseException:
            await db.close()  # else its thread keeps the process alive
            raise
        return store

    async def _refuse_another_programs_file(self, path: str) -> None:
        """A file with tables but no gateway schema (user_version 0) is some other program's
        database, given by mistake: leave it as it is, journal mode included."""
        if (await self._one("PRAGMA user_version"))[0] != 0:
            return
        tables = [row[0] for row in await self._all(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name")]
        if tables:
            shown = ", ".join(tables[:5]) + (", ..." if len(tables) > 5 else "")
            raise UserError(f"the file at {path} is another program's SQLite database (tables: {shown}), "
                            "not a gateway store; give the store a file of its own")

    async def _migrate(self) -> None:
        async with self._write() as db:
            version = (await self._one("PRAGMA user_version"))[0]
            if version > SCHEMA_VERSION:
                raise UserError(f"the store's schema (version {version}) is newer than this "
                                f"gateway knows (version {SCHEMA_VERSION}); upgrade the gateway")
            for number in range(version, SCHEMA_VERSION):
                for statement in MIGRATIONS[number]:
                    await db.execute(statement)
            await db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    async def close(self) -> None:
        await self._db.close()

    async def ping(self) -> None:
        async with self._read():
            await self._one("SELECT 1")

    # --- plumbing -------------------------------------------------------------------------

    @asynccontextmanager
    async def _read(self) -> AsyncIterator[aiosqlite.Connection]:
        async with self._lock:
            try:
                yield self._db
            except (sqlite3.Error, ValueError) as exc:  # aiosqlite: ValueError once closed
                raise StoreUnavailable().because(f"sqlite: {exc.__class__.__name__}") from exc

    @asynccontextmanager
    async def _write(self) -> AsyncIterator[aiosqlite.Connection]:
        async with self._read() as db:
            await db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                await db.execute("ROLLBACK")
                raise
            await db.execute("COMMIT")

    # One thread round trip each: aiosqlite pays one per call (execute, fetch, close).
    async def _one(self, sql: str, params: Sequence[Any] = ()) -> Any:
        rows = await self._db.execute_fetchall(sql, params)
        return next(iter(rows), None)

    async def _all(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        return list(await self._db.execute_fetchall(sql, params))

    async def _change(self, sql: str, params: Sequence[Any] = ()) -> int:
        """Run one statement; how many rows it changed."""
        cursor = await self._db.execute(sql, params)
        return int(cursor.rowcount)

    # --- users ----------------------------------------------------------------------------

    async def add_user(self, user: User) -> None:
        try:
            async with self._write() as db:
                await db.execute(
                    "INSERT INTO users (name, password_hash, roles, disabled, created_at, claims) "
                    "VALUES (?, ?, ?, ?, ?, ?)", _user_row(user),
                )
        except StoreUnavailable as exc:
            if isinstance(exc.__cause__, sqlite3.IntegrityError):
                raise UserError(f"user {user.name!r} already exists") from None
            raise

    async def get_user(self, name: str) -> User | None:
        async with self._read():
            row = await self._one(f"{_USERS} WHERE name = ?", (name,))
        return _user(row) if row else None

    async def list_users(self) -> list[User]:
        async with self._read():
            rows = await self._all(f"{_USERS} ORDER BY name")
        return [_user(row) for row in rows]

    async def user_names(self) -> list[str]:
        async with self._read():
            return [row[0] for row in await self._all("SELECT name FROM users")]

    async def update_user(
        self,
        name: str,
        *,
        password_hash: str | None = None,
        roles: tuple[str, ...] | None = None,
        disabled: bool | None = None,
        claims: tuple[tuple[str, Any], ...] | None = None,
    ) -> bool:
        changes: dict[str, Any] = {}
        if password_hash is not None:
            changes["password_hash"] = password_hash
        if roles is not None:
            changes["roles"] = json.dumps(list(roles))
        if disabled is not None:
            changes["disabled"] = int(disabled)
        if claims is not None:
            changes["claims"] = json.dumps(claims)
        if not changes:
            return await self.get_user(name) is not None
        assignments = ", ".join(f"{column} = ?" for column in changes)
        async with self._write() as db:
            cursor = await db.execute(f"UPDATE users SET {assignments} WHERE name = ?",
                                      (*changes.values(), name))
            return cursor.rowcount == 1

    async def remove_user(self, name: str) -> bool:
        async with self._write() as db:
            cursor = await db.execute("DELETE FROM users WHERE name = ?", (name,))
            return cursor.rowcount == 1

    # --- sessions -------------------------------------------------------------------------

    async def create_session(self, session: Session, refresh_hash: bytes) -> None:
        async with self._write() as db:
            await db.execute(
                f"INSERT INTO sessions ({_SESSION_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                _session_row(session))
            await db.execute(
                "INSERT INTO refresh_tokens (hash, session_id, generation, used_at) "
                "VALUES (?, ?, ?, NULL)", (refresh_hash, session.id, session.generation))

    async def rotate_refresh(
        self, old_hash: bytes, successor_hash: Callable[[bytes], bytes], now: float,
        rules: RefreshRules,
    ) -> Rotation:
        # Read, judge, then apply the outcome with one conditional statement. Two requests
        # with the same token (two tabs, two processes) both read it unused; the statement
        # lets exactly one of them mark it used, and the other reads again and finds the
        # token inside its grace period. Reading this way needs no write lock, so refreshes
        # of different sessions never wait for each other.
        for _ in range(3):
            async with self._read():
                row = await self._one(
                    f"SELECT t.generation, t.used_at, {_prefixed('s.')}, {_USER_COLUMNS} "
                    "FROM refresh_tokens t JOIN sessions s ON s.id = t.session_id "
                    "LEFT JOIN users u ON u.name = s.user WHERE t.hash = ?", (old_hash,))
                if row is None:
                    return Rotation("unknown")
                generation, used_at = row[0], row[1]
                session = _session(row[2:2 + _SESSION_WIDTH])
                user = _user(row[2 + _SESSION_WIDTH:]) if row[2 + _SESSION_WIDTH] is not None else None
                outcome = judge_refresh(session, generation, used_at, now, rules)
                if outcome == "rotated":
                    changed = await self._change(
                        "UPDATE refresh_tokens SET used_at = ?, successor = ? "
                        "WHERE hash = ? AND used_at IS NULL "
                        "AND (SELECT revoked_at FROM sessions WHERE id = session_id) IS NULL",
                        (now, successor_hash(session.chain_key), old_hash))
                    if changed != 1:
                        continue  # another request rotated it (or ended the session) first
                    session = replace(session, generation=generation + 1, last_used_at=now)
                elif outcome == "grace":
                    session = replace(session, last_used_at=max(now, session.last_used_at))
                    await self._change("UPDATE sessions SET last_used_at = max(last_used_at, ?) "
                                       "WHERE id = ?", (now, session.id))
                elif outcome == "reused":
                    session = replace(session, revoked_at=now, revoked_reason="refresh_token_reused")
                    await self._change("UPDATE sessions SET revoked_at = ?, revoked_reason = ? "
                                       "WHERE id = ? AND revoked_at IS NULL",
                                       (now, session.revoked_reason, session.id))
                return Rotation(outcome, session, user)
        raise StoreUnavailable().because("sqlite: rotation kept losing races")

    async def get_session(self, session_id: str) -> Session | None:
        async with self._read():
            row = await self._one(f"SELECT {_SESSION_COLUMNS} FROM sessions WHERE id = ?", (session_id,))
        return _session(row) if row else None

    async def session_of_refresh(self, refresh_hash: bytes) -> Session | None:
        async with self._read():
            row = await self._one(
                f"SELECT {_prefixed('s.')} FROM refresh_tokens t "
                "JOIN sessions s ON s.id = t.session_id WHERE t.hash = ?", (refresh_hash,))
        return _session(row) if row else None

    async def list_sessions(self, user: str | None = None) -> list[Session]:
        where, params = ("WHERE user = ?", (user,)) if user is not None else ("", ())
        async with self._read():
            rows = await self._all(
                f"SELECT {_SESSION_COLUMNS} FROM sessions {where} ORDER BY created_at", params)
        return [_session(row) for row in rows]

    async def revoke_session(self, session_id: str, now: float, reason: str) -> bool:
        async with self._write() as db:
            cursor = await db.execute(
                "UPDATE sessions SET revoked_at = ?, revoked_reason = ? "
                "WHERE id = ? AND revoked_at IS NULL", (now, reason, session_id))
            return cursor.rowcount == 1

    async def revoke_user_sessions(self, user: str, now: float, reason: str) -> int:
        async with self._write() as db:
            cursor = await db.execute(
                "UPDATE sessions SET revoked_at = ?, revoked_reason = ? "
                "WHERE user = ? AND revoked_at IS NULL", (now, reason, user))
            return cursor.rowcount

    async def count_sessions(self, now: float, rules: RefreshRules) -> int:
        async with self._read():
            row = await self._one(
                "SELECT count(*) FROM sessions WHERE revoked_at IS NULL AND expires_at > ? "
                "AND last_used_at + ? > ?", (now, rules.idle_ttl, now))
        return int(row[0])

    async def revocations_after(self, seq: int) -> list[Revocation]:
        async with self._read():
            rows = await self._all(
                "SELECT seq, session_id, revoked_at FROM revocations WHERE seq > ? ORDER BY seq", (seq,))
        return [Revocation(*row) for row in rows]

    async def purge(self, now: float, rules: RefreshRules, horizon: float) -> int:
        ended_before = now - horizon
        removed = 0
        while True:  # in batches, so that no write lock is held for long
            async with self._write() as db:
                cursor = await db.execute(
                    "DELETE FROM sessions WHERE id IN (SELECT id FROM sessions "
                    "WHERE expires_at < ? OR revoked_at < ? OR last_used_at < ? LIMIT ?)",
                    (ended_before, ended_before, ended_before - rules.idle_ttl, PURGE_BATCH))
                batch = cursor.rowcount
                if batch < PURGE_BATCH:
                    await db.execute("DELETE FROM revocations WHERE revoked_at < ?", (ended_before,))
                    await db.execute("DELETE FROM login_failures WHERE window_ends < ?", (now,))
            removed += batch
            if batch < PURGE_BATCH:
                return removed
            await asyncio.sleep(0)

    async def count_failure(self, key: str, now: float, window: float) -> Failures:
        async with self._write() as db:
            await db.execute(
                "INSERT INTO login_failures (key, count, last_at, window_ends) VALUES (?, 1, ?, ?) "
                "ON CONFLICT (key) DO UPDATE SET "
                "count = CASE WHEN window_ends > ? THEN count + 1 ELSE 1 END, "
                "window_ends = CASE WHEN window_ends > ? THEN window_ends ELSE ? END, "
                "last_at = ?",
                (key, now, now + window, now, now, now + window, now))
            row = await self._one("SELECT count, last_at, window_ends FROM login_failures WHERE key = ?", (key,))
        return Failures(*row)

    async def failures(self, key: str, now: float) -> Failures | None:
        async with self._read():
            row = await self._one("SELECT count, last_at, window_ends FROM login_failures "
                                  "WHERE key = ? AND window_ends > ?", (key, now))
        return Failures(*row) if row else None

    async def clear_failures(self, key: str) -> None:
        async with self._write() as db:
            await db.execute("DELETE FROM login_failures WHERE key = ?", (key,))

    async def export_state(self, now: float) -> Snapshot:
        async with self._read():
            users = [_user(row) for row in await self._all(f"{_USERS} ORDER BY name")]
            sessions = [_session(row) for row in await self._all(
                f"SELECT {_SESSION_COLUMNS} FROM sessions WHERE revoked_at IS NULL AND expires_at > ?", (now,))]
            chains = []
            for session in sessions:
                links = [Link(*row) for row in await self._all(
                    "SELECT hash, generation, used_at FROM refresh_tokens WHERE session_id = ? "
                    "ORDER BY generation", (session.id,))]
                chains.append((session, links))
        return Snapshot(users, chains)

    async def import_state(self, snapshot: Snapshot) -> None:
        async with self._write() as db:
            if (await self._one("SELECT count(*) FROM users"))[0]:
                raise UserError("the target store already has users; move into an empty store")
            for user in snapshot.users:
                await db.execute(
                    "INSERT INTO users (name, password_hash, roles, disabled, created_at, claims) "
                    "VALUES (?, ?, ?, ?, ?, ?)", _user_row(user))
            for session, links in snapshot.sessions:
                await db.execute(
                    f"INSERT INTO sessions ({_SESSION_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    _session_row(session))
                for link in links:
                    await db.execute("INSERT INTO refresh_tokens (hash, session_id, generation, used_at) "
                                     "VALUES (?, ?, ?, ?)", (link.hash, session.id, link.generation, link.used_at))


def _user(row: Sequence[Any]) -> User:
    return User(name=row[0], password_hash=row[1], roles=tuple(json.loads(row[2])),
                disabled=bool(row[3]), created_at=row[4], claims=claims_from_json(row[5]))


def _user_row(user: User) -> tuple[Any, ...]:
    return (user.name, user.password_hash, json.dumps(list(user.roles)), int(user.disabled),
            user.created_at, json.dumps(user.claims))


def _session(row: Sequence[Any]) -> Session:
    return Session(*row)


def _session_row(s: Session) -> tuple[Any, ...]:
    return (s.id, s.user, s.created_at, s.last_used_at, s.expires_at, s.generation,
            s.revoked_at, s.revoked_reason, s.ip, s.user_agent, s.chain_key)


def _prefixed(prefix: str) -> str:
    return ", ".join(prefix + column.strip() for column in _SESSION_COLUMNS.split(","))
