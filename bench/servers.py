"""The servers of the side-by-side run: an upstream, the proxies in front of it, and what
each configuration is driven with.

Debian's nginx serves a 1 KiB file (``/1k.txt``, and ``/open/1k.txt`` for the gateway's
public route) from CPU 0, where wrk also runs. Every proxy runs on CPU 1 unless its
configuration says otherwise; the driver moves a server to its configuration's CPUs before
each run, so one gateway process can be measured on one core and then on two.
"""

from __future__ import annotations

import asyncio
import secrets
import subprocess
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import jwt
from cryptography.hazmat.primitives import serialization

from bench.harness import free_port, start_gateway, start_haproxy, start_nginx, stop, until_up
from gateway.credentials import hash_password
from gateway.store import User, open_store

PASSWORD = "bench-password-1"
UPSTREAM_CPUS = {0}
LOAD_CPUS = {0}
PROXY_CPUS = {1}
BOTH_CPUS = {0, 1}

GATEWAY_CONFIG = """\
listen: {{host: 127.0.0.1, port: {port}}}
store: "sqlite:///{work}/gateway.db"
upstreams: {{app: {{url: "http://127.0.0.1:{upstream}"}}}}
tokens:
  issuer: bench
  audience: bench
  access_ttl: 2h
  keys: [{key}]
cookies: {{secure: false}}
routes:
  - {{path: /open/**, access: public}}
  - {{path: /**, access: authenticated}}
"""


@dataclass
class Target:
    """One configuration: a URL to drive, the process whose CPU it costs, where that runs."""
    name: str
    url: str
    pid: int
    cpus: set[int]
    headers: dict[str, str] = field(default_factory=dict)
    script: str = ""  # more Lua for wrk


# name -> (gateway instance it needs, what it is)
CONFIGS: dict[str, tuple[str | None, str]] = {
    "direct": (None, "the upstream itself, no proxy (baseline for added latency)"),
    "nginx": (None, "nginx proxy_pass, keep-alive upstream, 1 worker"),
    "haproxy": (None, "HAProxy 2.6 jwt_verify HS256 (+ exp), 1 thread"),
    "gw-public": ("hs256", "gateway, public route (no token)"),
    "gw-hs256": ("hs256", "gateway, HS256 access token"),
    "gw-eddsa": ("eddsa", "gateway, EdDSA access token"),
    "gw-rs256": ("rs256", "gateway, RS256 access token"),
    "gw-hs256-new": ("hs256", "gateway, HS256, a token not seen before on every request"),
    "gw-eddsa-new": ("eddsa", "gateway, EdDSA, a token not seen before on every request"),
    "gw-rs256-new": ("rs256", "gateway, RS256, a token not seen before on every request"),
    "gw-1w-2cpu": ("hs256", "gateway, HS256, 1 worker given both CPUs"),
    "gw-2w-2cpu": ("workers2", "gateway, HS256, --workers 2 given both CPUs"),
}
_KEYS = {"hs256": "HS256", "workers2": "HS256", "eddsa": "EdDSA", "rs256": "RS256"}


async def add_user(store_url: str) -> None:
    store = await open_store(store_url)
    try:
        await store.add_user(User("bench", hash_password(PASSWORD), ("user",)))
    finally:
        await store.close()


async def login(url: str) -> str:
    """An access token from a real POST /auth/login."""
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http:
        async with http.post(f"{url}/auth/login", json={"username": "bench", "password": PASSWORD}) as resp:
            if resp.status != 200:
                raise RuntimeError(f"login at {url}: {resp.status} {await resp.text()}")
            return str((await resp.json())["access_token"])


def _key(work: Path, algorithm: str, secret: str) -> str:
    if algorithm == "HS256":
        return f'{{kid: hs1, algorithm: HS256, secret: "{secret}"}}'
    pem = work / f"{algorithm.lower()}.pem"
    if not pem.exists():
        subprocess.run([sys.executable, "-m", "gateway", "keys", "generate", "--algorithm", algorithm,
                        "--kid", algorithm.lower(), "--out", str(pem)], check=True, stdout=subprocess.DEVNULL)
    return f'{{kid: {algorithm.lower()}, algorithm: {algorithm}, key_file: "{pem}"}}'


