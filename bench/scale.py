"""Proxied requests and refresh rotations per second, for 1 and 2 workers, on SQLite and Redis.

    python bench/scale.py [--seconds 5] [--rounds 3] [--redis redis://127.0.0.1:6379/14]
                          [--json bench/results/scale.json]

For each store and worker count, a real ``gateway run`` sits in front of Debian's nginx
serving a 1 KiB file (one worker). wrk (one thread, 32 connections) drives an authenticated
route with a Bearer token; then 32 clients of this script each refresh their own session in
a loop. With one worker the gateway is pinned to CPU 0 and nginx, wrk and the clients to
CPU 1; two workers get both CPUs, so they share them with the load. Each configuration
runs ``--rounds`` times, interleaved, and the table shows medians. The reference, measured
in every round, is nginx serving the file directly: proxied throughput is shown as a ratio
to it. CPU time is the gateway's own (all its processes), per request.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import secrets
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import (  # noqa: E402
    cpu_seconds,
    family,
    free_port,
    median,
    start_gateway,
    start_nginx,
    stop,
    until_up,
    wrk,
)
from gateway.credentials import hash_password  # noqa: E402
from gateway.store import User, open_store  # noqa: E402

CONFIG = """\
listen: {{host: 127.0.0.1, port: {port}}}
store: "{store}"
upstreams: {{app: {{url: "http://127.0.0.1:{upstream}"}}}}
tokens:
  issuer: bench
  audience: bench
  keys: [{{kid: k1, algorithm: HS256, secret: "{secret}"}}]
