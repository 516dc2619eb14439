"""The storage contract: users, sessions and their refresh-token chains.

Every backend implements :class:`Store`. Rotation is one store operation
(:meth:`Store.rotate_refresh`), atomic in each backend, and every backend decides its outcome
with the same pure function, :func:`judge_refresh`, so the rules live in one place.
Refresh tokens are never stored, only their SHA-256 hashes.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from ..errors import UserError

log = logging.getLogger("gateway.store")

Outcome = Literal["rotated", "grace", "reused", "revoked", "expired", "unknown"]


@dataclass(frozen=True)
class User:
    name: str
    password_hash: str
    roles: tuple[str, ...] = ()
    disabled: bool = False
    created_at: float = 0.0
    # Claims put into the user's access tokens besides sub and roles (name -> a JSON scalar
    # or a list of scalars): what an upstream credential check answered (users.claims).
    claims: tuple[tuple[str, Any], ...] = ()


def claims_from_json(text: str | bytes) -> tuple[tuple[str, Any], ...]:
    """User.claims as the stores keep them: JSON ``[[name, value], ...]``."""
    return tuple((str(name), value) for name, value in json.loads(text))


@dataclass(frozen=True)
class Session:
    id: str
    user: str
    created_at: float
    last_used_at: float
    expires_at: float  # absolute: login + refresh_ttl, however often it is refreshed
    generation: int = 0  # generation of the newest refresh token in the chain
    revoked_at: float | None = None
    revoked_reason: str | None = None
    ip: str = ""
    user_agent: str = ""
    # Secret to the server: each refresh token's successor is derived from the token and this
    # key (see gateway.sessions), so a repeated refresh yields the same successor.
    chain_key: bytes = field(default=b"", repr=False)


@dataclass(frozen=True)
class RefreshRules:
    idle_ttl: float
    reuse_grace: float


@dataclass(frozen=True)
class Revocation:
    seq: int  # increases with every revocation committed to the store
    session_id: str
    revoked_at: float


@dataclass(frozen=True)
class Link:
    """One refresh token of a chain, as stored (for moving stores)."""

    hash: bytes
    generation: int
    used_at: float | None


@dataclass(frozen=True)
class Snapshot:
    """Everything worth moving to another store: users, and sessions still alive with
    their chains (so that moving does not sign anyone out)."""

    users: list[User]
    sessions: list[tuple[Session, list[Link]]]


@dataclass(frozen=True)
class Failures:
    """Failed logins counted for one key in its current window."""

    count: int
    last_at: float  # when the latest one was counted
    window_ends: float


@dataclass(frozen=True)
class Rotation:
    outcome: Outcome
    session: Session | None = None
    user: User | None = None  # the session's user as the store has it now (None: removed)


def judge_refresh(
    session: Session, generation: int, used_at: float | None, now: float, rules: RefreshRules
) -> Outcome:
    """What presenting the refresh token of ``generation`` (used at ``used_at``, or never)
    means for ``session`` at ``now``.

    Only the newest token of a chain rotates. The one just before it is still honoured for
    ``reuse_grace`` after it was used (parallel tabs, a retried request whose answer was
    lost): it gets the same successor again, so the chain never forks. Any other used token
    is a replay: someone holds a copy of a token that has already been exchanged, so the
    whole session is ended (RFC 9700 section 4.14.2).
    """
    if session.revoked_at is not None:
        return "revoked"
    if now >= session.expires_at or now >= session.last_used_at + rules.idle_ttl:
        return "expired"
    if used_at is None and generation == session.generation:
        return "rotated"
    if used_at is not None and generation == session.generation - 1 \
            and now - used_at <= rules.reuse_grace:
        return "grace"
    return "reused"


class Store(Protocol):
    async def close(self) -> None: ...

    async def ping(self) -> None:
        """Raise StoreUnavailable unless the store answers."""

    # users
    async def add_user(self, user: User) -> None:
        """Raise UserError when the name is taken."""

    async def get_user(self, name: str) -> User | None: ...

    async def list_users(self) -> list[User]: ...

    async def user_names(self) -> list[str]:
        """Every user's name, in no order: one cheap read."""

    async def update_user(
        self,
        name: str,
        *,
        password_hash: str | None = None,
        roles: tuple[str, ...] | None = None,
        disabled: bool | None = None,
        claims: tuple[tuple[str, Any], ...] | None = None,
    ) -> bool:
        """False when there is no such user."""

    async def remove_user(self, name: str) -> bool: ...

    # sessions
    async def create_session(self, session: Session, refresh_hash: bytes) -> None: ...

    async def rotate_refresh(
        self, old_hash: bytes, successor_hash: Callable[[bytes], bytes], now: float,
        rules: RefreshRules,
    ) -> Rotation:
        """Atomically judge the token with :func:`judge_refresh` and apply the outcome:
        ``rotated`` marks it used and stores ``successor_hash(session.chain_key)`` as the
        next generation; ``grace`` only touches the session; ``reused`` revokes the
        session. ``unknown`` when no such token is stored."""

    async def get_session(self, session_id: str) -> Session | None: ...

    async def session_of_refresh(self, refresh_hash: bytes) -> Session | None:
        """The session that a refresh token of any generation belongs to."""

    async def list_sessions(self, user: str | None = None) -> list[Session]: ...

    async def revoke_session(self, session_id: str, now: float, reason: str) -> bool:
        """False when there is no such live session."""

    async def revoke_user_sessions(self, user: str, now: float, reason: str) -> int:
        """How many live sessions were ended."""

    async def count_sessions(self, now: float, rules: RefreshRules) -> int:
        """How many sessions are live at ``now``: not revoked, before their absolute end,
        and used within ``rules.idle_ttl`` (what :func:`judge_refresh` would still rotate).
        Cheap enough to ask at every metrics scrape."""

    async def revocations_after(self, seq: int) -> list[Revocation]:
        """Every revocation still kept with a ``seq`` above this one, oldest first. Whatever
        ends a session (including ``rotate_refresh`` on reuse) records one."""

    async def purge(self, now: float, rules: RefreshRules, horizon: float) -> int:
        """Delete sessions (and their tokens) that ended more than ``horizon`` ago, and
        revocations older than that; how many sessions went. Never blocks the store for long."""

    # failed-login counters (throttling): one fixed window per key, started by its first failure
    async def count_failure(self, key: str, now: float, window: float) -> Failures:
        """Count one more failure for ``key``, in its current window or a new one."""

    async def failures(self, key: str, now: float) -> Failures | None:
        """The failures of ``key`` in its current window; None once it has passed."""

    async def clear_failures(self, key: str) -> None: ...

    async def export_state(self, now: float) -> Snapshot:
        """Every user, and every session neither revoked nor past its absolute end."""

    async def import_state(self, snapshot: Snapshot) -> None:
        """Write a snapshot into this store, which must hold no users yet."""


