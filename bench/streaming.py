"""The gateway's memory while 1 GiB streams through it, up and down.

    python bench/streaming.py [--size 1g] [--interval 0.05] [--json bench/results/streaming.json]

Starts a real ``gateway run`` (pinned to CPU 1 when the machine has two) with a temporary
config: ``limits: {request_body: 2g}`` and one public route to an upstream that this script
starts in its own process. That upstream streams ``--size`` bytes out on
``GET /download/N`` (with a Content-Length, written 1 MiB at a time) and, on
``POST /upload``, reads the body as it arrives and keeps only a count and a SHA-256 of it.
The client (this process; it and the upstream share CPU 0) then:

1. warms up: a 1 MiB upload and download through the gateway, so that its connection pools,
   buffers and lazily imported code exist before the baseline is taken;
2. takes the idle RSS: the highest of the samples over one second with nothing in flight;
3. uploads ``--size`` bytes through the gateway from a generator (chunked: no
   Content-Length), counting and hashing what it yields; the upstream answers with its count
   and hash of what arrived;
4. downloads ``--size`` bytes through the gateway, counting and hashing each chunk, then
   discarding it; the upstream tells (on a direct request) its count and hash of what it sent.

Each 1 MiB block starts with its index, so a lost, repeated or reordered block changes the
hash. A thread reads the gateway process's ``VmRSS`` from ``/proc/PID/status`` every
``--interval`` seconds; the peak of each direction is the highest sample taken during it, and
its growth is that peak minus the idle RSS. Where the kernel allows it, the gateway's
``VmHWM`` (its peak RSS) is also reset (``/proc/PID/clear_refs``) before each direction and
read after it, which catches a peak shorter than the sampling interval. The issue's target is
growth under 50 MiB in either direction; the table says whether it was met. Throughput is
MiB/s of payload, end to end, on loopback.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import platform
import secrets
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import free_port, pin  # noqa: E402
from gateway.config import parse_size  # noqa: E402

CONFIG = """\
listen: {{host: 127.0.0.1, port: {port}}}
store: sqlite:gateway.db
upstreams: {{app: {{url: "http://127.0.0.1:{upstream}", timeout: 60s}}}}
tokens:
  issuer: bench
  audience: bench
  keys: [{{kid: k1, algorithm: HS256, secret: "{secret}"}}]
