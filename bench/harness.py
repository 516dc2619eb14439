"""What the benchmarks share: processes to start and pin, CPU time to read, wrk to drive.

Every figure a benchmark reports is meant to be read as a ratio against a reference taken
in the same run: this machine is shared and noisy, absolute numbers are not comparable
from one run to the next.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pin(cpus: set[int]) -> Callable[[], None] | None:
    """A preexec_fn pinning a child to ``cpus``, where the machine has them."""
    if not hasattr(os, "sched_setaffinity") or (os.cpu_count() or 1) <= max(cpus):
        return None
    return lambda: os.sched_setaffinity(0, cpus)


def family(pid: int) -> list[int]:
    """``pid`` and its children (a gateway's workers)."""
    kids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(entry.name))
    return [pid, *kids]


def cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def start_gateway(config: Path, *, cpus: set[int] | None = None) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "gateway", "run", "-c", str(config)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            preexec_fn=pin(cpus) if cpus else None)


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def until_up(url: str, seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    async with aiohttp.ClientSession() as http:
        while True:
            try:
                async with http.get(url) as resp:
                    if resp.status < 500:
                        return
            except aiohttp.ClientConnectionError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url} did not come up within {seconds} s")
            await asyncio.sleep(0.05)


def start_nginx(workdir: Path, port: int, *, root: Path | None = None, upstream: int | None = None,
                cpus: set[int] | None = None) -> subprocess.Popen[bytes]:
    """Debian's nginx, one worker: serving ``root`` as files, or ``proxy_pass`` to
    127.0.0.1:``upstream`` with keep-alive connections (the reference proxy)."""
    if shutil.which("nginx") is None:
        raise RuntimeError("nginx is not installed (Debian: apt-get install nginx-light)")
    workdir.mkdir(parents=True, exist_ok=True)
    if upstream is not None:
        site = (f"upstream up {{ server 127.0.0.1:{upstream}; keepalive 64; }}\n"
                f"server {{ listen 127.0.0.1:{port}; location / {{ proxy_pass http://up; "
                "proxy_http_version 1.1; proxy_set_header Connection \"\"; } }")
    else:
        site = f"server {{ listen 127.0.0.1:{port}; root {root}; location / {{ }} }}"
    conf = workdir / f"nginx-{port}.conf"
    user = "user root;\n" if os.geteuid() == 0 else ""  # else its worker cannot read a private temp dir
    conf.write_text(
        f"{user}daemon off; worker_processes 1; pid {workdir}/nginx-{port}.pid; error_log {workdir}/error.log;\n"
        "events { worker_connections 4096; }\n"
        f"http {{ access_log off; client_body_temp_path {workdir}; proxy_temp_path {workdir}; "
        f"fastcgi_temp_path {workdir}; uwsgi_temp_path {workdir}; scgi_temp_path {workdir};\n"
        f"keepalive_requests 1000000; {site} }}\n")
    return subprocess.Popen(["nginx", "-c", str(conf), "-p", str(workdir)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, preexec_fn=pin(cpus) if cpus else None)


@dataclass(frozen=True)
class WrkResult:
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    requests: int
    errors: int


def wrk(url: str, *, seconds: float, connections: int, headers: dict[str, str] | None = None,
        rate: int | None = None, cpus: set[int] | None = None) -> WrkResult:
    """Drive ``url`` with wrk (one thread) and read its summary."""
    if shutil.which("wrk") is None:
        raise RuntimeError("wrk is not installed (Debian: apt-get install wrk)")
    args = ["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "--latency", url]
    for name, value in (headers or {}).items():
        args += ["-H", f"{name}: {value}"]
    out = subprocess.run(args, capture_output=True, text=True, check=True,
                         preexec_fn=pin(cpus) if cpus else None).stdout
    latency = dict(re.findall(r"^\s+(\d+)%\s+([\d.]+\w+)", out, re.M))
    requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    errors = sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    errors += int(m.group(1)) if (m := re.search(r"Non-2xx or 3xx responses: (\d+)", out)) else 0
    return WrkResult(
        requests_per_s=float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),  # type: ignore[union-attr]
        p50_ms=_ms(latency["50"]), p99_ms=_ms(latency["99"]), requests=requests, errors=errors)


def _ms(text: str) -> float:
    value, unit = re.match(r"([\d.]+)(\w+)", text).groups()  # type: ignore[union-attr]
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[unit]


def median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2
