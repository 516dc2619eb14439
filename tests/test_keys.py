"""Keys (issue 7): EdDSA, ES256 and RS256 signing keys, verified by kid with the key's own
algorithm pinned; ``GET /.well-known/jwks.json``; ``gateway keys generate``;
``forward_token``; rotation; and the JWT cases of the attack catalogue (SEC-26, 27, 29, 30,
32, 33, 34, 36, 37, 39, 41) against the catalogue's fixture: one ES256 key, ``k1``, issuer
``https://app.example.com``, audience ``app``.

Hostile tokens are built by hand (base64url, JSON and a signature over the signing input),
never with the library the gateway verifies with, so that nothing it refuses to make goes
untested. Each case asserts the catalogue's Correct answer: 401 with the generic
``invalid_token`` body and ``WWW-Authenticate: Bearer realm="gateway", error="invalid_token"``,
and an upstream that saw nothing.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import stat
import subprocess
import sys
import time
import warnings
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import jwt as pyjwt
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID
from joserfc import jwt as jose_jwt
from joserfc.errors import BadSignatureError
from joserfc.jwk import KeySet

from gateway import config as config_module
from gateway import keys as gateway_keys
from gateway import tokens as tokens_module
from gateway.errors import InvalidToken
from gateway.tokens import AccessTokens

from conftest import SECRET, Gateway, GatewayFactory, Upstream

ISS, AUD = "https://app.example.com", "app"
ALGORITHMS = ("ES256", "EdDSA", "RS256")
GENERIC = {"error": "invalid_token", "error_description": "The access token is invalid."}
CHALLENGE = 'Bearer realm="gateway", error="invalid_token"'
JWKS = "/.well-known/jwks.json"
ROOT = Path(__file__).resolve().parent.parent


# --- keys -----------------------------------------------------------------------------------

_MADE: dict[str, list[Any]] = {}


def private_key(algorithm: str, n: int = 0) -> Any:
    """The n-th test key of an algorithm, made once per run (RSA keys take a while)."""
    made = _MADE.setdefault(algorithm, [])
    while len(made) <= n:
        made.append(gateway_keys.new_private_key(algorithm))
    return made[n]


ATTACKER = 99  # the index of a key that no gateway is configured with


@dataclass(frozen=True)
class Key:
    kid: str
    algorithm: str
    private: Any
    path: Path

    @property
    def public(self) -> Any:
        return self.private.public_key()

    def entry(self) -> dict[str, Any]:
        return {"kid": self.kid, "algorithm": self.algorithm, "key_file": str(self.path)}

    def public_entry(self) -> dict[str, Any]:
        """This key in the config as its public half only (verifies, cannot sign)."""
        path = self.path.with_suffix(".pub.pem")
        if not path.exists():
            path.write_bytes(self.public.public_bytes(serialization.Encoding.PEM,
                                                      serialization.PublicFormat.SubjectPublicKeyInfo))
        return {"kid": self.kid, "algorithm": self.algorithm, "key_file": str(path)}


def key_file(folder: Path, algorithm: str, kid: str, n: int = 0) -> Key:
    private = private_key(algorithm, n)
    path = folder / f"{kid}.pem"
    gateway_keys.write_new(path, gateway_keys.pem(private))
    return Key(kid, algorithm, private, path)


def hs_entry(kid: str, secret: str = "${TEST_GATEWAY_SECRET}") -> dict[str, Any]:
    return {"kid": kid, "algorithm": "HS256", "secret": secret}


def with_keys(*entries: dict[str, Any],
              routes: tuple[dict[str, Any], ...] = ()) -> Callable[[dict[str, Any]], None]:
    def change(raw: dict[str, Any]) -> None:
        raw["tokens"].update(issuer=ISS, audience=AUD, keys=list(entries))
        raw["routes"][-1:-1] = list(routes)

    return change


@pytest.fixture
def k1(tmp_path: Path) -> Key:
    return key_file(tmp_path, "ES256", "k1")


@pytest.fixture
async def es(gateway_factory: GatewayFactory, k1: Key) -> Gateway:
    """The catalogue's fixture: one ES256 key, k1."""
    return await gateway_factory(with_keys(k1.entry()))


# --- tokens by hand -------------------------------------------------------------------------


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _json(part: Any) -> bytes:
    if isinstance(part, bytes):
        return part
    if isinstance(part, str):
        return part.encode()
    return json.dumps(part).encode()


Signer = Callable[[bytes], bytes]


def signer(algorithm: str, key: Any) -> Signer:
    """A signature over the signing input as the JWS algorithm makes it (RFC 7518)."""
    if algorithm == "ES256":
        def es256(data: bytes) -> bytes:
            r, s = decode_dss_signature(key.sign(data, ec.ECDSA(hashes.SHA256())))
            return r.to_bytes(32, "big") + s.to_bytes(32, "big")
        return es256
    if algorithm in ("EdDSA", "Ed25519"):
        return lambda data: bytes(key.sign(data))
    if algorithm in ("RS256", "RS384", "RS512"):
        digest = {"RS256": hashes.SHA256, "RS384": hashes.SHA384, "RS512": hashes.SHA512}[algorithm]()
        return lambda data: bytes(key.sign(data, padding.PKCS1v15(), digest))
    if algorithm == "PS256":
        return lambda data: bytes(key.sign(data, padding.PSS(padding.MGF1(hashes.SHA256()), 32), hashes.SHA256()))
    if algorithm in ("HS256", "HS384", "HS512"):
        mac = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}[algorithm]
        return lambda data: hmac.new(key, data, mac).digest()
    raise AssertionError(algorithm)


def forge(header: Any, payload: Any, sign: Signer | None) -> str:
    """``header.payload.signature``; no signature part content when ``sign`` is None."""
    signing_input = f"{b64(_json(header))}.{b64(_json(payload))}"
    return f"{signing_input}.{b64(sign(signing_input.encode())) if sign else ''}"


def claims(**changes: Any) -> dict[str, Any]:
    """bob, admin, valid for ten minutes; a change to ``...`` removes the claim."""
    now = int(time.time())
    base = {"iss": ISS, "aud": AUD, "sub": "bob", "iat": now, "exp": now + 600, "jti": "j1",
            "sid": "s1", "roles": ["admin"]}
    base.update(changes)
    return {k: v for k, v in base.items() if v is not ...}


def header(key: Key, **changes: Any) -> dict[str, Any]:
    base = {"alg": key.algorithm, "typ": "at+jwt", "kid": key.kid, **changes}
    return {k: v for k, v in base.items() if v is not ...}


def signed(key: Key, payload: Any = None, **header_changes: Any) -> str:
    """A token signed with ``key``'s private key, as the gateway would sign it."""
    return forge(header(key, **header_changes), claims() if payload is None else payload,
                 signer(key.algorithm, key.private))


def hs_with(secret: bytes, payload: Any = None, alg: str = "HS256", **header_changes: Any) -> str:
    """An HMAC token over ``secret``: the algorithm-confusion forgery."""
    base = {"alg": alg, "typ": "at+jwt", "kid": "k1", **header_changes}
    return forge({k: v for k, v in base.items() if v is not ...}, claims() if payload is None else payload,
                 signer(alg, secret))


async def refused(gw: Gateway, upstream: Upstream, token: str, path: str = "/admin/x") -> None:
    async with gw.http.get(f"{gw.url}{path}", headers={"Authorization": f"Bearer {token}"}) as resp:
        body = await resp.read()
        assert resp.status == 401, body
        assert resp.headers["WWW-Authenticate"] == CHALLENGE
        assert json.loads(body) == GENERIC
    assert upstream.seen == []


async def admitted(gw: Gateway, upstream: Upstream, token: str, path: str = "/admin/x") -> int:
    async with gw.http.get(f"{gw.url}{path}", headers={"Authorization": f"Bearer {token}"}) as resp:
        return resp.status


async def jwks_body(gw: Gateway) -> bytes:
    async with gw.http.get(f"{gw.url}{JWKS}") as resp:
        assert resp.status == 200
        return await resp.read()