cookies: {{secure: false}}
limits: {{request_body: 2g}}
routes: [{{path: /**, access: public}}]
"""
BLOCK = 1024 * 1024
TARGET_MIB = 50
_BASE = hashlib.sha256(b"streaming").digest() * (BLOCK // 32)  # 1 MiB, not all one byte


def block(i: int, size: int) -> bytes:
    """Block ``i`` of a stream: its index, then fixed filler, ``size`` bytes in all."""
    return (struct.pack(">Q", i) + _BASE[8:])[:size]


def blocks(total: int) -> list[tuple[int, int]]:
    return [(i, min(BLOCK, total - i * BLOCK)) for i in range((total + BLOCK - 1) // BLOCK)]


# --- the upstream (its own process) ---------------------------------------------------------


def serve_upstream(port: int) -> None:
    sent: dict[str, Any] = {}

    async def download(request: web.Request) -> web.StreamResponse:
        total = int(request.match_info["size"])
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        response.content_length = total
        await response.prepare(request)
        digest, count = hashlib.sha256(), 0
        for i, size in blocks(total):
            data = block(i, size)
            await response.write(data)
            digest.update(data)
            count += len(data)
        await response.write_eof()
        sent.update(bytes=count, sha256=digest.hexdigest())
        return response

    async def upload(request: web.Request) -> web.Response:
        digest, count = hashlib.sha256(), 0
        async for chunk in request.content.iter_any():
            digest.update(chunk)
            count += len(chunk)
        return web.json_response({"bytes": count, "sha256": digest.hexdigest()})

    async def stats(request: web.Request) -> web.Response:
        return web.json_response(sent)

    app = web.Application()
    app.router.add_get("/download/{size}", download)
    app.router.add_post("/upload", upload)
    app.router.add_get("/sent", stats)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


# --- measuring ------------------------------------------------------------------------------


def _status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise LookupError(field)


def _reset_hwm(pid: int) -> bool:
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class Sampler(threading.Thread):
    """VmRSS of ``pid`` every ``interval`` seconds, labelled with the phase it fell in."""

    def __init__(self, pid: int, interval: float) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.phase = "start"
        self.samples: list[tuple[float, str, int]] = []
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            try:
                self.samples.append((time.monotonic(), self.phase, _status_kib(self.pid, "VmRSS")))
            except (OSError, LookupError):
                return  # the process is gone
            self._done.wait(self.interval)

    def stop(self) -> None:
        self._done.set()
        if self.is_alive():
            self.join()

    def peak(self, phase: str) -> int:
        return max(kib for _, p, kib in self.samples if p == phase)

    def count(self, phase: str) -> int:
        return sum(1 for _, p, _ in self.samples if p == phase)


async def _upload(http: aiohttp.ClientSession, url: str, total: int) -> dict[str, Any]:
    digest, count = hashlib.sha256(), 0

    async def body() -> AsyncIterator[bytes]:
        nonlocal count
        for i, size in blocks(total):
            data = block(i, size)
            digest.update(data)
            count += len(data)
            yield data

    async with http.post(f"{url}/upload", data=body()) as resp:
        assert resp.status == 200, f"upload: {resp.status} {await resp.text()}"
        seen = await resp.json()
    return {"client_bytes": count, "client_sha256": digest.hexdigest(),
            "upstream_bytes": seen["bytes"], "upstream_sha256": seen["sha256"]}


async def _download(http: aiohttp.ClientSession, url: str, upstream: str, total: int) -> dict[str, Any]:
    digest, count = hashlib.sha256(), 0
    async with http.get(f"{url}/download/{total}") as resp:
        assert resp.status == 200, f"download: {resp.status} {await resp.text()}"
        async for chunk in resp.content.iter_any():
            digest.update(chunk)
            count += len(chunk)  # and the chunk is dropped
    async with http.get(f"{upstream}/sent") as resp:
        sent = await resp.json()
    return {"client_bytes": count, "client_sha256": digest.hexdigest(),
            "upstream_bytes": sent["bytes"], "upstream_sha256": sent["sha256"]}


async def _wait_ready(http: aiohttp.ClientSession, url: str, proc: subprocess.Popen[bytes]) -> None:
    for _ in range(300):
        if proc.poll() is not None:
            raise SystemExit(f"{url} exited with {proc.returncode}")
        try:
            async with http.get(url) as resp:
                await resp.read()
                return
        except aiohttp.ClientConnectionError:
            await asyncio.sleep(0.05)
    raise SystemExit(f"{url} did not start")


async def bench(total: int, interval: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="gateway-bench-") as tmp:
        port, upstream_port = free_port(), free_port()
        url, upstream = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{upstream_port}"
        config = Path(tmp) / "gateway.yaml"
        config.write_text(CONFIG.format(port=port, upstream=upstream_port, secret=secrets.token_urlsafe(48)))
        up = subprocess.Popen([sys.executable, __file__, "--serve-upstream", str(upstream_port)],
                              preexec_fn=pin({0}))
        gw = subprocess.Popen([sys.executable, "-m", "gateway", "run", "-c", str(config)],
                              stdout=subprocess.DEVNULL, preexec_fn=pin({1}),
                              cwd=Path(__file__).resolve().parents[1])
        if (client_pin := pin({0})) is not None:
            client_pin()
        timeout = aiohttp.ClientTimeout(total=None, sock_read=120)
        http = aiohttp.ClientSession(timeout=timeout, auto_decompress=False,
                                     connector=aiohttp.TCPConnector(limit=0))
        sampler = Sampler(gw.pid, interval)
        try:
            await _wait_ready(http, f"{upstream}/sent", up)
            await _wait_ready(http, f"{url}/healthz", gw)
            await _upload(http, url, BLOCK)  # warm up
            await _download(http, url, upstream, BLOCK)
            sampler.start()
            sampler.phase = "idle"
            await asyncio.sleep(1.0)
            idle = sampler.peak("idle")
            results: dict[str, Any] = {}
            runs: list[tuple[str, Callable[[], Awaitable[dict[str, Any]]]]] = [
                ("upload", lambda: _upload(http, url, total)),
                ("download", lambda: _download(http, url, upstream, total))]
            for direction, run in runs:
                hwm_reset = _reset_hwm(gw.pid)
                sampler.phase = direction
                t0 = time.monotonic()
                moved = await run()
                seconds = time.monotonic() - t0
                sampler.phase = f"after-{direction}"
                peak = sampler.peak(direction)
                hwm = _status_kib(gw.pid, "VmHWM") if hwm_reset else None
                results[direction] = {
                    **moved,
                    "verified": moved["client_bytes"] == moved["upstream_bytes"] == total
                                and moved["client_sha256"] == moved["upstream_sha256"],
                    "seconds": round(seconds, 2),
                    "throughput_mib_s": round(total / BLOCK / seconds, 1),
                    "samples": sampler.count(direction),
                    "peak_rss_mib": round(peak / 1024, 1),
                    "growth_mib": round((peak - idle) / 1024, 1),
                    "peak_hwm_mib": round(hwm / 1024, 1) if hwm is not None else None,
                    "growth_hwm_mib": round((hwm - idle) / 1024, 1) if hwm is not None else None,
                }
                await asyncio.sleep(0.5)
            final = _status_kib(gw.pid, "VmRSS")
        finally:
            sampler.stop()
            for proc in (gw, up):
                proc.terminate()
                proc.wait(timeout=15)
            await http.close()
    worst = max(max(r["growth_mib"], r["growth_hwm_mib"] or 0) for r in results.values())
    return {
        "benchmark": "gateway RSS while a body streams through it",
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "bytes_each_way": total,
        "sample_interval_s": interval,
        "idle_rss_mib": round(idle / 1024, 1),
        "final_rss_mib": round(final / 1024, 1),
        "target_growth_mib": TARGET_MIB,
        "target_met": worst < TARGET_MIB and all(r["verified"] for r in results.values()),
        "results": results,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="1g", help="bytes each way: 1g, 256m, ... (default 1g)")
    parser.add_argument("--interval", type=float, default=0.05, help="RSS sampling interval, seconds")
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "streaming.json")
    parser.add_argument("--serve-upstream", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_upstream:
        serve_upstream(args.serve_upstream)
        return
    total = parse_size(args.size)
    report = asyncio.run(bench(total, args.interval))
    print(f"{report['benchmark']} — {report['date']}, {report['machine']}")
    print(f"{total / BLOCK:g} MiB each way; idle RSS {report['idle_rss_mib']} MiB; "
          f"VmRSS sampled every {args.interval:g}s")
    header = ["direction", "verified", "MiB/s", "peak RSS MiB", "growth MiB", "peak HWM MiB",
              "growth HWM MiB", "samples"]
    print("  ".join(f"{h:>14}" for h in header))
    for direction, r in report["results"].items():
        row = [direction, "yes" if r["verified"] else "NO", r["throughput_mib_s"], r["peak_rss_mib"],
               r["growth_mib"], r["peak_hwm_mib"], r["growth_hwm_mib"], r["samples"]]
        print("  ".join(f"{v!s:>14}" for v in row))
    print(f"target: growth under {TARGET_MIB} MiB each way: {'met' if report['target_met'] else 'NOT met'}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"written to {args.json}")


if __name__ == "__main__":
    main()
