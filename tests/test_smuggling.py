"""Request smuggling and malformed framing: SEC-23, SEC-24, SEC-13's lowercase method, and
the bodies of refused requests (SEC-58).

Every case is sent as raw bytes over a socket to a real ``gateway run`` process, once for
each of aiohttp's HTTP parsers: the C one (llhttp, aiohttp's default) and the pure-Python
one (``AIOHTTP_NO_EXTENSIONS=1``, which only takes effect when it is set before aiohttp is
imported, hence a process per parser). Both processes run for the whole module, in front of
one recording upstream: a plain socket server on a thread of the test process that records
every request line it receives (before reading the body, so a request whose body never
completes is recorded too). "The upstream saw nothing" means that list stayed empty. Running
the C variant as a process as well keeps the two variants identical in everything but the
parser; ``test_each_process_runs_the_parser_it_is_named_after`` checks that they differ
where the parsers do.

The malformed requests go to a *public* path wherever the case allows (``POST /static/x``),
so that a parser that accepts one shows it by forwarding it: a 401 cannot hide a lax parse.
The contract's answer is 400 and a closed connection; "closed without any response" is
accepted too, as long as nothing was forwarded.

Where a parser accepts what it should refuse and the gateway forwards it, the test is an
``xfail(strict=True)`` for that parser naming what happens; it starts failing (XPASS) the
day the parser, or the gateway, refuses it.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import socket
import socketserver
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp.http_parser
import pytest

from gateway.credentials import hash_password
from gateway.store import User, open_store

pytestmark = pytest.mark.slow  # starts a gateway process per parser

PARSERS = ("llhttp", "python")
USERS = {"alice": ("alice-password-1", ("user",)), "bob": ("bob-password-1", ("admin",))}

CONFIG = """\
listen: {{host: 127.0.0.1, port: {port}}}
public_url: http://gateway.test
store: sqlite:gateway.db
upstreams: {{app: {{url: "{upstream}", timeout: 2s, connect_timeout: 1s}}}}
tokens:
  issuer: https://gateway.test
  audience: app
  keys: [{{kid: k1, algorithm: HS256, secret: "{secret}"}}]
