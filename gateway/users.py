"""Managing users: the operations behind ``gateway users ...``.

Changing a password, disabling or removing a user ends every session of that user: whoever
held them must prove who they are again.
"""

from __future__ import annotations

import re
import time
import unicodedata
from collections.abc import Callable
from functools import cache
from importlib import resources

from .config import Registration
from .credentials import hash_password
from .errors import UserError
from .store import Store, User

USERNAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
ROLE = re.compile(r"^[A-Za-z0-9._:@-]{1,64}$")
MIN_PASSWORD_LENGTH = 8
MAX_PASSWORD_LENGTH = 1024


def check_username(name: str) -> str:
    if not USERNAME.fullmatch(name):
        raise UserError(f"invalid user name {name!r}: use 1-64 letters, digits, '.', '_', '@' or '-', "
                        "starting with a letter or digit")
    return name


def check_password(password: str) -> str:
    if len(password) < MIN_PASSWORD_LENGTH:
        raise UserError(f"the password must have at least {MIN_PASSWORD_LENGTH} characters")
    if len(password) > MAX_PASSWORD_LENGTH:
        raise UserError(f"the password must have at most {MAX_PASSWORD_LENGTH} characters")
    return password


def check_roles(roles: list[str]) -> tuple[str, ...]:
    for role in roles:
        if not ROLE.fullmatch(role):
            raise UserError(f"invalid role {role!r}: use letters, digits, '.', '_', ':', '@' or '-'")
    return tuple(dict.fromkeys(roles))


async def add(store: Store, name: str, password: str, roles: list[str],
              clock: Callable[[], float] = time.time) -> User:
    user = User(name=check_username(name), password_hash=hash_password(check_password(password)),
                roles=check_roles(roles), created_at=clock())
    await store.add_user(user)
    return user


async def passwd(store: Store, name: str, password: str, clock: Callable[[], float] = time.time) -> int:
    if not await store.update_user(name, password_hash=hash_password(check_password(password))):
        raise UserError(f"no user named {name!r}")
    return await store.revoke_user_sessions(name, clock(), "password_changed")


async def disable(store: Store, name: str, clock: Callable[[], float] = time.time) -> int:
    if not await store.update_user(name, disabled=True):
        raise UserError(f"no user named {name!r}")
    return await store.revoke_user_sessions(name, clock(), "user_disabled")


async def remove(store: Store, name: str, clock: Callable[[], float] = time.time) -> int:
    ended = await store.revoke_user_sessions(name, clock(), "user_removed")
    if not await store.remove_user(name):
        raise UserError(f"no user named {name!r}")
    return ended


async def set_roles(store: Store, name: str, roles: list[str], clock: Callable[[], float] = time.time) -> int:
    """Give ``name`` exactly ``roles``; how many sessions ended. Taking a role away ends the
    user's sessions, since their access tokens carry it until they expire; roles only added
    reach the sessions at their next refresh, and none ends."""
    wanted = check_roles(roles)
    user = await store.get_user(name)
    if user is None or not await store.update_user(name, roles=wanted):
        raise UserError(f"no user named {name!r}")
    if set(user.roles) - set(wanted):
        return await store.revoke_user_sessions(name, clock(), "roles_changed")
    return 0


async def enable(store: Store, name: str, clock: Callable[[], float] = time.time) -> int:
    """Let a disabled user sign in again; no session is ended (0)."""
    if not await store.update_user(name, disabled=False):
        raise UserError(f"no user named {name!r}")
    return 0


@cache
def common_passwords() -> frozenset[str]:
    """The short list of passwords everyone tries first, shipped with the package."""
    text = resources.files(__package__).joinpath("common-passwords.txt").read_text(encoding="utf-8")
    return frozenset(line.strip().casefold() for line in text.splitlines()
                     if line.strip() and not line.startswith("#"))


def look_alike(name: str) -> str:
    """What apps that are lax about user names may take a name for: case folded (Unicode
    NFKC), trailing punctuation dropped (``Dave``, ``dave`` and ``dave.`` are one user to
    an app that compares them case-insensitively or trims them)."""
    return unicodedata.normalize("NFKC", name).casefold().rstrip("._@-")


async def look_alike_taken(store: Store, name: str) -> bool:
    """Whether a user whose name looks like ``name`` exists: a self-registered ``dave``
    beside an operator's ``Dave`` would be the same user to such an app."""
    return bool(await look_alikes(store, name))


async def look_alikes(store: Store, name: str) -> list[str]:
    """The users whose names look like ``name`` (see look_alike), ``name`` itself included."""
    wanted = look_alike(name)
    return sorted(existing for existing in await store.user_names() if look_alike(existing) == wanted)


def check_registration(cfg: Registration, name: str, password: str) -> None:
    """A UserError saying what is wrong with a new user name or password, or nothing."""
    if not re.fullmatch(cfg.username_pattern, name) or not USERNAME.fullmatch(name):
        raise UserError("invalid_username")
    folded = password.casefold()
    if len(password) < cfg.min_password_length or len(password) > MAX_PASSWORD_LENGTH:
        raise UserError("weak_password")
    if folded in common_passwords() or folded == name.casefold() or len(set(password)) < 4:
        raise UserError("weak_password")
