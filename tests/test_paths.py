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
    # non-ASCII letters that no case mapping or NFKC turns into ASCII are ordinary characters
    ("/%C3%BCber/%E6%97%A5%E6%9C%AC/%D1%8F", "/%C3%BCber/%E6%97%A5%E6%9C%AC/%D1%8F", ""),
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


# Characters that upstreams turn into ASCII (by upper-casing, lower-casing, case-folding or
# NFKC), so that the gateway would judge one path and the upstream serve another.
READ_AS_ASCII = [
    ("/adm%C4%B1n/users", "dotless i: 'ı'.upper() == 'I'"),
    ("/adm%C4%B0n/users", "dotted capital I: 'İ'.lower() == 'i̇'"),
    ("/%C5%BFtatic/x", "long s: 'ſ'.upper() == 'S'"),
    ("/admin%E2%84%AA", "Kelvin sign: lower() == 'k'"),
    ("/static/%EF%BC%8E%EF%BC%8E/admin", "full-width dots: NFKC '..'"),
    ("/%EF%BD%81dmin", "full-width a"),
    ("/%EF%AC%80ile", "the ligature ﬀ: NFKC 'ff'"),
    ("/stra%C3%9Fe", "sharp s: 'ß'.upper() == 'SS' (Python, Java)"),
    ("/%E2%85%A0", "Roman numeral one: NFKC 'I'"),
]


@pytest.mark.parametrize("raw, why", READ_AS_ASCII)
def test_characters_that_upstreams_read_as_ascii_are_refused(raw: str, why: str) -> None:
    with pytest.raises(BadRequest) as refused:
        normalize(raw)
    assert refused.value.code == "ambiguous_path", why


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
