"""Instant revocation: an in-memory view of recently ended sessions.

An access token is checked on every proxied request without a store round trip, so ending
a session (logout, reuse detection, an operator's revoke) would otherwise leave its access
tokens working until they expire. Instead every process keeps the set of sessions revoked
within the last ``horizon`` (the longest an access token can live, plus leeway: after that
their tokens are refused by ``exp`` anyway) and refuses their tokens.

Freshness: the view reads the store's revocation log every ``POLL_INTERVAL`` (250 ms), so
a revocation made anywhere (another worker, another replica sharing the store, the CLI) is
seen by every process within that interval plus one store read. A revocation made by this
process is seen by it at once. If the store cannot be read, the last view is kept and
polling goes on: valid tokens keep working, and revocations arrive once the store is back.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from .errors import StoreUnavailable
from .store import Store

log = logging.getLogger("gateway.revocations")

POLL_INTERVAL = 0.25
PURGE_INTERVAL = 300.0


def horizon(access_ttl: float, leeway: float) -> float:
    """How long a revocation matters: the longest an access token issued just before it can
    still be accepted, plus a minute for clocks that disagree between processes."""
    return access_ttl + leeway + 60


class Revocations:
    def __init__(self, store: Store, clock: Callable[[], float], horizon: float) -> None:
        self.store = store
        self.clock = clock
        self.horizon = horizon
        self._revoked: dict[str, float] = {}  # session id -> when it was revoked
        self._seq = 0
        self._lock = asyncio.Lock()

    def is_revoked(self, session_id: str) -> bool:
        return session_id in self._revoked

    async def sync(self) -> None:
        """Read every revocation recorded since the last read."""
        async with self._lock:  # one read at a time; a caller waiting here gets fresh data
            for revocation in await self.store.revocations_after(self._seq):
                self._revoked[revocation.session_id] = revocation.revoked_at
                self._seq = revocation.seq
            cutoff = self.clock() - self.horizon
            for session_id in [sid for sid, at in self._revoked.items() if at < cutoff]:
                del self._revoked[session_id]

    async def run(self, interval: float = POLL_INTERVAL) -> None:
        """Keep the view fresh until cancelled."""
        failing = False
        while True:
            try:
                await self.sync()
                if failing:
                    log.info("revocations_resumed")
                failing = False
            except StoreUnavailable as exc:
                if not failing:
                    log.warning("revocations_stale", extra={"fields": {"reason": exc.reason}})
                failing = True
            await asyncio.sleep(interval)
