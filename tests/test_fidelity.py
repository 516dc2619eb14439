"""Proxy fidelity: a real third-party app answers the same directly and through the gateway.

The app is ``httpbin`` (the Flask app from PyPI) served by ``waitress`` in a subprocess on a
real port, with ``clear_untrusted_proxy_headers=False`` (waitress otherwise deletes
``X-Forwarded-*`` from untrusted peers before the app sees them). Each case in ``GROUPS`` is
sent twice with the same client: once to httpbin directly, once to a gateway (from conftest's
``gateway_factory``) whose ``app`` upstream is httpbin. The status and reason, every response
header (names as spelled, values, order, repeats) and the body bytes as sent (never
decompressed on either side) must be equal, apart from the differences listed here.

What httpbin *sees* (its echo of the request; ``?show_env=1`` makes it show the
``X-Forwarded-*`` headers it hides by default) differs in:

* ``X-Forwarded-For``, ``X-Forwarded-Proto``, ``X-Forwarded-Host``: set by the gateway.
* ``X-Request-ID``: made by the gateway for each request (the client here is no trusted proxy).
* ``X-Auth-User``, ``X-Auth-Roles``: the gateway's identity headers, on authenticated routes.
* ``Authorization``: the client's bearer token stays at the gateway.

These are not waved through: the direct request carries exactly what the gateway is expected
to add (``X-Forwarded-For: 127.0.0.1``, ``X-Forwarded-Proto: http`` and ``X-Forwarded-Host:
gateway.test`` from conftest's ``public_url``, alice's identity, and the request id the
gateway made, in the order the gateway appends them: the request through the gateway goes
first, so that its id is known), and only the gateway's request carries ``Authorization``. The echoes must then
be equal byte for byte, which checks the values the gateway adds and that it adds, drops or
reorders nothing else. ``Host`` needs no allowance: the gateway sends the upstream's own
authority, as the direct request does.

* ``Expect: 100-continue`` (the Expect case only): the gateway answers ``100 Continue`` itself,
  once the request is authorized, and does not forward ``Expect`` (``proxy.NEVER_FORWARDED``),
  as nginx does; httpbin then sees a plain upload with a ``Content-Length``. The ``Expect``
  entry of the direct echo is removed (and so ``Content-Length`` of the echo differs) before
  comparing.

Response headers a proxy may legitimately change, and so not compared:

* ``Date``: the two answers are made at different moments (present once on both sides; the
  gateway relays the upstream's). For the same reason a gzip body's MTIME field (bytes 4-8,
  httpbin compresses on the fly) is masked; every other compressed byte is compared.
* ``Connection``, ``Keep-Alive``: hop-by-hop (RFC 9110 §7.6.1). waitress closes after some
  answers (``Connection: close``); the gateway keeps its client's connection open.
* ``Transfer-Encoding``: hop-by-hop framing, checked on its own terms instead: a
  ``Content-Length`` crosses unchanged, and a body that the upstream sent chunked comes out
  chunked (streamed, not buffered to learn its length).

* ``X-Request-ID``: the gateway's answer carries the id it sent upstream; checked on its own
  (exactly one, and the one the upstream saw), then left out of the comparison.

Nothing else is tolerated: ``Server`` stays the upstream's, ``Content-Encoding`` and the
compressed bytes are the upstream's, ``Location`` and every ``Set-Cookie`` are untouched
(no ``strip_prefix`` here), redirects are relayed, not followed, and repeated headers keep
their order.

HEAD is checked on answers with a ``Content-Length`` only: waitress ends a *chunked* HEAD
answer with a stray ``0\\r\\n\\r\\n`` (a waitress bug), which aiohttp's client, ours and the
gateway's alike, rejects when it arrives with the head (the gateway then answers 502).

An answer with a body and no ``Content-Type`` (httpbin's ``/status/418``) gets none added.
"""

from __future__ import annotations

import asyncio
import base64
import json
import random
import select
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from multidict import CIMultiDict
from yarl import URL

from conftest import Gateway, GatewayFactory

# --- httpbin, served by waitress ------------------------------------------------------------

SERVE_HTTPBIN = textwrap.dedent("""\
    import logging, socket, waitress
    logging.disable(logging.WARNING)  # httpbin warns that flasgger (its Swagger UI) is absent
    from httpbin import app
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    print(sock.getsockname()[1], flush=True)
    # waitress drops X-Forwarded-* from untrusted peers by default: keep them, so that
    # httpbin's echo shows what the gateway sent.
    waitress.serve(app, sockets=[sock], threads=8, clear_untrusted_proxy_headers=False, _quiet=True)
""")


