"""The gateway's memory: idle, and with many idle keep-alive connections.

A separate process (``python -m bench.memory HOST PORT PATH N``, on CPU 0, its open-file
limit raised) opens N connections to the gateway, 50 at a time; each sends one request,
reads the whole answer and then stays open, idle. The gateway's RSS is the highest VmRSS
sampled over one second before the connections open and again once all N have their answer;
the difference divided by N is the cost of one idle keep-alive connection. The number of
the gateway's open file descriptors is read too, to show that the connections were all
there when the RSS was taken.
"""

from __future__ import annotations

import asyncio
import os
import re
import resource
import subprocess
import sys
import time
from typing import Any

import aiohttp

from bench.harness import ROOT, pin, rss_kib
from bench.servers import LOAD_CPUS

BATCH = 50  # few at once, so the gateway's pool to the upstream stays small


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def _rss_over(pid: int, seconds: float) -> int:
    samples = []
    until = time.monotonic() + seconds
    while time.monotonic() < until:
        samples.append(rss_kib(pid))
        await asyncio.sleep(0.05)
    return max(samples)


async def idle_connections(url: str, pid: int, count: int) -> dict[str, Any]:
    """``url``: a public URL through the gateway whose process is ``pid``."""
    async with aiohttp.ClientSession() as http:  # warm up: the pool, the code paths
        for _ in range(50):
            async with http.get(url) as resp:
                await resp.read()
    await asyncio.sleep(0.5)
    idle, fds_before = await _rss_over(pid, 1.0), _fds(pid)
    host_port, path = url.split("/", 3)[2], "/" + url.split("/", 3)[3]
    host, port = host_port.rsplit(":", 1)
    holder = subprocess.Popen([sys.executable, "-m", "bench.memory", host, port, path, str(count)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=ROOT,
                              preexec_fn=pin(LOAD_CPUS))
    try:
        assert holder.stdout is not None
        t0 = time.monotonic()
        line = await asyncio.to_thread(holder.stdout.readline)
        opened = int(line.split()[1]) if line.startswith(b"opened") else 0
        open_seconds = time.monotonic() - t0
        held, fds_held = await _rss_over(pid, 1.0), _fds(pid)
    finally:
        if holder.stdin:
            holder.stdin.close()
        try:
            holder.wait(timeout=30)
        except subprocess.TimeoutExpired:
            holder.kill()
            holder.wait()
    await asyncio.sleep(1.0)
    after = await _rss_over(pid, 1.0)
    return {
        "connections": count, "opened": opened, "open_seconds": round(open_seconds, 1),
        "idle_rss_mib": round(idle / 1024, 1), "held_rss_mib": round(held / 1024, 1),
        "after_close_rss_mib": round(after / 1024, 1),
        "fds_before": fds_before, "fds_held": fds_held,
        "kib_per_connection": round((held - idle) / max(opened, 1), 2),
    }


# --- the process that holds the connections ---------------------------------------------------


async def _hold(host: str, port: int, path: str, count: int) -> None:
    request = f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode()
    held: list[asyncio.StreamWriter] = []

    async def one() -> None:
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(head.split(b"\r\n", 1)[0].decode())
        length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
        await reader.readexactly(int(length.group(1)) if length else 0)
        held.append(writer)

    for start in range(0, count, BATCH):
        await asyncio.gather(*(one() for _ in range(min(BATCH, count - start))))
    print(f"opened {len(held)}", flush=True)
    await asyncio.to_thread(sys.stdin.read)  # until the parent closes our stdin
    for writer in held:
        writer.close()


def main() -> None:
    host, port, path, count = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if hard < count + 100:
        raise SystemExit(f"the open-file limit ({hard}) is below {count} connections")
    asyncio.run(_hold(host, port, path, count))


if __name__ == "__main__":
    main()
