"""Refresh rotations per second on SQLite, at concurrency 1 and 32.

    python bench/refresh.py [--seconds 5] [--rounds 3] [--json bench/results/refresh.json]

Starts a real ``gateway run`` on a fresh SQLite file (pinned to CPU 0 when the machine has
two), logs in one session per concurrent client, and has each client refresh its own
session in a loop (the load generator runs on CPU 1). Every round also measures, at the
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
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gateway.credentials import hash_password  # noqa: E402
from gateway.store import User, open_store  # noqa: E402

CONFIG = """\
listen: {{host: 127.0.0.1, port: {port}}}
store: sqlite:gateway.db
upstreams: {{app: {{url: "http://127.0.0.1:9"}}}}
tokens:
  issuer: bench
  audience: bench
  keys: [{{kid: k1, algorithm: HS256, secret: "{secret}"}}]
cookies: {{secure: false}}
routes: [{{path: /**, access: authenticated}}]
"""
PASSWORD = "bench-password-1"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _pin(cpu: int) -> Callable[[], None] | None:
    if not hasattr(os, "sched_setaffinity") or (os.cpu_count() or 1) < 2:
        return None
    return lambda: os.sched_setaffinity(0, {cpu})


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

    cpu0, t0 = _cpu_seconds(pid), time.monotonic()
    await asyncio.gather(*(client(i) for i in range(clients)))
    cpu, elapsed = _cpu_seconds(pid) - cpu0, time.monotonic() - t0
    return done / elapsed, cpu / done * 1e6


async def bench(seconds: float, rounds: int, concurrencies: list[int]) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="gateway-bench-") as tmp:
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        config = Path(tmp) / "gateway.yaml"
        config.write_text(CONFIG.format(port=port, secret=secrets.token_urlsafe(48)))
        store = await open_store(f"sqlite:{Path(tmp) / 'gateway.db'}")
        await store.add_user(User("bench", hash_password(PASSWORD), ("user",)))
        await store.close()
        proc = subprocess.Popen([sys.executable, "-m", "gateway", "run", "-c", str(config)],
                                stdout=subprocess.DEVNULL, preexec_fn=_pin(0))
        if (pin := _pin(1)) is not None:
            pin()
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
        "benchmark": "refresh rotations, SQLite store",
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "seconds_per_run": seconds,
        "rounds": rounds,
        "results": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "refresh.json")
    args = parser.parse_args()
    report = asyncio.run(bench(args.seconds, args.rounds, [1, 32]))
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
