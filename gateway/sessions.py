"""Refresh sessions as token families.

A login starts a session (``sid``) carrying a chain of opaque refresh tokens of 256 bits,
stored only as SHA-256 hashes (a high-entropy token needs no slow hash, and lookup by hash
keeps the comparison out of our code's timing). Each refresh exchanges the newest token for
its successor in one atomic store operation; the rules for grace and replay are
:func:`gateway.store.judge_refresh`.

A successor is not drawn at random but derived: ``HMAC(chain_key, token)``, where the
session's ``chain_key`` never leaves the server. So the same token presented twice within
the grace period (two tabs, a retry after a lost answer) gets the *same* successor, and
exactly one chain exists. Without the key, holding one token says nothing about the next.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass

from . import metrics
from .config import Tokens
from .credentials import belongs
from .errors import Unauthorized
from .revocations import Revocations
from .store import RefreshRules, Session, Store, User

security = logging.getLogger("gateway.security")
_REFRESH_TOKEN = re.compile(r"^[A-Za-z0-9_-]{43}$")  # token_urlsafe(32)


class RefreshRefused(Unauthorized):
    """A refresh token that cannot be exchanged: unknown, expired, revoked or replayed."""

    code = "invalid_token"
    description = "The refresh token is not valid."


_REFUSALS = {
    "unknown": ("invalid_token", "The refresh token is not valid."),
    "revoked": ("session_revoked", "The session has ended; sign in again."),
    "expired": ("session_expired", "The session has expired; sign in again."),
    "reused": ("refresh_token_reused", "The refresh token was already used; the session has ended."),
}


@dataclass(frozen=True)
class Refreshed:
    session: Session
    user: User
    refresh_token: str


def hash_token(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def successor(chain_key: bytes, token: str) -> str:
    digest = hmac.new(chain_key, token.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


class Sessions:
    def __init__(self, store: Store, cfg: Tokens, clock: Callable[[], float],
                 revocations: Revocations, *, source: str = "store") -> None:
        self.store = store
        self.source = source  # users.source: a refresh continues only the rows of its users
        self.cfg = cfg
        self.clock = clock
        self.rules = RefreshRules(idle_ttl=cfg.refresh_idle_ttl, reuse_grace=cfg.reuse_grace)
        # Told of every session this process ends, so that its access tokens stop at once.
        self.revocations = revocations

    async def start(self, user: User, ip: str, user_agent: str) -> tuple[Session, str]:
        now = self.clock()
        session = Session(
            id=secrets.token_hex(16),  # hex: never starts with "-", so it is easy to pass to a CLI
            user=user.name,
            created_at=now,
            last_used_at=now,
            expires_at=now + self.cfg.refresh_ttl,
            ip=ip,
            user_agent=user_agent[:256],
            chain_key=secrets.token_bytes(32),
        )
        token = secrets.token_urlsafe(32)
        await self.store.create_session(session, hash_token(token))
        return session, token

    async def refresh_presented(self, presented: list[str], ip: str = "") -> Refreshed:
        """refresh() for the refresh tokens a browser sent (cookies.read_all: at least one).
        Two different ones are refused, never one of them guessed at: a sibling subdomain
        can plant a cookie of the same name that the browser sends first."""
        if len(presented) > 1:
            metrics.refresh("invalid")
            raise RefreshRefused("ambiguous_credentials", "The request carries several refresh tokens.") \
                .because("several_refresh_tokens")
        return await self.refresh(presented[0], ip)

    async def refresh(self, token: str, ip: str = "") -> Refreshed:
        """Exchange ``token`` for its successor, or refuse with the reason. A replay is
        logged as the security event ``refresh_token_reused`` (user, sid, ip; never the
        token), whoever asked: the refresh endpoint or a renewal at the edge."""
        if not _REFRESH_TOKEN.fullmatch(token):
            metrics.refresh("invalid")
            raise RefreshRefused(*_REFUSALS["unknown"]).because("malformed")
        rotation = await self.store.rotate_refresh(
            hash_token(token), lambda chain_key: hash_token(successor(chain_key, token)),
            self.clock(), self.rules)
        if rotation.outcome == "reused" and rotation.session is not None:
            security.warning("refresh_token_reused", extra={"fields": {
                "user": rotation.session.user, "sid": rotation.session.id, "ip": ip}})
            await self.revocations.sync()
        if rotation.outcome not in ("rotated", "grace") or rotation.session is None:
            metrics.refresh("invalid" if rotation.outcome == "unknown" else rotation.outcome)
            raise RefreshRefused(*_REFUSALS[rotation.outcome]).because(rotation.outcome)
        session, user = rotation.session, rotation.user
        new_token = successor(session.chain_key, token)
        if user is None or user.disabled or not belongs(user, self.source):
            # A row of another users.source (the source was switched, or the row was taken
            # over): its sessions end like a disabled user's, and their access tokens too.
            reason = "user_disabled" if user is None or user.disabled else "user_source_changed"
            metrics.refresh("revoked")
            await self.end(session.id, reason)
            raise RefreshRefused(*_REFUSALS["revoked"]).because(reason)
        metrics.refresh(rotation.outcome)
        return Refreshed(session, user, new_token)

    async def end(self, session_id: str, reason: str) -> bool:
        ended = await self.store.revoke_session(session_id, self.clock(), reason)
        await self.revocations.sync()
        return ended

    async def end_all(self, user: str, reason: str) -> int:
        ended = await self.store.revoke_user_sessions(user, self.clock(), reason)
        await self.revocations.sync()
        return ended

    async def find(self, token: str) -> Session | None:
        """The session a refresh token belongs to (any generation), without using it."""
        if not _REFRESH_TOKEN.fullmatch(token):
            return None
        return await self.store.session_of_refresh(hash_token(token))

    def remaining(self, session: Session) -> int:
        """Seconds until the session ends at the latest: a refresh cookie's Max-Age."""
        return max(0, int(session.expires_at - self.clock()))
