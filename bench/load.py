"""Driving the configurations: peak throughput, latency at a fixed load, and latency while
users log in.

Every figure is taken in rounds that interleave the configurations (the order turns by one
each round), so that whatever else the machine is doing falls on all of them alike; the
report takes medians over rounds and ratios between configurations of the same run.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict
from typing import Any

import aiohttp

from bench.harness import cpu_seconds, family, set_affinity, wrk
from bench.servers import LOAD_CPUS, PASSWORD, Target

PEAK_CONNECTIONS = 32
FIXED_CONNECTIONS = 16
LOGINS_PER_S = 10


def _drive(target: Target, seconds: float, connections: int, delay_ms: int | None = None) -> dict[str, Any]:
    pids = family(target.pid)
    set_affinity(pids, target.cpus)
    cpu0 = cpu_seconds(pids)
    result = wrk(target.url, seconds=seconds, connections=connections, headers=target.headers,
                 delay_ms=delay_ms, script=target.script, cpus=LOAD_CPUS)
    cpu = cpu_seconds(pids) - cpu0
    return {**asdict(result), "cpu_us_per_request": cpu / max(result.requests, 1) * 1e6}


def _turn(items: list[Target], by: int) -> list[Target]:
    by %= max(len(items), 1)
    return items[by:] + items[:by]


async def peak(targets: dict[str, Target], rounds: int, seconds: float) -> dict[str, list[dict[str, Any]]]:
    """Each configuration at full load (32 connections), ``rounds`` times, interleaved."""
    order = list(targets.values())
    for target in order:  # warm up: pools filled, code paths imported
        await asyncio.to_thread(_drive, target, 1.0, PEAK_CONNECTIONS)
    samples: dict[str, list[dict[str, Any]]] = {t.name: [] for t in order}
    for r in range(rounds):
        for target in _turn(order, r):
            samples[target.name].append(await asyncio.to_thread(_drive, target, seconds, PEAK_CONNECTIONS))
            print(f"  round {r + 1}/{rounds} {target.name:>11}: "
                  f"{samples[target.name][-1]['requests_per_s']:8.0f} req/s", flush=True)
    return samples


def fixed_delay(rate: float) -> int:
    """The per-connection wait (ms) that holds FIXED_CONNECTIONS connections near ``rate``
    requests/s: each connection then makes one request every 1/(rate/connections) s, less
    the request's own latency (so the achieved rate lands a little under ``rate``)."""
    return max(1, round(FIXED_CONNECTIONS * 1000 / rate))


async def _logins(origin: str, until: float) -> dict[str, int]:
    """Start a login every 1/LOGINS_PER_S s (not waiting for the previous one) until ``until``."""
    statuses: dict[str, int] = {}

    async def one(http: aiohttp.ClientSession) -> None:
        try:
            async with http.post(f"{origin}/auth/login",
                                 json={"username": "bench", "password": PASSWORD}) as resp:
                await resp.read()
                key = str(resp.status)
        except aiohttp.ClientError as exc:
            key = type(exc).__name__
        statuses[key] = statuses.get(key, 0) + 1

    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http:
        tasks = []
        next_at = time.monotonic()
        while next_at < until:
            tasks.append(asyncio.create_task(one(http)))
            next_at += 1 / LOGINS_PER_S
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
        await asyncio.gather(*tasks)
    return statuses


async def fixed_load(direct: Target, gateway: Target, rate: float, rounds: int,
                     seconds: float, with_logins: bool) -> dict[str, Any]:
    """p99 at ``rate`` requests/s: direct to the upstream, through the gateway, and through
    the gateway while LOGINS_PER_S real logins (argon2id) run against it."""
    delay = fixed_delay(rate)
    origin = gateway.url.split("/", 3)
    origin_url = "/".join(origin[:3])
    samples: dict[str, list[dict[str, Any]]] = {"direct": [], "gateway": [], "gateway+logins": []}
    logins: list[dict[str, int]] = []
    _drive(gateway, 1.0, FIXED_CONNECTIONS, delay)
    for r in range(rounds):
        runs = ["direct", "gateway", "gateway+logins"] if with_logins else ["direct", "gateway"]
        for name in runs[r % len(runs):] + runs[:r % len(runs)]:
            target = direct if name == "direct" else gateway
            if name == "gateway+logins":
                run = asyncio.to_thread(_drive, target, seconds, FIXED_CONNECTIONS, delay)
                result, statuses = await asyncio.gather(
                    run, _logins(origin_url, time.monotonic() + seconds))
                logins.append(statuses)
            else:
                result = await asyncio.to_thread(_drive, target, seconds, FIXED_CONNECTIONS, delay)
            samples[name].append(result)
            print(f"  round {r + 1}/{rounds} {name:>15} at ~{rate:.0f}/s: "
                  f"{result['requests_per_s']:7.0f} req/s, p99 {result['p99_ms']:.2f} ms", flush=True)
    return {"target_rate_per_s": rate, "connections": FIXED_CONNECTIONS, "delay_ms": delay,
            "samples": {k: v for k, v in samples.items() if v}, "login_statuses": logins}


async def serial(direct: Target, gateway: Target, rounds: int, seconds: float) -> dict[str, Any]:
    """One connection, each request sent as soon as the last answer is in: nothing waits in
    a queue, so the p99 is the gateway's own slowest moments (a garbage collection, a log
    flush) rather than other requests."""
    samples: dict[str, list[dict[str, Any]]] = {"direct": [], "gateway": []}
    for r in range(rounds):
        for name in ("direct", "gateway")[r % 2:] + ("direct", "gateway")[:r % 2]:
            result = await asyncio.to_thread(_drive, direct if name == "direct" else gateway, seconds, 1)
            samples[name].append(result)
            print(f"  round {r + 1}/{rounds} {name:>15}, one connection: p50 {result['p50_ms']:.3f} ms, "
                  f"p99 {result['p99_ms']:.3f} ms", flush=True)
    return {"connections": 1, "samples": samples}
