"""``GET /.well-known/jwks.json``: the gateway's public keys (RFC 7517 JWK Set).

Only asymmetric keys are published (an HS256 secret never is); with HS256 keys alone the set
is empty. Consumers may cache it for five minutes and revalidate with ``If-None-Match``.
The document changes only when the configured keys do, so its ETag is a hash of its bytes.
"""

from __future__ import annotations

import hashlib
import json

from aiohttp import web

from .state import GATEWAY

CACHE_CONTROL = "public, max-age=300"


def document(jwks: dict[str, list[dict[str, str]]]) -> tuple[bytes, str]:
    """The JWK Set's bytes and their strong ETag."""
    body = json.dumps(jwks, sort_keys=True, separators=(",", ":")).encode()
    return body, '"' + hashlib.sha256(body).hexdigest()[:32] + '"'


def _matches(if_none_match: str, etag: str) -> bool:
    """RFC 9110 §13.1.2: ``*``, or any listed entity tag equal by the weak comparison."""
    candidates = [tag.strip() for tag in if_none_match.split(",")]
    return "*" in candidates or etag in (tag.removeprefix("W/") for tag in candidates)


async def jwks(request: web.Request) -> web.Response:
    body, etag = document(request[GATEWAY].tokens.jwks())
    headers = {"Cache-Control": CACHE_CONTROL, "ETag": etag}
    if any(_matches(value, etag) for value in request.headers.getall("If-None-Match", ())):
        return web.Response(status=304, headers=headers)
    return web.Response(body=body, content_type="application/json", headers=headers)
