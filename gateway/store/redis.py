"""The shared store: Redis, through redis-py's asyncio client (``pip install 'gateway[redis]'``).

For several workers and several replicas. Layout, under one prefix (``gw:``):

- ``gw:u:NAME`` a user (hash), ``gw:users`` every user name (set);
- ``gw:s:SID`` a session (hash), ``gw:us:NAME`` the user's session ids (set);
- ``gw:t:HASH`` one refresh token of a chain (hash: session, generation, used_at, successor);
- ``gw:revocations`` every revocation, in order (a stream: every replica reads it);
- ``gw:f:KEY`` a failed-login counter (expires with its window);
- ``gw:live:used`` and ``gw:live:ends`` every session not yet revoked or purged, scored by
  its last use and by its absolute end (sorted sets), so that live sessions are counted
  without reading them. A session started by a version without these sets is counted from
  its next refresh.

Rotation and revocation are WATCH/MULTI transactions over the token and its session: they
decide with the same :func:`~gateway.store.judge_refresh` as every store, and a concurrent
change to either key (another replica rotating or revoking) makes the transaction retry
with what that replica wrote. Sessions and tokens expire by key TTL a day after the session
can no longer be used, so nothing piles up.

URLs: ``redis://``, ``rediss://`` (TLS), ``unix://`` and ``redis+sentinel://`` (see
``_sentinel_master``). Redis Cluster is not supported: a rotation is one transaction over
keys that Cluster would place in different slots.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any, TypeVar
from urllib.parse import SplitResult, parse_qsl, urlencode, urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.sentinel import Sentinel
from redis.exceptions import RedisError, WatchError

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

T = TypeVar("T")
MARGIN = 86400  # keys outlive their session by a day, longer than any access token
_RETRIES = 20


class RedisStore:
    def __init__(self, client: aioredis.Redis, prefix: str = "gw:") -> None:
        self._r: Any = client  # (redis-py types its replies loosely; decoded here by hand)
        self._p = prefix

    @classmethod
    async def open(cls, url: str) -> RedisStore:
        """``redis://[:password@]host:port/db``, ``rediss://`` for TLS or ``unix:///path``;
        ``?key_prefix=NAME:`` puts this gateway's keys under another prefix (several
        deployments in one database)."""
        parts = urlsplit(url)
        query = parse_qsl(parts.query, keep_blank_values=True)
        prefix = next((v for k, v in query if k == "key_prefix"), "gw:")
        rest = urlencode([(k, v) for k, v in query if k != "key_prefix"])
        options: dict[str, Any] = {"socket_timeout": 2, "socket_connect_timeout": 2}
        try:
            if parts.scheme == "redis+sentinel":
                client = _sentinel_master(parts, options)
            else:
                client = aioredis.from_url(urlunsplit(parts._replace(query=rest)),
                                           health_check_interval=10, **options)
        except (ValueError, TypeError) as exc:
            raise UserError(f"cannot use the store URL: {exc}") from None
        return cls(client, prefix=prefix)  # connects on first use: a gateway may start before Redis

    async def close(self) -> None:
        await self._r.aclose()

    async def ping(self) -> None:
        await self._guard(lambda: self._r.ping())

    # --- plumbing -------------------------------------------------------------------------

    async def _guard(self, work: Callable[[], Awaitable[T]]) -> T:
        try:
            return await work()
        except (RedisError, OSError) as exc:
            raise StoreUnavailable().because(f"redis: {exc.__class__.__name__}") from exc

    def _user_key(self, name: str) -> str:
        return f"{self._p}u:{name}"

    def _session_key(self, sid: str) -> str:
        return f"{self._p}s:{sid}"

    def _token_key(self, token_hash: bytes) -> str:
        return f"{self._p}t:{token_hash.hex()}"

    def _sessions_of(self, user: str) -> str:
        return f"{self._p}us:{user}"

    def _tokens_of(self, sid: str) -> str:
        return f"{self._p}st:{sid}"

    @property
    def _stream(self) -> str:
        return f"{self._p}revocations"

    @property
    def _live_used(self) -> str:
        return f"{self._p}live:used"

    @property
    def _live_ends(self) -> str:
        return f"{self._p}live:ends"

    # --- users ----------------------------------------------------------------------------

    async def add_user(self, user: User) -> None:
        async def work() -> None:
            added = await self._r.hsetnx(self._user_key(user.name), "password_hash", user.password_hash)
            if not added:
                raise UserError(f"user {user.name!r} already exists")
            async with self._r.pipeline(transaction=True) as pipe:
                pipe.hset(self._user_key(user.name), mapping=_user_fields(user))
                pipe.sadd(f"{self._p}users", user.name)
                await pipe.execute()
        await self._guard(work)

    async def get_user(self, name: str) -> User | None:
        fields = await self._guard(lambda: self._r.hgetall(self._user_key(name)))
        return _user(name, fields) if fields else None

    async def list_users(self) -> list[User]:
        async def work() -> list[User]:
            names = sorted(n.decode() for n in await self._r.smembers(f"{self._p}users"))
            users = [await self.get_user(name) for name in names]
            return [u for u in users if u is not None]
        return await self._guard(work)

    async def user_names(self) -> list[str]:
        return [n.decode() for n in await self._guard(lambda: self._r.smembers(f"{self._p}users"))]

    async def update_user(
        self,
        name: str,
        *,
        password_hash: str | None = None,
        roles: tuple[str, ...] | None = None,
        disabled: bool | None = None,
        claims: tuple[tuple[str, Any], ...] | None = None,
    ) -> bool:
        changes: dict[str, str] = {}
        if password_hash is not None:
            changes["password_hash"] = password_hash
        if roles is not None:
            changes["roles"] = json.dumps(list(roles))
        if disabled is not None:
            changes["disabled"] = "1" if disabled else "0"
        if claims is not None:
            changes["claims"] = json.dumps(claims)

        async def work() -> bool:
            key = self._user_key(name)
            async with self._r.pipeline(transaction=True) as pipe:
                while True:
                    try:
                        await pipe.watch(key)
                        if not await pipe.exists(key):
                            return False
                        pipe.multi()
                        if changes:
                            pipe.hset(key, mapping=changes)
                        await pipe.execute()
                        return True
                    except WatchError:
                        continue
        return await self._guard(work)

    async def remove_user(self, name: str) -> bool:
        async def work() -> bool:
            async with self._r.pipeline(transaction=True) as pipe:
                pipe.delete(self._user_key(name))
                pipe.srem(f"{self._p}users", name)
                removed, _ = await pipe.execute()
            return bool(removed)
        return await self._guard(work)

    # --- sessions -------------------------------------------------------------------------

    async def create_session(self, session: Session, refresh_hash: bytes) -> None:
        async def work() -> None:
            skey, tkey = self._session_key(session.id), self._token_key(refresh_hash)
            until = int(session.expires_at) + MARGIN
            async with self._r.pipeline(transaction=True) as pipe:
                pipe.hset(skey, mapping=_session_fields(session))
                pipe.expireat(skey, until)
                pipe.hset(tkey, mapping={"sid": session.id, "generation": session.generation})
                pipe.expireat(tkey, until)
                pipe.sadd(self._tokens_of(session.id), tkey)
                pipe.expireat(self._tokens_of(session.id), until)
                pipe.sadd(self._sessions_of(session.user), session.id)
                pipe.zadd(self._live_used, {session.id: session.last_used_at})
                pipe.zadd(self._live_ends, {session.id: session.expires_at})
                await pipe.execute()
        await self._guard(work)

    async def rotate_refresh(
        self, old_hash: bytes, successor_hash: Callable[[bytes], bytes], now: float,
        rules: RefreshRules,
    ) -> Rotation:
        async def work() -> Rotation:
            tkey = self._token_key(old_hash)
            async with self._r.pipeline(transaction=True) as pipe:
                for _ in range(_RETRIES):
                    try:
                        await pipe.watch(tkey)
                        token = await pipe.hgetall(tkey)
                        if not token:
                            return Rotation("unknown")
                        sid = token[b"sid"].decode()
                        skey = self._session_key(sid)
                        await pipe.watch(skey)
                        fields = await pipe.hgetall(skey)
                        if not fields:
                            return Rotation("unknown")
                        session = _session(sid, fields)
                        user_fields = await pipe.hgetall(self._user_key(session.user))
                        user = _user(session.user, user_fields) if user_fields else None
                        generation = int(token[b"generation"])
                        used_at = float(token[b"used_at"]) if token.get(b"used_at") else None
                        outcome = judge_refresh(session, generation, used_at, now, rules)
                        if outcome == "grace":
                            # Parallel tabs land here together: touching the session in the
                            # watched transaction would make each retry the others. A plain
                            # write of a later last use is all that is needed.
                            await pipe.reset()
                            if now > session.last_used_at + 1:
                                await self._r.hset(skey, "last_used_at", repr(now))
                                # xx: never put back a session revoked meanwhile
                                await self._r.zadd(self._live_used, {sid: now}, xx=True)
                                session = replace(session, last_used_at=now)
                            return Rotation(outcome, session, user)
                        pipe.multi()
                        if outcome == "rotated":
                            new_key = self._token_key(successor_hash(session.chain_key))
                            until = int(min(session.expires_at, now + rules.idle_ttl)) + MARGIN
                            pipe.hset(tkey, mapping={"used_at": repr(now), "successor": new_key})
                            pipe.hset(new_key, mapping={"sid": sid, "generation": generation + 1})
                            pipe.hset(skey, mapping={"generation": generation + 1, "last_used_at": repr(now)})
                            pipe.sadd(self._tokens_of(sid), new_key)
                            for key in (tkey, new_key, skey, self._tokens_of(sid)):
                                pipe.expireat(key, until)
                            pipe.zadd(self._live_used, {sid: now})
                            pipe.zadd(self._live_ends, {sid: session.expires_at})
                            session = replace(session, generation=generation + 1, last_used_at=now)
                        elif outcome == "reused":
                            session = replace(session, revoked_at=now, revoked_reason="refresh_token_reused")
                            self._queue_revocation(pipe, session)
                        await pipe.execute()
                        return Rotation(outcome, session, user)
                    except WatchError:
                        continue  # another request changed the token or its session: judge again
            raise StoreUnavailable().because("redis: rotation kept losing races")
        return await self._guard(work)

    def _queue_revocation(self, pipe: Any, session: Session) -> None:
        pipe.hset(self._session_key(session.id), mapping={
            "revoked_at": repr(session.revoked_at), "revoked_reason": session.revoked_reason or ""})
        pipe.xadd(self._stream, {"sid": session.id, "at": repr(session.revoked_at)})
        pipe.zrem(self._live_used, session.id)
        pipe.zrem(self._live_ends, session.id)

    async def get_session(self, session_id: str) -> Session | None:
        fields = await self._guard(lambda: self._r.hgetall(self._session_key(session_id)))
        return _session(session_id, fields) if fields else None

    async def session_of_refresh(self, refresh_hash: bytes) -> Session | None:
        async def work() -> Session | None:
            sid = await self._r.hget(self._token_key(refresh_hash), "sid")
            return await self.get_session(sid.decode()) if sid else None
        return await self._guard(work)

    async def list_sessions(self, user: str | None = None) -> list[Session]:
        async def work() -> list[Session]:
            found = []
            for key in await self._session_sets(user):
                for raw in await self._r.smembers(key):
                    session = await self.get_session(raw.decode())
                    if session is None:  # expired with its key: forget it here too
                        await self._r.srem(key, raw)
                    else:
                        found.append(session)
            return sorted(found, key=lambda s: s.created_at)
        return await self._guard(work)

    async def _session_sets(self, user: str | None) -> list[str]:
        if user is not None:
            return [self._sessions_of(user)]
        return [key.decode() async for key in self._r.scan_iter(match=f"{self._p}us:*", count=500)]

    async def revoke_session(self, session_id: str, now: float, reason: str) -> bool:
        async def work() -> bool:
            skey = self._session_key(session_id)
            async with self._r.pipeline(transaction=True) as pipe:
                for _ in range(_RETRIES):
                    try:
                        await pipe.watch(skey)
                        fields = await pipe.hgetall(skey)
                        if not fields or fields.get(b"revoked_at"):
                            return False
                        pipe.multi()
                        session = replace(_session(session_id, fields), revoked_at=now, revoked_reason=reason)
                        self._queue_revocation(pipe, session)
                        await pipe.execute()
                        return True
                    except WatchError:
                        continue
            raise StoreUnavailable().because("redis: revocation kept losing races")
        return await self._guard(work)

    async def revoke_user_sessions(self, user: str, now: float, reason: str) -> int:
        async def work() -> int:
            ended = 0
            for raw in await self._r.smembers(self._sessions_of(user)):
                ended += await self.revoke_session(raw.decode(), now, reason)
            return ended
        return await self._guard(work)

    async def count_sessions(self, now: float, rules: RefreshRules) -> int:
        used_after = now - rules.idle_ttl
        count = await self._guard(lambda: self._r.eval(
            _COUNT_LIVE, 2, self._live_used, self._live_ends, repr(used_after), repr(now)))
        return int(count)

    async def revocations_after(self, seq: int) -> list[Revocation]:
        async def work() -> list[Revocation]:
            start = f"({_stream_id(seq)}" if seq else "-"
            entries = await self._r.xrange(self._stream, min=start, max="+")
            return [Revocation(_seq(entry_id), fields[b"sid"].decode(), float(fields[b"at"]))
                    for entry_id, fields in entries]
        return await self._guard(work)

    async def purge(self, now: float, rules: RefreshRules, horizon: float) -> int:
        """Sessions and their tokens also expire by themselves (key TTLs, a day after they
        can last be used); this ends those that ended more than ``horizon`` ago, by the
        gateway's clock, and trims the revocation log to what still matters."""
        ended_before = now - horizon

        async def work() -> int:
            removed = 0
            for key in await self._session_sets(None):
                for raw in await self._r.smembers(key):
                    session = await self.get_session(raw.decode())
                    if session is not None and not (
                            session.expires_at < ended_before
                            or (session.revoked_at is not None and session.revoked_at < ended_before)
                            or session.last_used_at < ended_before - rules.idle_ttl):
                        continue
                    tokens = self._tokens_of(raw.decode())
                    doomed = [self._session_key(raw.decode()), tokens,
                              *[t.decode() for t in await self._r.smembers(tokens)]]
                    async with self._r.pipeline(transaction=True) as pipe:
                        pipe.delete(*doomed)
                        pipe.srem(key, raw)
                        pipe.zrem(self._live_used, raw)
                        pipe.zrem(self._live_ends, raw)
                        await pipe.execute()
                    removed += session is not None
            # Stream ids are Redis's own clock: trim by it, not by ours.
            seconds, micros = await self._r.time()
            await self._r.xtrim(self._stream, minid=f"{int((seconds + micros / 1e6 - horizon) * 1000)}-0")
            return removed
        return await self._guard(work)

    async def count_failure(self, key: str, now: float, window: float) -> Failures:
        async def work() -> Failures:
            fkey = self._failures_key(key)
            async with self._r.pipeline(transaction=True) as pipe:
                for _ in range(_RETRIES):
                    try:
                        await pipe.watch(fkey)
                        current = await pipe.hgetall(fkey)
                        ends = float(current[b"ends"]) if current else 0.0
                        count = int(current[b"count"]) + 1 if ends > now else 1
                        ends = ends if count > 1 else now + window
                        pipe.multi()
                        pipe.hset(fkey, mapping={"count": count, "ends": repr(ends), "last": repr(now)})
                        pipe.expireat(fkey, int(ends) + 1)
                        await pipe.execute()
                        return Failures(count, now, ends)
                    except WatchError:
                        continue
            raise StoreUnavailable().because("redis: failure count kept losing races")
        return await self._guard(work)

    async def failures(self, key: str, now: float) -> Failures | None:
        current = await self._guard(lambda: self._r.hgetall(self._failures_key(key)))
        if not current or float(current[b"ends"]) <= now:
            return None
        return Failures(int(current[b"count"]), float(current[b"last"]), float(current[b"ends"]))

    async def clear_failures(self, key: str) -> None:
        await self._guard(lambda: self._r.delete(self._failures_key(key)))

    def _failures_key(self, key: str) -> str:
        return f"{self._p}f:{key}"

    async def export_state(self, now: float) -> Snapshot:
        async def work() -> Snapshot:
            users = await self.list_users()
            chains = []
            for session in await self.list_sessions():
                if session.revoked_at is not None or session.expires_at <= now:
                    continue
                links = []
                for key in await self._r.smembers(self._tokens_of(session.id)):
                    token = await self._r.hgetall(key)
                    if token:
                        links.append(Link(bytes.fromhex(key.decode().rsplit(":", 1)[1]),
                                          int(token[b"generation"]),
                                          float(token[b"used_at"]) if token.get(b"used_at") else None))
                chains.append((session, sorted(links, key=lambda link: link.generation)))
            return Snapshot(users, chains)
        return await self._guard(work)

    async def import_state(self, snapshot: Snapshot) -> None:
        async def work() -> None:
            if await self._r.scard(f"{self._p}users"):
                raise UserError("the target store already has users; move into an empty store")
            for user in snapshot.users:
                await self.add_user(user)
            for session, links in snapshot.sessions:
                until = int(session.expires_at) + MARGIN
                async with self._r.pipeline(transaction=True) as pipe:
                    pipe.hset(self._session_key(session.id), mapping=_session_fields(session))
                    pipe.sadd(self._sessions_of(session.user), session.id)
                    if session.revoked_at is None:
                        pipe.zadd(self._live_used, {session.id: session.last_used_at})
                        pipe.zadd(self._live_ends, {session.id: session.expires_at})
                    for link in links:
                        key = self._token_key(link.hash)
                        fields: dict[str, Any] = {"sid": session.id, "generation": link.generation}
                        if link.used_at is not None:
                            fields["used_at"] = repr(link.used_at)
                        pipe.hset(key, mapping=fields)
                        pipe.expireat(key, until)
                        pipe.sadd(self._tokens_of(session.id), key)
                    for key in (self._session_key(session.id), self._tokens_of(session.id)):
                        pipe.expireat(key, until)
                    await pipe.execute()
        await self._guard(work)


