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
import tempfile
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


def set_affinity(pids: list[int], cpus: set[int]) -> None:
    """Move running processes (a server and its workers) to ``cpus``, where the machine has them."""
    if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > max(cpus):
        for pid in pids:
            os.sched_setaffinity(pid, cpus)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise LookupError(f"no VmRSS for {pid}")


def start_gateway(config: Path, *, cpus: set[int] | None = None,
                  args: tuple[str, ...] = ()) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "gateway", "run", "-c", str(config), *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT,
                            preexec_fn=pin(cpus) if cpus else None, start_new_session=True)


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
                            stderr=subprocess.DEVNULL, preexec_fn=pin(cpus) if cpus else None,
                            start_new_session=True)


def start_haproxy(workdir: Path, port: int, *, upstream: int, hs256_secret: str,
                  cpus: set[int] | None = None) -> subprocess.Popen[bytes]:
    """Debian's HAProxy 2.6, one thread, checking a Bearer JWT with its native
    ``jwt_verify`` before ``proxy_pass``-like forwarding to 127.0.0.1:``upstream`` over
    kept-alive connections: refused unless the token's alg is HS256, its signature verifies
    with ``hs256_secret`` (taken as bytes, like the gateway's) and it has not expired."""
    if shutil.which("haproxy") is None:
        raise RuntimeError("haproxy is not installed (Debian: apt-get install haproxy)")
    if not hs256_secret.isalnum():
        raise ValueError("the HS256 secret goes into haproxy's config unquoted: letters and digits only")
    workdir.mkdir(parents=True, exist_ok=True)
    conf = workdir / f"haproxy-{port}.cfg"
    conf.write_text(f"""\
global
    nbthread 1
    maxconn 8000
defaults
    mode http
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    timeout http-keep-alive 60s
    http-reuse always
frontend bench
    bind 127.0.0.1:{port}
    http-request set-var(txn.bearer) http_auth_bearer
    http-request set-var(txn.alg) var(txn.bearer),jwt_header_query('$.alg')
    http-request deny unless {{ var(txn.alg) -m str HS256 }}
    http-request deny unless {{ var(txn.bearer),jwt_verify(txn.alg,"{hs256_secret}") -m int 1 }}
    http-request set-var(txn.now) date
    http-request set-var(txn.exp) var(txn.bearer),jwt_payload_query('$.exp','int')
    http-request deny if {{ var(txn.exp),sub(txn.now) -m int le 0 }}
    default_backend up
backend up
    server up 127.0.0.1:{upstream} maxconn 256
""")
    return subprocess.Popen(["haproxy", "-db", "-f", str(conf)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, preexec_fn=pin(cpus) if cpus else None,
                            start_new_session=True)


@dataclass(frozen=True)
class WrkResult:
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    requests: int
    errors: int


def wrk(url: str, *, seconds: float, connections: int, headers: dict[str, str] | None = None,
        delay_ms: int | None = None, script: str = "", cpus: set[int] | None = None) -> WrkResult:
    """Drive ``url`` with wrk (one thread) and read its summary. With ``delay_ms``, each
    connection waits after every answer before its next request (wrk's Lua ``delay()``),
    which holds the load below the server's peak. The wait is drawn from an exponential
    distribution with that mean, so the connections do not move in lockstep (which would
    send bursts of one request per connection at once) and requests arrive roughly as a
    Poisson stream. The latency wrk reports starts when a request is written: it leaves
    the wait out. ``script`` is more Lua for wrk (a ``request()`` function, say)."""
    if shutil.which("wrk") is None:
        raise RuntimeError("wrk is not installed (Debian: apt-get install wrk)")
    args = ["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "--latency", url]
    for name, value in (headers or {}).items():
        args += ["-H", f"{name}: {value}"]
    with tempfile.NamedTemporaryFile("w", suffix=".lua") as lua:
        if delay_ms is not None:
            lua.write("math.randomseed(os.time())\n"
                      f"function delay() return math.floor(-{delay_ms} * math.log(1 - math.random()) + 0.5)"
                      " end\n")
        if delay_ms is not None or script:
            lua.write(script)
            lua.flush()
            args += ["-s", lua.name]
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
