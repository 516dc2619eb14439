"""Access tokens: what verifies, and every way a token is refused (401 invalid_token)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from typing import Any

import jwt
import pytest

import gateway.tokens
from gateway.config import SigningKey, Tokens
from gateway.errors import InvalidToken
from gateway.tokens import AccessTokens

from conftest import SECRET, FakeClock, Gateway, Upstream

ISS, AUD = "https://gateway.test", "app"


def claims(**changes: Any) -> dict[str, Any]:
    now = int(time.time())
    base = {"iss": ISS, "aud": AUD, "sub": "bob", "iat": now, "exp": now + 600, "jti": "j1",
            "sid": "s1", "roles": ["admin"]}
    base.update(changes)
    return {k: v for k, v in base.items() if v is not ...}


def sign(payload: dict[str, Any], *, secret: str = SECRET, **header: Any) -> str:
    headers = {"kid": "k1", "typ": "at+jwt", **header}
    return jwt.encode(payload, secret, algorithm="HS256", headers=headers)


def b64(data: Any) -> str:
    raw = data if isinstance(data, bytes) else json.dumps(data).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def unsigned(header: Any, payload: Any, signature: str = "") -> str:
    return f"{b64(header)}.{b64(payload)}.{signature}"


def hs256(payload: Any, **header: Any) -> str:
    """Signed by hand, for payloads PyJWT refuses to make."""
    signing_input = f"{b64({'alg': 'HS256', 'typ': 'at+jwt', 'kid': 'k1', **header})}.{b64(payload)}"
    mac = hmac.new(SECRET.encode(), signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(mac)}"


async def test_a_valid_token_passes(gw: Gateway, upstream: Upstream) -> None:
    async with gw.http.get(f"{gw.url}/admin/x", headers={"Authorization": f"Bearer {sign(claims())}"}) as resp:
        assert resp.status == 200
    assert upstream.seen[-1].header("X-Auth-User") == ["bob"]


def _tampered() -> str:
    header, payload, signature = sign(claims(sub="alice", roles=["user"])).split(".")
    forged = b64(claims(sub="alice", roles=["admin"]))
    return f"{header}.{forged}.{signature}"


REFUSED = {
    "tampered payload": _tampered,
    "wrong secret": lambda: sign(claims(), secret="another-secret-that-is-long-enough-0123456789"),
    "expired": lambda: sign(claims(iat=int(time.time()) - 1000, exp=int(time.time()) - 60)),
    "alg none": lambda: unsigned({"alg": "none", "typ": "at+jwt", "kid": "k1"}, claims()),
    "alg None": lambda: unsigned({"alg": "None", "typ": "at+jwt", "kid": "k1"}, claims()),
    "alg none, no signature part": lambda: unsigned({"alg": "none", "kid": "k1"}, claims())[:-1],
    "wrong audience": lambda: sign(claims(aud="other")),
    "audience superstring": lambda: sign(claims(aud="appx")),
    "audience list without ours": lambda: sign(claims(aud=["other"])),
    "audience object": lambda: sign(claims(aud={"app": 1})),
    "no audience": lambda: sign(claims(aud=...)),
    "wrong issuer": lambda: sign(claims(iss="https://gateway.test/")),
    "issuer substring": lambda: sign(claims(iss="https")),
    "issuer list": lambda: hs256(claims(iss=[ISS])),
    "payload not an object": lambda: hs256([claims()]),
    "exp NaN": lambda: hs256(json.dumps(claims(exp=float("nan"))).encode()),
    "exp Infinity": lambda: hs256(json.dumps(claims(exp=float("inf"))).encode()),
    "exp a 400-digit integer": lambda: hs256(json.dumps(claims()).replace('"exp": ', '"exp": 1' + "0" * 400 + ", \"x\": ")),
    "sub not ASCII": lambda: sign(claims(sub="b\u00f8b")),
    "sub with a line separator": lambda: sign(claims(sub="bob\u2028")),
    "unknown kid": lambda: sign(claims(), kid="k2"),
    "kid path traversal": lambda: sign(claims(), kid="../../../../dev/null"),
    "no kid": lambda: jwt.encode(claims(), SECRET, algorithm="HS256", headers={"typ": "at+jwt"}),
    "kid not a string": lambda: hs256(claims(), kid=123),
    "other token type": lambda: sign(claims(), typ="JWT"),
    "HS512 under an HS256 key": lambda: jwt.encode(claims(), SECRET + SECRET, algorithm="HS512",
                                                    headers={"kid": "k1", "typ": "at+jwt"}),
    "embedded jwk": lambda: sign(claims(), jwk={"kty": "oct", "k": b64(b"x" * 32)}),
    "jku": lambda: sign(claims(), jku="http://127.0.0.1:9/jwks.json"),
    "exp as string": lambda: sign(claims(exp="9999999999")),
    "exp as boolean": lambda: sign(claims(exp=True)),
    "exp missing": lambda: sign(claims(exp=...)),
    "iat in the future": lambda: sign(claims(iat=int(time.time()) + 3600, exp=int(time.time()) + 3900)),
    "nbf in the future": lambda: sign(claims(nbf=int(time.time()) + 3600)),
    "lifetime beyond access_ttl": lambda: sign(claims(exp=int(time.time()) + 86400)),
    "sub not a string": lambda: sign(claims(sub=1234)),
    "sub empty": lambda: sign(claims(sub="")),
    "sub with CRLF": lambda: sign(claims(sub="bob\r\nX-Auth-Roles: admin")),
    "roles as string": lambda: sign(claims(roles="admin")),
    "roles as object": lambda: sign(claims(roles={"admin": True})),
    "roles nested": lambda: sign(claims(roles=[["admin"]])),
    "role with a trailing newline": lambda: sign(claims(roles=["admin\n"])),
    "no sid": lambda: sign(claims(sid=...)),
    "five parts (JWE form)": lambda: "a.b.c.d.e",
    "two parts": lambda: "a.b",
    "many dots": lambda: "." * 5000,
    "base64 padding": lambda: sign(claims()) + "=",
    "header not an object": lambda: unsigned([], claims(), "sig"),
    "oversized": lambda: sign(claims(pad="x" * 5000)),
    # SEC-26: every spelling of none; an algorithm the key is not pinned to
    "alg NONE": lambda: unsigned({"alg": "NONE", "typ": "at+jwt", "kid": "k1"}, claims()),
    "alg nOnE": lambda: unsigned({"alg": "nOnE", "typ": "JWT"}, claims()),
    "alg ES256 under the HS256 key": lambda: hs256(claims(), alg="ES256"),
    "alg HS256 spelled hs256": lambda: hs256(claims(), alg="hs256"),
    # SEC-30: the kid is an exact key of the configured keys, nothing else
    "kid in another case": lambda: sign(claims(), kid="K1"),
    "kid empty": lambda: sign(claims(), kid=""),
    "kid with a NUL": lambda: sign(claims(), kid="k1\u0000"),
    "kid with a trailing space": lambda: sign(claims(), kid="k1 "),
    "kid SQL": lambda: sign(claims(), kid="x' UNION SELECT 'k'--"),
    "kid /proc/self/environ": lambda: sign(claims(), kid="/proc/self/environ"),
    "kid null": lambda: hs256(claims(), kid=None),
    "kid a list": lambda: hs256(claims(), kid=["k1"]),
    "kid path traversal, empty HMAC key": lambda: _empty_key(kid="../../../../dev/null"),
    "empty HMAC key": lambda: _empty_key(),
    # SEC-29: key material named by the token
    "x5u": lambda: sign(claims(), x5u="http://127.0.0.1:9/c.pem"),
    "x5c": lambda: sign(claims(), x5c=[base64.b64encode(b"not a certificate").decode()]),
    "crit": lambda: sign(claims(), crit=["exp"]),
}


def _empty_key(**header: Any) -> str:
    signing_input = f"{b64({'alg': 'HS256', 'typ': 'at+jwt', 'kid': 'k1', **header})}.{b64(claims())}"
    return f"{signing_input}.{b64(hmac.new(b'', signing_input.encode(), hashlib.sha256).digest())}"


@pytest.mark.parametrize("name", REFUSED)
async def test_refused_tokens_get_401_invalid_token(gw: Gateway, upstream: Upstream, name: str) -> None:
    token = REFUSED[name]()
    async with gw.http.get(f"{gw.url}/admin/x", headers={"Authorization": f"Bearer {token}"}) as resp:
        assert resp.status == 401, name
        assert resp.headers["WWW-Authenticate"] == 'Bearer realm="gateway", error="invalid_token"'
        body = await resp.json()
    assert body == {"error": "invalid_token", "error_description": "The access token is invalid."}
    assert upstream.seen == []


async def test_header_beyond_the_parser_limit_is_400(gw: Gateway, upstream: Upstream) -> None:
    async with gw.http.get(f"{gw.url}/admin/x", headers={"Authorization": "Bearer " + "." * 100_000}) as resp:
        assert resp.status == 400
    assert upstream.seen == []


async def test_expired_cookie_token_is_refused_too(gw: Gateway, upstream: Upstream) -> None:
    token = REFUSED["expired"]()
    async with gw.http.get(f"{gw.url}/profile", headers={"Cookie": f"gw_access={token}"}) as resp:
        assert resp.status == 401
    assert upstream.seen == []


async def test_token_expires_with_the_clock(gw: Gateway) -> None:
    token = await gw.token("alice")
    gw.clock.advance(900 + 4)  # within the 5 s leeway
    async with gw.http.get(f"{gw.url}/profile", headers={"Authorization": f"Bearer {token}"}) as resp:
        assert resp.status == 200
    gw.clock.advance(2)
    async with gw.http.get(f"{gw.url}/profile", headers={"Authorization": f"Bearer {token}"}) as resp:
        assert resp.status == 401


@pytest.mark.parametrize("value", ["bearer {t}", "BEARER {t}"])
async def test_scheme_is_case_insensitive(gw: Gateway, value: str) -> None:
    token = await gw.token("alice")
    async with gw.http.get(f"{gw.url}/profile", headers={"Authorization": value.format(t=token)}) as resp:
        assert resp.status == 200


async def test_malformed_authorization_headers(gw: Gateway) -> None:
    token = await gw.token("alice")
    async with gw.http.get(f"{gw.url}/profile", headers={"Authorization": f"Bearer  {token}"}) as resp:
        assert resp.status == 401
    async with gw.http.get(f"{gw.url}/profile", headers={"Authorization": "Bearer "}) as resp:
        assert resp.status == 401
    async with gw.http.get(f"{gw.url}/profile", headers=[("Authorization", f"Bearer {token}"),
                                                         ("Authorization", f"Bearer {token}")]) as resp:
        assert resp.status == 400
    # another scheme is not a token; the access cookie still decides
    async with gw.http.get(f"{gw.url}/profile", headers={"Authorization": "Basic YWxpY2U6eA==",
                                                         "Cookie": f"gw_access={token}"}) as resp:
        assert resp.status == 200


async def test_query_string_is_never_a_token_source(gw: Gateway) -> None:
    token = await gw.token("alice")
    async with gw.http.get(f"{gw.url}/profile", params={"access_token": token}) as resp:
        assert resp.status == 401


def test_verify_with_a_second_key_by_kid() -> None:
    cfg = Tokens(issuer=ISS, audience=AUD, keys=(
        SigningKey("new", "HS256", b"n" * 16 + b"0123456789abcdef"),
        SigningKey("old", "HS256", SECRET.encode()),
    ))
    tokens = AccessTokens(cfg, time.time)
    old = sign(claims(), kid="old")
    assert tokens.verify(old).sub == "bob"
    issued, ttl = tokens.issue("carol", ("user",), "sid-1")
    assert jwt.get_unverified_header(issued)["kid"] == "new"  # the first key signs
    assert tokens.verify(issued).roles == ("user",) and ttl == 900
    with pytest.raises(InvalidToken):
        tokens.verify(sign(claims(), kid="missing"))


def test_float_times_are_valid() -> None:
    tokens = AccessTokens(Tokens(issuer=ISS, audience=AUD, keys=(SigningKey("k1", "HS256", SECRET.encode()),)),
                          time.time)
    now = time.time()
    assert tokens.verify(sign(claims(iat=now - 0.5, exp=now + 600.5))).sub == "bob"


# --- the verified-token cache ---------------------------------------------------------------


def cached_tokens(clock: Any = time.time) -> AccessTokens:
    return AccessTokens(Tokens(issuer=ISS, audience=AUD, leeway=5,
                               keys=(SigningKey("k1", "HS256", SECRET.encode()),)), clock)


def test_a_token_seen_before_is_not_verified_again(monkeypatch: pytest.MonkeyPatch) -> None:
    tokens = cached_tokens()
    decoded: list[str] = []
    real_decode = jwt.decode
    monkeypatch.setattr(jwt, "decode", lambda token, *a, **k: decoded.append(token) or real_decode(token, *a, **k))
    token = sign(claims())
    assert [tokens.verify(token).sub for _ in range(3)] == ["bob"] * 3
    assert decoded == [token]  # one signature check for three requests
    # a token differing by one character of its signature is another text: checked, refused
    head, body, signature = token.split(".")
    forged = f"{head}.{body}.{signature[:-2]}{'A' if signature[-2] != 'A' else 'B'}{signature[-1]}"
    with pytest.raises(InvalidToken):
        tokens.verify(forged)
    assert decoded == [token, forged]
    with pytest.raises(InvalidToken):
        tokens.verify(forged)  # refusals are not kept: checked again, refused again
    assert decoded == [token, forged, forged]


def test_a_cached_token_still_expires() -> None:
    clock = FakeClock()
    clock.now = float(int(clock.now))
    tokens = cached_tokens(clock)
    token = sign(claims(iat=int(clock.now), exp=int(clock.now) + 60))
    assert tokens.verify(token).sub == "bob"
    clock.advance(60 + 5)  # exp + leeway: still valid
    assert tokens.verify(token).sub == "bob"
    clock.advance(1)
    with pytest.raises(InvalidToken) as refused:
        tokens.verify(token)
    assert refused.value.reason == "expired"


def test_the_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gateway.tokens, "VERIFIED_CACHE_SIZE", 8)
    tokens = cached_tokens()
    issued = [sign(claims(jti=f"j{n}")) for n in range(20)]
    for token in issued:
        tokens.verify(token)
    assert list(tokens._verified) == issued[-8:]  # the oldest went first


async def test_a_cached_token_of_a_revoked_session_is_refused_at_once(gw: Gateway, upstream: Upstream) -> None:
    token = await gw.token("alice")
    bearer = {"Authorization": f"Bearer {token}"}
    for _ in range(2):
        async with gw.http.get(f"{gw.url}/profile", headers=bearer) as resp:
            assert resp.status == 200
    async with gw.http.post(f"{gw.url}/auth/logout", headers=bearer) as resp:
        assert resp.status == 204
    async with gw.http.get(f"{gw.url}/profile", headers=bearer) as resp:
        assert resp.status == 401