@pytest.fixture(scope="module")
def httpbin_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("httpbin") / "stderr.txt"
    with log.open("wb") as stderr:
        proc = subprocess.Popen([sys.executable, "-c", SERVE_HTTPBIN], stdout=subprocess.PIPE,
                                stderr=stderr, cwd=Path(__file__).parent)
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 30)
        line = proc.stdout.readline() if ready else b""
        assert line.strip().isdigit(), f"httpbin did not start: {log.read_text()}"
        yield f"http://127.0.0.1:{int(line)}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


# --- the gateway in front of it -------------------------------------------------------------

# What the gateway adds to every request (public_url is http://gateway.test in conftest).
FORWARDED = (("X-Forwarded-For", "127.0.0.1"), ("X-Forwarded-Proto", "http"),
             ("X-Forwarded-Host", "gateway.test"))
IDENTITY = (("X-Auth-User", "alice"), ("X-Auth-Roles", "user"))


def request_id(proxied: Answer) -> tuple[tuple[str, str], ...]:
    """The request id the gateway made (and sent upstream, after the identity headers)."""
    [made] = proxied.values("X-Request-ID")
    return (("X-Request-ID", made),)

BASE = (("Accept", "*/*"), ("Accept-Encoding", "gzip, deflate, br"), ("User-Agent", "fidelity-test/1"))
TOLERATED = frozenset({"date", "connection", "keep-alive", "transfer-encoding"})


@pytest.fixture
async def gateway(gateway_factory: GatewayFactory, httpbin_url: str) -> Gateway:
    def in_front_of_httpbin(raw: dict[str, Any]) -> None:
        raw["upstreams"]["app"] = {"url": httpbin_url, "timeout": "10s", "connect_timeout": "2s"}
        raw["routes"] = [
            {"path": "/headers", "access": "authenticated"},
            {"path": "/anything/**", "access": "authenticated"},
            {"path": "/**", "access": "public"},
        ]

    return await gateway_factory(in_front_of_httpbin)


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    # The same client for both sides. It adds no headers of its own: every case sends BASE
    # first, so that headers keep one order both ways (httpbin's /stream echoes them in order).
    async with aiohttp.ClientSession(
        auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar(),
        skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding"),
    ) as http:
        yield http


# --- the cases ------------------------------------------------------------------------------

ONE_MB = random.Random(4).randbytes(1024 * 1024)


@dataclass(frozen=True)
class Case:
    id: str
    method: str
    path: str
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes | None = None
    chunked: bool = False  # send the body with Transfer-Encoding: chunked
    auth: bool = False  # a route that needs alice's token (/headers, /anything/**)


JSON = (("Content-Type", "application/json"),)
FORM = (("Content-Type", "application/x-www-form-urlencoded"),)

