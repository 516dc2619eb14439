"""The gateway's two cookies: reading them, setting them, and hiding them from upstreams.

Both are HttpOnly (no script can read a token), ``Secure`` unless turned off for local HTTP,
and carry SameSite. The refresh cookie is scoped to the auth path, so it travels only to
the refresh and logout endpoints. A cookie is cleared with exactly the attributes it was
set with, or the browser keeps the old one.

No cookie of the gateway's ever reaches an upstream, whatever it is called now or was
called before: what is stripped is every prefix variant (``NAME``, ``__Host-NAME``,
``__Secure-NAME``, the prefix in any case) of the base names of the current config, of the
configs a reload replaced (:func:`retire`), of ``cookies.retired_names``, and of the
defaults, so that neither a ``secure`` toggle nor a rename sends a live token upstream.
"""

from __future__ import annotations

from collections.abc import Iterable
from http.cookies import Morsel

from aiohttp import web
from multidict import CIMultiDict

from .config import Cookie, Cookies

PREFIXES = ("__host-", "__secure-")  # matched in any case, as browsers do
DEFAULT_NAMES = frozenset({"gw_access", "gw_refresh", "gw_probe"})  # stripped under any config
MAX_RETIRED = 4  # cookie settings of replaced configs kept across reloads


def read(headers: CIMultiDict[str], name: str) -> str | None:
    """The value of cookie ``name`` from every ``Cookie`` header; the first one wins."""
    found = read_all(headers, name)
    return found[0] if found else None


def read_all(headers: CIMultiDict[str], name: str) -> list[str]:
    """Every distinct value of cookie ``name``, in the order sent. A browser sends two
    cookies of one name when they differ in path or domain: one may have been planted by a
    sibling subdomain (``Domain=`` the parent, a longer ``Path`` so that it comes first)."""
    found: list[str] = []
    for header in headers.getall("Cookie", ()):
        for pair in header.split(";"):
            key, sep, value = pair.strip().partition("=")
            value = value.strip().strip('"')
            if sep and key == name and value and value not in found:
                found.append(value)
    return found


def base(name: str) -> str:
    """A cookie name without its ``__Host-`` or ``__Secure-`` prefix."""
    lower = name.lower()
    for prefix in PREFIXES:
        if lower.startswith(prefix):
            return name[len(prefix):]
    return name


def without(header: str, bases: Iterable[str]) -> str:
    """A ``Cookie`` header value without the cookies whose base name is one of ``bases``
    (:func:`names`), under whatever prefix."""
    drop = set(bases)
    kept = [pair.strip() for pair in header.split(";")
            if pair.strip() and base(pair.strip().partition("=")[0].strip()) not in drop]
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


def clear(resp: web.StreamResponse, cfg: Cookies, retired: Iterable[Cookies] = ()) -> None:
    """Expire both cookies, and those of the replaced configs ``retired`` (:func:`retire`)
    and ``cookies.retired_names`` that a browser may still hold."""
    done: set[tuple[str, str, str | None]] = set()
    for owner in (cfg, *retired):
        for cookie in (owner.access, owner.refresh):
            if (cookie.name, cookie.path, cookie.domain) not in done:
                done.add((cookie.name, cookie.path, cookie.domain))
                _set(resp, owner, cookie, "", 0)
    for name in cfg.retired_names:
        if (name, "/", None) not in done:  # set with Path=/ and no Domain, as by default
            done.add((name, "/", None))
            _add(resp, name, "", max_age=0, path="/", domain=None,
                 secure=cfg.secure or name.lower().startswith(PREFIXES), same_site="Lax")


def retire(old: Cookies, earlier: tuple[Cookies, ...], new: Cookies) -> tuple[Cookies, ...]:
    """The cookie settings a reload from ``old`` to ``new`` leaves behind: ``old``'s and
    those it had itself retired, newest first, unless ``new`` sets the same cookies;
    at most MAX_RETIRED."""
    own = {(c.name, c.path, c.domain) for c in (new.access, new.refresh)}
    kept: list[Cookies] = []
    for cfg in (old, *earlier):
        if {(c.name, c.path, c.domain) for c in (cfg.access, cfg.refresh)} <= own:
            continue
        if cfg not in kept:
            kept.append(cfg)
    return tuple(kept[:MAX_RETIRED])


def _probe_name(cfg: Cookies) -> str:
    return "__Host-gw_probe" if cfg.secure else "gw_probe"


def set_probe(resp: web.StreamResponse, cfg: Cookies) -> None:
    """A harmless cookie set with the sign-in page: if the form comes back without it, the
    browser keeps no cookies for this site, and signing it in would only lead back."""
    _add(resp, _probe_name(cfg), "1", max_age=3600, path="/", domain=None, secure=cfg.secure, same_site="Lax")


def has_probe(headers: CIMultiDict[str], cfg: Cookies) -> bool:
    return read(headers, _probe_name(cfg)) is not None


def names(cfg: Cookies, retired: Iterable[Cookies] = ()) -> frozenset[str]:
    """The base names of every cookie of the gateway's, now or before: none of them is an
    upstream's business (see the module's docstring)."""
    return frozenset({base(c.name) for owner in (cfg, *retired) for c in (owner.access, owner.refresh)}
                     | {base(name) for name in cfg.retired_names} | DEFAULT_NAMES)
