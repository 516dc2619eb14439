"""The route table: first path match decides, methods never fall through."""

from __future__ import annotations

import pytest

from gateway.config import AUTHENTICATED, PUBLIC, Access, Route
from gateway.errors import BadRequest, MethodNotAllowed, NotFound
from gateway.routes import RouteTable

ADMIN = Access("rules", roles=frozenset({"admin"}))


def route(i: int, path: str, access: dict[str, Access], methods: frozenset[str] | None = None) -> Route:
    return Route(index=i, path=path, methods=methods, access=access, upstream="app")


TABLE = RouteTable((
    route(0, "/static/**", {"*": PUBLIC}),
    route(1, "/admin/**", {"*": ADMIN}, frozenset({"GET", "POST"})),
    route(2, "/files/*", {"GET": PUBLIC, "*": AUTHENTICATED}),
    route(3, "/exact", {"*": AUTHENTICATED}),
    route(4, "/**", {"*": AUTHENTICATED}),
))


@pytest.mark.parametrize("path, index", [
    ("/static", 0), ("/static/", 0), ("/static/a/b.js", 0), ("/staticx", 4),
    ("/STATIC/a.js", 4),  # public routes match case-sensitively...
    ("/admin", 1), ("/admin/users", 1), ("/ADMIN/users", 1), ("/Admin", 1),  # ...protective ones don't,
    ("/admin./users", 1), ("/admin%20/x", 1), ("/Admin.%20", 1), ("/static./a.js", 4),  # nor trailing dots
    ("/exact.", 3), ("/files/.../b", 4), ("/files/a.", 2),
    ("/files/a", 2), ("/files/a/", 2), ("/files/a/b", 4), ("/files/", 4), ("/files", 4),
    ("/exact", 3), ("/exact/", 4), ("/", 4),
])
def test_first_path_match_decides(path: str, index: int) -> None:
    assert TABLE.decide("GET", path)[0].index == index


def test_methods() -> None:
    assert TABLE.decide("HEAD", "/admin/x")[1] is ADMIN  # HEAD is authorized as GET
    with pytest.raises(MethodNotAllowed) as refused:
        TABLE.decide("DELETE", "/admin/users/7")  # never falls through to /**
    assert refused.value.headers["Allow"] == "GET, HEAD, POST"
    assert TABLE.decide("GET", "/files/a")[1] is PUBLIC
    assert TABLE.decide("HEAD", "/files/a")[1] is PUBLIC
    assert TABLE.decide("PUT", "/files/a")[1] is AUTHENTICATED


def test_per_method_access_without_default_is_405() -> None:
    table = RouteTable((route(0, "/api/**", {"GET": PUBLIC, "POST": ADMIN}),))
    with pytest.raises(MethodNotAllowed) as refused:
        table.decide("DELETE", "/api/x")
    assert refused.value.headers["Allow"] == "GET, HEAD, POST"


@pytest.mark.parametrize("method, query, outcome", [
    ("POST", "_method=DELETE", MethodNotAllowed),  # /admin/** does not allow DELETE at all
    ("POST", "x=1&_METHOD=get", 1),  # the same access as POST: fine
    ("GET", "_method=", MethodNotAllowed),  # an empty method is no method the route allows
])
def test_method_override_in_the_query(method: str, query: str, outcome: object) -> None:
    if isinstance(outcome, int):
        assert TABLE.decide(method, "/admin/x", query)[0].index == outcome
    else:
        with pytest.raises(outcome):  # type: ignore[call-overload]
            TABLE.decide(method, "/admin/x", query)


def test_method_override_needing_other_access_is_refused() -> None:
    with pytest.raises(BadRequest) as refused:
        TABLE.decide("GET", "/files/a", "_method=PUT")  # GET is public there, PUT is not
    assert refused.value.code == "ambiguous_method"
    assert TABLE.decide("PUT", "/files/a", "_method=DELETE")[1] is AUTHENTICATED


def test_no_match_is_denied() -> None:
    with pytest.raises(NotFound):
        RouteTable((route(0, "/api/**", {"*": PUBLIC}),)).decide("GET", "/other")