# One gateway per group (starting one costs a dummy argon2 hash); every case of a group is
# checked, and a failure lists each case that differed.
GROUPS: dict[str, list[Case]] = {
    "methods-and-bodies": [
        Case("get-query", "GET", "/get?show_env=1&a=1&a=2&b=%C3%A9&empty="),
        Case("post-json", "POST", "/post?show_env=1", JSON, b'{"name": "alice", "n": [1, 2.5, null]}'),
        Case("post-form", "POST", "/post?show_env=1", FORM, b"a=1&b=two+words&a=3"),
        Case("post-binary-1mb", "POST", "/post?show_env=1", (("Content-Type", "application/octet-stream"),),
             ONE_MB),
        Case("post-chunked", "POST", "/post?show_env=1", JSON, b'{"chunked": true}' * 1000, chunked=True),
        Case("put", "PUT", "/put?show_env=1", JSON, b'{"put": 1}'),
        Case("patch", "PATCH", "/patch?show_env=1", FORM, b"patched=yes"),
        Case("delete", "DELETE", "/delete?show_env=1"),
        Case("delete-with-body", "DELETE", "/delete?show_env=1", JSON, b'{"why": "because"}'),
        Case("options", "OPTIONS", "/get"),
        Case("anything-authenticated", "PUT", "/anything/deep/path?show_env=1&q=1", JSON, b'{"x": 1}',
             auth=True),
    ],
    "request-headers-and-cookies": [
        Case("headers-custom-repeated", "GET", "/headers?show_env=1",
             (("X-Custom", "one"), ("X-Repeat", "a"), ("X-Repeat", "b"), ("x-lower-case", "Mixed Value"),
              ("X-Empty", ""), ("Cookie", "theme=dark; lang=en")), auth=True),
        Case("cookies-echo", "GET", "/cookies", (("Cookie", "theme=dark; lang=en"),)),
        Case("cookies-set-several", "GET", "/cookies/set?a=1&b=two&c=3"),
        Case("response-headers-repeated", "GET",
             "/response-headers?X-Multi=first&X-Multi=second&X-Multi=third&Cache-Control=no-store"
             "&Link=%3C%2Fa%3E%3B%20rel%3Dnext&X-Other=z"),
    ],
    "statuses-and-redirects": [
        Case("status-204", "GET", "/status/204"),
        Case("status-304", "GET", "/status/304"),
        Case("etag-304", "GET", "/etag/abc", (("If-None-Match", '"abc"'),)),
        Case("status-500", "GET", "/status/500"),
        Case("status-put-201", "PUT", "/status/201", JSON, b"{}"),
        Case("redirect-to-absolute", "GET",
             "/redirect-to?url=http%3A%2F%2Fexample.com%2Fa%3Fb%3D1&status_code=307"),
        Case("redirect-to-relative", "GET", "/redirect-to?url=%2Fget%3Fx%3D1"),
        Case("redirect-n", "GET", "/redirect/2"),
    ],
    "encodings-and-content-types": [
        Case("gzip", "GET", "/gzip?show_env=1"),
        Case("deflate", "GET", "/deflate?show_env=1"),
        Case("brotli", "GET", "/brotli?show_env=1"),
        Case("xml", "GET", "/xml"),
        Case("html", "GET", "/html"),
        Case("robots", "GET", "/robots.txt"),
        Case("image-png", "GET", "/image", (("Accept", "image/png"),)),
        Case("encoding-utf8", "GET", "/encoding/utf8"),
        Case("base64", "GET", "/base64/SGVsbG8sIGdhdGV3YXkh"),
    ],
    "streams-bytes-ranges-head": [
        Case("stream-5", "GET", "/stream/5?show_env=1"),
        Case("stream-bytes", "GET", "/stream-bytes/300000?seed=7&chunk_size=7000"),
        Case("bytes", "GET", "/bytes/102400?seed=3"),
        Case("range", "GET", "/range/5000?duration=0", (("Range", "bytes=100-1099"),)),
        Case("range-suffix", "GET", "/range/5000?duration=0", (("Range", "bytes=-10"),)),
        Case("range-unsatisfiable", "GET", "/range/5000?duration=0", (("Range", "bytes=9000-"),)),
        # HEAD only where the answer has a Content-Length (see the module docstring)
        Case("head-get", "HEAD", "/get?show_env=1"),
        Case("head-bytes", "HEAD", "/bytes/4096?seed=1"),
    ],
}


@dataclass
class Answer:
    status: int
    reason: str
    headers: list[tuple[str, str]]  # as received: names' case, order, repeats
    body: bytes  # as received, de-chunked, never decompressed

    def values(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]


async def fetch(http: aiohttp.ClientSession, base: str, case: Case,
                extra: tuple[tuple[str, str], ...] = ()) -> Answer:
    headers = (*BASE, *case.headers, *extra)
    if case.method == "HEAD":
        # A HEAD answer's Content-Length announces a body that never comes; read just the
        # head, over a raw socket (see the module docstring for waitress's stray bytes).
        url = URL(base)
        assert case.body is None and url.port is not None
        return (await raw_exchange(url.port, "HEAD", case.path, headers)).answer
    data: Any = case.body
    if case.body is not None and case.chunked:
        body = case.body

        async def chunks() -> AsyncIterator[bytes]:
            for i in range(0, len(body), 4000):
                yield body[i:i + 4000]

        data = chunks()
    async with http.request(case.method, URL(base + case.path, encoded=True), headers=CIMultiDict(headers),
                            data=data, allow_redirects=False) as resp:
        raw = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in resp.raw_headers]
        return Answer(resp.status, resp.reason or "", raw, await resp.read())


