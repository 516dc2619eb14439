"""Access tokens: issue and verify, and the public keys as a JWK Set. The only module that
imports ``jwt``.

The first configured key signs, whatever its algorithm: HS256 with its secret, EdDSA, ES256
or RS256 with its private key. Every configured key verifies the tokens that name its
``kid``, with the key's own algorithm pinned (a list of one, never taken from the token) and
the key's own material: the secret of an HS256 key, the public key object of another. An
HMAC algorithm and an asymmetric key never meet, so no public key, in any encoding, can be
used as an HMAC secret (algorithm confusion).

PyJWT checks the signature. Every claim is then checked here, by type and value, against the
gateway's own clock, so the rules do not depend on a library version: ``iss`` by exact
equality, ``aud`` equal or contained in a list of strings, ``exp``/``iat`` finite numbers
(not booleans, not strings), a lifetime no longer than ``access_ttl``.

Checking a signature is most of what a proxied request costs (an Ed25519 or RSA signature
several times more than HS256), and a client sends the same token with every request for
minutes. So the claims of a token whose signature was checked are kept, by the token's exact
text, in a bounded cache: the same text again has the same signature, which needs no second
check. Every claim is still checked on every request (a cached token expires like any
other), revocation is checked by the caller on every request, and a reload builds a new
AccessTokens, so a key taken out of the config takes its tokens' cache entries with it.
"""

from __future__ import annotations

import base64
import math
import re
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeGuard

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from .config import RESERVED_CLAIMS, SigningKey, Tokens
from .errors import InvalidToken

MAX_TOKEN_LENGTH = 4096
VERIFIED_CACHE_SIZE = 4096  # tokens whose signature was checked (a few MiB at most)
TOKEN_TYPE = "at+jwt"  # RFC 9068; a JWT of another kind signed with the same key is refused
_B64URL = re.compile(r"^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+$")
_ROLE = re.compile(r"^[A-Za-z0-9._:@-]{1,64}$")
# Header parameters that name key material. The gateway verifies only with configured keys,
# so a token that carries one of these was not made by it.
_FOREIGN_KEY_PARAMS = frozenset({"jwk", "jku", "x5u", "x5c", "x5t", "x5t#S256", "crit"})


@dataclass(frozen=True)
class Identity:
    sub: str
    roles: tuple[str, ...]
    sid: str
    jti: str
    exp: float
    claims: Mapping[str, Any]
    token: str


class AccessTokens:
    def __init__(self, cfg: Tokens, clock: Callable[[], float]) -> None:
        self.cfg = cfg
        self.clock = clock
        self._signing = cfg.keys[0]
        self._signing_material = _signing_material(cfg.keys[0])
        # kid -> (key, what verifies its signatures): an exact match in memory, nothing else.
        self._keys = {key.kid: (key, _verifying_material(key)) for key in cfg.keys}
        self._jwks = {"keys": [_jwk(key) for key in cfg.keys if not key.symmetric]}
        self._verified: dict[str, dict[str, Any]] = {}  # token -> its claims; oldest first

    def jwks(self) -> dict[str, list[dict[str, str]]]:
        """The public keys of every asymmetric key, as an RFC 7517 JWK Set (in config order;
        an HS256 secret is never in it)."""
        return {"keys": [dict(jwk) for jwk in self._jwks["keys"]]}

    def issue(self, sub: str, roles: tuple[str, ...], sid: str,
              extra: tuple[tuple[str, Any], ...] = ()) -> tuple[str, int]:
        """A signed access token and its lifetime in seconds; ``extra`` are the user's own
        claims (User.claims), never one of RESERVED_CLAIMS."""
        iat = int(self.clock())
        ttl = int(self.cfg.access_ttl)
        claims = {
            **{name: value for name, value in extra if name not in RESERVED_CLAIMS},
            "iss": self.cfg.issuer,
            "aud": self.cfg.audience,
            "sub": sub,
            "iat": iat,
            "exp": iat + ttl,
            "jti": secrets.token_urlsafe(12),
            "sid": sid,
            "roles": list(roles),
        }
        key = self._signing
        token = jwt.encode(claims, self._signing_material, algorithm=key.algorithm,
                           headers={"kid": key.kid, "typ": TOKEN_TYPE})
        return token, ttl

    def verify(self, token: str) -> Identity:
        claims = self._verified.get(token)
        if claims is None:
            claims = self._verify_signature(token)
            if len(self._verified) >= VERIFIED_CACHE_SIZE:
                del self._verified[next(iter(self._verified))]
            self._verified[token] = claims
        try:
            return self._check_claims(claims, token)
        except InvalidToken:
            self._verified.pop(token, None)
            raise

    def _verify_signature(self, token: str) -> dict[str, Any]:
        """The token's claims, once its shape, header and signature hold; nothing checked
        about the claims themselves."""
        # Shape first, before any decoding: bounded length, exactly three base64url parts
        # (a JWE has five and is never accepted).
        if len(token) > MAX_TOKEN_LENGTH or not _B64URL.fullmatch(token):
            raise InvalidToken().because("malformed")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise InvalidToken().because("malformed") from None
        kid = header.get("kid")
        found = self._keys.get(kid) if isinstance(kid, str) else None
        if found is None:
            raise InvalidToken().because("unknown_kid")
        key, material = found
        if header.get("alg") != key.algorithm or header.get("typ") != TOKEN_TYPE \
                or not _FOREIGN_KEY_PARAMS.isdisjoint(header):
            raise InvalidToken().because("bad_header")
        try:
            claims = jwt.decode(
                token,
                material,
                algorithms=[key.algorithm],
                options={"verify_signature": True, "verify_exp": False, "verify_nbf": False,
                         "verify_iat": False, "verify_aud": False, "verify_iss": False,
                         "verify_sub": False, "verify_jti": False},
            )
        except jwt.PyJWTError:
            raise InvalidToken().because("bad_signature") from None
        return claims

    def _check_claims(self, claims: dict[str, Any], token: str) -> Identity:
        cfg, now = self.cfg, self.clock()
        exp, iat, nbf = claims.get("exp"), claims.get("iat"), claims.get("nbf", 0)
        if not _number(exp) or not _number(iat) or not _number(nbf):
            raise InvalidToken().because("bad_time_claims")
        if now > exp + cfg.leeway:
            raise InvalidToken().because("expired")
        if iat > now + cfg.leeway or nbf > now + cfg.leeway:
            raise InvalidToken().because("not_yet_valid")
        if exp - iat > cfg.access_ttl + cfg.leeway:
            raise InvalidToken().because("lifetime_too_long")
        if claims.get("iss") != cfg.issuer or not isinstance(claims.get("iss"), str):
            raise InvalidToken().because("wrong_issuer")
        aud = claims.get("aud")
        if not (aud == cfg.audience if isinstance(aud, str)
                else isinstance(aud, list) and all(isinstance(a, str) for a in aud) and cfg.audience in aud):
            raise InvalidToken().because("wrong_audience")
        sub, sid, jti, roles = claims.get("sub"), claims.get("sid"), claims.get("jti"), claims.get("roles", [])
        if not _text(sub) or not _text(sid) or not _text(jti):
            raise InvalidToken().because("bad_claims")
        if not isinstance(roles, list) or not all(isinstance(r, str) and _ROLE.fullmatch(r) for r in roles):
            raise InvalidToken().because("bad_claims")
        return Identity(sub=sub, roles=tuple(roles), sid=sid, jti=jti, exp=float(exp),
                        claims=claims, token=token)