# --- signing and verifying with each algorithm ----------------------------------------------


@pytest.mark.parametrize("algorithm", ALGORITHMS)
async def test_the_first_key_signs_with_its_algorithm(gateway_factory: GatewayFactory, upstream: Upstream,
                                                      tmp_path: Path, algorithm: str) -> None:
    key = key_file(tmp_path, algorithm, "k1")
    gw = await gateway_factory(with_keys(key.entry()))
    token = await gw.token("alice")
    assert pyjwt.get_unverified_header(token) == {"alg": algorithm, "kid": "k1", "typ": "at+jwt"}
    verified = pyjwt.decode(token, key.public, algorithms=[algorithm], audience=AUD, issuer=ISS)
    assert verified["sub"] == "alice" and verified["roles"] == ["user"]
    async with gw.http.get(f"{gw.url}/profile", headers={"Authorization": f"Bearer {token}"}) as resp:
        assert resp.status == 200
    assert upstream.seen[-1].header("X-Auth-User") == ["alice"]


@pytest.mark.parametrize("algorithm", ALGORITHMS)
async def test_a_token_signed_by_hand_with_the_configured_key_passes(
        gateway_factory: GatewayFactory, upstream: Upstream, tmp_path: Path, algorithm: str) -> None:
    # The control for every refusal below: the hand-made tokens are right when they should be.
    key = key_file(tmp_path, algorithm, "k1")
    gw = await gateway_factory(with_keys(key.entry()))
    assert await admitted(gw, upstream, signed(key)) == 200
    assert upstream.seen[-1].header("X-Auth-User") == ["bob"]


def test_verify_passes_the_keys_own_algorithm_and_key_object(monkeypatch: pytest.MonkeyPatch,
                                                              tmp_path: Path) -> None:
    """SEC-26/27: the allowlist is a list of one from the key's config, and an asymmetric key
    is verified with its public key object, never with bytes an HMAC could take."""
    es256, ed = key_file(tmp_path, "ES256", "k1"), key_file(tmp_path, "EdDSA", "k2")
    cfg = config_module.Tokens(issuer=ISS, audience=AUD, keys=(
        config_module.SigningKey("k1", "ES256", private_key=es256.private, public_key=es256.public),
        config_module.SigningKey("k2", "EdDSA", public_key=ed.public),
        config_module.SigningKey("k3", "HS256", secret=SECRET.encode()),
    ))
    tokens = AccessTokens(cfg, time.time)
    calls: list[tuple[Any, Any]] = []
    real = pyjwt.decode

    def spy(token: str, key: Any, algorithms: Any, **kwargs: Any) -> Any:
        calls.append((key, algorithms))
        return real(token, key, algorithms=algorithms, **kwargs)

    monkeypatch.setattr(tokens_module.jwt, "decode", spy)
    tokens.verify(tokens.issue("alice", ("user",), "s1")[0])
    tokens.verify(signed(ed))
    tokens.verify(hs_with(SECRET.encode(), kid="k3"))
    assert [type(algs) for _, algs in calls] == [list, list, list]
    assert [algs for _, algs in calls] == [["ES256"], ["EdDSA"], ["HS256"]]
    assert isinstance(calls[0][0], ec.EllipticCurvePublicKey)
    assert isinstance(calls[1][0], ed25519.Ed25519PublicKey)
    assert calls[2][0] == SECRET.encode()
    with pytest.raises(InvalidToken):  # HS256 under the ES256 key's kid never reaches the library
        tokens.verify(hs_with(SECRET.encode(), kid="k1"))
    assert len(calls) == 3


def test_a_public_key_alone_cannot_sign() -> None:
    public = private_key("ES256").public_key()
    cfg = config_module.Tokens(issuer=ISS, audience=AUD,
                               keys=(config_module.SigningKey("k1", "ES256", public_key=public),))
    with pytest.raises(ValueError, match="public key only"):
        AccessTokens(cfg, time.time)


# --- SEC-26: alg none, and an algorithm the token chooses -----------------------------------

NONE_VARIANTS = [
    (alg, typ, kid, tail)
    for alg in ("none", "None", "NONE", "nOnE")
    for typ, kid in (("JWT", ...), ("at+jwt", "k1"))
    for tail in ("empty signature", "no signature part")
]


@pytest.mark.parametrize(("alg", "typ", "kid", "tail"), NONE_VARIANTS)
async def test_sec26_alg_none(es: Gateway, upstream: Upstream, alg: str, typ: str, kid: Any, tail: str) -> None:
    head = {"alg": alg, "typ": typ} if kid is ... else {"alg": alg, "typ": typ, "kid": kid}
    token = forge(head, claims(), None)
    await refused(es, upstream, token if tail == "empty signature" else token[:-1])


@pytest.mark.parametrize(("algorithm", "claimed"), [
    ("ES256", "ES384"), ("ES256", "ES256K"), ("ES256", "ES512"),
    ("RS256", "PS256"), ("RS256", "RS384"), ("RS256", "RS512"),
    ("EdDSA", "Ed25519"), ("EdDSA", "Ed448"),
])
async def test_sec26_a_signature_by_the_real_key_under_another_algorithm_name(
        gateway_factory: GatewayFactory, upstream: Upstream, tmp_path: Path, algorithm: str, claimed: str) -> None:
    """Signed by the configured private key itself, where the claimed algorithm allows it:
    only the algorithm pinned to the kid verifies, whatever the header says."""
    key = key_file(tmp_path, algorithm, "k1")
    gw = await gateway_factory(with_keys(key.entry()))
    how = claimed if claimed in ("PS256", "RS384", "RS512", "Ed25519") else algorithm
    token = forge(header(key, alg=claimed), claims(), signer(how, key.private))
    await refused(gw, upstream, token)


# --- SEC-27: a public key used as an HMAC secret --------------------------------------------


def public_encodings(public: Any, jwks: bytes, kid: str) -> dict[str, bytes]:
    """Every form of the public key an attacker can get hold of: the PEM, its DER (SPKI),
    its OpenSSH line, and the JWK from the JWKS endpoint, each as bytes."""
    pem = public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    der = public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    ssh = public.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    jwk = next(k for k in json.loads(jwks)["keys"] if k["kid"] == kid)
    out = {
        "PEM": pem,
        "PEM without its final newline": pem.rstrip(b"\n"),
        "PEM with CRLF line ends": pem.replace(b"\n", b"\r\n"),
        "DER (SPKI)": der,
        "OpenSSH": ssh,
        "OpenSSH with a comment and newline": ssh + b" gateway@host\n",
        "JWK as served (exact bytes)": json.dumps(jwk, sort_keys=True, separators=(",", ":")).encode(),
        "JWK, json.dumps": json.dumps(jwk).encode(),
        "JWK, pretty": json.dumps(jwk, indent=2).encode(),
        "the JWKS document as served": jwks,
    }
    if isinstance(public, rsa.RSAPublicKey):
        out["PKCS#1 PEM"] = public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.PKCS1)
        out["PKCS#1 DER"] = public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.PKCS1)
    if isinstance(public, (ec.EllipticCurvePublicKey, ed25519.Ed25519PublicKey)):
        raw_format = (serialization.PublicFormat.UncompressedPoint if isinstance(public, ec.EllipticCurvePublicKey)
                      else serialization.PublicFormat.Raw)
        out["raw public bytes"] = public.public_bytes(
            serialization.Encoding.X962 if isinstance(public, ec.EllipticCurvePublicKey)
            else serialization.Encoding.Raw, raw_format)
    return out


ENCODINGS = ["PEM", "PEM without its final newline", "PEM with CRLF line ends", "DER (SPKI)", "OpenSSH",
             "OpenSSH with a comment and newline", "JWK as served (exact bytes)", "JWK, json.dumps",
             "JWK, pretty", "the JWKS document as served", "raw public bytes"]
