"""Request-target normalization: the one path the gateway decides on and forwards.

Most real bypasses of auth proxies are a *disagreement* between the path the proxy checked
and the path the upstream served (``/static/../admin``, ``/admin%2Fusers``, ``//admin``,
``/admin;x``). So the gateway works from the raw request-target, turns it into one
unambiguous form, authorizes that form, and forwards exactly that form. What it cannot make
unambiguous it refuses with 400, before any route is looked at.
"""

from __future__ import annotations

import unicodedata
from functools import lru_cache
from typing import NamedTuple

from .errors import BadRequest

_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
# RFC 3986 pchar without "%" and without ";" (upstreams such as Tomcat strip ";params", and
# "..;" means ".." to them), plus the "/" separator.
_RAW_ALLOWED = frozenset(_UNRESERVED | set(b"!$&'()*+,=:@/"))
_HEX = frozenset(b"0123456789abcdefABCDEF")
_HEX_BYTES = frozenset(bytes([b]) for b in _HEX)
# Decoded, these would change the path's structure or mean different things to different
# upstreams: "/", "\" and ";".
_AMBIGUOUS = frozenset(b"/\\;")


class Target(NamedTuple):
    path: str  # normalized; percent-encoded except for unreserved characters
    query: str  # forwarded unchanged, without the "?"; "" when absent

    @property
    def path_qs(self) -> str:
        return f"{self.path}?{self.query}" if self.query else self.path


def ambiguous(description: str) -> BadRequest:
    return BadRequest("ambiguous_path", description)


def normalize(raw_target: str) -> Target:
    """``/static/%2e%2e//admin/./users?x`` -> ``Target("/admin/users", "x")``.

    Steps, in this order: refuse anything outside origin-form; decode percent-encoded
    unreserved characters (and nothing else); refuse encoded ``/``, ``\\``, ``;``, an
    escaped escape (``%252e``), NUL, control characters, malformed escapes and invalid UTF-8;
    merge repeated slashes; remove dot segments (RFC 3986 section 5.2.4), clamped at root.
    """
    if not raw_target.startswith("/"):
        raise BadRequest("invalid_path", "The request target must be a path.")
    path, _, query = raw_target.partition("?")
    if "#" in raw_target:
        raise ambiguous("A fragment is not allowed in a request.")
    segments: list[str] = []
    trailing_slash = False
    for raw_segment in path.split("/")[1:]:
        segment = _decode_segment(raw_segment)
        trailing_slash = segment in {"", ".", ".."}
        if segment in {"", "."}:
            continue  # "//" and "/./" say nothing
        if segment == "..":
            if segments:
                segments.pop()
            continue
        segments.append(segment)
    normalized = "/" + "/".join(segments)
    if trailing_slash and segments:
        normalized += "/"
    return Target(normalized, query)


def _decode_segment(raw: str) -> str:
    data = raw.encode("latin-1", "replace")  # anything non-ASCII is refused below anyway
    out = bytearray()
    plain = bytearray()  # the segment fully decoded, to check that it is valid UTF-8
    i, n = 0, len(data)
    while i < n:
        byte = data[i]
        if byte == 0x25:  # "%"
            if i + 2 >= n:
                raise ambiguous("The path has a truncated percent-escape.")
            hi, lo = data[i + 1], data[i + 2]
            if hi not in _HEX or lo not in _HEX:
                raise ambiguous("The path has an invalid percent-escape.")
            value = int(data[i + 1 : i + 3], 16)
            if value == 0x25 and data[i + 3 : i + 4] in _HEX_BYTES and data[i + 4 : i + 5] in _HEX_BYTES:
                # "%25" + two hex digits is an escape of an escape: an upstream that decodes
                # once more than HTTP does would see "%2e%2e", then "..".
                raise ambiguous("A percent-escape of a percent-escape is not allowed in the path.")
            if value in _AMBIGUOUS:
                raise ambiguous("An encoded '/', '\\' or ';' is not allowed in the path.")
            if value < 0x20 or value == 0x7F:
                raise ambiguous("Control characters are not allowed in the path.")
            if value in _UNRESERVED:
                out.append(value)
            else:
                out += b"%%%02X" % value
            plain.append(value)
            i += 3
            continue
        if byte not in _RAW_ALLOWED:
            if byte == 0x3B:
                raise ambiguous("';' is not allowed in the path.")
            raise ambiguous("The path has a character that must be percent-encoded.")
        out.append(byte)
        plain.append(byte)
        i += 1
    try:
        text = plain.decode("utf-8")  # strict: refuses overlong forms such as %C0%AE and stray bytes
    except UnicodeDecodeError:
        raise ambiguous("The path is not valid UTF-8.") from None
    if not text.isascii() and any(_reads_as_ascii(c) for c in text if not c.isascii()):
        raise ambiguous("The path has a character that some servers read as an ASCII one.")
    return out.decode("ascii")


@lru_cache(maxsize=4096)
def _reads_as_ascii(char: str) -> bool:
    """Whether case mapping or compatibility normalization, as upstreams apply them
    (``.upper()``, ``equalsIgnoreCase``, NFKC), turns ``char`` into something with ASCII in
    it: ``/adm\u0131n`` (dotless i) is ``/ADMIN`` upper-cased, and ``\uff0e\uff0e``
    (full-width dots) is ``..`` under NFKC. Routes compare in ASCII, so such a path could
    be judged as one path and served as another."""
    mappings = (char.upper(), char.lower(), char.casefold(), unicodedata.normalize("NFKC", char))
    return any(c.isascii() for mapped in mappings for c in mapped)


def safe_next(value: object) -> str:
    """Where to send a browser after sign-in: a same-origin path with its query, or ``/``.

    The one validator for every redirect the gateway makes. Anything with a scheme or an
    authority (``//evil``, ``/\\evil``, ``https:evil``, ``javascript:``), anything that
    normalization refuses, or that normalization would change, falls back to ``/``.
    """
    if not isinstance(value, str) or not value.startswith("/") or len(value) > 2048:
        return "/"
    if value.startswith("//") or "\\" in value or not value.isascii() or not value.isprintable():
        return "/"
    try:
        target = normalize(value)
    except BadRequest:
        return "/"
    return target.path_qs
