"""The upstream hop: which headers cross it, and streaming both bodies through.

Header rules, in the order they apply:

1. The client's hop-by-hop headers go first, with *every* header its ``Connection`` header
   names. This happens before authentication, so ``Connection: Authorization`` drops the
   token rather than letting the gateway authenticate and then forward without it, and no
   client can make the gateway drop a header it adds later.
2. What the upstream must only hear from the gateway goes next: identity headers (every
   case and every copy), ``Authorization``, the gateway's cookies, method-override and
   URL-rewrite headers, and forwarding headers unless the peer is a trusted proxy. The
   gateway's cookies go under every name they have or had (:func:`gateway.cookies.names`).
3. The gateway then sets identity, ``X-Forwarded-*`` and ``X-Request-ID`` headers itself,
   and, on a route with ``forward_token: true``, ``Authorization: Bearer`` with the verified
   access token.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import secrets
from collections.abc import AsyncIterator, Iterable
from urllib.parse import urlsplit

import aiohttp
from aiohttp import hdrs, web
from multidict import CIMultiDict
from yarl import URL

from . import cookies, metrics
from .config import DEFAULT_IDENTITY_HEADERS, Config, Cookies, Route
from .errors import BadGateway, GatewayTimeout, PayloadTooLarge
from .paths import Target
from .tokens import Identity

log = logging.getLogger("gateway.proxy")

HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding",
    "upgrade", "proxy-authenticate", "proxy-authorization",
})
# Believed only from a trusted proxy; regenerated otherwise.
FORWARDING = frozenset({
    "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "x-forwarded-port",
    "x-forwarded-prefix", "x-forwarded-uri", "x-forwarded-path", "x-forwarded-server",
    "x-forwarded-ssl", "x-forwarded-scheme", "x-url-scheme", "forwarded", "x-real-ip",
    "x-client-ip", "true-client-ip", "x-cluster-client-ip", "cf-connecting-ip",
    "fastly-client-ip", "x-original-host", "x-host",
})
# Never honoured and never forwarded: they let a client change the method or path that an
# upstream acts on after the gateway authorized another one.
NEVER_FORWARDED = frozenset({
    "authorization", "host", "expect", "x-http-method-override", "x-http-method",
    "x-method-override", "x-original-url", "x-rewrite-url", "x-original-uri",
})
CHUNK = 64 * 1024
SMALL_BODY = 64 * 1024  # an answer this size or smaller goes out in one write with its headers
# A request id we pass on: up to 128 visible ASCII characters (no space, no control).
_REQUEST_ID = re.compile(r"^[\x21-\x7e]{1,128}$")


def canonical(name: str) -> str:
    """A header name as WSGI/CGI upstreams see it: ``X_Auth.User`` is ``x-auth-user``."""
    return name.lower().replace("_", "-").replace(".", "-")


class _Relayed(web.StreamResponse):
    """An upstream's answer, headers as the upstream sent them: aiohttp adds
    ``Content-Type: application/octet-stream`` to a body without one, and its own
    ``Server``, which would change how a browser treats the body and name the gateway's
    software. Only the framing headers are the gateway's to choose."""

    def send_headers_with_body(self) -> None:
        self._send_headers_immediately = False

    async def _prepare_headers(self) -> None:
        sent = {name for name in (hdrs.CONTENT_TYPE, hdrs.SERVER) if name in self.headers}
        await super()._prepare_headers()
        for name in {hdrs.CONTENT_TYPE, hdrs.SERVER} - sent:
            self.headers.popall(name, None)


async def continue_if_expected(request: web.BaseRequest) -> None:
    """Send ``100 Continue`` to a client that asked for it. The gateway's own route does
    not send it on arrival (see app.py): only once the request has been authorized, so an
    unauthenticated client never uploads a body just to be refused."""
    if request.headers.get("Expect", "").lower() == "100-continue" and request.version >= (1, 1):
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # the real response has not started


def _prefixed_cookie_path(header: str, prefix: str) -> str:
    """``a=1; Path=/x`` -> ``a=1; Path=/app/x`` for a route that strips ``/app``."""
    parts = header.split(";")
    for i, part in enumerate(parts[1:], start=1):
        key, sep, value = part.strip().partition("=")
        if sep and key.lower() == "path" and value.startswith("/"):
            parts[i] = f" Path={prefix if value == '/' else prefix + value}"
    return ";".join(parts)


def error_kind(exc: aiohttp.ClientError) -> str:
    """The kind of an upstream failure, for the metrics: one of metrics.UPSTREAM_ERROR_KINDS."""
    if isinstance(exc, (aiohttp.ServerTimeoutError, aiohttp.ConnectionTimeoutError)):
        return "timeout"
    if isinstance(exc, aiohttp.ClientSSLError):
        return "tls"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return "connect"  # refused, unreachable, no such host
    if isinstance(exc, (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)):
        return "reset"  # the connection dropped before or while answering
    return "invalid_response"  # a malformed status line, headers or body


