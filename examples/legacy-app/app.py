"""A legacy web app that knows nothing about tokens.

It has no login, no sessions and no password handling. It trusts one thing: the
``X-Auth-User`` header (and shows ``X-Auth-Roles``), which only the gateway in front of it
can set. Standard library only, to make the point that the app could be written in anything.

    python examples/legacy-app/app.py --port 8000
"""

from __future__ import annotations

import argparse
import html
import json
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


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
        elif path == "/":
            who = html.escape(user) if user else "stranger"
            body = (f"<p>Hello, <strong>{who}</strong>.</p>"
                    f"<p>Your roles: {html.escape(roles) or 'none'}.</p>"
                    '<ul><li><a href="/whoami">/whoami</a></li>'
                    '<li><a href="/admin/">/admin/</a> (role admin)</li>'
                    '<li><a href="/static/hello.txt">/static/hello.txt</a> (public)</li></ul>'
                    '<form method="post" action="/auth/logout"><button>Sign out</button></form>')
            self._send(200, "text/html", _page("Legacy app", body))
        else:
            self._send(404, "text/plain", "not found\n")

    def _send(self, status: int, content_type: str, text: str) -> None:
        body = text.encode()
        self.send_response(status)
        self.send_header("Content-Type", f"{content_type}; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_HEAD = do_GET

    def log_message(self, format: str, *args: object) -> None:
        pass


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