CONFUSION = [(a, e) for a in ALGORITHMS for e in ENCODINGS if not (a == "RS256" and e == "raw public bytes")] \
    + [("RS256", "PKCS#1 PEM"), ("RS256", "PKCS#1 DER")]


@pytest.mark.parametrize(("algorithm", "encoding"), CONFUSION)
async def test_sec27_public_key_as_hmac_secret(gateway_factory: GatewayFactory, upstream: Upstream,
                                               tmp_path: Path, algorithm: str, encoding: str) -> None:
    key = key_file(tmp_path, algorithm, "k1")
    gw = await gateway_factory(with_keys(key.entry()))
    secret = public_encodings(key.public, await jwks_body(gw), "k1")[encoding]
    for alg in ("HS256", "HS384", "HS512"):
        for typ in ("at+jwt", "JWT"):
            await refused(gw, upstream, hs_with(secret, alg=alg, typ=typ))
    await refused(gw, upstream, hs_with(secret, kid=...))  # and with no kid at all


async def test_sec27_an_hs_key_and_an_es_key_never_share_an_allowlist(
        gateway_factory: GatewayFactory, upstream: Upstream, k1: Key) -> None:
    gw = await gateway_factory(with_keys(k1.entry(), hs_entry("k2")))
    await refused(gw, upstream, hs_with(SECRET.encode(), kid="k1"))  # HS256 under the ES256 kid
    await refused(gw, upstream, signed(k1, kid="k2"))  # ES256 under the HS256 kid
    await refused(gw, upstream, signed(k1, kid="k2", alg="HS256"))
    pem = k1.public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    await refused(gw, upstream, hs_with(pem, kid="k2"))  # the ES public key as the HS key's secret
    # the controls: each key verifies what it signed under its own kid
    assert await admitted(gw, upstream, hs_with(SECRET.encode(), kid="k2")) == 200
    assert await admitted(gw, upstream, signed(k1)) == 200


# --- SEC-29: key material named by the token ------------------------------------------------


@dataclass
class Listener:
    url: str
    connections: list[bytes] = field(default_factory=list)


@pytest.fixture
async def listener() -> AsyncIterator[Listener]:
    """A TCP listener standing in for evil.example: it records any connection at all."""
    state = Listener(url="")

    async def accepted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        state.connections.append(b"")
        try:
            state.connections[-1] = await asyncio.wait_for(reader.read(1024), 1)
        except (asyncio.TimeoutError, ConnectionError):
            pass
        writer.close()

    server = await asyncio.start_server(accepted, "127.0.0.1", 0)
    state.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    yield state
    server.close()
    await server.wait_closed()


def attacker_jwk() -> dict[str, Any]:
    jwk: dict[str, Any] = pyjwt.algorithms.ECAlgorithm.to_jwk(private_key("ES256", ATTACKER).public_key(),
                                                              as_dict=True)
    return jwk


def self_signed_certificate(private: Any) -> str:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "evil.example")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(private.public_key())
            .serial_number(1).not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1)).sign(private, hashes.SHA256()))
    return base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()


SEC29 = ["jwk, no kid", "jwk with kid k1", "jwk with an unknown kid", "jku", "jku signed by the real key",
         "jku to Redis", "x5u", "x5c", "x5c, no kid", "x5t#S256"]


@pytest.mark.parametrize("case", SEC29)
async def test_sec29_key_material_in_the_header(es: Gateway, upstream: Upstream, k1: Key, listener: Listener,
                                                case: str) -> None:
    attacker = private_key("ES256", ATTACKER)
    evil = signer("ES256", attacker)
    base = {"alg": "ES256", "typ": "at+jwt"}
    cert = self_signed_certificate(attacker)
    token = {
        "jwk, no kid": lambda: forge({**base, "jwk": attacker_jwk()}, claims(), evil),
        "jwk with kid k1": lambda: forge({**base, "kid": "k1", "jwk": attacker_jwk()}, claims(), evil),
        "jwk with an unknown kid": lambda: forge({**base, "kid": "evil", "jwk": {**attacker_jwk(), "kid": "evil"}},
                                                 claims(), evil),
        "jku": lambda: forge({**base, "kid": "k1", "jku": f"{listener.url}/jwks.json"}, claims(), evil),
        "jku signed by the real key": lambda: signed(k1, jku=f"{listener.url}/jwks.json"),
        "jku to Redis": lambda: forge({**base, "kid": "k1", "jku": "http://127.0.0.1:6379/"}, claims(), evil),
        "x5u": lambda: forge({**base, "kid": "k1", "x5u": f"{listener.url}/c.pem"}, claims(), evil),
        "x5c": lambda: forge({**base, "kid": "k1", "x5c": [cert]}, claims(), evil),
        "x5c, no kid": lambda: forge({**base, "x5c": [cert]}, claims(), evil),
        "x5t#S256": lambda: forge({**base, "kid": "evil", "x5u": f"{listener.url}/c.pem",
                                   "x5t#S256": b64(hashlib.sha256(b"x").digest())}, claims(), evil),
    }[case]()
    await refused(es, upstream, token)
    await asyncio.sleep(0.2)  # anything the gateway might have started on the side
    assert listener.connections == []  # zero outbound requests


# --- SEC-30: kid injection ------------------------------------------------------------------

KIDS: dict[str, Any] = {
    "path traversal": "../../../../dev/null",
    "SQL": "x' UNION SELECT 'k'--",
    "/proc/self/environ": "/proc/self/environ",
    "NUL suffix": "k1\u0000",
    "trailing space": "k1 ",
    "other case": "K1",
    "number": 123,
    "empty": "",
    "null": None,
    "list": ["k1"],
    "object": {"k1": 1},
    "5 KB": "k" * 5 * 1024,  # over the gateway's token limit, under the server's header limit
}


@pytest.mark.parametrize("name", KIDS)
async def test_sec30_kid_injection(es: Gateway, upstream: Upstream, k1: Key, name: str) -> None:
    kid = KIDS[name]
    await refused(es, upstream, signed(k1, kid=kid))  # signed by the real key: only the kid is off
    await refused(es, upstream, hs_with(b"", kid=kid))  # an HMAC over an empty key, as /dev/null gives
    await refused(es, upstream, hs_with(b"\x00" * 32, kid=kid))


@pytest.mark.parametrize("where", ["kid", "sub"])
async def test_sec30_sec34_a_10_kb_field_is_refused_before_it_is_read(es: Gateway, upstream: Upstream, k1: Key,
                                                                      where: str) -> None:
    """A 10 KB kid or sub makes an Authorization header beyond the HTTP parser's 8 KiB field
    limit: 400 before any token is read (not the catalogue's 401, which needs the token to
    reach the verifier), never forwarded."""
    token = signed(k1, kid="k" * 10 * 1024) if where == "kid" else signed(k1, claims(sub="b" * 10 * 1024))
    async with es.http.get(f"{es.url}/admin/x", headers={"Authorization": f"Bearer {token}"}) as resp:
        assert resp.status == 400
    async with es.http.get(f"{es.url}/admin/x", headers={"Cookie": f"gw_access={token}"}) as resp:
        assert resp.status == 400
    assert upstream.seen == []


async def test_sec39_the_parsers_400_does_not_echo_the_token(es: Gateway, k1: Key) -> None:
    token = signed(k1, claims(sub="b" * 10 * 1024))
    async with es.http.get(f"{es.url}/admin/x", headers={"Authorization": f"Bearer {token}"}) as resp:
        body = await resp.text()
    assert resp.status == 400 and token[:40] not in body and "Bearer" not in body
    assert json.loads(body) == {"error": "invalid_request", "error_description": "Bad Request"}


async def test_sec30_no_kid_with_two_keys_configured(gateway_factory: GatewayFactory, upstream: Upstream,
                                                     tmp_path: Path) -> None:
    one, two = key_file(tmp_path, "ES256", "k1"), key_file(tmp_path, "ES256", "k2", 1)
    gw = await gateway_factory(with_keys(one.entry(), two.entry()))
    await refused(gw, upstream, signed(one, kid=...))
    await refused(gw, upstream, signed(two, kid=...))
    await refused(gw, upstream, signed(two, kid="k1"))  # one key's signature under another's kid
    assert await admitted(gw, upstream, signed(one)) == 200
    assert await admitted(gw, upstream, signed(two)) == 200


