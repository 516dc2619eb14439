"""The gateway's exceptions. This is the only module that chooses HTTP statuses.

Each class is documented by *when* it is raised. Every error answer is JSON
``{"error": <stable code>, "error_description": <generic text>}``; descriptions never echo
input, tokens or library messages.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Self

from aiohttp import web


class GatewayError(Exception):
    """Base of every error the gateway answers on purpose."""

    status = 500
    code = "internal_error"
    description = "The gateway could not handle this request."

    def __init__(
        self,
        code: str | None = None,
        description: str | None = None,
        *,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.code = code or self.code
        self.description = description or self.description
        self.headers = dict(headers or {})
        self.reason = self.code  # for logs only; never sent to the client
        super().__init__(self.code)

    def because(self, reason: str) -> Self:
        self.reason = reason
        return self

    def body(self) -> dict[str, str]:
        return {"error": self.code, "error_description": self.description}


class BadRequest(GatewayError):
    """The request is malformed or ambiguous: a path we refuse to guess about, a body of the
    wrong shape, a header that appears twice where it may appear once."""

    status = 400
    code = "invalid_request"
    description = "The request is malformed."


class Unauthorized(GatewayError):
    """No usable credentials: a protected route without a token, an invalid token, bad login
    credentials, a dead refresh token. Carries ``WWW-Authenticate`` (RFC 6750)."""

    status = 401
    code = "unauthorized"
    description = "Authentication is required."

    def __init__(self, code: str | None = None, description: str | None = None) -> None:
        super().__init__(code, description, headers={"WWW-Authenticate": 'Bearer realm="gateway"'})


class InvalidToken(Unauthorized):
    """An access token was presented but is not valid: bad signature, unknown key, expired,
    wrong issuer or audience, malformed, or its session was revoked."""

    code = "invalid_token"
    description = "The access token is invalid."

    def __init__(self, code: str | None = None, description: str | None = None) -> None:
        super().__init__(code, description)
        self.headers["WWW-Authenticate"] = 'Bearer realm="gateway", error="invalid_token"'


class Forbidden(GatewayError):
    """Authenticated, but the route's rule does not admit this identity (role, claim), or a
    cross-site request to a state-changing endpoint."""

    status = 403
    code = "forbidden"
    description = "You are not allowed to do this."


class NotFound(GatewayError):
    """No route matches the path: the gateway denies what it was not told to forward."""

    status = 404
    code = "not_found"
    description = "Nothing is served at this path."


class MethodNotAllowed(GatewayError):
    """A route matches the path but not the method. Never falls through to a later route."""

    status = 405
    code = "method_not_allowed"
    description = "This method is not allowed here."

    def __init__(self, allowed: frozenset[str] | set[str]) -> None:
        super().__init__(headers={"Allow": ", ".join(sorted(allowed))})


class RequestTimeout(GatewayError):
    """The client did not send its whole body in time."""

    status = 408
    code = "request_timeout"
    description = "The request body did not arrive in time."


class Conflict(GatewayError):
    """The thing to create exists already (a user name taken at registration)."""

    status = 409
    code = "conflict"
    description = "This already exists."


class PayloadTooLarge(GatewayError):
    """A body is larger than the endpoint accepts."""

    status = 413
    code = "payload_too_large"
    description = "The request body is too large."


class UnsupportedMediaType(GatewayError):
    """A body in a content type the endpoint does not take."""

    status = 415
    code = "unsupported_media_type"
    description = "Send JSON or a URL-encoded form."


class TooManyRequests(GatewayError):
    """Too many failed logins for this user name or from this address, for now. Carries
    ``Retry-After``."""

    status = 429
    code = "too_many_requests"
    description = "Too many failed attempts; try again later."

    def __init__(self, retry_after: float) -> None:
        super().__init__(headers={"Retry-After": str(max(1, math.ceil(retry_after)))})


class StoreUnavailable(GatewayError):
    """The session store cannot be reached or did not answer in time."""

    status = 503
    code = "store_unavailable"
    description = "The session store is unavailable; try again shortly."


class BadGateway(GatewayError):
    """The upstream refused the connection, reset it, or answered something unusable."""

    status = 502
    code = "upstream_unavailable"
    description = "The upstream service is unavailable."


class GatewayTimeout(GatewayError):
    """The upstream did not answer within its timeout."""

    status = 504
    code = "upstream_timeout"
    description = "The upstream service did not answer in time."


# The codes of answers that aiohttp chooses (its router, its HTTP parser), not the gateway.
_CODES_BY_STATUS = {400: "invalid_request", 404: "not_found", 405: "method_not_allowed",
                    413: "payload_too_large", 431: "headers_too_large"}


def for_status(status: int, description: str) -> GatewayError:
    """The gateway's error for a status that aiohttp chose."""
    exc = GatewayError(_CODES_BY_STATUS.get(status, "http_error"), description)
    exc.status = status
    return exc


def response(exc: GatewayError) -> web.Response:
    """The JSON answer for ``exc``."""
    return web.Response(
        status=exc.status,
        text=json.dumps(exc.body()),
        content_type="application/json",
        headers={**exc.headers, "Cache-Control": "no-store"},
    )


class ConfigError(Exception):
    """The config file cannot be used. ``problems`` lists every one, each with its key path."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


class UserError(Exception):
    """A CLI or store operation cannot be done as asked (a user that exists, a bad name).
    The CLI prints its message as one line and exits non-zero."""
