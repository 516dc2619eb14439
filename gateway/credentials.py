"""Who may log in: users in the store, with argon2id password hashes.

Hashing costs tens of milliseconds of CPU and 64 MiB of memory by design, so it never runs
on the event loop: a small thread pool bounds how many run at once, and proxied traffic
keeps flowing while logins are checked. An unknown or disabled user is checked against a
dummy hash of the same cost, so neither the answer nor its timing tells them apart from a
wrong password.
"""

from __future__ import annotations

import asyncio
import secrets
from concurrent.futures import ThreadPoolExecutor

import argon2

from .errors import Unauthorized
from .store import Store, User

_hasher = argon2.PasswordHasher()  # argon2id, RFC 9106 low-memory profile


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def verify_password(password_hash: str, password: str) -> bool:
    try:
        return _hasher.verify(password_hash, password)
    except (argon2.exceptions.VerificationError, argon2.exceptions.InvalidHashError):
        return False


class InvalidCredentials(Unauthorized):
    code = "invalid_credentials"
    description = "The user name or password is incorrect."


class Credentials:
    def __init__(self, store: Store, *, max_parallel: int = 2) -> None:
        self.store = store
        self._pool = ThreadPoolExecutor(max_workers=max_parallel, thread_name_prefix="argon2")
        self._dummy_hash = hash_password(secrets.token_urlsafe(16))

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def check(self, username: str, password: str) -> User:
        """The user, when the password is right and the user may log in."""
        user = await self.store.get_user(username)
        usable = user is not None and not user.disabled
        password_hash = user.password_hash if usable and user is not None else self._dummy_hash
        loop = asyncio.get_running_loop()
        ok = await loop.run_in_executor(self._pool, verify_password, password_hash, password)
        if not (ok and usable) or user is None:
            raise InvalidCredentials().because("unknown_user" if user is None else
                                               "disabled" if user.disabled else "bad_password")
        return user