async def test_sec30_no_kid_with_one_key_configured(es: Gateway, upstream: Upstream, k1: Key) -> None:
    # The gateway always names its key; a token that does not was not made by it.
    await refused(es, upstream, signed(k1, kid=...))


# --- SEC-32: issuer and audience compared exactly -------------------------------------------

BAD_ISSUERS = ["https", "app.example.com", "https://app.example.com/", "https://app.example.com.evil.example",
               "HTTPS://APP.EXAMPLE.COM", ["https://app.example.com"], {"https://app.example.com": 1}, 7, None, ...]
BAD_AUDIENCES = [..., "appx", "xapp", "ap", "APP", "", ["other"], [], {"app": 1}, 7, None, [["app"]], ["app", 7]]


@pytest.mark.parametrize("iss", BAD_ISSUERS, ids=repr)
async def test_sec32_issuer(es: Gateway, upstream: Upstream, k1: Key, iss: Any) -> None:
    await refused(es, upstream, signed(k1, claims(iss=iss)))


@pytest.mark.parametrize("aud", BAD_AUDIENCES, ids=repr)
async def test_sec32_audience(es: Gateway, upstream: Upstream, k1: Key, aud: Any) -> None:
    await refused(es, upstream, signed(k1, claims(aud=aud)))


@pytest.mark.parametrize("aud", ["app", ["other", "app"], ["app"]], ids=repr)
async def test_sec32_audience_that_is_ours(es: Gateway, upstream: Upstream, k1: Key, aud: Any) -> None:
    assert await admitted(es, upstream, signed(k1, claims(aud=aud))) == 200


# --- SEC-33: time claims --------------------------------------------------------------------


def _payload_text(**raw: str) -> bytes:
    """claims() as JSON text, with some values replaced by raw JSON text (NaN, Infinity)."""
    text = json.dumps(claims(**{k: 0 for k in raw}))
    for name, value in raw.items():
        text = text.replace(f'"{name}": 0', f'"{name}": {value}')
    return text.encode()


NOW = int(time.time())
BAD_TIMES: dict[str, Callable[[], Any]] = {
    "exp a string": lambda: claims(exp=str(int(time.time()) + 600)),
    "exp 9999999999 as a string": lambda: claims(exp="9999999999"),
    "exp null": lambda: claims(exp=None),
    "exp true": lambda: claims(exp=True),
    "exp [1]": lambda: claims(exp=[1]),
    "exp 1e308": lambda: claims(exp=1e308),
    "exp NaN": lambda: _payload_text(exp="NaN"),
    "exp Infinity": lambda: _payload_text(exp="Infinity"),
    "exp -Infinity": lambda: _payload_text(exp="-Infinity"),
    "exp a 400-digit integer": lambda: _payload_text(exp="1" + "0" * 400),
    "exp missing": lambda: claims(exp=...),
    "exp in the past": lambda: claims(iat=int(time.time()) - 1000, exp=int(time.time()) - 60),
    "exp in the year 3000": lambda: claims(exp=32503680000),
    "exp far beyond access_ttl": lambda: claims(exp=int(time.time()) + 86400),
    "nbf an hour ahead": lambda: claims(nbf=int(time.time()) + 3600),
    "nbf a string": lambda: claims(nbf="0"),
    "iat an hour ahead": lambda: claims(iat=int(time.time()) + 3600, exp=int(time.time()) + 3900),
    "iat a string": lambda: claims(iat=str(int(time.time()))),
    "iat true": lambda: claims(iat=True),
}


@pytest.mark.parametrize("name", BAD_TIMES)
async def test_sec33_time_claims(es: Gateway, upstream: Upstream, k1: Key, name: str) -> None:
    await refused(es, upstream, signed(k1, BAD_TIMES[name]()))


@pytest.mark.parametrize("name", ["float exp and iat", "nbf within the leeway", "iat within the leeway"])
async def test_sec33_valid_times(es: Gateway, upstream: Upstream, k1: Key, name: str) -> None:
    now = time.time()
    payload = {"float exp and iat": claims(iat=now - 0.5, exp=now + 600.5),
               "nbf within the leeway": claims(nbf=int(now) + 2),
               "iat within the leeway": claims(iat=int(now) + 2, exp=int(now) + 600)}[name]
    assert await admitted(es, upstream, signed(k1, payload)) == 200


# --- SEC-34: claim types --------------------------------------------------------------------

BAD_CLAIMS: dict[str, dict[str, Any]] = {
    "sub a number": {"sub": 1234},
    "sub a list": {"sub": ["bob"]},
    "sub empty": {"sub": ""},
    "sub missing": {"sub": ...},
    "sub with CRLF and a header": {"sub": "bob\r\nX-Auth-Roles: admin"},
    "sub with NUL": {"sub": "bob\u0000"},
    "sub with a tab": {"sub": "bob\tadmin"},
    "sub 1 KB": {"sub": "b" * 1024},
    "sub 5 KB": {"sub": "b" * 5 * 1024},
    "sub not ASCII": {"sub": "b\u00f8b"},
    "roles a string": {"roles": "admin"},
    "roles a superstring": {"roles": "admin-lite"},
    "roles an object": {"roles": {"admin": True}},
    "roles nested": {"roles": [["admin"]]},
    "roles with a number": {"roles": ["admin", 1]},
    "roles with CRLF": {"roles": ["admin\r\nX-Auth-User: root"]},
    "roles with a space": {"roles": ["admin "]},
    "sid missing": {"sid": ...},
    "sid a number": {"sid": 5},
    "jti missing": {"jti": ...},
}


@pytest.mark.parametrize("name", BAD_CLAIMS)
async def test_sec34_claim_types(es: Gateway, upstream: Upstream, k1: Key, name: str) -> None:
    await refused(es, upstream, signed(k1, claims(**BAD_CLAIMS[name])))


@pytest.mark.parametrize("roles", [["Admin"], ["ADMIN"], ["admin-lite"], ["administrator"], []], ids=repr)
async def test_sec34_roles_compare_exactly(es: Gateway, upstream: Upstream, k1: Key, roles: list[str]) -> None:
    assert await admitted(es, upstream, signed(k1, claims(roles=roles))) == 403
    assert upstream.seen == []


# --- SEC-36: a token in several places ------------------------------------------------------