async def both(http: aiohttp.ClientSession, httpbin_url: str, gateway: Gateway, case: Case,
               token: str = "") -> tuple[Answer, Answer]:
    """(direct, through the gateway), the direct one carrying what the gateway adds."""
    identity: tuple[tuple[str, str], ...] = ()
    gateway_extra: tuple[tuple[str, str], ...] = ()
    if case.auth:
        identity = IDENTITY
        gateway_extra = (("Authorization", f"Bearer {token or await gateway.token('alice')}"),)
    proxied = await fetch(http, gateway.url, case, gateway_extra)
    direct = await fetch(http, httpbin_url, case, identity + request_id(proxied) + FORWARDED)
    return direct, proxied


def _masked_body(answer: Answer) -> bytes:
    body = answer.body
    if answer.values("Content-Encoding") == ["gzip"] and body[:2] == b"\x1f\x8b":
        return body[:4] + b"\0\0\0\0" + body[8:]  # MTIME: when httpbin compressed it
    return body


def _first_difference(a: bytes, b: bytes) -> str:
    at = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
    return f"bodies differ at byte {at}: direct {a[max(0, at - 40):at + 80]!r}, gateway {b[max(0, at - 40):at + 80]!r}"


def assert_same(direct: Answer, proxied: Answer) -> None:
    assert (proxied.status, proxied.reason) == (direct.status, direct.reason)
    a, b = _masked_body(direct), _masked_body(proxied)
    assert a == b, _first_difference(a, b)
    kept = [(k, v) for k, v in direct.headers if k.lower() not in TOLERATED]
    assert direct.values("X-Request-ID") == [] and len(proxied.values("X-Request-ID")) == 1
    assert [(k, v) for k, v in proxied.headers if k.lower() not in TOLERATED | {"x-request-id"}] == kept
    assert len(proxied.values("Date")) == len(direct.values("Date")) == 1
    # Framing: a Content-Length crosses unchanged; a chunked body stays chunked (streamed).
    assert proxied.values("Content-Length") == direct.values("Content-Length")
    if direct.values("Transfer-Encoding") == ["chunked"] and proxied.body:
        assert proxied.values("Transfer-Encoding") == ["chunked"]


@pytest.mark.parametrize("group", GROUPS)
async def test_same_answers_direct_and_through_the_gateway(
    group: str, client: aiohttp.ClientSession, httpbin_url: str, gateway: Gateway
) -> None:
    token = await gateway.token("alice")
    differed = {}
    for case in GROUPS[group]:
        direct, proxied = await both(client, httpbin_url, gateway, case, token)
        try:
            assert_same(direct, proxied)
        except AssertionError as exc:
            differed[case.id] = str(exc)
    assert not differed, "\n\n".join(f"[{case}] {why}" for case, why in differed.items())


async def test_an_answer_without_content_type_gets_none_added(
    client: aiohttp.ClientSession, httpbin_url: str, gateway: Gateway
) -> None:
    # httpbin's teapot: 418 with a body, a Content-Length and no Content-Type.
    direct, proxied = await both(client, httpbin_url, gateway, Case("status-418", "GET", "/status/418"))
    assert direct.values("Content-Type") == [] and direct.body
    assert proxied.values("Content-Type") == []
    assert_same(direct, proxied)


# --- what the table checks on top of equality -----------------------------------------------


async def test_the_echo_shows_exactly_what_the_gateway_adds(
    client: aiohttp.ClientSession, httpbin_url: str, gateway: Gateway
) -> None:
    # Guards the method above: without the added headers the echoes differ in just these.
    case = Case("headers", "GET", "/headers?show_env=1", (("X-Custom", "one"),), auth=True)
    token = await gateway.token("alice")
    direct = await fetch(client, httpbin_url, case)
    proxied = await fetch(client, gateway.url, case, (("Authorization", f"Bearer {token}"),))
    seen_direct = json.loads(direct.body)["headers"]
    seen_proxied = json.loads(proxied.body)["headers"]
    added = {k: v for k, v in seen_proxied.items() if seen_direct.get(k) != v}
    [made] = proxied.values("X-Request-ID")  # what the upstream saw is what the answer says
    assert added == dict(FORWARDED + IDENTITY) | {"X-Request-Id": made}
    assert set(seen_direct) <= set(seen_proxied)
    assert "Authorization" not in seen_proxied


async def test_compressed_bodies_are_relayed_not_decompressed(client: aiohttp.ClientSession, gateway: Gateway) -> None:
    for path, encoding, magic in (("/gzip", "gzip", b"\x1f\x8b"), ("/deflate", "deflate", b"\x78"),
                                  ("/brotli", "br", b"")):
        case = Case(path, "GET", path)
        proxied = await fetch(client, gateway.url, case)
        assert proxied.values("Content-Encoding") == [encoding]
        assert proxied.body.startswith(magic)
        assert proxied.values("Content-Length") == [str(len(proxied.body))]
        with pytest.raises(ValueError):
            json.loads(proxied.body)  # still compressed