async def start(work: Path, names: list[str], stack: ExitStack) -> dict[str, Target]:
    """Start what ``names`` need; ``stack`` stops it all."""
    www = work / "www"
    (www / "open").mkdir(parents=True, exist_ok=True)
    for path in (www / "1k.txt", www / "open" / "1k.txt"):
        path.write_bytes(b"x" * 1024)
    secret = secrets.token_hex(32)
    up_port = free_port()
    upstream = stack.enter_context(_running(start_nginx(work / "upstream", up_port, root=www, cpus=UPSTREAM_CPUS)))
    await until_up(f"http://127.0.0.1:{up_port}/1k.txt")
    targets: dict[str, Target] = {}
    if "direct" in names:
        targets["direct"] = Target("direct", f"http://127.0.0.1:{up_port}/1k.txt", upstream.pid, UPSTREAM_CPUS)
    if "nginx" in names:
        port = free_port()
        proc = stack.enter_context(_running(start_nginx(work / "proxy", port, upstream=up_port, cpus=PROXY_CPUS)))
        await until_up(f"http://127.0.0.1:{port}/1k.txt")
        targets["nginx"] = Target("nginx", f"http://127.0.0.1:{port}/1k.txt", proc.pid, PROXY_CPUS)
    if "haproxy" in names:
        port = free_port()
        proc = stack.enter_context(_running(start_haproxy(work / "haproxy", port, upstream=up_port,
                                                          hs256_secret=secret, cpus=PROXY_CPUS)))
        await until_up(f"http://127.0.0.1:{port}/1k.txt")
        token = jwt.encode({"sub": "bench", "exp": int(time.time()) + 7200}, secret, algorithm="HS256")
        targets["haproxy"] = Target("haproxy", f"http://127.0.0.1:{port}/1k.txt", proc.pid, PROXY_CPUS,
                                    {"Authorization": f"Bearer {token}"})
        forged = jwt.encode({"sub": "bench", "exp": int(time.time()) + 7200}, "x" * 64, algorithm="HS256")
        expired = jwt.encode({"sub": "bench", "exp": int(time.time()) - 10}, secret, algorithm="HS256")
        for headers in ({}, {"Authorization": f"Bearer {forged}"}, {"Authorization": f"Bearer {expired}"}):
            await expect(targets["haproxy"].url, headers, 403)
    instances = {CONFIGS[n][0] for n in names} - {None}
    if instances:
        await add_user(f"sqlite:///{work}/gateway.db")
    urls: dict[str, tuple[str, int, str]] = {}
    for instance in sorted(i for i in instances if i is not None):
        port = free_port()
        config = work / f"gateway-{instance}.yaml"
        config.write_text(GATEWAY_CONFIG.format(port=port, work=work, upstream=up_port,
                                                key=_key(work, _KEYS[instance], secret)))
        workers = instance == "workers2"
        proc = stack.enter_context(_running(start_gateway(
            config, cpus=BOTH_CPUS if workers else PROXY_CPUS, args=("--workers", "2") if workers else ())))
        url = f"http://127.0.0.1:{port}"
        await until_up(f"{url}/healthz")
        if workers:
            await asyncio.sleep(1.0)  # the second worker listening too
        urls[instance] = (url, proc.pid, await login(url))
    for name in names:
        owner = CONFIGS[name][0]
        if owner is None:
            continue
        origin, pid, token = urls[owner]
        resource = "/open/1k.txt" if name == "gw-public" else "/1k.txt"
        headers = {} if name == "gw-public" else {"Authorization": f"Bearer {token}"}
        cpus = BOTH_CPUS if name in ("gw-1w-2cpu", "gw-2w-2cpu") else PROXY_CPUS
        script = ""
        if name.endswith("-new"):
            tokens = work / f"tokens-{owner}.txt"
            tokens.write_text("\n".join(_variants(token, work, _KEYS[owner], secret)) + "\n")
            script = _CYCLE.format(path=tokens)
        targets[name] = Target(name, origin + resource, pid, cpus, headers, script)
        if headers:
            await expect(targets[name].url, {}, 401)
    for target in targets.values():
        await expect(target.url, target.headers, 200)
    return targets


async def expect(url: str, headers: dict[str, str], status: int) -> None:
    """Each proxy does what it is measured doing: forwards a good request, refuses a bad one."""
    async with aiohttp.ClientSession() as http, http.get(url, headers=headers) as resp:
        if resp.status != status:
            raise RuntimeError(f"{url} answered {resp.status}, not {status}")


# The gateway remembers the last 4096 tokens whose signature it checked; cycling through
# more than that, in order, every request carries a token it has not seen (or has forgotten).
FRESH_TOKENS = 5000
_CYCLE = """\
local tokens = {{}}
for line in io.lines("{path}") do tokens[#tokens + 1] = "Bearer " .. line end
local i = 0
function request()
  i = i % #tokens + 1
  return wrk.format(nil, nil, {{["Authorization"] = tokens[i]}})
end
"""


def _variants(token: str, work: Path, algorithm: str, secret: str) -> list[str]:
    """FRESH_TOKENS tokens like ``token`` (a real login's), each with its own jti, signed
    with the same key as the gateway signs with."""
    header = jwt.get_unverified_header(token)
    claims = jwt.decode(token, options={"verify_signature": False})
    key: Any = secret
    if algorithm != "HS256":
        key = serialization.load_pem_private_key((work / f"{algorithm.lower()}.pem").read_bytes(), None)
    return [jwt.encode({**claims, "jti": f"bench-{i}"}, key, algorithm=algorithm,
                       headers={"kid": header["kid"], "typ": header["typ"]}) for i in range(FRESH_TOKENS)]


class _running:
    """A started process as a context: stopped on the way out, whatever happened."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc

    def __enter__(self) -> subprocess.Popen[bytes]:
        return self.proc

    def __exit__(self, *exc: object) -> None:
        stop(self.proc)
