"""CORS where the config asks for it (a route's ``cors``, or ``auth_cors`` for the
gateway's own endpoints): the gateway answers preflights itself, without a token (a
preflight never carries one), and marks answers to the origins it allows.

Only origins listed exactly are allowed; a wildcard is never used, so an allowed origin may
also send credentials when the config says so. The gateway owns CORS where it is
configured: the upstream's ``Access-Control-Allow-Origin`` and friends are replaced.
"""

from __future__ import annotations

from collections.abc import Set

from aiohttp import web

from .config import Cors
from .errors import Forbidden


def is_preflight(request: web.BaseRequest) -> bool:
    return (request.method == "OPTIONS" and "Origin" in request.headers
            and "Access-Control-Request-Method" in request.headers)


def allowed_origin(cors: Cors | None, request: web.BaseRequest) -> str | None:
    """The request's Origin, when ``cors`` lets that other origin in."""
    origin = request.headers.get("Origin")
    if cors is None or origin is None or origin not in cors.origins:
        return None
    return origin


def preflight(cors: Cors | None, request: web.BaseRequest, methods: Set[str]) -> web.Response:
    """The answer to a preflight: what ``cors`` and the endpoint's ``methods`` allow, or
    403 ``cors_denied``."""
    origin = allowed_origin(cors, request)
    method = request.headers["Access-Control-Request-Method"].strip().upper()
    asked = {h.strip().lower() for h in request.headers.get("Access-Control-Request-Headers", "").split(",")
             if h.strip()}
    if cors is None or origin is None:
        raise Forbidden("cors_denied", "This origin is not allowed here.").because("cors_origin")
    allowed = preflight_methods(cors, methods)
    if method not in allowed or not asked <= cors.headers:
        raise Forbidden("cors_denied", "This method or header is not allowed here.").because("cors_request")
    response = web.Response(status=204)
    mark(response, cors, origin)
    response.headers["Access-Control-Allow-Methods"] = ", ".join(sorted(allowed))
    response.headers["Access-Control-Allow-Headers"] = ", ".join(sorted(cors.headers))
    response.headers["Access-Control-Max-Age"] = str(cors.max_age)
    return response


def preflight_methods(cors: Cors, methods: Set[str]) -> frozenset[str]:
    """The methods a preflight may ask for: those ``cors`` lists that the endpoint allows."""
    return cors.methods & methods if methods else cors.methods


def mark(response: web.StreamResponse, cors: Cors, origin: str) -> None:
    """Let ``origin`` read this answer, replacing whatever the upstream said about it."""
    for name in ("Access-Control-Allow-Origin", "Access-Control-Allow-Credentials",
                 "Access-Control-Expose-Headers"):
        response.headers.popall(name, None)
    response.headers["Access-Control-Allow-Origin"] = origin
    if cors.credentials:
        response.headers["Access-Control-Allow-Credentials"] = "true"
    if cors.expose:
        response.headers["Access-Control-Expose-Headers"] = ", ".join(cors.expose)
    vary = response.headers.get("Vary", "")
    if "origin" not in vary.lower():
        response.headers["Vary"] = f"{vary}, Origin" if vary else "Origin"