async def test_redirects_are_relayed_not_followed(client: aiohttp.ClientSession, gateway: Gateway) -> None:
    case = Case("redirect", "GET", "/redirect-to?url=http%3A%2F%2Fexample.com%2Fa%3Fb%3D1&status_code=307")
    proxied = await fetch(client, gateway.url, case)
    assert proxied.status == 307
    assert proxied.values("Location") == ["http://example.com/a?b=1"]
    cookies = await fetch(client, gateway.url, Case("set", "GET", "/cookies/set?a=1&b=two&c=3"))
    assert cookies.status == 302
    assert cookies.values("Location") == ["/cookies"]
    assert [v.split(";")[0] for v in cookies.values("Set-Cookie")] == ["a=1", "b=two", "c=3"]


async def test_streamed_response_arrives_in_pieces(client: aiohttp.ClientSession, gateway: Gateway) -> None:
    async with client.get(f"{gateway.url}/stream/20") as resp:
        assert resp.headers.get("Transfer-Encoding") == "chunked"
        assert "Content-Length" not in resp.headers
        lines = [line async for line in resp.content]
    assert [json.loads(line)["id"] for line in lines] == list(range(20))


# --- Expect: 100-continue, over raw sockets -------------------------------------------------


@dataclass
class Exchange:
    interim: bytes  # the status line of an interim (1xx) answer, b"" when there was none
    answer: Answer


async def raw_exchange(port: int, method: str, path: str, headers: tuple[tuple[str, str], ...],
                       body: bytes | None = None, expect: bool = False) -> Exchange:
    """One request over a raw socket, closed after one answer (no ``Connection: close``,
    which httpbin would echo). With ``expect``, the head goes with ``Expect: 100-continue``
    and the body only after an interim ``100``, as curl does."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        head = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{port}",
                *(f"{k}: {v}" for k, v in headers)]
        if body is not None:
            head.append(f"Content-Length: {len(body)}")
        if expect:
            head.append("Expect: 100-continue")
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + (b"" if expect else body or b""))
        await writer.drain()
        first = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        interim = b""
        if first.startswith(b"HTTP/1.1 100"):
            interim = first.split(b"\r\n", 1)[0]
            writer.write(body or b"")
            await writer.drain()
            first = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        lines = first.decode("latin-1").split("\r\n")
        _, status, reason = lines[0].split(" ", 2)
        parsed = [(k, v) for k, _, v in (line.partition(": ") for line in lines[1:] if line)]
        length = next((int(v) for k, v in parsed if k.lower() == "content-length"), 0)
        data = b""
        if method != "HEAD" and length:
            data = await asyncio.wait_for(reader.readexactly(length), 10)
        return Exchange(interim, Answer(int(status), reason, parsed, data))
    finally:
        writer.close()


async def test_expect_100_continue_upload(httpbin_url: str, gateway: Gateway) -> None:
    body = random.Random(5).randbytes(256 * 1024)
    path = "/anything/upload?show_env=1"
    token = await gateway.token("alice")
    sent = (*BASE, ("Content-Type", "application/octet-stream"))
    proxied = await raw_exchange(gateway.port, "POST", path, sent + (("Authorization", f"Bearer {token}"),),
                                 body, expect=True)
    direct = await raw_exchange(URL(httpbin_url).port or 80, "POST", path,
                                sent + IDENTITY + request_id(proxied.answer) + FORWARDED, body, expect=True)
    assert direct.interim == proxied.interim == b"HTTP/1.1 100 Continue"
    assert proxied.answer.status == direct.answer.status == 200
    drop = TOLERATED | {"content-length", "x-request-id"}  # the echo is one header shorter: see below
    assert [h for h in proxied.answer.headers if h[0].lower() not in drop] == \
        [h for h in direct.answer.headers if h[0].lower() not in drop]
    echo_direct, echo_proxied = json.loads(direct.answer.body), json.loads(proxied.answer.body)
    # The one tolerated difference: the gateway answers the expectation itself and does
    # not forward Expect (see the module docstring).
    assert echo_direct["headers"].pop("Expect") == "100-continue"
    assert echo_proxied == echo_direct
    assert echo_proxied["data"] == "data:application/octet-stream;base64," + base64.b64encode(body).decode()

