"""The gateway's parts, built once from one config: what every handler reaches through
``request.app[GATEWAY]``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web

from .config import Config, Route
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

    @classmethod
    def build(cls, config: Config, store: Store, clock: Callable[[], float]) -> Gateway:
        revocations = Revocations(store, clock, horizon(config.tokens.access_ttl, config.tokens.leeway))
        return cls(
            config=config,
            store=store,
            clock=clock,
            routes=RouteTable(config.routes),
            tokens=AccessTokens(config.tokens, clock),
            sessions=Sessions(store, config.tokens, clock, revocations),
            credentials=Credentials(store, config.users, clock),
            proxy=Proxy(config),
            revocations=revocations,
            throttle=LoginThrottle(store, config.throttle, clock),
        )


GATEWAY = web.AppKey("gateway", Gateway)

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