async def test_sec36_tokens_in_several_places(es: Gateway, upstream: Upstream, k1: Key) -> None:
    alice, bob = await es.token("alice"), await es.token("bob")
    forged = forge(header(k1), claims(), signer("ES256", private_key("ES256", ATTACKER)))

    async def get(*headers: tuple[str, str], params: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
        async with es.http.get(f"{es.url}/profile", headers=list(headers), params=params) as resp:
            return resp.status, await resp.json()

    # a forged Bearer beside a good cookie: the Bearer token, when sent, is the credential
    assert await get(("Authorization", f"Bearer {forged}"), ("Cookie", f"gw_access={alice}")) == (401, GENERIC)
    # the tokens of two users
    status, body = await get(("Authorization", f"Bearer {alice}"), ("Cookie", f"gw_access={bob}"))
    assert (status, body["error"]) == (401, "ambiguous_credentials")
    # two Authorization headers; two tokens in one
    status, body = await get(("Authorization", f"Bearer {alice}"), ("Authorization", f"Bearer {bob}"))
    assert status == 400
    assert await get(("Authorization", f"Bearer {alice}, Bearer {bob}"),) == (401, GENERIC)
    # the query string is never a token source
    status, body = await get(params={"access_token": bob})
    assert status == 401
    assert upstream.seen == []
    # with alice's Bearer token, bob's token in the query does not make her bob
    assert (await get(("Authorization", f"Bearer {alice}"), params={"access_token": bob}))[0] == 200
    assert upstream.seen[-1].header("X-Auth-User") == ["alice"]
    # a good Bearer beside a forged cookie: alice, and the unverified cookie is not forwarded
    assert (await get(("Authorization", f"Bearer {alice}"), ("Cookie", f"gw_access={forged}; theme=dark")))[0] == 200
    assert upstream.seen[-1].header("X-Auth-User") == ["alice"]
    assert upstream.seen[-1].header("Cookie") == ["theme=dark"]
    assert upstream.seen[-1].header("Authorization") == []
    # another scheme beside a valid cookie: the cookie decides, Authorization is not forwarded
    assert (await get(("Authorization", "Basic Ym9iOng="), ("Cookie", f"gw_access={alice}")))[0] == 200
    assert upstream.seen[-1].header("X-Auth-User") == ["alice"]
    assert upstream.seen[-1].header("Authorization") == []


# --- SEC-37: malformed structure ------------------------------------------------------------


def _es(header_part: Any, payload_part: Any, k1: Key) -> str:
    return forge(header_part, payload_part, signer("ES256", k1.private))


MALFORMED: dict[str, Callable[[Key], str]] = {
    "two parts": lambda k: "a.b",
    "two real parts": lambda k: signed(k).rsplit(".", 1)[0],
    "five parts (JWE form)": lambda k: "a.b.c.d.e",
    "JWE header, five parts": lambda k: f"{b64(json.dumps({'alg': 'dir', 'enc': 'A128GCM', 'kid': 'k1'}).encode())}"
                                        ".a.b.c.d",
    "four parts": lambda k: signed(k) + ".x",
    "5000 dots": lambda k: "." * 5000,
    "plus sign": lambda k: signed(k)[:10] + "+" + signed(k)[11:],
    "slash": lambda k: "a/b.c.d",
    "padding": lambda k: signed(k) + "=",
    "padded header": lambda k: signed(k).replace(".", "=.", 1),
    "spaces inside": lambda k: signed(k).replace(".", ". ", 1),
    "empty header": lambda k: "." + signed(k).split(".", 1)[1],
    "header {} (no alg)": lambda k: _es({}, claims(), k),
    "header without alg": lambda k: _es({"typ": "at+jwt", "kid": "k1"}, claims(), k),
    "header []": lambda k: _es([], claims(), k),
    "header \"x\"": lambda k: _es("\"x\"", claims(), k),
    "header null": lambda k: _es("null", claims(), k),
    "header not JSON": lambda k: _es("{alg: ES256}", claims(), k),
    "header not UTF-8": lambda k: _es(b'{"alg":"ES256","typ":"at+jwt","kid":"k1\xff"}', claims(), k),
    "payload []": lambda k: _es(header(k), [], k),
    "payload 1": lambda k: _es(header(k), 1, k),
    "payload a string": lambda k: _es(header(k), "\"bob\"", k),
    "payload not JSON": lambda k: _es(header(k), "sub=bob", k),
    "payload not UTF-8": lambda k: _es(header(k), json.dumps(claims()).encode().replace(b"bob", b"b\xffb"), k),
    "crit header": lambda k: signed(k, crit=["exp"]),
    "typ JWT": lambda k: signed(k, typ="JWT"),
    "typ missing": lambda k: signed(k, typ=...),
    "signature of another token": lambda k: signed(k).rsplit(".", 1)[0] + "." + signed(k, claims(sub="x")).rsplit(".", 1)[1],
    "signature truncated": lambda k: signed(k)[:-4],
    "signature DER-encoded": lambda k: _der_signed(k),
    "empty signature": lambda k: signed(k).rsplit(".", 1)[0] + ".",
}


def _der_signed(k: Key) -> str:
    signing_input = f"{b64(_json(header(k)))}.{b64(_json(claims()))}"
    der = k.private.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256()))
    return f"{signing_input}.{b64(der)}"


@pytest.mark.parametrize("name", MALFORMED)
async def test_sec37_malformed_tokens(es: Gateway, upstream: Upstream, k1: Key, name: str) -> None:
    await refused(es, upstream, MALFORMED[name](k1))


async def test_sec37_authorization_header_forms(es: Gateway, upstream: Upstream) -> None:
    token = await es.token("alice")
    for value in ("Bearer ", "Bearer", f"Bearer  {token}", f"Bearer\t{token}", f"Token {token}"):
        async with es.http.get(f"{es.url}/profile", headers={"Authorization": value}) as resp:
            assert resp.status == 401, value
    assert upstream.seen == []
    for value in (f"bearer {token}", f"BEARER {token}"):  # the scheme is case-insensitive (RFC 7235)
        async with es.http.get(f"{es.url}/profile", headers={"Authorization": value}) as resp:
            assert resp.status == 200, value
    async with es.http.get(f"{es.url}/profile", headers={"Authorization": "Bearer " + "." * 100_000}) as resp:
        assert resp.status == 400  # beyond the parser's header limit
    assert len(upstream.seen) == 2


# --- SEC-39: refusals say nothing -----------------------------------------------------------


SEC39: dict[str, tuple[Callable[[Key], str], str]] = {
    "bad signature": (lambda k: forge(header(k), claims(), signer("ES256", private_key("ES256", ATTACKER))),
                      "bad_signature"),
    "unknown kid": (lambda k: signed(k, kid="attacker-kid-0x5eed"), "unknown_kid"),
    "expired": (lambda k: signed(k, claims(iat=int(time.time()) - 1000, exp=int(time.time()) - 60)), "expired"),
    "wrong audience": (lambda k: signed(k, claims(aud="other-audience-0x5eed")), "wrong_audience"),
    "malformed base64": (lambda k: signed(k).replace(".", "!.", 1), "malformed"),
    "HMAC with the public key": (lambda k: hs_with(k.public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)), "bad_header"),
}


@pytest.mark.parametrize("name", SEC39)
async def test_sec39_refusals_never_echo_detail(es: Gateway, upstream: Upstream, k1: Key, name: str,
                                                caplog: pytest.LogCaptureFixture) -> None:
    make, reason = SEC39[name]
    token = make(k1)
    caplog.set_level(logging.DEBUG)
    async with es.http.get(f"{es.url}/admin/x", headers={"Authorization": f"Bearer {token}"}) as resp:
        assert resp.status == 401
        body = await resp.text()
        headers = list(resp.headers.items())
    assert json.loads(body) == GENERIC
    assert dict(headers)["WWW-Authenticate"] == CHALLENGE
    said = body + json.dumps(headers)
    echoes = [part for part in token.split(".") if len(part) > 8] + ["0x5eed"]
    for part in [*echoes, "-----BEGIN", "kid", "Signature", "signature", "xpired", "audience", "decode",
                 "Invalid", "padding", "base64"]:
        assert part not in said, part
    logged = "\n".join(json.dumps({**record.__dict__, "msg": record.getMessage()}, default=str)
                       for record in caplog.records)
    for part in echoes:
        assert part not in logged, part
    access = [r for r in caplog.records if r.name == "gateway.access"]
    assert access and access[-1].fields["error"] == reason  # type: ignore[attr-defined]
    assert upstream.seen == []


# --- SEC-41: weak HMAC secrets at gateway check and gateway run -----------------------------

CHECK_CONFIG = """\
upstreams: {app: {url: "http://127.0.0.1:9"}}
store: sqlite:gateway.db
tokens:
  issuer: https://app.example.com
  audience: app
  keys:
    - {kid: k1, algorithm: HS256, secret: "${SEC41_SECRET}"}
cookies: {secure: false}
routes:
  - {path: /**, access: authenticated}
"""


def run_gateway(*args: str, cwd: Path, env: dict[str, str] | None = None,
                umask: int | None = None) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("GATEWAY_", "SEC41_"))}
    environment.update(env or {})
    proc = subprocess.run([sys.executable, "-m", "gateway", *args], cwd=cwd, env=environment,
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
                          preexec_fn=(lambda: os.umask(umask)) if umask is not None else None)
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    return proc


