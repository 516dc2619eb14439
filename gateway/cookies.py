"""The gateway's two cookies: reading them, setting them, and hiding them from upstreams.

Both are HttpOnly (no script can read a token), ``Secure`` unless turned off for local HTTP,
and carry SameSite. The refresh cookie is scoped to the auth path, so it travels only to
the refresh and logout endpoints. A cookie is cleared with exactly the attributes it was
set with, or the browser keeps the old one.
"""

from __future__ import annotations

from collections.abc import Iterable
from http.cookies import Morsel

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
    _add(resp, cookie.name, value, max_age=max_age, path=cookie.path, domain=cookie.domain,
         secure=cfg.secure, same_site=cookie.same_site)


def _add(resp: web.StreamResponse, name: str, value: str, *, max_age: int, path: str,
         domain: str | None, secure: bool, same_site: str) -> None:
    """Add a ``Set-Cookie`` header. Written as a header rather than with aiohttp's
    ``set_cookie``, so that it also works from the app's response-prepare hook, which runs
    after aiohttp has turned its cookie jar into headers."""
    morsel: Morsel[str] = Morsel()
    morsel.set(name, value, f'"{value}"' if value == "" else value)
    morsel["max-age"] = str(max_age)
    morsel["path"] = path
    if domain:
        morsel["domain"] = domain
    morsel["secure"] = secure
    morsel["httponly"] = True
    morsel["samesite"] = same_site
    resp.headers.add("Set-Cookie", morsel.OutputString())


def set_access(resp: web.StreamResponse, cfg: Cookies, token: str, max_age: int) -> None:
    _set(resp, cfg, cfg.access, token, max_age)


def set_refresh(resp: web.StreamResponse, cfg: Cookies, token: str, max_age: int) -> None:
    _set(resp, cfg, cfg.refresh, token, max_age)


def clear(resp: web.StreamResponse, cfg: Cookies, *, access: bool = True, refresh: bool = True) -> None:
    if access:
        _set(resp, cfg, cfg.access, "", 0)
    if refresh:
        _set(resp, cfg, cfg.refresh, "", 0)


def _probe_name(cfg: Cookies) -> str:
    return "__Host-gw_probe" if cfg.secure else "gw_probe"


def set_probe(resp: web.StreamResponse, cfg: Cookies) -> None:
    """A harmless cookie set with the sign-in page: if the form comes back without it, the
    browser keeps no cookies for this site, and signing it in would only lead back."""
    _add(resp, _probe_name(cfg), "1", max_age=3600, path="/", domain=None, secure=cfg.secure, same_site="Lax")


def has_probe(headers: CIMultiDict[str], cfg: Cookies) -> bool:
    return read(headers, _probe_name(cfg)) is not None


def names(cfg: Cookies) -> tuple[str, ...]:
    """Every cookie of the gateway's: none of them is an upstream's business."""
    return (cfg.access.name, cfg.refresh.name, _probe_name(cfg))
