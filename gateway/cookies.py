"""The gateway's two cookies: reading them, setting them, and hiding them from upstreams.

Both are HttpOnly (no script can read a token), ``Secure`` unless turned off for local HTTP,
and carry SameSite. The refresh cookie is scoped to the auth path, so it travels only to
the refresh and logout endpoints. A cookie is cleared with exactly the attributes it was
set with, or the browser keeps the old one.
"""

from __future__ import annotations

from collections.abc import Iterable

from aiohttp import web
from multidict import CIMultiDict

from .config import Cookie, Cookies


def read(headers: CIMultiDict[str], name: str) -> str | None:
    """The value of cookie ``name`` from every ``Cookie`` header; the first one wins."""
    for header in headers.getall("Cookie", ()):
        for pair in header.split(";"):
            key, sep, value = pair.strip().partition("=")
            if sep and key == name:
                return value.strip().strip('"') or None
    return None


def without(header: str, names: Iterable[str]) -> str:
    """A ``Cookie`` header value with the named cookies removed."""
    drop = set(names)
    kept = [pair.strip() for pair in header.split(";")
            if pair.strip() and pair.strip().partition("=")[0].strip() not in drop]
    return "; ".join(kept)


def _set(resp: web.StreamResponse, cfg: Cookies, cookie: Cookie, value: str, max_age: int) -> None:
    resp.set_cookie(
        cookie.name,
        value,
        max_age=max_age,
        path=cookie.path,
        domain=cookie.domain,
        secure=cfg.secure,
        httponly=True,
        samesite=cookie.same_site,
    )


def set_access(resp: web.StreamResponse, cfg: Cookies, token: str, max_age: int) -> None:
    _set(resp, cfg, cfg.access, token, max_age)


def set_refresh(resp: web.StreamResponse, cfg: Cookies, token: str, max_age: int) -> None:
    _set(resp, cfg, cfg.refresh, token, max_age)


def clear(resp: web.StreamResponse, cfg: Cookies, *, access: bool = True, refresh: bool = True) -> None:
    if access:
        _set(resp, cfg, cfg.access, "", 0)
    if refresh:
        _set(resp, cfg, cfg.refresh, "", 0)