cookies: {{secure: false}}
identity_headers: {{X-Auth-User: sub, X-Auth-Roles: roles}}
routes:
  - {{path: /static/**, access: public}}
  - {{path: /admin/**, methods: [GET, POST], access: {{roles: [admin]}}}}
  - {{path: /**, access: authenticated, upstream: app}}
"""


# --- the recording upstream -----------------------------------------------------------------


@dataclass
class Received:
    line: str  # the request line, as it arrived
    headers: list[tuple[str, str]]
    body: bytes = b""
    complete: bool = False  # the body ended where its framing said it would


@dataclass
class Recorder:
    """Every request the upstream received, in order, across all its connections."""

    url: str = ""
    received: list[Received] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def clear(self) -> None:
        with self.lock:
            self.received.clear()

    def seen(self) -> list[str]:
        """The request lines received so far."""
        with self.lock:
            return [r.line for r in self.received]

    def settled(self) -> list[str]:
        """``seen()`` once nothing more is on its way (a request forwarded just as the
        client's connection closed has had time to arrive)."""
        time.sleep(0.05)
        return self.seen()


# Sent after a normal answer to "/static/desync", in the same write: an upstream that puts
# more on the wire than its Content-Length. A client that kept the connection would take it
# as the answer to whatever it sends next.
DESYNC = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 9\r\n\r\npoisoned!"


def _recording_handler(recorder: Recorder) -> type[socketserver.StreamRequestHandler]:
    class Handler(socketserver.StreamRequestHandler):
        def handle(self) -> None:
            while True:
                line = self.rfile.readline(65536)
                if not line:
                    return
                headers: list[tuple[str, str]] = []
                while True:
                    raw = self.rfile.readline(65536)
                    if raw in (b"\r\n", b"\n", b""):
                        break
                    name, _, value = raw.decode("latin-1").partition(":")
                    headers.append((name, value.strip()))
                got = Received(line.decode("latin-1").rstrip("\r\n"), headers)
                with recorder.lock:  # recorded before the body, which may never come
                    recorder.received.append(got)
                if not self._read_body(got):
                    return  # the body was cut short: this connection is done
                got.complete = True
                body = json.dumps({"line": got.line, "body": got.body.decode("latin-1")}).encode()
                self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
                                 + (DESYNC if " /static/desync " in got.line else b""))

        def _read_body(self, got: Received) -> bool:
            found = {k.lower(): v for k, v in got.headers}
            try:
                if "chunked" in found.get("transfer-encoding", "").lower():
                    while True:
                        size = int(self.rfile.readline(1024).split(b";")[0], 16)
                        got.body += self.rfile.read(size)
                        if self.rfile.read(2) != b"\r\n":
                            return False
                        if size == 0:
                            return True
                length = int(found.get("content-length", "0"))
            except ValueError:
                return False
            got.body = self.rfile.read(length)
            return len(got.body) == length

    return Handler


@pytest.fixture(scope="module")
def recorder() -> Iterator[Recorder]:
    state = Recorder()
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _recording_handler(state))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    yield state
    server.shutdown()
    server.server_close()


# --- a gateway process per parser -----------------------------------------------------------


@dataclass
class RunningGateway:
    parser: str  # "llhttp" | "python"
    port: int
    tokens: dict[str, str]  # user name -> a valid access token


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _add_users(db: Path) -> None:
    async def add() -> None:
        store = await open_store(f"sqlite:{db}")
        for name, (password, roles) in USERS.items():
            await store.add_user(User(name, hash_password(password), roles, created_at=time.time()))
        await store.close()

    asyncio.run(add())


@pytest.fixture(scope="module", params=PARSERS)
def gateway(request: pytest.FixtureRequest, recorder: Recorder,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningGateway]:
    parser: str = request.param
    env = {k: v for k, v in os.environ.items() if k != "AIOHTTP_NO_EXTENSIONS"}
    if parser == "python":
        env["AIOHTTP_NO_EXTENSIONS"] = "1"
    elif aiohttp.http_parser.HttpRequestParser is aiohttp.http_parser.HttpRequestParserPy:
        pytest.skip("aiohttp's C extensions (llhttp) are not available in this environment")
    home = tmp_path_factory.mktemp(f"gateway-{parser}")
    port = _free_port()
    config = home / "gateway.yaml"
    config.write_text(CONFIG.format(port=port, upstream=recorder.url, secret=secrets.token_urlsafe(48)))
    _add_users(home / "gateway.db")
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "run", "-c", str(config)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _until_healthy(port, proc)
        tokens = {name: _login(port, name, password) for name, (password, _) in USERS.items()}
        yield RunningGateway(parser, port, tokens)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()


@pytest.fixture
def gw(gateway: RunningGateway, recorder: Recorder) -> RunningGateway:
    recorder.clear()
    return gateway


def _until_healthy(port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 15
    while True:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else b""
        try:
            if send(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").status == 200:
                return
        except OSError:
            pass
        assert time.monotonic() < deadline, "the gateway did not come up within 15 s"
        time.sleep(0.05)


def _login(port: int, name: str, password: str) -> str:
    body = json.dumps({"username": name, "password": password}).encode()
    answer = send(port, b"POST /auth/login HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                        b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    assert answer.status == 200, answer.raw
    return str(json.loads(answer.bodies[0])["access_token"])


# --- raw HTTP -------------------------------------------------------------------------------


@dataclass
class Answer:
    raw: bytes  # everything the gateway sent before it closed the connection or we stopped
    closed: bool  # the gateway closed the connection
    statuses: list[int]  # every final (non-1xx) response, in order
    bodies: list[bytes]
    interim: list[int]  # 1xx responses

    @property
    def status(self) -> int | None:
        return self.statuses[0] if self.statuses else None


def send(port: int, data: bytes, *, responses: int | None = None, timeout: float = 2.0) -> Answer:
    """Send ``data`` as it is and read until the gateway closes the connection, or until
    ``responses`` final responses have arrived, or ``timeout`` passes."""
    raw, closed = b"", False
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                sock.settimeout(max(0.01, deadline - time.monotonic()))
                chunk = sock.recv(65536)
                if not chunk:
                    closed = True
                    break
                raw += chunk
                if responses is not None and len(_parse(raw)[0]) >= responses:
                    break
        except TimeoutError:
            pass
        except ConnectionResetError:
            closed = True
    statuses, bodies, interim = _parse(raw)
    return Answer(raw, closed, statuses, bodies, interim)


def _parse(raw: bytes) -> tuple[list[int], list[bytes], list[int]]:
    statuses: list[int] = []
    bodies: list[bytes] = []
    interim: list[int] = []
    while raw:
        head, sep, rest = raw.partition(b"\r\n\r\n")
        match = re.match(rb"HTTP/\d\.\d (\d{3})", head)
        if not sep or not match:
            break
        status = int(match.group(1))
        if 100 <= status < 200:
            interim.append(status)
            raw = rest
            continue
        length = re.search(rb"(?im)^content-length:\s*(\d+)\s*$", head)
        size = int(length.group(1)) if length else len(rest)
        if len(rest) < size:
            break  # not all here yet
        statuses.append(status)
        bodies.append(rest[:size])
        raw = rest[size:]
    return statuses, bodies, interim


def assert_refused(answer: Answer, recorder: Recorder) -> None:
    """400 (or no answer at all), the connection closed, and nothing forwarded."""
    assert answer.statuses in ([400], []), answer.raw
    assert answer.closed, "the connection was left open after a framing error"
    assert recorder.settled() == []


def lax(request: pytest.FixtureRequest, gw: RunningGateway, reasons: dict[str, str]) -> None:
    """Expect this case to fail, strictly, for the parsers named in ``reasons``."""
    if gw.parser in reasons:
        request.applymarker(pytest.mark.xfail(strict=True, reason=f"{gw.parser}: {reasons[gw.parser]}"))


# --- the cases ------------------------------------------------------------------------------

HOST = b"Host: app.example.com\r\n"
POST = b"POST /static/x HTTP/1.1\r\n" + HOST
SMUGGLED = b"GET /admin/users HTTP/1.1\r\nHost: app.example.com\r\n\r\n"
CHUNKED_EMPTY = b"0\r\n\r\n"


@dataclass(frozen=True)
class Case:
    id: str
    data: bytes
    lax: dict[str, str] = field(default_factory=dict)  # parser -> how it gets this wrong


# SEC-23: conflicting framing, each followed by a smuggled GET /admin/users.
SEC_23 = [
    Case("CL then TE", POST + b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"
         + CHUNKED_EMPTY + SMUGGLED),
    Case("TE then CL", POST + b"Transfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n"
         + CHUNKED_EMPTY + SMUGGLED),
    Case("CL 5 and CL 6", POST + b"Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello" + SMUGGLED),
    Case("CL 5, 5", POST + b"Content-Length: 5, 5\r\n\r\nhello" + SMUGGLED),
    # more of the same kind
    Case("CL 5 twice", POST + b"Content-Length: 5\r\nContent-Length: 5\r\n\r\nhello" + SMUGGLED),
    Case("TE chunked twice", POST + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n"
         + CHUNKED_EMPTY + SMUGGLED),
    # the Python parser accepts this; the gateway refuses any coding list but one "chunked"
    Case("TE chunked, chunked", POST + b"Transfer-Encoding: chunked, chunked\r\n\r\n" + CHUNKED_EMPTY + SMUGGLED),
]


@pytest.mark.parametrize("case", SEC_23, ids=lambda c: c.id)
def test_sec23_conflicting_framing_is_refused_and_nothing_is_forwarded(
    request: pytest.FixtureRequest, gw: RunningGateway, recorder: Recorder, case: Case
) -> None:
    lax(request, gw, case.lax)
    answer = send(gw.port, case.data)
    assert_refused(answer, recorder)
    assert "GET /admin/users HTTP/1.1" not in recorder.seen()


# SEC-24: obfuscated framing headers and obs-fold.
SEC_24_HEADERS = [
    Case("CR inside a header value", POST + b"X-Abc: \rxTransfer-Encoding: chunked\r\n\r\n"
         + CHUNKED_EMPTY + SMUGGLED),
    Case("CR inside a header value, with CL", POST + b"X-Abc: \rxTransfer-Encoding: chunked\r\n"
         b"Content-Length: 5\r\n\r\n" + CHUNKED_EMPTY + SMUGGLED),
    Case("space before the colon", POST + b"Transfer-Encoding : chunked\r\n\r\n" + CHUNKED_EMPTY + SMUGGLED),
    Case("TE xchunked", POST + b"Transfer-Encoding: xchunked\r\n\r\n" + CHUNKED_EMPTY + SMUGGLED),
    Case("TE chunked, identity", POST + b"Transfer-Encoding: chunked, identity\r\n\r\n" + CHUNKED_EMPTY + SMUGGLED),
    Case("CL +5", POST + b"Content-Length: +5\r\n\r\nhello" + SMUGGLED),
    Case("obs-fold in CL", POST + b"Content-Length: 5\r\n 6\r\n\r\nhello" + SMUGGLED),
    Case("obs-fold in an identity header", b"GET /static/x HTTP/1.1\r\n" + HOST
         + b"X-Auth-User: alice\r\n\tadmin\r\n\r\n"),
    # more of the same kind
    Case("tab before the colon", POST + b"Transfer-Encoding\t: chunked\r\n\r\n" + CHUNKED_EMPTY + SMUGGLED),
    Case("CL with a space before the colon", POST + b"Content-Length : 5\r\n\r\nhello" + SMUGGLED),
    Case("TE identity", POST + b"Transfer-Encoding: identity\r\n\r\n" + SMUGGLED),
    Case("CL 0x5", POST + b"Content-Length: 0x5\r\n\r\nhello" + SMUGGLED),
    Case("CL -1", POST + b"Content-Length: -1\r\n\r\nhello" + SMUGGLED),
    Case("CL 5 5", POST + b"Content-Length: 5 5\r\n\r\nhello" + SMUGGLED),
    Case("obs-fold as the first header", b"GET /static/x HTTP/1.1\r\n Host: a\r\n\r\n"),
    Case("NUL in a header value", b"GET /static/x HTTP/1.1\r\n" + HOST + b"X-A: a\x00b\r\n\r\n"),
    Case("bare LF line endings", b"GET /static/x HTTP/1.1\nHost: a\n\n"),
    Case("bare LF after a header", b"GET /static/x HTTP/1.1\r\nHost: a\nX-A: b\r\n\r\n"),
    # malformed chunked bodies
    Case("chunk size 5x", POST + b"Transfer-Encoding: chunked\r\n\r\n5x\r\nhello\r\n" + CHUNKED_EMPTY + SMUGGLED),
    Case("chunk size +5", POST + b"Transfer-Encoding: chunked\r\n\r\n+5\r\nhello\r\n" + CHUNKED_EMPTY + SMUGGLED),
    Case("chunk size with a space", POST + b"Transfer-Encoding: chunked\r\n\r\n5 \r\nhello\r\n"
         + CHUNKED_EMPTY + SMUGGLED),
    Case("chunk size overflow", POST + b"Transfer-Encoding: chunked\r\n\r\nfffffffffffffffff1\r\nhello\r\n"
         + CHUNKED_EMPTY + SMUGGLED,
         lax={"python": "takes the 72-bit chunk size 'fffffffffffffffff1' as a Python int, forwards "
                        "POST /static/x and streams what follows (the smuggled request too) as chunk "
                        "data, waiting for ~2**72 bytes; llhttp answers 400 'Chunk size overflow'"}),
    Case("no CRLF after chunk data", POST + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhelloXX0\r\n\r\n" + SMUGGLED),
    Case("LF in a chunk extension", POST + b"Transfer-Encoding: chunked\r\n\r\n5;a\nb\r\nhello\r\n"
         + CHUNKED_EMPTY + SMUGGLED),
    Case("bare LF in chunk lines", POST + b"Transfer-Encoding: chunked\r\n\r\n5\nhello\n0\n\n" + SMUGGLED),
]


@pytest.mark.parametrize("case", SEC_24_HEADERS, ids=lambda c: c.id)
def test_sec24_obfuscated_framing_is_refused_and_nothing_is_forwarded(
    request: pytest.FixtureRequest, gw: RunningGateway, recorder: Recorder, case: Case
) -> None:
    lax(request, gw, case.lax)
    assert_refused(send(gw.port, case.data), recorder)


_DOUBLE_SPACE = ("accepts 'GET  /static/x HTTP/1.1' (two spaces) as 'GET /static/x' and forwards it; the "
                 "Python parser answers 400 'Bad status line'")
SEC_24_REQUEST_LINES = [
    # the case's own inputs, on a protected path
    Case("HTTP/1.<mathematical 1>", "GET /admin HTTP/1.𝟙\r\nHost: a\r\n\r\n".encode()),
    Case("HTTP/1<o-umlaut>1", "GET /admin HTTP/1ö1\r\nHost: a\r\n\r\n".encode()),
    Case("GET/:", b"GET/: HTTP/1.1\r\nHost: a\r\n\r\n"),
    # ("GET  /admin HTTP/1.1" is test_sec24_two_spaces_after_the_method)
    # the same on a public path, where a lax parse would be forwarded rather than a 401
    Case("HTTP/1.<mathematical 1>, public", "GET /static/x HTTP/1.𝟙\r\nHost: a\r\n\r\n".encode()),
    Case("HTTP/1<o-umlaut>1, public", "GET /static/x HTTP/1ö1\r\nHost: a\r\n\r\n".encode()),
    Case("two spaces, public", b"GET  /static/x HTTP/1.1\r\nHost: a\r\n\r\n", lax={"llhttp": _DOUBLE_SPACE}),
    # more of the same kind
    Case("tabs for spaces", b"GET\t/static/x\tHTTP/1.1\r\nHost: a\r\n\r\n"),
    Case("a space after the version", b"GET /static/x HTTP/1.1 \r\nHost: a\r\n\r\n"),
    Case("lower-case http/1.1", b"GET /static/x http/1.1\r\nHost: a\r\n\r\n"),
    Case("non-ASCII method", "GÉT /static/x HTTP/1.1\r\nHost: a\r\n\r\n".encode()),
    # The parsers let these versions through (llhttp: 0.9 and 2.0; Python: any HTTP/d.d); the
    # gateway refuses every version but 1.0 and 1.1 before deciding anything.
    Case("no version (HTTP/0.9)", b"GET /static/x\r\n\r\n"),
    Case("HTTP/2.0 in an HTTP/1 request line", b"GET /static/x HTTP/2.0\r\nHost: a\r\n\r\n"),
    Case("HTTP/1.9", b"GET /static/x HTTP/1.9\r\nHost: a\r\n\r\n"),
    Case("HTTP/3.0", b"GET /static/x HTTP/3.0\r\nHost: a\r\n\r\n"),
    Case("no Host", b"GET /static/x HTTP/1.1\r\n\r\n"),
    Case("two Hosts", b"GET /static/x HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"),
]


@pytest.mark.parametrize("case", SEC_24_REQUEST_LINES, ids=lambda c: c.id)
def test_sec24_lax_request_lines_are_refused_and_nothing_is_forwarded(
    request: pytest.FixtureRequest, gw: RunningGateway, recorder: Recorder, case: Case
) -> None:
    lax(request, gw, case.lax)
    assert_refused(send(gw.port, case.data), recorder)


def test_sec24_two_spaces_after_the_method(gw: RunningGateway, recorder: Recorder) -> None:
    """``GET  /admin HTTP/1.1``. The Python parser refuses it (400 and close). llhttp reads
    it as ``GET /admin``, so the gateway decides on ``/admin``: 401 without a token, which
    fails closed, but it is not the 400 the case asks for (see the public variant above,
    which llhttp forwards)."""
    answer = send(gw.port, b"GET  /admin HTTP/1.1\r\nHost: a\r\n\r\n",
                  responses=1 if gw.parser == "llhttp" else None)
    if gw.parser == "llhttp":
        assert answer.status == 401, answer.raw
    else:
        assert answer.status == 400 and answer.closed, answer.raw
    assert recorder.settled() == []


def test_http10_with_transfer_encoding_is_closed_after_one_request(gw: RunningGateway, recorder: Recorder) -> None:
    """RFC 9112 section 6.1: an HTTP/1.0 message with Transfer-Encoding has faulty framing;
    it may be processed, but the connection must be closed after it. Both parsers process
    it (decoding the chunked body) and close, so what follows is never read as a request."""
    answer = send(gw.port, b"POST /static/x HTTP/1.0\r\n" + HOST + b"Transfer-Encoding: chunked\r\n\r\n"
                  + b"5\r\nhello\r\n" + CHUNKED_EMPTY + SMUGGLED)
    assert answer.closed
    assert answer.statuses in ([400], [200]), answer.raw
    assert recorder.settled() in ([], ["POST /static/x HTTP/1.1"])
    if answer.statuses == [200]:
        assert recorder.received[0].body == b"hello" and recorder.received[0].complete


# --- what a parser accepts must still never smuggle ----------------------------------------


def test_pipelined_requests_are_each_decided_by_the_gateway(gw: RunningGateway, recorder: Recorder) -> None:
    """The control for the cases above: a well-framed public request followed by
    ``GET /admin/users`` is two requests, and the gateway authorizes the second one itself."""
    answer = send(gw.port, b"GET /static/x HTTP/1.1\r\n" + HOST + b"\r\n" + SMUGGLED, responses=2)
    assert answer.statuses == [200, 401]
    assert recorder.settled() == ["GET /static/x HTTP/1.1"]


def test_chunked_trailer_fields_never_reach_the_upstream(gw: RunningGateway, recorder: Recorder) -> None:
    """A trailer section carrying an identity header and a framing header. llhttp refuses it
    (400: a Transfer-Encoding trailer); the Python parser accepts it and drops the trailer.
    Either way no trailer field is forwarded as a header, and the body is exactly the chunks."""
    answer = send(gw.port, POST + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n"
                  b"X-Auth-User: bob\r\nTransfer-Encoding: x\r\n\r\n", responses=1)
    if answer.status == 400:
        assert recorder.settled() == []
        return
    assert answer.status == 200, answer.raw
    (got,) = recorder.received
    assert got.complete and got.body == b"hello"
    assert not any(k.lower() == "x-auth-user" for k, _ in got.headers)


def test_upgrade_request_does_not_open_a_tunnel_for_what_follows(gw: RunningGateway, recorder: Recorder) -> None:
    """WebSocket and h2c smuggling: an Upgrade request to a public path that the upstream
    does not accept (it answers 200, not 101), followed by a smuggled ``GET /admin/users``.
    The bytes after the handshake are never relayed to the upstream as a request."""
    for protocol, upgrade in (
        ("websocket", b"Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
                      b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"),
        ("h2c", b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
                b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n"),
    ):
        recorder.clear()
        answer = send(gw.port, b"GET /static/x HTTP/1.1\r\n" + HOST + upgrade + b"\r\n" + SMUGGLED, responses=2)
        assert 101 not in answer.interim, answer.raw
        assert answer.statuses[1:] in ([], [401]), answer.raw
        assert recorder.settled() in ([], ["GET /static/x HTTP/1.1"])
        if protocol == "h2c":  # never offered to the upstream: the gateway speaks HTTP/1.1 to it
            assert all(k.lower() not in ("upgrade", "http2-settings")
                       for r in recorder.received for k, _ in r.headers)


def test_upstream_bytes_beyond_its_content_length_are_never_served(gw: RunningGateway, recorder: Recorder) -> None:
    """SEC-23's other side: an upstream that sends more than its Content-Length. The
    gateway's connection to it must not be reused with those bytes still on it, or they
    become the answer to the next client's request (response queue poisoning)."""
    first = send(gw.port, b"GET /static/desync HTTP/1.1\r\n" + HOST + b"Connection: close\r\n\r\n")
    assert first.statuses == [200]
    assert b"poisoned!" not in first.raw
    for _ in range(3):
        answer = send(gw.port, b"GET /static/next HTTP/1.1\r\n" + HOST + b"Connection: close\r\n\r\n")
        assert answer.statuses == [200], answer.raw
        assert b"poisoned!" not in answer.raw
        assert json.loads(answer.bodies[0])["line"] == "GET /static/next HTTP/1.1"


def test_a_body_cut_short_never_joins_the_next_request_upstream(gw: RunningGateway, recorder: Recorder) -> None:
    """A client declares 10 bytes, sends 5 and hangs up. The upstream has already seen the
    request (bodies stream), but the connection it came on must be dropped, never handed to
    the next request with 5 bytes still owed: the next request must arrive as a request."""
    with socket.create_connection(("127.0.0.1", gw.port)) as sock:
        sock.sendall(POST + b"Content-Length: 10\r\n\r\nhello")
        deadline = time.monotonic() + 3
        while not recorder.seen() and time.monotonic() < deadline:
            time.sleep(0.01)
    answer = send(gw.port, b"GET /static/after HTTP/1.1\r\n" + HOST + b"Connection: close\r\n\r\n")
    assert answer.statuses == [200], answer.raw
    assert recorder.settled() == ["POST /static/x HTTP/1.1", "GET /static/after HTTP/1.1"]
    cut, after = recorder.received
    assert not cut.complete and cut.body == b"hello"
    assert after.complete


# --- SEC-58: the body of a refused request is never read as a request ----------------------

INNER = b"GET /static/smuggled HTTP/1.1\r\nHost: a\r\n\r\n"


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_refused_request_body_is_never_parsed_as_a_request(
    gw: RunningGateway, recorder: Recorder, framing: str
) -> None:
    """An unauthenticated ``POST /profile`` whose body is a whole request to a public path:
    401, the connection closed, and the body's request never forwarded."""
    if framing == "chunked":
        body = b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(INNER), INNER)
    else:
        body = b"Content-Length: %d\r\n\r\n%s" % (len(INNER), INNER)
    answer = send(gw.port, b"POST /profile HTTP/1.1\r\nHost: a\r\n" + body)
    assert answer.statuses == [401] and answer.closed, answer.raw
    assert recorder.settled() == []


@pytest.mark.parametrize("user, status", [(None, 401), ("alice", 403)])
def test_refused_request_gets_no_100_continue(
    gw: RunningGateway, recorder: Recorder, user: str | None, status: int
) -> None:
    """``Expect: 100-continue`` on a request the gateway refuses: the final status comes
    without a ``100 Continue`` first, so the client never uploads the body."""
    auth = b"Authorization: Bearer %s\r\n" % gw.tokens[user].encode() if user else b""
    answer = send(gw.port, b"POST /admin/users HTTP/1.1\r\nHost: a\r\n" + auth
                  + b"Expect: 100-continue\r\nContent-Length: 1000\r\n\r\n", responses=1)
    assert answer.interim == [] and answer.statuses == [status], answer.raw
    assert recorder.settled() == []


# --- SEC-13: a lower-case method ------------------------------------------------------------


@pytest.mark.parametrize("method, path, user", [
    ("get", "/admin/users", "alice"),
    ("get", "/admin/users", "bob"),
    ("get", "/admin/users", None),
    ("delete", "/admin/users/7", "bob"),
    ("post", "/admin/users", "alice"),
    ("get", "/static/x", None),
])
def test_sec13_lowercase_method_is_refused_or_is_the_uppercase_one(
    gw: RunningGateway, recorder: Recorder, method: str, path: str, user: str | None
) -> None:
    """Either refused (400/405, nothing forwarded), or treated as the upper-case method for
    both the decision and the forwarded request line: never as an unlisted method that a
    route lets through. llhttp refuses it (400 'Invalid method'); the Python parser
    upper-cases it."""
    auth = b"Authorization: Bearer %s\r\n" % gw.tokens[user].encode() if user else b""
    extra = b"Content-Length: 0\r\n" if method == "post" else b""

    def ask(verb: str) -> tuple[Answer, list[str]]:
        recorder.clear()
        answer = send(gw.port, f"{verb} {path} HTTP/1.1\r\n".encode() + HOST + auth + extra
                      + b"Connection: close\r\n\r\n")
        return answer, recorder.settled()

    lower, lower_seen = ask(method)
    if lower.status in (400, 405):
        assert lower_seen == []
        assert gw.parser == "python" or lower.status == 400  # llhttp knows no lower-case methods
        return
    upper, upper_seen = ask(method.upper())
    assert gw.parser == "python"
    assert lower.status == upper.status
    assert lower_seen == upper_seen
    if lower_seen:
        assert lower_seen == [f"{method.upper()} {path} HTTP/1.1"]


def test_each_process_runs_the_parser_it_is_named_after(gw: RunningGateway) -> None:
    """The parsers differ on lower-case methods (llhttp knows none; the pure-Python parser
    reads any token): a guard against both processes silently running the same one."""
    answer = send(gw.port, b"get /healthz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    assert (answer.status == 400) == (gw.parser == "llhttp"), answer.raw
