"""Path normalization and the redirect validator, table-driven."""

from __future__ import annotations

import pytest

from gateway.errors import BadRequest
from gateway.paths import normalize, safe_next

NORMALIZED = [
    ("/", "/", ""),
    ("/a/b?x=1&y=%2F", "/a/b", "x=1&y=%2F"),  # the query is never touched
    ("/static/../admin/users", "/admin/users", ""),
    ("/static/x/../../admin/users", "/admin/users", ""),
    ("/../admin", "/admin", ""),  # clamped at root
    ("/static/%2e%2e/admin", "/admin", ""),
    ("/static/%2E%2E/admin", "/admin", ""),
    ("/static/.%2e/admin", "/admin", ""),
    ("/static/%2e./admin", "/admin", ""),
    ("/100%25", "/100%25", ""),  # a literal "%" stays escaped
    ("//admin//users", "/admin/users", ""),
    ("///admin///users", "/admin/users", ""),
    ("/static//../admin/users", "/admin/users", ""),  # "//" is merged first, then ".." pops
    ("/a/./b/.", "/a/b/", ""),
    ("/a/b/..", "/a/", ""),
    ("/docs/", "/docs/", ""),
    ("/%41dmin/%7euser", "/Admin/~user", ""),  # unreserved characters are decoded
    ("/caf%c3%a9", "/caf%C3%A9", ""),  # other escapes are kept, upper-cased
    ("/a%20b", "/a%20b", ""),
    ("/admin/users%23/static/x", "/admin/users%23/static/x", ""),  # %23 is a character, not a fragment
]


@pytest.mark.parametrize("raw, path, query", NORMALIZED)
def test_normalize(raw: str, path: str, query: str) -> None:
    assert normalize(raw) == (path, query)


REFUSED = [
    "/admin%2Fusers", "/admin%2fusers", "/static/..%2Fadmin/users", "/static/..%5Cadmin/users",
    "/%2fadmin/users", "/static\\..\\admin\\users", "/admin;jsessionid=x/users", "/admin;/users",
    "/static/..;/admin/users", "/admin%3Busers", "/admin/users%00.css", "/admin%0a/users",
    "/admin%09/users", "/admin%7f", "/admin/%", "/admin/%zz", "/admin/%f", "/admin/%ff",
    "/admin/%c0%ae%c0%ae/", "/static/%252e%252e/admin", "/%2561dmin/users", "/static/..%252fadmin", "/admin/users#/static/x", "http://evil/admin", "*", "admin",
    "/a b", "/ä",
]


@pytest.mark.parametrize("raw", REFUSED)
def test_refused(raw: str) -> None:
    with pytest.raises(BadRequest):
        normalize(raw)


@pytest.mark.parametrize("value, expected", [
    ("/reports?year=2026", "/reports?year=2026"),
    ("/a/../b", "/b"),
    ("/javascript:alert(1)", "/javascript:alert(1)"),
    ("//evil.example", "/"), ("///evil.example", "/"), ("/\\evil.example", "/"),
    ("\\/evil.example", "/"), ("\\\\evil.example", "/"), ("/%5Cevil.example", "/"),
    ("/%2F/evil.example", "/"), ("%2F%2Fevil.example", "/"), ("https://evil.example", "/"),
    ("https:evil.example", "/"), ("javascript:alert(1)", "/"), (" javascript:alert(1)", "/"),
    ("data:text/html,x", "/"), ("", "/"), (None, "/"), ("/x\r\nSet-Cookie: a=b", "/"),
    # SEC-50 and SEC-52, every input of the catalogue
    ("//evil.example", "/"), ("%2F%2Fevil.example", "/"), ("/\\evil.example", "/"), ("\\/evil.example", "/"),
    ("/%5Cevil.example", "/"), ("\\\\evil.example", "/"), ("///evil.example", "/"), ("/%2F/evil.example", "/"),
    ("https:evil.example", "/"), ("http:evil.example", "/"), ("https:/evil.example", "/"),
    ("JaVaScRiPt:alert(1)", "/"), ("data:text/html,<script>alert(1)</script>", "/"), ("vbscript:msgbox", "/"),
])
def test_safe_next(value: object, expected: str) -> None:
    assert safe_next(value) == expected
