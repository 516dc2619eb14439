"""The compiled route table: which route decides a request, and what it requires.

The first route whose *path* matches decides. A method that route does not allow is a 405:
it never falls through to a later, weaker route. HEAD is authorized as GET.

Routes that protect (anything but ``public``) match case-insensitively and ``public`` routes
match case-sensitively, so that playing with case (``/ADMIN/users`` against an upstream
that ignores case) can only make a request *more* protected, never less.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from urllib.parse import unquote_plus

from .config import Access, Route
from .errors import BadRequest, MethodNotAllowed, NotFound

_PARAMETER_SEPARATOR = re.compile(r"[&;]")
_TRAILING_DOTS = re.compile(r"(?<=[^/.])(?:\.|%20)+(?=/|$)")  # see fold
_PHP_UNDERSCORES = re.compile(r"[ .]")  # PHP reads these (and a "[" never closed) as "_" in a name


@dataclass(frozen=True)
class _Compiled:
    route: Route
    kind: str  # "exact" | "one" (/x/*) | "any" (/x/**)
    prefix: str  # the literal part, folded (see fold) when the route protects
    fold_case: bool


class RouteTable:
    def __init__(self, routes: tuple[Route, ...]) -> None:
        self.routes = routes
        self._compiled = tuple(_compile(route) for route in routes)

    def match(self, path: str) -> Route | None:
        folded = fold(path)
        for c in self._compiled:
            if _matches(c, folded if c.fold_case else path):
                return c.route
        return None

    def decide(self, method: str, path: str, query: str = "") -> tuple[Route, Access]:
        """The route for this request and the access it requires; NotFound when no route
        matches, MethodNotAllowed when the matching route does not allow the method.

        Frameworks such as Rails, Laravel and Play act on ``?_method=DELETE`` as if it were
        the method. The query cannot be stripped safely, so a method named there must be
        allowed too, and need the same access as the request's own; otherwise the request
        is refused rather than guessed about (400 ``ambiguous_method``)."""
        return (route := self.route_for(path)), required(route, method, query)

    def route_for(self, path: str) -> Route:
        """The first route whose path matches; NotFound when none does."""
        route = self.match(path)
        if route is None:
            raise NotFound()
        return route


def required(route: Route, method: str, query: str = "") -> Access:
    """What ``route`` requires of a request with this method and query (see decide)."""
    access = access_for(route, method)
    override = offending_override(route, method, query)
    if override is not None:
        access_for(route, override)  # MethodNotAllowed when the route does not allow it
        raise BadRequest("ambiguous_method", "The query names a method that needs other access.")
    return access


def _method_overrides(query: str) -> list[str]:
    """Every method a ``_method`` query parameter names, upper-cased, in order: a name is
    taken as ``_method`` in every spelling some framework reads so (percent- or
    plus-encoded, in any case, PHP's ``.``, space or ``[`` for ``_``, ``_method[]``), and
    ``;`` separates parameters as ``&`` does (older Rack). Frameworks differ on which of
    several they act on, so each one counts."""
    if "method" not in query.lower() and "%" not in query:
        return []
    found = []
    for part in _PARAMETER_SEPARATOR.split(query):
        name, _, value = part.partition("=")
        name = _PHP_UNDERSCORES.sub("_", unquote_plus(name).strip().lower())
        if name.startswith("_method[") or name.replace("[", "_") == "_method":
            found.append(unquote_plus(value).strip().upper())
    return found


def offending_override(route: Route, method: str, query: str) -> str | None:
    """The first method named by ``_method`` that the route does not allow, or that needs
    other access than ``method`` (see decide); None when every one is harmless."""
    access = route.access.get("GET" if method == "HEAD" else method) or route.access.get("*")
    for override in _method_overrides(query):
        if override == method:
            continue
        try:
            if access_for(route, override) != access:
                return override
        except MethodNotAllowed:
            return override
    return None


def access_for(route: Route, method: str) -> Access:
    as_method = "GET" if method == "HEAD" else method
    if route.methods is not None and as_method not in route.methods:
        raise MethodNotAllowed(allowed_methods(route))
    access = route.access.get(as_method) or route.access.get("*")
    if access is None:
        raise MethodNotAllowed(allowed_methods(route))
    return access


def allowed_methods(route: Route) -> set[str]:
    named = set(route.methods or ()) or {m for m in route.access if m != "*"}
    if "GET" in named:
        named.add("HEAD")
    return named


@dataclass(frozen=True)
class Shadow:
    """``route`` is never matched: ``by``, earlier in the table, matches every path it would
    (and, as methods never fall through, answers every request it would have had)."""

    route: Route
    by: Route
    # Only as written: ``by`` matches case-sensitively (it is public), so spellings of the
    # path in another case still reach ``route``, which matches in any case.
    other_case_only: bool = False


def shadowed(routes: tuple[Route, ...]) -> list[Shadow]:
    """Every route that can never match, each with the first earlier route that takes its
    paths; and every protective route that an earlier public one takes as written (which
    only other spellings in case still reach). Conservative: a route is named only when
    *every* path it matches (as written) is taken."""
    compiled = [_compile(route) for route in routes]
    out = []
    for j, later in enumerate(compiled):
        earlier = next((c for c in compiled[:j] if _covers(c, later)), None)
        if earlier is not None:
            out.append(Shadow(later.route, earlier.route))
        elif later.fold_case:
            as_written = _compile(later.route, fold_case=False)
            earlier = next((c for c in compiled[:j] if _covers(c, as_written)), None)
            if earlier is not None:
                out.append(Shadow(later.route, earlier.route, other_case_only=True))
    return out


def fold(path: str) -> str:
    """A (normalized) path as routes that protect match it: lower-cased, and each segment
    without the dots and spaces (``%20``) it ends in (``/Admin.%20/x`` is ``/admin/x``),
    which Windows and IIS drop from a name. A segment is never left empty."""
    return _TRAILING_DOTS.sub("", path.lower())


def _covers(a: _Compiled, b: _Compiled) -> bool:
    """Whether ``a`` matches every path that ``b`` matches, in the case each matches in."""
    ap, bp = a.prefix, b.prefix
    if a.fold_case:
        bp = fold(bp)
    elif b.fold_case and ap.lower() != ap.upper():
        return False  # b also matches spellings in other cases, which a (case-sensitive) does not
    if a.kind == "any":
        if not ap:
            return True
        return bool(bp) and (bp == ap or bp.startswith(ap + "/"))
    if b.kind == "exact":
        return _matches(replace(a, prefix=ap), bp)
    return a.kind == b.kind == "one" and ap == bp


def _compile(route: Route, *, fold_case: bool | None = None) -> _Compiled:
    folds = not all(a.is_public for a in route.access.values()) if fold_case is None else fold_case
    pattern = fold(route.path) if folds else route.path
    if pattern.endswith("/**"):
        return _Compiled(route, "any", pattern[:-3], folds)
    if pattern.endswith("/*"):
        return _Compiled(route, "one", pattern[:-1], folds)
    return _Compiled(route, "exact", pattern, folds)


def _matches(c: _Compiled, path: str) -> bool:
    if c.kind == "exact":
        return path == c.prefix
    if c.kind == "any":
        # "/x/**" is "/x" itself and anything below it; "/**" is everything
        return path == c.prefix or path.startswith(c.prefix + "/") or not c.prefix
    # "/x/*": exactly one more non-empty segment, with or without a trailing slash
    if not path.startswith(c.prefix):
        return False
    rest = path[len(c.prefix):].removesuffix("/")
    return bool(rest) and "/" not in rest