WEAK = {"secret": "secret", "changeme": "changeme", "16 bytes": secrets.token_hex(8), "31 bytes": "Q" + secrets.token_hex(15),
        "unset variable": None, "empty": ""}


@pytest.mark.parametrize("name", WEAK)
def test_sec41_weak_secrets_stop_check_and_run(tmp_path: Path, name: str) -> None:
    (tmp_path / "gateway.yaml").write_text(CHECK_CONFIG)
    value = WEAK[name]
    env = {} if value is None else {"SEC41_SECRET": value}
    check = run_gateway("check", "-c", "gateway.yaml", cwd=tmp_path, env=env)
    lines = [line for line in check.stdout.splitlines() if line.strip()]
    assert check.returncode == 1 and len(lines) == 1, check
    assert "tokens.keys[0].secret" in lines[0]
    run = run_gateway("run", "-c", "gateway.yaml", "--port", "0", cwd=tmp_path, env=env)
    errors = [line for line in run.stderr.splitlines() if line.strip()]
    assert run.returncode == 1 and len(errors) == 1 and run.stdout == "", run
    assert errors[0].startswith("gateway: error: tokens.keys[0].secret"), errors
    if value and name.endswith("bytes"):
        assert value not in check.stdout + run.stderr  # a problem never echoes the secret


def test_sec41_a_strong_secret_passes_check(tmp_path: Path) -> None:
    (tmp_path / "gateway.yaml").write_text(CHECK_CONFIG)
    check = run_gateway("check", "-c", "gateway.yaml", cwd=tmp_path, env={"SEC41_SECRET": secrets.token_urlsafe(48)})
    assert check.returncode == 0, check


def test_sec41_no_secret_written_in_the_docs_would_be_accepted(tmp_path: Path) -> None:
    """A secret copied from the README, the docs or an example config: either they only name
    a variable, or the gateway refuses the value they show."""
    files = [ROOT / "README.md", *(ROOT / "docs").glob("*.md"), *(ROOT / "config").glob("*.yaml"),
             *(ROOT / "examples").rglob("*.yaml"), *(ROOT / "examples").rglob("*.md")]
    shown = {value for path in files if path.is_file()
             for value in re.findall(r"""secret:\s*["']?([^"'\s,}]+)""", path.read_text())}
    literal = {value for value in shown if not value.startswith("${")}
    (tmp_path / "gateway.yaml").write_text(CHECK_CONFIG)
    for value in literal:
        with pytest.raises(config_module.ConfigError):
            config_module.load(tmp_path / "gateway.yaml", env={"SEC41_SECRET": value})
    assert shown  # the scan found the docs' secrets at all


# --- GET /.well-known/jwks.json -------------------------------------------------------------


async def test_jwks_with_only_hs256_keys_is_empty(gw: Gateway, upstream: Upstream) -> None:
    async with gw.http.get(f"{gw.url}{JWKS}") as resp:
        assert resp.status == 200
        assert resp.content_type == "application/json"
        assert resp.headers["Cache-Control"] == "public, max-age=300"
        assert re.fullmatch(r'"[0-9a-f]{32}"', resp.headers["ETag"])
        body = await resp.read()
    assert json.loads(body) == {"keys": []}
    assert SECRET.encode() not in body
    assert upstream.seen == []


def _unb64(text: str) -> bytes:
    assert re.fullmatch(r"[A-Za-z0-9_-]+", text), text  # base64url without padding
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


async def test_jwks_lists_every_asymmetric_key_and_no_secret(gateway_factory: GatewayFactory, tmp_path: Path,
                                                             upstream: Upstream) -> None:
    es256, ed, rs = (key_file(tmp_path, "ES256", "k1"), key_file(tmp_path, "EdDSA", "k3"),
                     key_file(tmp_path, "RS256", "k4"))
    gw = await gateway_factory(with_keys(es256.entry(), hs_entry("k2"), ed.entry(), rs.public_entry()))
    body = await jwks_body(gw)
    assert SECRET.encode() not in body
    keys = json.loads(body)["keys"]
    assert [k["kid"] for k in keys] == ["k1", "k3", "k4"]  # config order; never the HS256 key
    ec_jwk, okp_jwk, rsa_jwk = keys
    assert ec_jwk.keys() == {"kty", "crv", "x", "y", "kid", "alg", "use"}
    assert okp_jwk.keys() == {"kty", "crv", "x", "kid", "alg", "use"}
    assert rsa_jwk.keys() == {"kty", "n", "e", "kid", "alg", "use"}
    assert (ec_jwk["kty"], ec_jwk["crv"], ec_jwk["alg"], ec_jwk["use"]) == ("EC", "P-256", "ES256", "sig")
    assert (okp_jwk["kty"], okp_jwk["crv"], okp_jwk["alg"], okp_jwk["use"]) == ("OKP", "Ed25519", "EdDSA", "sig")
    assert (rsa_jwk["kty"], rsa_jwk["alg"], rsa_jwk["use"]) == ("RSA", "RS256", "sig")
    numbers = es256.public.public_numbers()
    assert _unb64(ec_jwk["x"]) == numbers.x.to_bytes(32, "big")
    assert _unb64(ec_jwk["y"]) == numbers.y.to_bytes(32, "big")
    assert _unb64(okp_jwk["x"]) == ed.public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert int.from_bytes(_unb64(rsa_jwk["n"]), "big") == rs.public.public_numbers().n
    assert _unb64(rsa_jwk["e"]) == b"\x01\x00\x01"
    assert _unb64(rsa_jwk["n"])[0] != 0  # the shortest big-endian form
    assert upstream.seen == []


async def test_jwks_etag_and_conditional_requests(es: Gateway, upstream: Upstream) -> None:
    async with es.http.get(f"{es.url}{JWKS}") as resp:
        etag, body = resp.headers["ETag"], await resp.read()
    for value in (etag, f"W/{etag}", f'"other", {etag}', "*"):
        async with es.http.get(f"{es.url}{JWKS}", headers={"If-None-Match": value}) as resp:
            assert resp.status == 304, value
            assert resp.headers["ETag"] == etag and resp.headers["Cache-Control"] == "public, max-age=300"
            assert await resp.read() == b""
    for value in ('"other"', etag.strip('"'), 'W/"x"'):
        async with es.http.get(f"{es.url}{JWKS}", headers={"If-None-Match": value}) as resp:
            assert resp.status == 200 and await resp.read() == body, value
    async with es.http.head(f"{es.url}{JWKS}") as resp:
        assert resp.status == 200 and resp.headers["ETag"] == etag
    async with es.http.post(f"{es.url}{JWKS}") as resp:
        assert resp.status == 405
    async with es.http.get(f"{es.url}/.well-known/other.json") as resp:
        assert resp.status == 401  # not the gateway's: the routes decide (and want a token)
    assert upstream.seen == []


async def test_jwks_etag_follows_the_keys_not_the_process(gateway_factory: GatewayFactory, tmp_path: Path) -> None:
    one, two = key_file(tmp_path, "ES256", "k1"), key_file(tmp_path, "EdDSA", "k2")
    first = await gateway_factory(with_keys(one.entry()))
    again = await gateway_factory(with_keys(one.entry()))  # another replica, same keys
    other = await gateway_factory(with_keys(two.entry(), one.entry()))
    tags = []
    for gw in (first, again, other):
        async with gw.http.get(f"{gw.url}{JWKS}") as resp:
            tags.append(resp.headers["ETag"])
    assert tags[0] == tags[1] != tags[2]


