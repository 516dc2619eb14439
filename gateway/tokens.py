"""Access tokens: issue and verify. The only module that imports ``jwt``.

PyJWT checks the signature, with the algorithm pinned by the key that the ``kid`` names (a
list of one, never taken from the token). Every claim is then checked here, by type and
value, against the gateway's own clock, so the rules do not depend on a library version:
``iss`` by exact equality, ``aud`` equal or contained in a list of strings, ``exp``/``iat``
finite numbers (not booleans, not strings), a lifetime no longer than ``access_ttl``.
"""

from __future__ import annotations

import math
import re
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeGuard

import jwt

from .config import Tokens
from .errors import InvalidToken

MAX_TOKEN_LENGTH = 4096
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
        self._keys = {key.kid: key for key in cfg.keys}

    def issue(self, sub: str, roles: tuple[str, ...], sid: str) -> tuple[str, int]:
        """A signed access token and its lifetime in seconds."""
        iat = int(self.clock())
        ttl = int(self.cfg.access_ttl)
        claims = {
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
        token = jwt.encode(claims, key.secret, algorithm=key.algorithm,
                           headers={"kid": key.kid, "typ": TOKEN_TYPE})
        return token, ttl

    def verify(self, token: str) -> Identity:
        # Shape first, before any decoding: bounded length, exactly three base64url parts
        # (a JWE has five and is never accepted).
        if len(token) > MAX_TOKEN_LENGTH or not _B64URL.fullmatch(token):
            raise InvalidToken().because("malformed")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise InvalidToken().because("malformed") from None
        kid = header.get("kid")
        key = self._keys.get(kid) if isinstance(kid, str) else None
        if key is None:
            raise InvalidToken().because("unknown_kid")
        if header.get("alg") != key.algorithm or header.get("typ") != TOKEN_TYPE \
                or not _FOREIGN_KEY_PARAMS.isdisjoint(header):
            raise InvalidToken().because("bad_header")
        try:
            claims = jwt.decode(
                token,
                key.secret,
                algorithms=[key.algorithm],
                options={"verify_signature": True, "verify_exp": False, "verify_nbf": False,
                         "verify_iat": False, "verify_aud": False, "verify_iss": False,
                         "verify_sub": False, "verify_jti": False},
            )
        except jwt.PyJWTError:
            raise InvalidToken().because("bad_signature") from None
        return self._check_claims(claims, token)

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


def _number(value: Any) -> TypeGuard[float]:
    """A JSON number that is a plausible time: not a bool, not NaN or infinite, and not an
    integer too large to compare with a float."""
    if type(value) is int:
        return -(2**53) < value < 2**53
    return type(value) is float and math.isfinite(value)


def _text(value: Any) -> TypeGuard[str]:
    """Printable ASCII of a sane length: safe to put in a header and a log line as it is."""
    return isinstance(value, str) and 0 < len(value) <= 256 and value.isascii() and value.isprintable()