# Sessions used within the idle window, less those of them past their absolute end. A
# session is never used after its end, so only ends within the idle window need a look.
_COUNT_LIVE = """
local live = redis.call('ZCOUNT', KEYS[1], '(' .. ARGV[1], '+inf')
for _, sid in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '(' .. ARGV[1], ARGV[2])) do
  local used = redis.call('ZSCORE', KEYS[1], sid)
  if used and tonumber(used) > tonumber(ARGV[1]) then live = live - 1 end
end
return live
"""


def _sentinel_master(parts: SplitResult, options: dict[str, Any]) -> aioredis.Redis:
    """``redis+sentinel://[:password@]host:port[,host:port...]/SERVICE[/DB]``: the master
    that the Sentinels name, followed through fail-overs."""
    hosts = parts.netloc.rsplit("@", 1)[-1]
    password = parts.netloc.rsplit("@", 1)[0].lstrip(":") if "@" in parts.netloc else None
    sentinels = []
    for host in hosts.split(","):
        name, _, port = host.rpartition(":")
        sentinels.append((name or port, int(port) if name else 26379))
    service, _, db = parts.path.strip("/").partition("/")
    if not service:
        raise ValueError("a Sentinel URL names its service: redis+sentinel://host:26379/SERVICE/DB")
    sentinel = Sentinel(sentinels, **options)  # type: ignore[no-untyped-call,unused-ignore]  # typed in newer redis-py
    master: aioredis.Redis = sentinel.master_for(service, db=int(db or 0), password=password, **options)
    return master


