"""Signing keys on disk: ``gateway keys generate``.

A new private key for EdDSA (Ed25519), ES256 (P-256) or RS256 (RSA, 3072 bits), written as an
unencrypted PKCS#8 PEM file that only its owner may read (mode 0600). An existing file is
never overwritten: a key that signed tokens in use must not vanish by a slip of the shell.
"""

from __future__ import annotations

import os
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from .errors import UserError

ALGORITHMS = ("EdDSA", "ES256", "RS256")
RSA_BITS = 3072
KID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")  # what the config accepts as a kid


@dataclass(frozen=True)
class GeneratedKey:
    kid: str
    algorithm: str
    path: Path


def new_private_key(algorithm: str) -> Any:
    """A fresh private key of the type ``algorithm`` signs with."""
    if algorithm == "EdDSA":
        return ed25519.Ed25519PrivateKey.generate()
    if algorithm == "ES256":
        return ec.generate_private_key(ec.SECP256R1())
    if algorithm == "RS256":
        return rsa.generate_private_key(public_exponent=65537, key_size=RSA_BITS)
    raise UserError(f"unknown algorithm {algorithm!r} (choose one of: {', '.join(ALGORITHMS)})")


def pem(private_key: Any) -> bytes:
    """A private key as unencrypted PKCS#8 PEM."""
    data: bytes = private_key.private_bytes(
        encoding=serialization.Encoding.PEM,
        format=serialization.PrivateFormat.PKCS8,
        encryption_algorithm=serialization.NoEncryption(),
    )
    return data


def default_kid(algorithm: str) -> str:
    """``es256-20260501-9f3a``: the algorithm, the day, and a little randomness, so two keys
    made on one day still differ."""
    return f"{algorithm.lower()}-{time.strftime('%Y%m%d')}-{secrets.token_hex(2)}"


def write_new(path: Path, data: bytes) -> None:
    """Create ``path`` with mode 0600 and write ``data``; refuse if anything (a file, a
    symlink, a directory) is already there."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        raise UserError(f"{path} already exists; not overwriting it (choose another --out)") from None
    except OSError as exc:
        raise UserError(f"cannot create {path}: {exc.strerror or exc}") from None
    try:
        os.fchmod(fd, 0o600)  # whatever the umask made of it
        with os.fdopen(fd, "wb") as out:
            fd = -1
            out.write(data)
    except OSError as exc:
        if fd != -1:
            os.close(fd)
        path.unlink(missing_ok=True)
        raise UserError(f"cannot write {path}: {exc.strerror or exc}") from None


def generate(algorithm: str, out: Path | None = None, kid: str | None = None) -> GeneratedKey:
    """Make a key for ``algorithm`` and write it to ``out`` (default ``KID.pem`` in the
    working directory)."""
    if algorithm not in ALGORITHMS:
        raise UserError(f"unknown algorithm {algorithm!r} (choose one of: {', '.join(ALGORITHMS)})")
    kid = kid or default_kid(algorithm)
    if not KID.fullmatch(kid):
        raise UserError(f"--kid {kid!r}: use 1 to 64 letters, digits, '.', '_' or '-'")
    path = out if out is not None else Path(f"{kid}.pem")
    write_new(path, pem(new_private_key(algorithm)))
    return GeneratedKey(kid=kid, algorithm=algorithm, path=path)
