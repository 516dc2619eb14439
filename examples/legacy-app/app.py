"""A legacy web app that knows nothing about tokens.

It has no login, no sessions and no password handling. It trusts one thing: the
``X-Auth-User`` header (and shows ``X-Auth-Roles``), which only the gateway in front of it
can set. Standard library only, to make the point that the app could be written in anything.
It also serves the single-page app of ``examples/spa/`` as static files under ``/spa/``.

    python examples/legacy-app/app.py --port 8000
"""

from __future__ import annotations

import argparse
import html
import json
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

# examples/spa, beside this file's directory. Resolved, because the package ships this file
# as a symlink (gateway/demo_app.py).
SPA_DIR = Path(__file__).resolve().parent.parent / "spa"
SPA_TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml"}
# The SPA needs nothing but its own origin: no inline script or style, no other host.
SPA_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
                               "img-src 'self'; connect-src 'self'; form-action 'none'; "
                               "base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}


class LegacyApp(BaseHTTPRequestHandler):
    server_version = "LegacyApp/1.0"

    def do_GET(self) -> None:
        user = self.headers.get("X-Auth-User")
        roles = self.headers.get("X-Auth-Roles", "")
        path = self.path.split("?", 1)[0]
        if path == "/static/hello.txt":
            self._send(200, "text/plain", "Hello from a public file. No sign-in needed.\n")
        elif path == "/whoami":
            self._send(200, "application/json", json.dumps({"user": user, "roles": roles}) + "\n")
        elif path in ("/admin", "/admin/"):
            self._send(200, "text/html", _page("Admin", f"<p>Welcome to the admin area, "
                                                        f"{html.escape(user or '?')}.</p>"))
        elif path == "/spa" or path.startswith("/spa/"):
            file = _spa_file(path)
            if file is None:
                self._send(404, "text/plain", "not found\n")
            else:
                self._send(200, SPA_TYPES[file.suffix], file.read_text(encoding="utf-8"), SPA_HEADERS)
        elif path == "/":
            who = html.escape(user) if user else "stranger"
            body = (f"<p>Hello, <strong>{who}</strong>.</p>"
                    f"<p>Your roles: {html.escape(roles) or 'none'}.</p>"
                    '<ul><li><a href="/whoami">/whoami</a></li>'
                    '<li><a href="/admin/">/admin/</a> (role admin)</li>'
                    '<li><a href="/static/hello.txt">/static/hello.txt</a> (public)</li>'
                    '<li><a href="/spa/">/spa/</a> (a single-page app, public)</li></ul>'
                    '<form method="post" action="/auth/logout"><button>Sign out</button></form>')
            self._send(200, "text/html", _page("Legacy app", body))
        else:
            self._send(404, "text/plain", "not found\n")

    def _send(self, status: int, content_type: str, text: str, headers: dict[str, str] | None = None) -> None:
        body = text.encode()
        self.send_response(status)
        self.send_header("Content-Type", f"{content_type}; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_HEAD = do_GET

    def log_message(self, format: str, *args: object) -> None:
        pass


def _spa_file(path: str) -> Path | None:
    """The file of SPA_DIR that ``/spa``, ``/spa/`` or ``/spa/NAME`` names, or None. The
    path is resolved and must stay inside SPA_DIR: no ``..``, no symlink out of it."""
    name = path.removeprefix("/spa").lstrip("/") or "index.html"
    try:
        root = SPA_DIR.resolve(strict=True)
        file = (root / name).resolve()
    except (OSError, ValueError):  # no spa directory; a NUL or an unusable name
        return None
    if not file.is_relative_to(root) or file.suffix not in SPA_TYPES or not file.is_file():
        return None
    return file


def _page(title: str, body: str) -> str:
    return (f"<!doctype html><html lang=en><meta charset=utf-8><title>{title}</title>"
            f"<body style='font-family:system-ui;margin:2rem'><h1>{title}</h1>{body}</body></html>")


def make_server(host: str = "127.0.0.1", port: int = 8000) -> ThreadingHTTPServer:
    return ThreadingHTTPServer((host, port), LegacyApp)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    print(f"legacy app on http://{args.host}:{args.port}")
    make_server(args.host, args.port).serve_forever()