def _stream_id(seq: int) -> str:
    return f"{seq >> 32}-{seq & 0xFFFFFFFF}"


def _seq(entry_id: bytes) -> int:
    """A stream id ``ms-n`` as one increasing integer (the store contract's cursor)."""
    ms, _, n = entry_id.decode().partition("-")
    return (int(ms) << 32) | int(n)


def _user_fields(user: User) -> dict[str, str]:
    return {"password_hash": user.password_hash, "roles": json.dumps(list(user.roles)),
            "disabled": "1" if user.disabled else "0", "created_at": repr(user.created_at),
            "claims": json.dumps(user.claims)}


def _user(name: str, f: dict[bytes, bytes]) -> User:
    return User(name=name, password_hash=f[b"password_hash"].decode(),
                roles=tuple(json.loads(f.get(b"roles", b"[]"))), disabled=f.get(b"disabled") == b"1",
                created_at=float(f.get(b"created_at", b"0")),
                claims=claims_from_json(f.get(b"claims", b"[]")))


def _session_fields(s: Session) -> dict[str, Any]:
    return {"user": s.user, "created_at": repr(s.created_at), "last_used_at": repr(s.last_used_at),
            "expires_at": repr(s.expires_at), "generation": s.generation,
            "revoked_at": "" if s.revoked_at is None else repr(s.revoked_at),
            "revoked_reason": s.revoked_reason or "", "ip": s.ip, "user_agent": s.user_agent,
            "chain_key": s.chain_key}


def _session(sid: str, f: dict[bytes, bytes]) -> Session:
    return Session(
        id=sid, user=f[b"user"].decode(), created_at=float(f[b"created_at"]),
        last_used_at=float(f[b"last_used_at"]), expires_at=float(f[b"expires_at"]),
        generation=int(f[b"generation"]),
        revoked_at=float(f[b"revoked_at"]) if f.get(b"revoked_at") else None,
        revoked_reason=f[b"revoked_reason"].decode() or None if f.get(b"revoked_reason") else None,
        ip=f.get(b"ip", b"").decode(), user_agent=f.get(b"user_agent", b"").decode(),
        chain_key=f.get(b"chain_key", b""),
    )