@pytest.mark.parametrize("algorithm", ALGORITHMS)
async def test_an_issued_token_verifies_with_an_independent_library_from_the_jwks(
        gateway_factory: GatewayFactory, tmp_path: Path, algorithm: str) -> None:
    """joserfc, given nothing but the JWKS document fetched over HTTP, verifies the gateway's
    tokens; the other keys in the set (other algorithms) are there too."""
    first = key_file(tmp_path, algorithm, "signer")
    others = [key_file(tmp_path, a, f"other-{a.lower()}", 1) for a in ALGORITHMS if a != algorithm]
    gw = await gateway_factory(with_keys(first.entry(), *(k.entry() for k in others)))
    token = await gw.token("bob")
    async with aiohttp.ClientSession() as http, http.get(f"{gw.url}{JWKS}") as resp:
        document = await resp.json()
    keyset = KeySet.import_key_set(document)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # joserfc notes that RFC 9864 deprecates the name EdDSA
        verified = jose_jwt.decode(token, keyset, algorithms=[algorithm])
    assert verified.header["kid"] == "signer" and verified.header["alg"] == algorithm
    jose_jwt.JWTClaimsRegistry(iss={"essential": True, "value": ISS}, aud={"essential": True, "value": AUD},
                               exp={"essential": True}, sub={"essential": True, "value": "bob"}).validate(verified.claims)
    assert verified.claims["roles"] == ["admin"]
    head, payload, signature = token.split(".")
    tampered = f"{head}.{b64(json.dumps({**verified.claims, 'sub': 'mallory'}).encode())}.{signature}"
    with warnings.catch_warnings(), pytest.raises(BadSignatureError):
        warnings.simplefilter("ignore")
        jose_jwt.decode(tampered, keyset, algorithms=[algorithm])


# --- gateway keys generate ------------------------------------------------------------------

KEY_TYPES = {"EdDSA": ed25519.Ed25519PrivateKey, "ES256": ec.EllipticCurvePrivateKey,
             "RS256": rsa.RSAPrivateKey}


def snippet(stdout: str) -> dict[str, Any]:
    line = next(line for line in stdout.splitlines() if line.strip().startswith("- {"))
    entry = yaml.safe_load(line.strip())[0]
    assert isinstance(entry, dict) and entry.keys() == {"kid", "algorithm", "key_file"}
    return entry


@pytest.mark.parametrize("algorithm", ALGORITHMS)
async def test_keys_generate_writes_a_key_a_gateway_signs_with(
        gateway_factory: GatewayFactory, upstream: Upstream, tmp_path: Path, algorithm: str) -> None:
    conf = tmp_path / "conf"
    conf.mkdir()
    made = run_gateway("keys", "generate", "--algorithm", algorithm, "--out", "keys.pem", "-c", "gateway.yaml",
                       cwd=conf, umask=0)
    assert made.returncode == 0 and made.stderr == "", made
    path = conf / "keys.pem"
    assert str(path.name) in made.stdout
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # even under umask 0
    data = path.read_bytes()
    assert data.startswith(b"-----BEGIN PRIVATE KEY-----\n")  # PKCS#8, unencrypted
    private = serialization.load_pem_private_key(data, password=None)
    assert isinstance(private, KEY_TYPES[algorithm])
    if isinstance(private, ec.EllipticCurvePrivateKey):
        assert isinstance(private.curve, ec.SECP256R1)
    if isinstance(private, rsa.RSAPrivateKey):
        assert private.key_size >= 3072
    entry = snippet(made.stdout)
    assert entry["algorithm"] == algorithm and entry["key_file"] == "keys.pem"
    # the snippet, pasted into a config next to the key, loads
    text = CHECK_CONFIG.replace('- {kid: k1, algorithm: HS256, secret: "${SEC41_SECRET}"}',
                                made.stdout.splitlines()[-1].strip())
    (conf / "gateway.yaml").write_text(text)
    check = run_gateway("check", "-c", "gateway.yaml", cwd=conf)
    assert check.returncode == 0, check
    loaded = config_module.load(conf / "gateway.yaml")
    assert loaded.tokens.keys[0].kid == entry["kid"] and loaded.tokens.keys[0].algorithm == algorithm
    # and a gateway signs with it
    gw = await gateway_factory(with_keys({**entry, "key_file": str(path)}))
    token = await gw.token("alice")
    assert pyjwt.get_unverified_header(token)["kid"] == entry["kid"]
    assert pyjwt.decode(token, private.public_key(), algorithms=[algorithm], audience=AUD)["sub"] == "alice"


def test_keys_generate_default_name_and_kid(tmp_path: Path) -> None:
    made = run_gateway("keys", "generate", "--algorithm", "es256", cwd=tmp_path)
    assert made.returncode == 0, made
    entry = snippet(made.stdout)
    assert re.fullmatch(r"es256-\d{8}-[0-9a-f]{4}", entry["kid"]) and entry["algorithm"] == "ES256"
    assert entry["key_file"] == f"{entry['kid']}.pem"
    assert stat.S_IMODE((tmp_path / entry["key_file"]).stat().st_mode) == 0o600
    named = run_gateway("keys", "generate", "--algorithm", "EdDSA", "--kid", "2026-05", cwd=tmp_path)
    assert snippet(named.stdout)["kid"] == "2026-05" and (tmp_path / "2026-05.pem").is_file()


