"""Apache htpasswd files, bcrypt entries only.

One ``user:hash`` a line; blank lines and lines starting with ``#`` are skipped. The only
scheme taken is bcrypt (``$2y$``, ``$2a$``, ``$2b$``: ``htpasswd -B``), the one strong
scheme htpasswd files use. Everything else an htpasswd file may hold is refused, naming
the line and the scheme, so that a weak file stops ``gateway check`` and ``gateway run``
instead of quietly admitting users behind a hash anyone can crack: ``{SHA}`` (unsalted
SHA-1), ``$apr1$`` and ``$1$`` (MD5), crypt (DES, 8 characters of password), plain text.

A file is all or nothing: one bad line and :func:`load` raises :class:`HtpasswdError`
(first problem, and how many more), so a running gateway keeps the contents it had.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

MAX_SIZE = 16 * 1024 * 1024
_BCRYPT = re.compile(r"^\$2[aby]\$(\d\d)\$[./A-Za-z0-9]{53}$")
_DES = re.compile(r"^[./A-Za-z0-9]{13}$")
# prefix -> what it is, for the message
_REFUSED = (
    ("{SHA}", "{SHA} (unsalted SHA-1)"),
    ("{SSHA}", "{SSHA} (salted SHA-1)"),
    ("$apr1$", "$apr1$ (Apache MD5)"),
    ("$1$", "$1$ (MD5-crypt)"),
    ("$5$", "$5$ (SHA-256-crypt)"),
    ("$6$", "$6$ (SHA-512-crypt)"),
    ("$2x$", "$2x$ (bcrypt of a buggy implementation)"),
)


class HtpasswdError(ValueError):
    """The file cannot be used; ``str()`` is one line naming the line number."""


@dataclass(frozen=True)
class Entry:
    name: str
    hash: bytes  # a bcrypt hash, as bcrypt.checkpw takes it
    cost: int
    line: int


def load(path: str | os.PathLike[str]) -> dict[str, Entry]:
    """The file's entries by user name; HtpasswdError when it cannot be read or used."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_SIZE + 1)
    except OSError as exc:
        raise HtpasswdError(f"cannot read it: {exc.strerror or exc.__class__.__name__}") from None
    if len(data) > MAX_SIZE:
        raise HtpasswdError(f"it is larger than {MAX_SIZE // 1024 // 1024} MiB")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise HtpasswdError(f"line {line}: not UTF-8 text") from None
    return parse(text)


def parse(text: str) -> dict[str, Entry]:
    from .users import USERNAME  # noqa: PLC0415 (users imports config, which imports this)

    entries: dict[str, Entry] = {}
    problems: list[str] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, value = line.partition(":")
        if not sep or not name:
            problems.append(f"line {number}: expected user:hash")
            continue
        if not USERNAME.fullmatch(name):
            problems.append(f"line {number}: the user name {name[:64]!r} is not allowed (1-64 letters, "
                            "digits, '.', '_', '@' or '-', starting with a letter or digit)")
            continue
        if name in entries:
            problems.append(f"line {number}: user {name} is already on line {entries[name].line}")
            continue
        m = _BCRYPT.fullmatch(value)
        if m is None or not 4 <= int(m.group(1)) <= 31:
            problems.append(f"line {number}: user {name} has a password in {_scheme(value)}, which the "
                            f"gateway refuses: only bcrypt is taken (make it again with: htpasswd -B FILE {name})")
            continue
        entries[name] = Entry(name=name, hash=value.encode("ascii"), cost=int(m.group(1)), line=number)
    if problems:
        more = f" (and {len(problems) - 1} more lines with problems)" if len(problems) > 1 else ""
        raise HtpasswdError(problems[0] + more)
    return entries


def _scheme(value: str) -> str:
    for prefix, what in _REFUSED:
        if value.startswith(prefix):
            return what
    if value.startswith("$2"):
        return "a malformed bcrypt hash"
    if _DES.fullmatch(value):
        return "crypt (DES)"
    if value.startswith(("$", "{")):
        return "an unknown scheme"
    return "plain text"
