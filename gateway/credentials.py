"""Who may log in: one ``Credentials.check(username, password) -> User`` for every
``users.source``.

Every source answers bad credentials the same way (:class:`InvalidCredentials`, 401
``invalid_credentials``; the reason goes to the logs only) and fails closed: whatever goes
wrong while checking (an unreadable file, an upstream that is down, slow or answers
something unexpected) is a refusal, never a sign-in.

- ``store``: users in the store, with argon2id hashes. A hash made with other parameters
  than the current ones is replaced on the next successful login (the password is known
  then, and only then).
- ``htpasswd``: an Apache htpasswd file of bcrypt entries (:mod:`gateway.htpasswd`). It is
  watched: its size, mtime and inode are looked at once a second (by a background task,
  and on a login if that has not happened in the last second), and a changed file is read
  again without a restart. A file that cannot be used keeps the previous contents, with a
  warning. Its users get ``users.default_roles``.
- ``upstream``: the credentials are POSTed to the legacy app's login URL (JSON or a form,
  with the configured field names) through a client session of this module's own, opened
  for that one check: no cookie jar, no redirects followed, ``users.timeout`` for all of
  it. Valid means a 2xx answer whose body is a JSON object; the roles are the list of
  strings at ``roles_field`` in it (anything else: none), plus ``default_roles``. Any other
  status, a timeout, a connection error, or a body that is not a JSON object is a refusal,
  logged with its reason (never the password). A login endpoint that answers 200 with an
  HTML page for everything is thereby not mistaken for a yes. The user name must pass the
  gateway's rules (:data:`gateway.users.USERNAME`) before anything is sent. Each of the
  configured ``claims`` is the value at its dotted path in the answer, when that is a short
  string, a number, a boolean or a short list of those (anything else, or nothing there:
  the claim is left out, with a warning); it goes into the user's access tokens.

Hashing threads run at the lowest CPU priority (nice 19; Linux sets it per thread): a
password check takes ~100 ms of CPU by design, and on a busy core the proxied requests
come first. Under load a login takes longer; the traffic it shares a core with does not.

Timing does not tell an unknown user from a wrong password: an unknown or disabled store
user is checked against a dummy argon2id hash, an unknown htpasswd user against a dummy
bcrypt hash of the file's most common cost. Hashing costs tens of milliseconds of CPU by
design, so it never runs on the event loop: a small thread pool bounds how many run at
once (argon2 and bcrypt alike), and proxied traffic keeps flowing while logins are checked.

**Refresh for users who are not in the store.** Sessions are refreshed from the store's
row of their user (:meth:`gateway.sessions.Sessions.refresh` refuses when it is missing or
disabled), and this module keeps such a row for every user of the other two sources, so
``sessions.py`` needs no change. At each login the row is written (created, or taken over
from a store user of the same name) with an unusable password hash (``!htpasswd:...`` or
``!upstream``, which no argon2 check ever accepts) and the roles of the source, and a
refresh uses those roles:

- htpasswd: the row follows the file. When a read of the file no longer has the user, the
  user's sessions are ended and the row is removed; when the user's hash in the file
  changed (a new password), the sessions are ended, as ``gateway users passwd`` does. The
  row's hash names the file entry it was made from (a SHA-256 prefix of the bcrypt hash,
  which is useless without its salt), so a change made while the gateway was down is seen
  at the first read after a start. Ending sessions, not only refusing their next refresh,
  stops their access tokens within a second, like every other revocation.
- upstream: a user cannot be asked about again without the password, so the roles and
  claims captured at login stay until the session ends or the user logs in again. An operator
  ends them early with ``gateway sessions revoke --user NAME`` or ``gateway users disable``.

A disabled row (``gateway users disable NAME``) refuses logins for every source.

**A row belongs to one source** (:func:`belongs`): a store user's row has a real hash, an
htpasswd user's row the htpasswd mark, an upstream user's row the upstream mark. A refresh
is refused for a row that does not belong to the active ``users.source`` (a switch of the
source leaves no earlier session alive), and a login that takes over a row that was not
already its own for the same entry (a self-registered store user, a user of the other
source, an htpasswd entry since replaced) first ends every session of that row: whoever
held them was someone else. A reload that changes ``users.source`` ends the sessions of
every row the new source does not own (:meth:`Credentials.end_foreign_sessions`).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import os
import secrets
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import aiohttp
import argon2
import bcrypt

from . import htpasswd
from .config import UpstreamCheck, Users
from .errors import StoreUnavailable, Unauthorized, UserError
from .store import Store, User

log = logging.getLogger("gateway.credentials")
security = logging.getLogger("gateway.security")
T = TypeVar("T")

_hasher = argon2.PasswordHasher()  # argon2id, RFC 9106 low-memory profile

HTPASSWD_MARK = "!htpasswd:"  # the password hash of a store row kept for an htpasswd user
UPSTREAM_MARK = "!upstream"  # ... and for a user of the upstream source
RELOAD_INTERVAL = 1.0  # seconds between looks at the htpasswd file
MAX_ANSWER = 1024 * 1024  # bytes of the upstream's answer that are read
MAX_CLAIM_TEXT = 200  # characters of a claim taken from the upstream's answer
MAX_CLAIM_ITEMS = 16  # ... and items of a list
MAX_CLAIMS_JSON = 1024  # bytes of all of them, as JSON
_BCRYPT_MAX = 72  # bytes of a password that bcrypt uses (Apache's htpasswd cuts there too)


def belongs(user: User, source: str) -> bool:
    """Whether a store row is a user of ``source`` (a ``users.source``): the one rule that
    says which rows a refresh may continue (see the module's docstring)."""
    mark = user.password_hash
    if source == "htpasswd":
        return mark.startswith(HTPASSWD_MARK)
    if source == "upstream":
        return mark == UPSTREAM_MARK
    return not (mark.startswith(HTPASSWD_MARK) or mark.startswith(UPSTREAM_MARK))


def _source_of(user: User) -> str:
    return next((source for source in ("htpasswd", "upstream", "store") if belongs(user, source)), "none")


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def verify_password(password_hash: str, password: str) -> bool:
    try:
        return _hasher.verify(password_hash, password)
    except (argon2.exceptions.VerificationError, argon2.exceptions.InvalidHashError):
        return False


def needs_rehash(password_hash: str) -> bool:
    """Whether a (verified) hash was made with other parameters than the current ones."""
    try:
        return _hasher.check_needs_rehash(password_hash)
    except argon2.exceptions.InvalidHashError:
        return False


def verify_bcrypt(password_hash: bytes, password: str) -> bool:
    try:
        return bcrypt.checkpw(password.encode()[:_BCRYPT_MAX], password_hash)
    except ValueError:
        return False


class InvalidCredentials(Unauthorized):
    code = "invalid_credentials"
    description = "The user name or password is incorrect."


class Credentials:
    """Built once per process by :meth:`gateway.state.Gateway.build`, inside the running app:
    for the htpasswd source it starts watching the file at once; :meth:`close` stops that."""

    def __init__(self, store: Store, users: Users | None = None, clock: Callable[[], float] = time.time,
                 *, max_parallel: int = 2) -> None:
        self.store = store
        self.users = users = users or Users()
        self.clock = clock
        self._pool = ThreadPoolExecutor(max_workers=max_parallel, thread_name_prefix="hashing",
                                        initializer=_lowest_priority)
        self._dummy_hash = hash_password(secrets.token_urlsafe(16))
        self._file = _HtpasswdFile(users.htpasswd, store, users.default_roles, clock, self._pool) \
            if users.source == "htpasswd" else None
        self._watcher: asyncio.Task[None] | None = None
        if self._file is not None:
            try:
                self._watcher = asyncio.get_running_loop().create_task(self._file.watch())
            except RuntimeError:  # no loop running: the file is looked at on each login instead
                pass

    async def end_foreign_sessions(self) -> int:
        """End the sessions of every row that is not a user of the active source: after a
        reload that switched ``users.source``, none of them may go on. How many ended."""
        ended = 0
        for row in await self.store.list_users():
            if not belongs(row, self.users.source):
                count = await self.store.revoke_user_sessions(row.name, self.clock(), "user_source_changed")
                if count:
                    security.warning("user_source_changed", extra={"fields": {
                        "user": row.name, "was": _source_of(row), "now": self.users.source, "ended": count}})
                ended += count
        return ended

    def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def check(self, username: str, password: str) -> User:
        """The user, when the password is right and the user may log in; otherwise
        InvalidCredentials, whatever the source and whatever went wrong."""
        try:
            username.encode(), password.encode()
        except UnicodeEncodeError:  # a lone surrogate from JSON: no password is made of that
            raise InvalidCredentials().because("not_utf8") from None
        if self._file is not None:
            return await self._check_htpasswd(self._file, username, password)
        if self.users.source == "upstream" and self.users.upstream is not None:
            return await self._check_upstream(self.users.upstream, username, password)
        return await self._check_store(username, password)

    async def _run(self, fn: Callable[..., T], *args: object) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def hash(self, password: str) -> str:
        """An argon2id hash of ``password``, made in the hashing threads."""
        return await self._run(hash_password, password)

    # --- store --------------------------------------------------------------------------

    async def _check_store(self, username: str, password: str) -> User:
        user = await self.store.get_user(username)
        usable = user is not None and not user.disabled
        password_hash = user.password_hash if usable and user is not None else self._dummy_hash
        ok = await self._run(verify_password, password_hash, password)
        if not (ok and usable) or user is None:
            raise InvalidCredentials().because("unknown_user" if user is None else
                                               "disabled" if user.disabled else "bad_password")
        if needs_rehash(user.password_hash):
            new_hash = await self._run(hash_password, password)
            try:
                await self.store.update_user(user.name, password_hash=new_hash)
            except StoreUnavailable as exc:  # the old hash still works; next time, then
                log.warning("rehash_failed", extra={"fields": {"user": user.name, "reason": exc.reason}})
            else:
                log.info("password_rehashed", extra={"fields": {"user": user.name}})
                user = User(name=user.name, password_hash=new_hash, roles=user.roles,
                            disabled=user.disabled, created_at=user.created_at)
        return user

    # --- htpasswd -----------------------------------------------------------------------

    async def _check_htpasswd(self, file: _HtpasswdFile, username: str, password: str) -> User:
        await file.look()
        entry = file.entries.get(username) if file.entries is not None else None
        row = await self.store.get_user(username)
        password_hash = entry.hash if entry is not None else await file.dummy_hash()
        ok = await self._run(verify_bcrypt, password_hash, password)
        if entry is None:
            raise InvalidCredentials().because("unknown_user")
        if not ok:
            raise InvalidCredentials().because("bad_password")
        if row is not None and row.disabled:
            raise InvalidCredentials().because("disabled")
        return await self._keep_row(row, username, _htpasswd_mark(entry), self.users.default_roles)

    # --- upstream -----------------------------------------------------------------------

    async def _check_upstream(self, cfg: UpstreamCheck, username: str, password: str) -> User:
        from .users import USERNAME  # noqa: PLC0415 (users imports this module)

        if not USERNAME.fullmatch(username):
            raise InvalidCredentials().because("invalid_username")
        row = await self.store.get_user(username)
        fields = {cfg.username_field: username, cfg.password_field: password}
        try:
            async with asyncio.timeout(cfg.timeout), aiohttp.ClientSession(
                    timeout=aiohttp.ClientTimeout(total=cfg.timeout),
                    cookie_jar=aiohttp.DummyCookieJar()) as http:
                async with http.post(cfg.url, allow_redirects=False, headers={"Accept": "application/json"},
                                     json=fields if cfg.body == "json" else None,
                                     data=fields if cfg.body == "form" else None) as resp:
                    status = resp.status
                    body = await _read_at_most(resp, MAX_ANSWER) if 200 <= status < 300 else b""
        except TimeoutError:
            raise self._upstream_failed(username, "upstream_timeout") from None
        except aiohttp.ClientError as exc:
            raise self._upstream_failed(username, f"upstream_unreachable: {exc.__class__.__name__}") from None
        if not 200 <= status < 300:
            if status >= 500 or 300 <= status < 400:
                raise self._upstream_failed(username, f"upstream_status_{status}")
            raise InvalidCredentials().because(f"upstream_status_{status}")
        try:
            answer = json.loads(body) if len(body) <= MAX_ANSWER else None
        except (ValueError, RecursionError):  # includes UnicodeDecodeError; absurd nesting
            answer = None
        if not isinstance(answer, dict):
            raise self._upstream_failed(username, "upstream_invalid_answer")
        if row is not None and row.disabled:
            raise InvalidCredentials().because("disabled")
        roles = tuple(dict.fromkeys(_roles_at(answer, cfg.roles_field) + self.users.default_roles))
        return await self._keep_row(row, username, UPSTREAM_MARK, roles, _claims_at(answer, cfg.claims))

    def _upstream_failed(self, username: str, reason: str) -> InvalidCredentials:
        log.warning("upstream_check_failed", extra={"fields": {"user": username[:64], "reason": reason}})
        return InvalidCredentials().because(reason)

    # --- the store's row of a user of another source --------------------------------------

    async def _keep_row(self, row: User | None, name: str, mark: str, roles: tuple[str, ...],
                        claims: tuple[tuple[str, Any], ...] = ()) -> User:
        """Write the row that refreshes read: see the module's docstring."""
        if row is None:
            user = User(name=name, password_hash=mark, roles=roles, claims=claims, created_at=self.clock())
            try:
                await self.store.add_user(user)
                return user
            except UserError:  # another process was first: whatever it wrote is judged below
                row = await self.store.get_user(name)
                if row is None:
                    raise InvalidCredentials().because("row_vanished") from None
                if row.disabled:
                    raise InvalidCredentials().because("disabled") from None
        if row.password_hash != mark:
            # Not this source's row for this very entry: its sessions were someone else's
            # (a self-registered store user of the same name, a user of another source, a
            # replaced htpasswd entry). They end before the row changes hands.
            ended = await self.store.revoke_user_sessions(name, self.clock(), "user_replaced")
            security.warning("user_replaced", extra={"fields": {
                "user": name, "was": _source_of(row), "now": self.users.source, "ended": ended}})
        elif row.roles == roles and row.claims == claims:
            return row
        await self.store.update_user(name, password_hash=mark, roles=roles, claims=claims)
        return User(name=name, password_hash=mark, roles=roles, claims=claims, created_at=row.created_at)


def _lowest_priority() -> None:
    """Run the calling (hashing) thread at nice 19, and the threads it starts with it."""
    if sys.platform != "linux":
        return  # elsewhere the nice value is the whole process's
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except OSError:
        pass


def _htpasswd_mark(entry: htpasswd.Entry) -> str:
    return HTPASSWD_MARK + hashlib.sha256(entry.hash).hexdigest()[:16]


def _at(answer: dict[str, Any], path: str) -> Any:
    """The value at a dotted path of the answer, or None."""
    value: Any = answer if path else None
    for key in path.split(".") if path else ():
        value = value.get(key) if isinstance(value, dict) else None
    return value


def _roles_at(answer: dict[str, Any], path: str) -> tuple[str, ...]:
    """The list of strings at a dotted path of the answer; role names the gateway would not
    take (which could not travel in a token or an identity header) are dropped."""
    from .users import ROLE  # noqa: PLC0415

    value = _at(answer, path)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        return ()
    return tuple(v for v in value if ROLE.fullmatch(v))


def _claims_at(answer: dict[str, Any], wanted: tuple[tuple[str, str], ...]) -> tuple[tuple[str, Any], ...]:
    """The configured claims found in the answer. Values are bounded, so that a token
    always stays well under the size the gateway verifies (tokens.MAX_TOKEN_LENGTH)."""
    found: list[tuple[str, Any]] = []
    for claim, path in wanted:
        value = _at(answer, path)
        if _claim_value(value) or isinstance(value, list) and len(value) <= MAX_CLAIM_ITEMS \
                and all(_claim_value(v) for v in value):
            if len(json.dumps([*found, (claim, value)])) <= MAX_CLAIMS_JSON:
                found.append((claim, value))
                continue
            reason = f"the claims would be over {MAX_CLAIMS_JSON} bytes"
        elif value is None:
            continue
        else:
            reason = f"not a short string, a finite number, a boolean or a short list of those at {path}"
        log.warning("upstream_claim_dropped", extra={"fields": {"claim": claim, "reason": reason}})
    return tuple(found)


def _claim_value(value: Any) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    return isinstance(value, bool | int) or isinstance(value, str) and len(value) <= MAX_CLAIM_TEXT


async def _read_at_most(resp: aiohttp.ClientResponse, limit: int) -> bytes:
    """Up to ``limit + 1`` bytes of the body: one more than allowed says it is too long."""
    body = b""
    async for chunk in resp.content.iter_chunked(64 * 1024):
        body += chunk
        if len(body) > limit:
            break
    return body


class _HtpasswdFile:
    """The file's entries as last read, and the store's rows kept in step with them."""

    def __init__(self, path: str, store: Store, roles: tuple[str, ...], clock: Callable[[], float],
                 pool: ThreadPoolExecutor) -> None:
        self.path = path
        self.store = store
        self.roles = roles
        self.clock = clock
        self.pool = pool
        self.entries: dict[str, htpasswd.Entry] | None = None  # None: never read successfully
        self._signature: tuple[int, int, int] | None = None
        self._looked_at = -RELOAD_INTERVAL
        self._out_of_step = False  # the rows still have to follow the last read
        self._lock = asyncio.Lock()
        self._dummies: dict[int, bytes] = {}

    async def watch(self) -> None:
        while True:
            try:
                await self.look()
            except Exception:  # keep watching whatever happened
                log.exception("htpasswd_watch_failed")
            await asyncio.sleep(RELOAD_INTERVAL)

    async def look(self) -> None:
        """Read the file again if it changed, at most once per RELOAD_INTERVAL."""
        if time.monotonic() - self._looked_at < RELOAD_INTERVAL:
            return
        async with self._lock:
            if time.monotonic() - self._looked_at < RELOAD_INTERVAL:
                return  # someone else just did
            self._looked_at = time.monotonic()
            try:
                st = os.stat(self.path)
                signature: tuple[int, int, int] | None = (st.st_mtime_ns, st.st_size, st.st_ino)
            except OSError:
                signature = None
            if signature is None or signature != self._signature:
                self._signature = signature
                await self._read()
            if self._out_of_step:
                await self._follow()

    async def _read(self) -> None:
        try:
            entries = await asyncio.get_running_loop().run_in_executor(None, htpasswd.load, self.path)
        except htpasswd.HtpasswdError as exc:
            log.warning("htpasswd_not_reloaded", extra={"fields": {
                "file": self.path, "reason": str(exc),
                "kept": "nothing" if self.entries is None else f"{len(self.entries)} users"}})
            return
        first = self.entries is None
        self.entries = entries
        self._out_of_step = True
        await self.dummy_hash()  # made now rather than during a login
        if not first:
            log.info("htpasswd_reloaded", extra={"fields": {"file": self.path, "users": len(entries)}})

    async def _follow(self) -> None:
        """Rows of users gone from the file are removed and rows of users whose password
        changed are updated, ending their sessions in both cases."""
        entries = self.entries
        if entries is None:
            return
        try:
            for row in await self.store.list_users():
                if not row.password_hash.startswith(HTPASSWD_MARK):
                    continue  # not one of ours
                entry = entries.get(row.name)
                if entry is None:
                    ended = await self.store.revoke_user_sessions(row.name, self.clock(), "user_removed")
                    await self.store.remove_user(row.name)
                    log.info("htpasswd_user_removed", extra={"fields": {"user": row.name, "ended": ended}})
                elif row.password_hash != _htpasswd_mark(entry) or row.roles != self.roles:
                    ended = 0
                    if row.password_hash != _htpasswd_mark(entry):
                        ended = await self.store.revoke_user_sessions(row.name, self.clock(),
                                                                      "password_changed")
                    await self.store.update_user(row.name, password_hash=_htpasswd_mark(entry),
                                                 roles=self.roles)
                    log.info("htpasswd_user_changed", extra={"fields": {"user": row.name, "ended": ended}})
        except StoreUnavailable as exc:  # try again at the next look
            log.warning("htpasswd_follow_failed", extra={"fields": {"reason": exc.reason}})
            return
        self._out_of_step = False

    async def dummy_hash(self) -> bytes:
        """A bcrypt hash of a random password at the file's most common cost."""
        costs = Counter(e.cost for e in (self.entries or {}).values())
        cost = max(costs, key=lambda c: (costs[c], c)) if costs else 10
        if cost not in self._dummies:
            made = await asyncio.get_running_loop().run_in_executor(
                self.pool, bcrypt.hashpw, secrets.token_bytes(16), bcrypt.gensalt(cost))
            self._dummies[cost] = made
        return self._dummies[cost]
