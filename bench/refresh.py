"""Refresh rotations per second on SQLite (or Redis), at concurrency 1 and 32.

    python bench/refresh.py [--seconds 5] [--rounds 3] [--store URL] [--json bench/results/refresh.json]

Starts a real ``gateway run`` on a fresh SQLite file, or on ``--store`` (a Redis URL: its
keys go under a fresh prefix, deleted afterwards), pinned to CPU 1 when the machine has
two, logs in one session per concurrent client, and has each client refresh its own
session in a loop (the load generator runs on CPU 0). Every round also measures, at the
same concurrency, ``GET /healthz``: a request through the same server that touches no
store. Rounds interleave the two, and the table shows medians, so the ratio
rotations/healthz describes the cost of a rotation on this machine, whatever its noise.
CPU time is the gateway process's own (user + system, from /proc), per request.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import cpu_seconds, free_port, pin  # noqa: E402
from gateway.credentials import hash_password  # noqa: E402
from gateway.store import User, open_store  # noqa: E402

CONFIG = """\
listen: {{host: 127.0.0.1, port: {port}}}
store: "{store}"
upstreams: {{app: {{url: "http://127.0.0.1:9"}}}}
tokens:
  issuer: bench
  audience: bench
  keys: [{{kid: k1, algorithm: HS256, secret: "{secret}"}}]
cookies: {{secure: false}}
routes: [{{path: /**, access: authenticated}}]
"""
PASSWORD = "bench-password-1"



async def _measure(pid: int, clients: int, seconds: float,
                   step: Callable[[int], Awaitable[None]]) -> tuple[float, float]:
    """Run ``step(client)`` in a loop on every client for ``seconds``: (ops/s, gateway CPU µs/op)."""
    done = 0
    stop = time.monotonic() + seconds

    async def client(i: int) -> None:
        nonlocal done
        while time.monotonic() < stop:
            await step(i)
            done += 1

    cpu0, t0 = cpu_seconds([pid]), time.monotonic()
    await asyncio.gather(*(client(i) for i in range(clients)))
    cpu, elapsed = cpu_seconds([pid]) - cpu0, time.monotonic() - t0
    return done / elapsed, cpu / done * 1e6


async def bench(seconds: float, rounds: int, concurrencies: list[int],
                store_url: str | None = None) -> dict[str, object]:
    prefix = f"gwbench:{secrets.token_hex(4)}:"
    with tempfile.TemporaryDirectory(prefix="gateway-bench-") as tmp:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        config = Path(tmp) / "gateway.yaml"
        store_url = f"{store_url}?key_prefix={prefix}" if store_url else f"sqlite:///{tmp}/gateway.db"
        config.write_text(CONFIG.format(port=port, store=store_url, secret=secrets.token_urlsafe(48)))
        store = await open_store(store_url)
        await store.add_user(User("bench", hash_password(PASSWORD), ("user",)))
        await store.close()
        proc = subprocess.Popen([sys.executable, "-m", "gateway", "run", "-c", str(config)],
                                stdout=subprocess.DEVNULL, preexec_fn=pin({1}))
        if (client_pin := pin({0})) is not None:
            client_pin()
        connector = aiohttp.TCPConnector(limit=0)
        http = aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar())
        try:
            for _ in range(300):
                try:
                    async with http.get(f"{url}/healthz") as resp:
                        if resp.status == 200:
                            break
                except aiohttp.ClientConnectionError:
                    await asyncio.sleep(0.05)
            tokens: list[str] = []
            for _ in range(max(concurrencies)):
                async with http.post(f"{url}/auth/login", json={"username": "bench", "password": PASSWORD}) as resp:
                    assert resp.status == 200, await resp.text()
                    tokens.append(resp.cookies["gw_refresh"].value)

            async def refresh(i: int) -> None:
                async with http.post(f"{url}/auth/refresh", headers={"Cookie": f"gw_refresh={tokens[i]}"}) as resp:
                    assert resp.status == 200, await resp.text()
                    tokens[i] = resp.cookies["gw_refresh"].value

            async def healthz(i: int) -> None:
                async with http.get(f"{url}/healthz") as resp:
                    assert resp.status == 200
                    await resp.read()

            samples: dict[tuple[str, int], list[tuple[float, float]]] = {}
            await _measure(proc.pid, 4, 1.0, refresh)  # warm up
            for _ in range(rounds):
                for clients in concurrencies:
                    for name, step in (("healthz", healthz), ("refresh", refresh)):
                        samples.setdefault((name, clients), []).append(
                            await _measure(proc.pid, clients, seconds, step))
        finally:
            await http.close()
            proc.terminate()
            proc.wait(timeout=15)
            if store_url.startswith("redis"):
                await _forget(store_url.split("?", 1)[0], prefix)
    rows = []
    for clients in concurrencies:
        ref = samples[("healthz", clients)]
        rot = samples[("refresh", clients)]
        ref_rate = statistics.median(r for r, _ in ref)
        rot_rate = statistics.median(r for r, _ in rot)
        rows.append({
            "concurrency": clients,
            "rotations_per_s": round(rot_rate),
            "healthz_per_s": round(ref_rate),
            "rotations_over_healthz": round(rot_rate / ref_rate, 3),
            "gateway_cpu_us_per_rotation": round(statistics.median(c for _, c in rot)),
            "gateway_cpu_us_per_healthz": round(statistics.median(c for _, c in ref)),
        })
    return {
        "benchmark": f"refresh rotations, {store_url.split(':', 1)[0]} store",
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "seconds_per_run": seconds,
        "rounds": rounds,
        "results": rows,
    }


async def _forget(redis_url: str, prefix: str) -> None:
    import redis.asyncio  # noqa: PLC0415

    client = redis.asyncio.Redis.from_url(redis_url)
    try:
        keys = [key async for key in client.scan_iter(match=f"{prefix}*")]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--store", help="a Redis URL (default: a fresh SQLite file)")
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "refresh.json")
    args = parser.parse_args()
    report = asyncio.run(bench(args.seconds, args.rounds, [1, 32], args.store))
    print(f"{report['benchmark']} — {report['date']}, {report['machine']}; "
          f"medians of {args.rounds} rounds of {args.seconds:g}s")
    header = ["concurrency", "rotations/s", "healthz/s", "ratio", "CPU µs/rotation", "CPU µs/healthz"]
    print("  ".join(f"{h:>15}" for h in header))
    for row in report["results"]:  # type: ignore[attr-defined]
        print("  ".join(f"{v:>15}" for v in row.values()))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"written to {args.json}")


if __name__ == "__main__":
    main()