cookies: {{secure: false}}
routes: [{{path: /**, access: authenticated}}]
workers: {workers}
"""
PASSWORD = "bench-password-1"
CLIENTS = 32


async def _sessions(url: str, count: int) -> tuple[str, list[str]]:
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http:
        tokens, access = [], ""
        for _ in range(count):
            async with http.post(f"{url}/auth/login", json={"username": "bench", "password": PASSWORD}) as resp:
                assert resp.status == 200, await resp.text()
                access = (await resp.json())["access_token"]
                tokens.append(resp.cookies["gw_refresh"].value)
        return access, tokens


async def _rotations(url: str, tokens: list[str], seconds: float, pids: list[int]) -> tuple[float, float]:
    done = 0
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar()) as http:
        stop_at = time.monotonic() + seconds

        async def client(i: int) -> None:
            nonlocal done
            while time.monotonic() < stop_at:
                async with http.post(f"{url}/auth/refresh", headers={"Cookie": f"gw_refresh={tokens[i]}"}) as resp:
                    assert resp.status == 200, await resp.text()
                    tokens[i] = resp.cookies["gw_refresh"].value
                done += 1

        cpu0, t0 = cpu_seconds(pids), time.monotonic()
        await asyncio.gather(*(client(i) for i in range(len(tokens))))
        cpu, elapsed = cpu_seconds(pids) - cpu0, time.monotonic() - t0
    return done / elapsed, cpu / done * 1e6


async def bench(seconds: float, rounds: int, redis_url: str) -> dict[str, Any]:
    samples: dict[str, list[dict[str, float]]] = {}
    reference: list[float] = []
    with tempfile.TemporaryDirectory(prefix="gateway-bench-") as tmp:
        work = Path(tmp)
        (work / "www").mkdir()
        (work / "www" / "1k.txt").write_bytes(b"x" * 1024)
        nginx_port = free_port()
        nginx = start_nginx(work / "nginx", nginx_port, root=work / "www", cpus={1})
        prefix = f"gwbench:{secrets.token_hex(4)}:"
        stores = {"sqlite": f"sqlite:///{work}/gateway.db", "redis": f"{redis_url}?key_prefix={prefix}"}
        try:
            await until_up(f"http://127.0.0.1:{nginx_port}/1k.txt")
            for url in stores.values():
                store = await open_store(url)
                await store.add_user(User("bench", hash_password(PASSWORD), ("user",)))
                await store.close()
            for _ in range(rounds):
                reference.append(wrk(f"http://127.0.0.1:{nginx_port}/1k.txt", seconds=seconds,
                                     connections=CLIENTS, cpus={1}).requests_per_s)
                for name, store_url in stores.items():
                    for workers in (1, 2):
                        port = free_port()
                        config = work / f"{name}-{workers}.yaml"
                        config.write_text(CONFIG.format(port=port, store=store_url, upstream=nginx_port,
                                                        secret=secrets.token_urlsafe(48), workers=workers))
                        cpus = {0} if workers == 1 else {0, 1}
                        proc = start_gateway(config, cpus=cpus)
                        try:
                            url = f"http://127.0.0.1:{port}"
                            await until_up(f"{url}/healthz")
                            await asyncio.sleep(0.5)  # every worker listening
                            pids = family(proc.pid)
                            access, tokens = await _sessions(url, CLIENTS)
                            cpu0 = cpu_seconds(pids)
                            proxied = wrk(f"{url}/1k.txt", seconds=seconds, connections=CLIENTS,
                                          headers={"Authorization": f"Bearer {access}"},
                                          cpus={1} if workers == 1 else None)
                            proxied_cpu = (cpu_seconds(pids) - cpu0) / max(proxied.requests, 1) * 1e6
                            rotations, rotation_cpu = await _rotations(url, tokens, seconds, pids)
                            samples.setdefault(f"{name}/{workers}", []).append({
                                "proxied_per_s": proxied.requests_per_s, "proxied_p99_ms": proxied.p99_ms,
                                "proxied_cpu_us": proxied_cpu, "errors": proxied.errors,
                                "rotations_per_s": rotations, "rotation_cpu_us": rotation_cpu})
                        finally:
                            stop(proc)
        finally:
            stop(nginx)
            if "redis" in stores:
                import redis  # noqa: PLC0415

                client = redis.Redis.from_url(redis_url)
                keys = list(client.scan_iter(match=f"{prefix}*"))
                if keys:
                    client.delete(*keys)
    nginx_direct = median(reference)
    rows = []
    for key, runs in samples.items():
        store_name, worker_count = key.split("/")
        proxied_rate = median([r["proxied_per_s"] for r in runs])
        rows.append({
            "store": store_name, "workers": int(worker_count),
            "proxied_per_s": round(proxied_rate),
            "proxied_over_nginx_direct": round(proxied_rate / nginx_direct, 3),
            "proxied_p99_ms": round(median([r["proxied_p99_ms"] for r in runs]), 2),
            "proxied_cpu_us": round(median([r["proxied_cpu_us"] for r in runs])),
            "rotations_per_s": round(median([r["rotations_per_s"] for r in runs])),
            "rotation_cpu_us": round(median([r["rotation_cpu_us"] for r in runs])),
            "errors": int(sum(r["errors"] for r in runs)),
        })
    return {
        "benchmark": "workers and stores: proxied requests and refresh rotations",
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "seconds_per_run": seconds, "rounds": rounds,
        "nginx_direct_per_s": round(nginx_direct),
        "results": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/14")
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "scale.json")
    args = parser.parse_args()
    report = asyncio.run(bench(args.seconds, args.rounds, args.redis))
    print(f"{report['benchmark']} — {report['date']}, {report['machine']}; medians of {args.rounds} "
          f"rounds of {args.seconds:g}s; nginx serving the file directly: {report['nginx_direct_per_s']}/s")
    header = ["store", "workers", "proxied/s", "÷ nginx", "p99 ms", "CPU µs/req", "rotations/s",
              "CPU µs/rot", "errors"]
    print("  ".join(f"{h:>11}" for h in header))
    for row in report["results"]:
        print("  ".join(f"{v:>11}" for v in row.values()))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"written to {args.json}")


if __name__ == "__main__":
    main()
