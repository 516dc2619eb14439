"""The storage contract, run against every backend (SQLite and Redis), with a fake clock."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway.errors import UserError
from gateway.sessions import hash_token
from gateway.store import Failures, RefreshRules, Session, Store, User, open_store, resolve_url
from gateway.store.sqlite import SCHEMA_VERSION, SQLiteStore

from conftest import redis_store

RULES = RefreshRules(idle_ttl=3600, reuse_grace=10)
T0 = 1_800_000_000.0


@pytest.fixture(params=["sqlite", "redis"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    if request.param == "redis":
        async with redis_store(request.getfixturevalue("redis_url")) as opened:
            yield opened
        return
    opened = await open_store(f"sqlite:///{str(tmp_path / 'store.db').lstrip('/')}")
    yield opened
    await opened.close()


def then(successor_hash: bytes):  # type: ignore[no-untyped-def]
    """A successor function that ignores the chain key (the store's tests choose the hashes)."""
    return lambda chain_key: successor_hash


def session(sid: str = "s1", user: str = "alice", **changes: object) -> Session:
    values: dict[str, object] = dict(id=sid, user=user, created_at=T0, last_used_at=T0,
                                     expires_at=T0 + 86400, chain_key=b"k" * 32)
    values.update(changes)
    return Session(**values)  # type: ignore[arg-type]


async def test_users_round_trip(store: Store) -> None:
    await store.add_user(User("alice", "hash-a", ("user", "dev"), created_at=T0))
    await store.add_user(User("bob", "hash-b", ("admin",), created_at=T0))
    with pytest.raises(UserError):
        await store.add_user(User("alice", "other"))
    assert await store.get_user("alice") == User("alice", "hash-a", ("user", "dev"), False, T0)
    assert await store.get_user("nobody") is None
    assert [u.name for u in await store.list_users()] == ["alice", "bob"]
    assert sorted(await store.user_names()) == ["alice", "bob"]
    assert await store.update_user("alice", roles=("ops",), disabled=True)
    assert (await store.get_user("alice")) == User("alice", "hash-a", ("ops",), True, T0)
    assert not await store.update_user("nobody", disabled=True)
    assert await store.remove_user("bob") and not await store.remove_user("bob")


async def test_a_users_claims_round_trip(store: Store) -> None:
    claims = (("tenant", "acme"), ("level", 3), ("ratio", 0.5), ("staff", True), ("groups", ["a", "b"]))
    await store.add_user(User("carol", "hash-c", ("user",), created_at=T0, claims=claims))
    assert (await store.get_user("carol")) == User("carol", "hash-c", ("user",), False, T0, claims)
    assert await store.update_user("carol", claims=(("tenant", "globex"),))
    assert (await store.get_user("carol")) == User("carol", "hash-c", ("user",), False, T0, (("tenant", "globex"),))
    assert await store.update_user("carol", roles=("ops",))  # claims stay as they were
    assert [u.claims for u in await store.list_users()] == [(("tenant", "globex"),)]
    # and a refresh reads them with the rest of the user
    await store.create_session(session(user="carol"), hash_token("c0"))
    rotated = await store.rotate_refresh(hash_token("c0"), then(hash_token("c1")), T0 + 5, RULES)
    assert rotated.user is not None and rotated.user.claims == (("tenant", "globex"),)


async def test_rotation_outcomes(store: Store) -> None:
    await store.create_session(session(), hash_token("t0"))
    assert (await store.rotate_refresh(hash_token("nope"), then(hash_token("x")), T0, RULES)).outcome == "unknown"

    first = await store.rotate_refresh(hash_token("t0"), then(hash_token("t1")), T0 + 5, RULES)
    assert first.outcome == "rotated"
    assert first.user is None  # no such user in this store
    await store.add_user(User("alice", "hash-a", ("user",), created_at=T0))
    assert first.session is not None and first.session.generation == 1
    assert first.session.last_used_at == T0 + 5

    # the previous token, inside the grace period: honoured, no new link
    again = await store.rotate_refresh(hash_token("t0"), then(hash_token("t1")), T0 + 14, RULES)
    assert again.outcome == "grace" and again.session is not None and again.session.generation == 1
    assert again.user == User("alice", "hash-a", ("user",), False, T0)

    assert (await store.rotate_refresh(hash_token("t1"), then(hash_token("t2")), T0 + 20, RULES)).outcome == "rotated"
    # t0 is now two links back: a replay, whatever the time
    replay = await store.rotate_refresh(hash_token("t0"), then(hash_token("t1")), T0 + 21, RULES)
    assert replay.outcome == "reused"
    assert replay.session is not None and replay.session.revoked_reason == "refresh_token_reused"
    assert (await store.get_session("s1")).revoked_at == T0 + 21  # type: ignore[union-attr]
    assert (await store.rotate_refresh(hash_token("t2"), then(hash_token("t3")), T0 + 22, RULES)).outcome == "revoked"


async def test_replay_after_grace_is_reuse(store: Store) -> None:
    await store.create_session(session(), hash_token("t0"))
    await store.rotate_refresh(hash_token("t0"), then(hash_token("t1")), T0, RULES)
    assert (await store.rotate_refresh(hash_token("t0"), then(hash_token("t1")), T0 + 10.5, RULES)).outcome == "reused"


async def test_expiry_absolute_and_idle(store: Store) -> None:
    await store.create_session(session("abs", expires_at=T0 + 100), hash_token("a0"))
    await store.create_session(session("idle"), hash_token("i0"))
    assert (await store.rotate_refresh(hash_token("a0"), then(hash_token("a1")), T0 + 100, RULES)).outcome == "expired"
    assert (await store.rotate_refresh(hash_token("i0"), then(hash_token("i1")), T0 + 3600, RULES)).outcome == "expired"


async def test_successor_hash_comes_from_the_chain_key(store: Store) -> None:
    await store.create_session(session(chain_key=b"c" * 32), hash_token("t0"))
    seen = []
    rotation = await store.rotate_refresh(hash_token("t0"), lambda key: seen.append(key) or hash_token("t1"),
                                          T0, RULES)
    assert rotation.outcome == "rotated" and seen == [b"c" * 32]
    assert (await store.session_of_refresh(hash_token("t1"))).id == "s1"  # type: ignore[union-attr]


async def test_concurrent_rotation_makes_one_successor(store: Store) -> None:
    await store.create_session(session(), hash_token("t0"))
    results = await asyncio.gather(*(
        store.rotate_refresh(hash_token("t0"), then(hash_token("t1")), T0 + 1, RULES) for _ in range(30)))
    outcomes = sorted(r.outcome for r in results)
    assert outcomes == ["grace"] * 29 + ["rotated"]
    assert (await store.get_session("s1")).generation == 1  # type: ignore[union-attr]


async def test_revocation(store: Store) -> None:
    for sid, user in (("a1", "alice"), ("a2", "alice"), ("b1", "bob")):
        await store.create_session(session(sid, user), hash_token(sid))
    assert await store.revoke_session("a1", T0, "logout")
    assert not await store.revoke_session("a1", T0, "logout")  # already ended
    assert not await store.revoke_session("missing", T0, "logout")
    assert await store.revoke_user_sessions("alice", T0 + 1, "logout_all") == 1
    by_id = {s.id: s for s in await store.list_sessions()}
    assert by_id["a1"].revoked_reason == "logout" and by_id["a2"].revoked_reason == "logout_all"
    assert by_id["b1"].revoked_at is None
    assert [s.id for s in await store.list_sessions("bob")] == ["b1"]
    assert (await store.session_of_refresh(hash_token("a2"))).id == "a2"  # type: ignore[union-attr]


async def test_count_sessions_counts_the_live_ones(store: Store) -> None:
    for sid, user in (("s1", "alice"), ("s2", "alice"), ("s3", "bob")):
        await store.create_session(session(sid, user), hash_token(f"{sid}-0"))
    await store.create_session(session("short", expires_at=T0 + 100), hash_token("short-0"))
    assert await store.count_sessions(T0, RULES) == 4
    await store.revoke_session("s2", T0, "logout")
    assert await store.count_sessions(T0, RULES) == 3
    # used just before its absolute end, and still over at that end
    assert (await store.rotate_refresh(hash_token("short-0"), then(hash_token("short-1")), T0 + 50, RULES)).outcome == "rotated"
    assert await store.count_sessions(T0 + 99, RULES) == 3
    assert await store.count_sessions(T0 + 100, RULES) == 2
    # a refresh, and a repeat inside the grace period, each push the idle end later
    assert (await store.rotate_refresh(hash_token("s3-0"), then(hash_token("s3-1")), T0 + 10, RULES)).outcome == "rotated"
    assert (await store.rotate_refresh(hash_token("s3-0"), then(hash_token("s3-1")), T0 + 15, RULES)).outcome == "grace"
    assert (await store.rotate_refresh(hash_token("s1-0"), then(hash_token("s1-1")), T0 + 3000, RULES)).outcome == "rotated"
    assert await store.count_sessions(T0 + 3612, RULES) == 2  # s1 and s3
    assert await store.count_sessions(T0 + 3615, RULES) == 1  # s3 idle for idle_ttl
    # a replay ends s1
    assert (await store.rotate_refresh(hash_token("s1-0"), then(hash_token("s1-1")), T0 + 3100, RULES)).outcome == "reused"
    assert await store.count_sessions(T0 + 3612, RULES) == 1
    await store.revoke_user_sessions("bob", T0 + 3200, "admin_revoke")
    assert await store.count_sessions(T0 + 3200, RULES) == 0
    assert await store.purge(T0 + 10 * 86400, RULES, 100) == 4
    assert await store.count_sessions(T0, RULES) == 0


async def test_sqlite_file_is_wal_versioned_and_holds_no_plaintext_token(tmp_path: Path) -> None:
    path = tmp_path / "gw.db"
    store = await open_store(f"sqlite:///{str(path).lstrip('/')}")
    token = "plaintext-refresh-token-value-0123456789abc"
    await store.create_session(session(), hash_token(token))
    await store.close()
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    db.close()
    assert token.encode() not in path.read_bytes()
    reopened = await open_store(f"sqlite:///{str(path).lstrip('/')}")  # migrating again is a no-op
    assert (await reopened.get_session("s1")) == session()
    await reopened.close()


async def test_sqlite_refuses_a_newer_schema_and_a_non_database(tmp_path: Path) -> None:
    path = tmp_path / "future.db"
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(UserError, match="newer"):
        await open_store(f"sqlite:///{str(path).lstrip('/')}")
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not a database" * 100)
    with pytest.raises(UserError, match="cannot use the store"):
        await open_store(f"sqlite:///{str(junk).lstrip('/')}")


async def test_every_revocation_is_recorded_in_order(store: Store) -> None:
    for sid in ("a1", "a2", "b1", "r1"):
        await store.create_session(session(sid, "bob" if sid == "b1" else "alice"), hash_token(sid))
    assert await store.revocations_after(0) == []
    await store.revoke_session("b1", T0 + 1, "logout")
    await store.revoke_user_sessions("alice", T0 + 2, "logout_all")  # a1, a2 and r1
    await store.revoke_session("b1", T0 + 3, "logout")  # already ended: nothing new
    recorded = await store.revocations_after(0)
    assert [(r.session_id, r.revoked_at) for r in recorded][0] == ("b1", T0 + 1)
    assert sorted(r.session_id for r in recorded[1:]) == ["a1", "a2", "r1"]
    assert [r.seq for r in recorded] == sorted(r.seq for r in recorded)
    assert await store.revocations_after(recorded[-1].seq) == []
    # reuse detection inside rotate_refresh is recorded too
    await store.create_session(session("s9", "carol"), hash_token("t0"))
    await store.rotate_refresh(hash_token("t0"), then(hash_token("t1")), T0, RULES)
    await store.rotate_refresh(hash_token("t0"), then(hash_token("t1")), T0 + 60, RULES)
    (reuse,) = await store.revocations_after(recorded[-1].seq)
    assert (reuse.session_id, reuse.revoked_at) == ("s9", T0 + 60)


async def test_purge_deletes_what_ended_before_the_horizon(store: Store) -> None:
    horizon = 100.0
    now = T0 + 10 * 86400
    cases = {  # session id: (changes, purged?)
        "expired-long-ago": (dict(expires_at=now - horizon - 1, last_used_at=now - 60), True),
        "expired-recently": (dict(expires_at=now - horizon + 1, last_used_at=now - 60), False),
        "idle-long-ago": (dict(last_used_at=now - RULES.idle_ttl - horizon - 1, expires_at=now + 86400), True),
        "idle-recently": (dict(last_used_at=now - RULES.idle_ttl - horizon + 1, expires_at=now + 86400), False),
        "live": (dict(last_used_at=now - 60, expires_at=now + 86400), False),
    }
    for sid, (changes, _) in cases.items():
        await store.create_session(session(sid, **changes), hash_token(sid))
    await store.create_session(session("revoked-long-ago", last_used_at=now, expires_at=now + 86400),
                               hash_token("revoked-long-ago"))
    await store.create_session(session("revoked-recently", last_used_at=now, expires_at=now + 86400),
                               hash_token("revoked-recently"))
    await store.revoke_session("revoked-long-ago", now - horizon - 1, "logout")
    await store.revoke_session("revoked-recently", now - horizon + 1, "logout")
    assert await store.purge(now, RULES, horizon) == 3
    left = {s.id for s in await store.list_sessions()}
    assert left == {"expired-recently", "idle-recently", "live", "revoked-recently"}
    assert await store.session_of_refresh(hash_token("expired-long-ago")) is None  # tokens go too
    kept = [r.session_id for r in await store.revocations_after(0)]
    assert "revoked-recently" in kept
    if isinstance(store, SQLiteStore):  # (Redis trims its log by its own clock, not this fake one)
        assert kept == ["revoked-recently"]


@pytest.mark.parametrize("url, resolved", [
    ("sqlite:///var/lib/gw.db", "sqlite:///var/lib/gw.db"),
    ("sqlite:/var/lib/gw.db", "sqlite:///var/lib/gw.db"),
    ("sqlite:data/gw.db", "sqlite:///base/data/gw.db"),  # relative to the config file's directory
    ("sqlite:", None), ("sqlite://host/gw.db", None), ("postgres://db/gw", None), ("gw.db", None),
])
def test_store_urls(url: str, resolved: str | None) -> None:
    assert resolve_url(url, Path("/base")) == resolved


@pytest.mark.parametrize("direction", ["sqlite->redis", "redis->sqlite"])
async def test_moving_stores_keeps_users_and_live_sessions(
    direction: str, tmp_path: Path, redis_url: str
) -> None:
    sqlite = await open_store(f"sqlite:{tmp_path / 'moved.db'}")
    async with redis_store(redis_url) as redis:
        source, target = (sqlite, redis) if direction == "sqlite->redis" else (redis, sqlite)
        await source.add_user(User("alice", "hash-a", ("user",), created_at=T0))
        await source.add_user(User("bob", "hash-b", ("admin",), True, T0))
        await source.create_session(session("live"), hash_token("l0"))
        await source.rotate_refresh(hash_token("l0"), then(hash_token("l1")), T0 + 1, RULES)
        await source.create_session(session("ended", user="bob"), hash_token("e0"))
        await source.revoke_session("ended", T0 + 2, "logout")
        snapshot = await source.export_state(T0 + 3)
        assert [s.id for s, _ in snapshot.sessions] == ["live"]
        await target.import_state(snapshot)
        assert await target.list_users() == await source.list_users()
        assert await target.get_session("ended") is None
        assert await target.count_sessions(T0 + 3, RULES) == 1
        # the live chain goes on in the new store: the old token is a replay, the new one rotates
        assert (await target.rotate_refresh(hash_token("l1"), then(hash_token("l2")), T0 + 4, RULES)).outcome == "rotated"
        assert (await target.rotate_refresh(hash_token("l0"), then(hash_token("l1")), T0 + 60, RULES)).outcome == "reused"
        with pytest.raises(UserError, match="already has users"):
            await target.import_state(snapshot)
    await sqlite.close()


async def test_failed_login_counters_keep_a_window(store: Store) -> None:
    window = 900.0
    assert await store.failures("user:alice", T0) is None
    counted = [await store.count_failure("user:alice", T0 + i, window) for i in range(3)]
    assert counted == [Failures(1, T0, T0 + window), Failures(2, T0 + 1, T0 + window),
                       Failures(3, T0 + 2, T0 + window)]
    assert (await store.count_failure("ip:10.0.0.1", T0, window)).count == 1  # keys are counted apart
    assert await store.failures("user:alice", T0 + window - 1) == Failures(3, T0 + 2, T0 + window)
    assert await store.failures("user:alice", T0 + window) is None  # the window has passed...
    assert await store.count_failure("user:alice", T0 + window, window) == \
        Failures(1, T0 + window, T0 + 2 * window)  # ...and a new one opens
    await store.clear_failures("user:alice")
    assert await store.failures("user:alice", T0 + window) is None
    counts = await asyncio.gather(*(store.count_failure("ip:10.0.0.2", T0, window) for _ in range(20)))
    assert sorted(f.count for f in counts) == list(range(1, 21))  # concurrent failures are all counted


async def test_a_version_1_store_is_migrated_on_open(tmp_path: Path) -> None:
    from gateway.store.sqlite import MIGRATIONS  # noqa: PLC0415

    path = tmp_path / "v1.db"
    db = sqlite3.connect(path)
    for statement in MIGRATIONS[0]:
        db.execute(statement)
    db.execute("INSERT INTO users (name, password_hash, created_at) VALUES ('old', 'h', 1)")
    db.execute("PRAGMA user_version = 1")
    db.commit()
    db.close()
    store = await open_store(f"sqlite:{path}")
    try:
        assert (await store.get_user("old")) == User("old", "h", created_at=1)  # the data stays
        assert (await store.count_failure("user:old", T0, 60)).count == 1  # and the new table is there
        assert await store.update_user("old", claims=(("tenant", "acme"),))  # and the claims column
    finally:
        await store.close()
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 3