def strip_hop_by_hop(raw_headers: Iterable[tuple[bytes, bytes]]) -> CIMultiDict[str]:
    """The client's headers, minus hop-by-hop headers and those ``Connection`` names."""
    headers: CIMultiDict[str] = CIMultiDict(
        (name.decode("latin-1"), value.decode("latin-1")) for name, value in raw_headers)
    named = {token.strip().lower() for value in headers.getall("Connection", ())
             for token in value.split(",")}
    drop = HOP_BY_HOP | named
    return CIMultiDict((k, v) for k, v in headers.items() if k.lower() not in drop)


def _forwards_token(request: web.BaseRequest) -> bool:
    """Whether the request's route (pipeline.handle sets it) has ``forward_token: true``."""
    from .state import ROUTE  # noqa: PLC0415 (state imports this module)

    route = request.get(ROUTE) if isinstance(request, web.Request) else None
    return route is not None and route.forward_token


class Proxy:
    def __init__(self, config: Config, retired_cookies: Iterable[Cookies] = (),
                 retired_identity_headers: Iterable[str] = ()) -> None:
        self.config = config
        self.trusted = config.trusted_proxies
        self._identity = tuple((header, claim) for header, claim in config.identity_headers)
        # the default names too, and those of the configs a reload replaced: a config that
        # dropped or renamed one (or a file reloaded half written) must not let a client's
        # copy through to an app that still reads it
        self._always_drop = NEVER_FORWARDED | {canonical(h) for h in (
            *(h for h, _ in config.identity_headers), *(h for h, _ in DEFAULT_IDENTITY_HEADERS),
            *retired_identity_headers)}
        self._own_cookies = cookies.names(config.cookies, retired_cookies)
        public = urlsplit(config.public_url) if config.public_url else None
        self._public_scheme = public.scheme if public else None
        self._public_host = public.netloc if public else None
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=30),
            auto_decompress=False,  # bodies pass through as the upstream sent them
            cookie_jar=aiohttp.DummyCookieJar(),
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
            trust_env=False,
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    def _prefixed_location(self, location: str, route: Route) -> str:
        """Put ``strip_prefix`` back on a redirect to the upstream's own paths, so the
        browser comes back through the same route: ``/login`` -> ``/app/login``, and
        ``http://upstream:8000/login`` -> ``/app/login``. Other targets are left alone."""
        origin = self.config.upstreams[route.upstream].url
        if location.startswith(origin + "/") or location == origin:
            location = location[len(origin):] or "/"
        if location.startswith("/") and not location.startswith("//"):
            return route.strip_prefix + location
        return location

    def is_trusted(self, peer: str | None) -> bool:
        if not peer or not self.trusted:
            return False
        try:
            address = ipaddress.ip_address(peer)
        except ValueError:
            return False
        return any(address in network for network in self.trusted)

    def client_ip(self, request: web.BaseRequest) -> str:
        """The client's address: the TCP peer, or, behind trusted proxies, the rightmost
        ``X-Forwarded-For`` entry that is not itself a trusted proxy."""
        peer = request.remote or ""
        if not self.is_trusted(peer):
            return peer
        hops = [h.strip() for v in request.headers.getall("X-Forwarded-For", ()) for h in v.split(",")]
        for hop in reversed(hops):
            if hop and not self.is_trusted(hop):
                return hop
        return peer

    def request_id(self, request: web.BaseRequest) -> str:
        """The request's ``X-Request-ID``: the one a trusted proxy sent, if it is one value
        of sane shape; otherwise a new one. Anyone else's would let a client put what it
        likes into the logs and the upstream's idea of which request is which."""
        if self.is_trusted(request.remote):
            sent = request.headers.getall("X-Request-ID", ())
            if len(sent) == 1 and _REQUEST_ID.fullmatch(sent[0]):
                return sent[0]
        return secrets.token_hex(16)

    def upstream_headers(
        self, request: web.BaseRequest, inbound: CIMultiDict[str], identity: Identity | None
    ) -> CIMultiDict[str]:
        trusted = self.is_trusted(request.remote)
        out: CIMultiDict[str] = CIMultiDict()
        for name, value in inbound.items():
            lower, canon = name.lower(), canonical(name)
            if canon in self._always_drop or canon == "x-request-id" \
                    or (canon in FORWARDING and (not trusted or lower != canon)):
                continue  # every spelling of a header the upstream may only hear from us
            if lower == "cookie":
                value = cookies.without(value, self._own_cookies)
                if not value:
                    continue
            out.add(name, value)
        if identity is not None:
            for header, claim in self._identity:
                claimed = identity.claims.get(claim)
                if isinstance(claimed, list):
                    claimed = ",".join(str(v) for v in claimed)
                if isinstance(claimed, bool) or not isinstance(claimed, (str, int)):
                    continue
                text = str(claimed)
                if text.isascii() and text.isprintable():  # never CR, LF or NUL in a header
                    out[header] = text
            if _forwards_token(request):
                # forward_token: the upstream hears the token the gateway verified, never
                # the client's own Authorization (dropped above with every other spelling).
                out["Authorization"] = f"Bearer {identity.token}"
        from .state import REQUEST_ID  # noqa: PLC0415 (state imports this module)

        if isinstance(request, web.Request) and REQUEST_ID in request:
            out["X-Request-ID"] = request[REQUEST_ID]
        peer = request.remote or ""
        prior = inbound.get("X-Forwarded-For") if trusted else None
        out["X-Forwarded-For"] = f"{prior}, {peer}" if prior else peer
        if not (trusted and "X-Forwarded-Proto" in inbound):
            out["X-Forwarded-Proto"] = self._public_scheme or request.scheme
        if not (trusted and "X-Forwarded-Host" in inbound):
            host = self._public_host or request.host
            if host:
                out["X-Forwarded-Host"] = host
        return out

    @property
    def client(self) -> aiohttp.ClientSession:
        """The one client session (and connection pool) for every upstream."""
        assert self._session is not None, "Proxy.start() was not called"
        return self._session

    def upstream_url(self, route: Route, target: Target) -> URL:
        """Where ``target`` goes: the route's upstream, with ``strip_prefix`` removed from
        the normalized path (``/app/x`` -> ``/x``, ``/app`` -> ``/``)."""
        path = target.path
        if route.strip_prefix:
            path = path[len(route.strip_prefix):] or "/"
        query = f"?{target.query}" if target.query else ""
        return URL(self.config.upstreams[route.upstream].url + path + query, encoded=True)

    async def forward(
        self, request: web.Request, target: Target, route: Route, headers: CIMultiDict[str]
    ) -> web.StreamResponse:
        upstream = self.config.upstreams[route.upstream]
        url = self.upstream_url(route, target)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=upstream.connect_timeout,
                                        sock_read=upstream.timeout)
        body = self._body(request)
        await continue_if_expected(request)
        try:
            answer = await self.client.request(
                request.method, url, headers=headers, data=body, allow_redirects=False,
                timeout=timeout,
            )
        except (asyncio.TimeoutError, aiohttp.ServerTimeoutError):
            metrics.upstream_error("timeout")
            raise GatewayTimeout().because(f"timeout:{upstream.name}") from None
        except aiohttp.ClientError as exc:
            if isinstance(exc.__cause__, PayloadTooLarge) or isinstance(exc.__context__, PayloadTooLarge):
                raise PayloadTooLarge().because("chunked_body_over_limit") from None
            metrics.upstream_error(error_kind(exc))
            raise BadGateway().because(f"{exc.__class__.__name__}:{upstream.name}") from None
        try:
            return await self._relay(request, answer, route)
        finally:
            answer.release()

    def _body(self, request: web.Request) -> AsyncIterator[bytes] | aiohttp.StreamReader | None:
        """The request body to stream upstream, held to ``limits.request_body``: a declared
        length is checked before anything is sent; a chunked body is counted as it goes."""
        if not request.body_exists:
            return None
        limit = self.config.limits.request_body
        if request.content_length is not None:
            if request.content_length > limit:
                raise PayloadTooLarge()
            return request.content

        async def counted() -> AsyncIterator[bytes]:
            seen = 0
            async for chunk in request.content.iter_any():
                seen += len(chunk)
                if seen > limit:
                    raise PayloadTooLarge()
                yield chunk

        return counted()

    async def _relay(
        self, request: web.Request, answer: aiohttp.ClientResponse, route: Route
    ) -> web.StreamResponse:
        response = _Relayed(status=answer.status, reason=answer.reason)
        named = {t.strip().lower() for v in answer.headers.getall("Connection", ()) for t in v.split(",")}
        for raw_name, raw_value in answer.raw_headers:
            name, value = raw_name.decode("latin-1"), raw_value.decode("latin-1")
            lower = name.lower()
            if lower in HOP_BY_HOP or lower in named:
                continue
            if route.strip_prefix and lower == "location":
                value = self._prefixed_location(value, route)
            elif route.strip_prefix and lower == "set-cookie":
                value = _prefixed_cookie_path(value, route.strip_prefix)
            response.headers.add(name, value)
        if answer.content_length is not None and answer.content_length <= SMALL_BODY:
            # The headers go out with the body, in one write, rather than in a write of their
            # own: most answers are small, and the upstream sent this one's body already.
            response.send_headers_with_body()
        await response.prepare(request)
        try:
            async for chunk in answer.content.iter_chunked(CHUNK):
                await response.write(chunk)
        except (asyncio.TimeoutError, aiohttp.ClientError) as exc:
            # Headers are out; the only honest signal left is to cut the connection, so the
            # client sees a truncated body rather than a complete-looking one.
            log.warning("upstream_aborted", extra={"fields": {"reason": exc.__class__.__name__}})
            metrics.upstream_error("timeout" if isinstance(exc, asyncio.TimeoutError) else error_kind(exc))
            if request.transport is not None:
                request.transport.abort()
            return response
        except ConnectionError:
            return response  # the client went away; nothing left to tell it
        await response.write_eof()
        return response