def test_keys_generate_outside_the_config_folder_prints_an_absolute_path(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    made = run_gateway("keys", "generate", "--algorithm", "ES256", "--out", str(tmp_path / "k.pem"),
                       "-c", str(tmp_path / "etc" / "gateway.yaml"), cwd=tmp_path)
    assert snippet(made.stdout)["key_file"] == str((tmp_path / "k.pem").resolve())


def test_keys_generate_never_overwrites(tmp_path: Path) -> None:
    (tmp_path / "k.pem").write_text("the key that signs today\n")
    os.symlink(tmp_path / "elsewhere.pem", tmp_path / "link.pem")  # dangling
    for out in ("k.pem", "link.pem"):
        made = run_gateway("keys", "generate", "--algorithm", "ES256", "--out", out, cwd=tmp_path)
        errors = [line for line in made.stderr.splitlines() if line.strip()]
        assert made.returncode == 1 and made.stdout == "" and len(errors) == 1, made
        assert errors[0].startswith("gateway: error: ") and "already exists" in errors[0]
    assert (tmp_path / "k.pem").read_text() == "the key that signs today\n"
    assert not (tmp_path / "elsewhere.pem").exists()


def test_keys_generate_refuses_a_bad_kid_or_algorithm(tmp_path: Path) -> None:
    made = run_gateway("keys", "generate", "--algorithm", "ES256", "--kid", "../k1", cwd=tmp_path)
    assert made.returncode == 1 and made.stderr.startswith("gateway: error: --kid"), made
    made = run_gateway("keys", "generate", "--algorithm", "HS256", cwd=tmp_path)
    assert made.returncode == 2 and "invalid choice" in made.stderr
    made = run_gateway("keys", "generate", "--algorithm", "ES256", "--out", "no/such/dir/k.pem", cwd=tmp_path)
    assert made.returncode == 1 and made.stderr.startswith("gateway: error: cannot create"), made
    assert list(tmp_path.iterdir()) == []


# --- forward_token --------------------------------------------------------------------------

FORWARD_ROUTES = ({"path": "/fwd/**", "access": "authenticated", "forward_token": True},
                  {"path": "/pub/**", "access": "public", "forward_token": True})


@pytest.fixture
async def fwd(gateway_factory: GatewayFactory, k1: Key) -> Gateway:
    return await gateway_factory(with_keys(k1.entry(), routes=FORWARD_ROUTES))


async def test_forward_token_sends_the_verified_token_upstream(fwd: Gateway, upstream: Upstream, k1: Key) -> None:
    token = await fwd.token("alice")
    async with fwd.http.get(f"{fwd.url}/fwd/x", headers={"Authorization": f"Bearer {token}"}) as resp:
        assert resp.status == 200
    assert upstream.seen[-1].header("Authorization") == [f"Bearer {token}"]
    assert upstream.seen[-1].header("X-Auth-User") == ["alice"]
    # the upstream can check it itself, against the gateway's JWKS
    keyset = KeySet.import_key_set(json.loads(await jwks_body(fwd)))
    forwarded = upstream.seen[-1].header("Authorization")[0].removeprefix("Bearer ")
    assert jose_jwt.decode(forwarded, keyset, algorithms=["ES256"]).claims["sub"] == "alice"


async def test_forward_token_from_the_cookie_replaces_any_client_authorization(
        fwd: Gateway, upstream: Upstream) -> None:
    token = await fwd.token("alice")
    async with fwd.http.get(f"{fwd.url}/fwd/x", headers={"Cookie": f"gw_access={token}; theme=dark"}) as resp:
        assert resp.status == 200
    assert upstream.seen[-1].header("Authorization") == [f"Bearer {token}"]
    assert upstream.seen[-1].header("Cookie") == ["theme=dark"]
    async with fwd.http.get(f"{fwd.url}/fwd/x", headers=[("Cookie", f"gw_access={token}"),
                                                         ("Authorization", "Basic Ym9iOng="),
                                                         ("X_Authorization", "Bearer forged")]) as resp:
        assert resp.status == 200
    seen = upstream.seen[-1]
    assert seen.header("Authorization") == [f"Bearer {token}"]  # the verified token, once
    assert [v for k, v in seen.headers if k.lower().replace("_", "-") == "authorization"] == [f"Bearer {token}"]


async def test_forward_token_after_an_edge_refresh_is_the_new_token(fwd: Gateway, upstream: Upstream) -> None:
    login = await fwd.login("alice")
    async with fwd.http.get(f"{fwd.url}/fwd/page", headers={
            "Cookie": f"gw_refresh={login['refresh_token']}", "Accept": "text/html"}) as resp:
        assert resp.status == 200
        renewed = resp.cookies["gw_access"].value
    assert renewed and renewed != login["access_token"]
    assert upstream.seen[-1].header("Authorization") == [f"Bearer {renewed}"]


async def test_without_forward_token_the_upstream_never_sees_a_token(fwd: Gateway, upstream: Upstream) -> None:
    token = await fwd.token("alice")
    async with fwd.http.get(f"{fwd.url}/profile", headers={"Authorization": f"Bearer {token}"}) as resp:
        assert resp.status == 200
    # a public route forwards no token, even one flagged forward_token: nothing was verified
    async with fwd.http.get(f"{fwd.url}/pub/x", headers={"Authorization": f"Bearer {token}"}) as resp:
        assert resp.status == 200
    async with fwd.http.get(f"{fwd.url}/pub/x", headers={"Authorization": "Bearer forged.token.value"}) as resp:
        assert resp.status == 200
    assert [s.header("Authorization") for s in upstream.seen] == [[], [], []]


async def test_forward_token_does_not_forward_a_refused_token(fwd: Gateway, upstream: Upstream, k1: Key) -> None:
    forged = forge(header(k1), claims(), signer("ES256", private_key("ES256", ATTACKER)))
    await refused(fwd, upstream, forged, "/fwd/x")


# --- rotation -------------------------------------------------------------------------------


async def _status(gw: Gateway, token: str) -> int:
    async with gw.http.get(f"{gw.url}/profile", headers={"Authorization": f"Bearer {token}"}) as resp:
        return resp.status


async def _refresh(gw: Gateway, refresh_token: str) -> dict[str, Any]:
    async with gw.http.post(f"{gw.url}/auth/refresh", headers={"Cookie": f"gw_refresh={refresh_token}"}) as resp:
        assert resp.status == 200, await resp.text()
        body: dict[str, Any] = await resp.json()
        body["refresh_token"] = resp.cookies["gw_refresh"].value
        return body


async def _kids(gw: Gateway) -> list[str]:
    return [k["kid"] for k in json.loads(await jwks_body(gw))["keys"]]


def _on_store(db: Path, *entries: dict[str, Any]) -> Callable[[dict[str, Any]], None]:
    keys = with_keys(*entries)

    def change(raw: dict[str, Any]) -> None:
        keys(raw)
        raw["store"] = f"sqlite:///{str(db).lstrip('/')}"

    return change


@pytest.mark.parametrize(("old_algorithm", "new_algorithm"), [("ES256", "EdDSA"), ("RS256", "ES256"),
                                                              ("HS256", "ES256"), ("ES256", "ES256")])
async def test_rotation_nobody_signs_out(gateway_factory: GatewayFactory, upstream: Upstream, tmp_path: Path,
                                         old_algorithm: str, new_algorithm: str) -> None:
    db = tmp_path / "shared.db"
    old = (hs_entry("old") if old_algorithm == "HS256"
           else key_file(tmp_path, old_algorithm, "old").entry())
    new_key = key_file(tmp_path, new_algorithm, "new", 1)
    new = new_key.entry()

    # 1. today: [old]
    g1 = await gateway_factory(_on_store(db, old))
    alice = await g1.login("alice")
    assert pyjwt.get_unverified_header(alice["access_token"])["kid"] == "old"

    # 2. the new key is published beside the old one, which still signs: [old, new]
    g2 = await gateway_factory(_on_store(db, old, new))
    assert await _status(g2, alice["access_token"]) == 200
    assert pyjwt.get_unverified_header(await g2.token("bob"))["kid"] == "old"
    assert await _kids(g2) == [k for k, a in (("old", old_algorithm), ("new", new_algorithm)) if a != "HS256"]

    # 3. the new key moves first: [new, old]. It signs; the old key's tokens still pass.
    g3 = await gateway_factory(_on_store(db, new, old))
    bob = await g3.login("bob")
    assert pyjwt.get_unverified_header(bob["access_token"])["kid"] == "new"
    assert await _status(g3, alice["access_token"]) == 200
    assert await _status(g2, bob["access_token"]) == 200  # a replica still on step 2 takes them
    assert await _status(g1, bob["access_token"]) == 401  # one that skipped step 2 would not
    renewed = await _refresh(g3, alice["refresh_token"])  # alice's session goes on, now under new
    assert pyjwt.get_unverified_header(renewed["access_token"])["kid"] == "new"

    # 4. after access_ttl + leeway, the old key goes: [new]
    g4 = await gateway_factory(_on_store(db, new))
    assert await _status(g4, alice["access_token"]) == 401  # signed by the removed key
    assert await _status(g4, renewed["access_token"]) == 200
    assert await _status(g4, bob["access_token"]) == 200
    again = await _refresh(g4, renewed["refresh_token"])  # and still nobody has to sign in
    assert await _status(g4, again["access_token"]) == 200
    assert await _kids(g4) == (["new"] if new_algorithm != "HS256" else [])
    assert upstream.seen and all(s.header("X-Auth-User") in (["alice"], ["bob"]) for s in upstream.seen)


async def test_rotation_with_the_old_key_kept_as_its_public_half(gateway_factory: GatewayFactory,
                                                                 tmp_path: Path) -> None:
    db = tmp_path / "shared.db"
    old, new = key_file(tmp_path, "ES256", "old"), key_file(tmp_path, "EdDSA", "new")
    g1 = await gateway_factory(_on_store(db, old.entry()))
    token = await g1.token("alice")
    g2 = await gateway_factory(_on_store(db, new.entry(), old.public_entry()))  # no private key left
    assert await _status(g2, token) == 200
    assert await _kids(g2) == ["new", "old"]


async def test_hs256_secrets_rotate_the_same_way(gateway_factory: GatewayFactory, tmp_path: Path) -> None:
    db, old_secret, new_secret = tmp_path / "shared.db", secrets.token_urlsafe(48), secrets.token_urlsafe(48)
    g1 = await gateway_factory(_on_store(db, hs_entry("old", old_secret)))
    alice = await g1.login("alice")
    g2 = await gateway_factory(_on_store(db, hs_entry("new", new_secret), hs_entry("old", old_secret)))
    assert await _status(g2, alice["access_token"]) == 200
    assert pyjwt.get_unverified_header(await g2.token("bob"))["kid"] == "new"
    g3 = await gateway_factory(_on_store(db, hs_entry("new", new_secret)))
    assert await _status(g3, alice["access_token"]) == 401
    assert await _status(g3, (await _refresh(g3, alice["refresh_token"]))["access_token"]) == 200
    assert await _kids(g3) == []