STORE_URL_FORMS = "sqlite:///ABSOLUTE/PATH.db, sqlite:RELATIVE/PATH.db or redis://HOST:PORT/DB"
REDIS_SCHEMES = ("redis://", "rediss://", "unix://", "redis+sentinel://")


def resolve_url(url: str, base_dir: Path) -> str | None:
    """``url`` with a relative SQLite path made absolute against ``base_dir`` (as
    ``sqlite:///ABSOLUTE/PATH``); a Redis URL as it is; None when it is not a store URL
    we know."""
    if url.startswith(REDIS_SCHEMES):
        return url if len(url.split("://", 1)[1]) > 0 else None
    if not url.startswith("sqlite:"):
        return None
    rest = url[len("sqlite:"):]
    if not rest or (rest.startswith("//") and not rest.startswith("///")):
        return None  # empty, or sqlite://host/...: there is no host to talk to
    path = "/" + rest.lstrip("/") if rest.startswith("/") else str((base_dir / rest).resolve())
    return "sqlite:///" + path.lstrip("/")


async def open_store(url: str, *, create: bool = True) -> Store:
    """Open the store at ``url`` (see STORE_URL_FORMS; a relative path is relative to the
    working directory). ``create=False`` refuses a SQLite file that does not exist yet,
    rather than make an empty one (a store to read from, as a migration's source)."""
    resolved = resolve_url(url, Path.cwd())
    if resolved is None:
        raise UserError(f"unsupported store URL {url.split(':', 1)[0]!r}: expected {STORE_URL_FORMS}")
    if resolved.startswith(REDIS_SCHEMES):
        try:
            from .redis import RedisStore
        except ImportError:
            raise UserError("the Redis store needs redis-py: pip install 'gateway[redis]'") from None
        return await RedisStore.open(resolved)
    from .sqlite import SQLiteStore

    path = "/" + resolved[len("sqlite:///"):]
    is_new = not Path(path).exists()
    if not create and not Path(path).is_file():
        raise UserError(f"no SQLite store at {path}")
    store = await SQLiteStore.open(path)
    if is_new:  # said, so that a mistyped path is seen as a new, empty store
        log.info("store_created", extra={"fields": {"path": path}})
    return store
