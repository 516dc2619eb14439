"""``gateway demo``: the example legacy app behind a gateway, on a throwaway SQLite store.

Everything it makes lives in a temporary directory and goes away when it stops. The signing
secret and the demo passwords are new random values on every run.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import tempfile
import threading
from pathlib import Path

from . import config as config_module
from . import demo_app, users
from .errors import UserError
from .server import serve
from .store import open_store

CONFIG = """\
# The demo's config: see config/gateway.yaml for every key.
listen: {{host: 127.0.0.1, port: {port}}}
store: sqlite:gateway.db
upstreams:
  legacy: {{url: "http://127.0.0.1:{upstream_port}", timeout: 10s}}
tokens:
  issuer: gateway-demo
  audience: legacy
  access_ttl: 15m
  keys:
    - {{kid: demo-1, algorithm: HS256, secret_file: signing.secret}}
cookies:
  secure: false          # the demo speaks plain HTTP on localhost
identity_headers: {{X-Auth-User: sub, X-Auth-Roles: roles}}
routes:
  - {{path: /static/**, access: public}}
  - {{path: /spa/**, access: public}}       # the single-page app's files (examples/spa)
  - {{path: /admin/**, access: {{roles: [admin]}}}}
  - {{path: /**, access: authenticated}}
"""


def run_demo(port: int = 8080) -> None:
    with tempfile.TemporaryDirectory(prefix="gateway-demo-") as tmp:
        upstream = demo_app.make_server("127.0.0.1", 0)
        threading.Thread(target=upstream.serve_forever, daemon=True).start()
        try:
            _run(Path(tmp), port or _free_port(), upstream.server_address[1])
        finally:
            upstream.shutdown()
    print(f"gateway demo stopped; deleted {tmp}", flush=True)


def _run(tmp: Path, port: int, upstream_port: int) -> None:
    secret_path = tmp / "signing.secret"
    secret_path.write_text(secrets.token_urlsafe(48))
    os.chmod(secret_path, 0o600)
    config_path = tmp / "gateway.yaml"
    config_path.write_text(CONFIG.format(port=port, upstream_port=upstream_port))
    cfg = config_module.load(config_path)
    passwords = {"alice": secrets.token_urlsafe(9), "bob": secrets.token_urlsafe(9)}
    asyncio.run(_add_users(cfg.store, passwords))
    url = f"http://127.0.0.1:{port}"

    def ready() -> None:
        print(_instructions(url, upstream_port, passwords, config_path), flush=True)

    try:
        serve(cfg, ready=ready)
    except OSError as exc:
        raise UserError(f"cannot listen on 127.0.0.1:{port} ({exc.strerror}); "
                        "try: gateway demo --port 0") from None


async def _add_users(store_url: str, passwords: dict[str, str]) -> None:
    store = await open_store(store_url)
    try:
        await users.add(store, "alice", passwords["alice"], ["user"])
        await users.add(store, "bob", passwords["bob"], ["admin"])
    finally:
        await store.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _instructions(url: str, upstream_port: int, passwords: dict[str, str], config_path: Path) -> str:
    alice = passwords["alice"]
    return f"""
gateway demo is running at {url}
  in front of a legacy app at http://127.0.0.1:{upstream_port} that knows nothing about tokens
  (it only reads X-Auth-User). Config: {config_path}

Users:  alice / {alice}   (role user)
        bob   / {passwords["bob"]}   (role admin)

Open {url}/ in a browser and sign in, or try with curl (below).
Open {url}/spa/ for a single-page app that keeps its token in memory (examples/spa/).

  curl -i {url}/static/hello.txt                  # public: no token needed
  curl -i {url}/whoami                            # 401: no token
  TOKEN=$(curl -s -c jar.txt -H 'Content-Type: application/json' \\
       -d '{{"username":"alice","password":"{alice}"}}' {url}/auth/login \\
       | python3 -c 'import json,sys; print(json.load(sys.stdin)["access_token"])')
  curl -H "Authorization: Bearer $TOKEN" {url}/whoami         # the app sees alice
  curl -i -H "Authorization: Bearer $TOKEN" {url}/admin/      # 403: alice is no admin
  curl -s -b jar.txt -c jar.txt -X POST {url}/auth/refresh    # new tokens, rotated cookie
  curl -i -b jar.txt -X POST {url}/auth/logout                # session ended

Press Ctrl-C to stop; everything the demo made is deleted.
"""