def _signing_material(key: SigningKey) -> Any:
    """What signs with ``key``: its secret (HS256) or its private key object."""
    if key.symmetric:
        if not key.secret:
            raise ValueError(f"key {key.kid!r} has no secret")
        return key.secret
    if key.private_key is None:
        raise ValueError(f"key {key.kid!r} is a public key only; the first key signs and needs a private key")
    return key.private_key


def _verifying_material(key: SigningKey) -> Any:
    """What verifies ``key``'s signatures: its secret (HS256) or its public key object, never
    bytes that an HMAC could take as a secret."""
    if key.symmetric:
        if not key.secret:
            raise ValueError(f"key {key.kid!r} has no secret")
        return key.secret
    if key.public_key is None:
        raise ValueError(f"key {key.kid!r} has no public key")
    return key.public_key


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _uint(value: int) -> str:
    """An unsigned integer as base64url of its shortest big-endian bytes (RFC 7518 §6.3)."""
    return _b64(value.to_bytes(max(1, (value.bit_length() + 7) // 8), "big"))


def _jwk(key: SigningKey) -> dict[str, str]:
    """The public JWK of an asymmetric key (RFC 7517, 7518 §6, 8037)."""
    public = key.public_key
    fields: dict[str, str]
    if isinstance(public, ed25519.Ed25519PublicKey):
        raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        fields = {"kty": "OKP", "crv": "Ed25519", "x": _b64(raw)}
    elif isinstance(public, ec.EllipticCurvePublicKey) and isinstance(public.curve, ec.SECP256R1):
        numbers = public.public_numbers()
        fields = {"kty": "EC", "crv": "P-256", "x": _b64(numbers.x.to_bytes(32, "big")),
                  "y": _b64(numbers.y.to_bytes(32, "big"))}
    elif isinstance(public, rsa.RSAPublicKey):
        rsa_numbers = public.public_numbers()
        fields = {"kty": "RSA", "n": _uint(rsa_numbers.n), "e": _uint(rsa_numbers.e)}
    else:
        raise ValueError(f"key {key.kid!r} has no public key that fits {key.algorithm}")
    return {**fields, "kid": key.kid, "alg": key.algorithm, "use": "sig"}


def _number(value: Any) -> TypeGuard[float]:
    """A JSON number that is a plausible time: not a bool, not NaN or infinite, and not an
    integer too large to compare with a float."""
    if type(value) is int:
        return -(2**53) < value < 2**53
    return type(value) is float and math.isfinite(value)


def _text(value: Any) -> TypeGuard[str]:
    """Printable ASCII of a sane length: safe to put in a header and a log line as it is."""
    return isinstance(value, str) and 0 < len(value) <= 256 and value.isascii() and value.isprintable()
