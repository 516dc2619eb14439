"""Login throttling: failed logins counted per user name and per client address, in the
store, so that every replica sees the same counts.

- **Per address** (the TCP peer, or behind ``trusted_proxies`` the client they name): after
  ``throttle.per_ip`` failures in a window, that address waits for the window to end.
- **Per user name**, whatever the address: after ``throttle.per_user`` failures, each next
  attempt must wait a delay that doubles with every further failure (1 s, 2 s, 4 s, ...),
  up to ``throttle.max_delay``, counted from the latest failure. This is a back-off, not a
  lock: the rightful user gets an attempt again at most ``max_delay`` after the last failed
  one, so nobody can lock an account for good.

A refused attempt (429) does not check the password and does not count. A successful login
clears its user name's count. User names are counted in a canonical form (Unicode NFKC,
trimmed, case-folded), so ``Alice``, `` alice`` and ``ａｌｉｃｅ`` share one counter; the
counter exists whether or not the user does, so throttling says nothing about who exists.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Callable

from .config import Throttle
from .errors import TooManyRequests
from .store import Store


def canonical(username: str) -> str:
    return unicodedata.normalize("NFKC", username).strip().casefold()


class LoginThrottle:
    def __init__(self, store: Store, cfg: Throttle, clock: Callable[[], float]) -> None:
        self.store = store
        self.cfg = cfg
        self.clock = clock

    async def check(self, username: str, ip: str) -> None:
        """Refuse (429 with Retry-After) an attempt that must wait; otherwise return."""
        now = self.clock()
        wait = 0.0
        by_ip = await self.store.failures(f"ip:{ip}", now)
        if by_ip is not None and by_ip.count >= self.cfg.per_ip:
            wait = by_ip.window_ends - now
        by_user = await self.store.failures(f"user:{canonical(username)}", now)
        if by_user is not None and by_user.count >= self.cfg.per_user:
            delay = min(self.cfg.max_delay, 2.0 ** (by_user.count - self.cfg.per_user))
            wait = max(wait, by_user.last_at + delay - now)
        if wait > 0:
            raise TooManyRequests(wait).because("throttled")

    async def failed(self, username: str, ip: str) -> None:
        now = self.clock()
        await self.store.count_failure(f"user:{canonical(username)}", now, self.cfg.window)
        await self.store.count_failure(f"ip:{ip}", now, self.cfg.window)

    async def succeeded(self, username: str) -> None:
        await self.store.clear_failures(f"user:{canonical(username)}")

    async def attempted(self, ip: str) -> None:
        """Count an attempt that always counts, whatever its outcome (a registration)."""
        await self.store.count_failure(f"ip:{ip}", self.clock(), self.cfg.window)
