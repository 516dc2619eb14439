"""The gateway's parts, built from one config: what every handler reaches through
``request[GATEWAY]``. A reload (gateway/reload.py) builds a new one beside the old; each
request keeps the one it started with."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

from aiohttp import web
from aiohttp.typedefs import Handler

from .config import Config, Cookies, Route
from .credentials import Credentials
from .proxy import Proxy
from .revocations import Revocations, horizon
from .routes import RouteTable
from .sessions import Sessions
from .store import Store
from .throttle import LoginThrottle
from .tokens import AccessTokens


@dataclass(frozen=True)
class Gateway:
    config: Config
    store: Store
    clock: Callable[[], float]
    routes: RouteTable
    tokens: AccessTokens
    sessions: Sessions
    credentials: Credentials
    proxy: Proxy
    revocations: Revocations
    throttle: LoginThrottle
    # The gateway's own endpoints for this config: path -> method -> handler.
    endpoints: dict[str, dict[str, Handler]] = field(default_factory=dict)
    # The cookie settings of the configs reloads replaced (cookies.retire): a browser may
    # still send those cookies, which must never reach an upstream.
    retired_cookies: tuple[Cookies, ...] = ()
    # The identity headers of the configs reloads replaced: an app may still read one.
    retired_identity_headers: frozenset[str] = frozenset()

    @classmethod
    def build(cls, config: Config, store: Store, clock: Callable[[], float], *,
              endpoints: dict[str, dict[str, Handler]] | None = None,
              revocations: Revocations | None = None, credentials: Credentials | None = None,
              retired_cookies: tuple[Cookies, ...] = (),
              retired_identity_headers: frozenset[str] = frozenset()) -> Gateway:
        """The parts for ``config``. A reload passes the running revocation view (one per
        process: its state and its poller outlive any config) and, when ``users`` did not
        change, the running credentials (their hashing threads and htpasswd watcher)."""
        if revocations is None:
            revocations = Revocations(store, clock, horizon(config.tokens.access_ttl, config.tokens.leeway))
        else:
            # Only ever longer: tokens issued under the old, longer access_ttl are still
            # alive, and their revoked sessions must stay remembered until they expire.
            revocations.horizon = max(revocations.horizon,
                                      horizon(config.tokens.access_ttl, config.tokens.leeway))
        return cls(
            config=config,
            store=store,
            clock=clock,
            routes=RouteTable(config.routes),
            tokens=AccessTokens(config.tokens, clock),
            sessions=Sessions(store, config.tokens, clock, revocations, source=config.users.source),
            credentials=credentials or Credentials(store, config.users, clock),
            proxy=Proxy(config, retired_cookies, retired_identity_headers),
            revocations=revocations,
            throttle=LoginThrottle(store, config.throttle, clock),
            endpoints=endpoints or {},
            retired_cookies=retired_cookies,
            retired_identity_headers=retired_identity_headers,
        )


GATEWAY = web.RequestKey("gateway", Gateway)  # the gateway this request uses, start to end
STOPPING = web.AppKey("stopping", asyncio.Event)  # set when the server begins to shut down

@dataclass(frozen=True)
class Renewal:
    """Tokens renewed at the edge (browser.refresh_at_edge), to set as cookies on the answer."""

    access_token: str
    refresh_token: str
    max_age: int  # seconds the session has left


# What one request learned on its way: for the access log, and for the answer's headers.
PATH = web.RequestKey("path", str)  # the normalized path
IP = web.RequestKey("ip", str)  # the client's address (see Proxy.client_ip)
ROUTE = web.RequestKey("route", Route)
USER = web.RequestKey("user", str)
ERROR = web.RequestKey("error", str)  # why the request was refused, for logs only
RENEWED = web.RequestKey("renewed", Renewal)  # set these session cookies on the answer
CLEAR_COOKIES = web.RequestKey("clear_cookies", bool)  # clear the session cookies on the answer
CORS = web.RequestKey("cors", tuple)  # (Cors, origin): an allowed other origin asked
REQUEST_ID = web.RequestKey("request_id", str)  # see Proxy.request_id
ENDPOINT = web.RequestKey("endpoint", str)  # which own endpoint answered: auth, health, metrics, jwks
