"""Logs: JSON lines on stdout (or ``log_format: text``, for reading by eye), one per request
(the access log, ``gateway.access``) and one per security event (``gateway.security``).

Fields come from ``extra={"fields": {...}}``. Nothing here ever receives a token, a cookie
value, a password or the query string: the access log takes the normalized path, which
has no query.
"""

from __future__ import annotations

import atexit
import json
import logging
import re
import sys
import threading
import time
from typing import Any

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.http_exceptions import HttpProcessingError

from . import metrics
from .state import ENDPOINT, ERROR, IP, PATH, REQUEST_ID, ROUTE, USER

FORMATS = ("json", "text")
# A value is written as it is only when it is visible ASCII with no quote, "=" or space;
# anything else is quoted, with control characters escaped, so that a client's input (a
# user name, a header) can neither forge a second field or line nor send a terminal
# escape sequence to whoever reads the log.
_PLAIN = re.compile(r'[!#-<>-~]+')
_VISIBLE = re.compile(r"[!-~]+")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                    + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
            "pid": record.process,
        }
        line.update(getattr(record, "fields", {}))
        if record.exc_info and record.exc_info[0] is not None:
            line["exception"] = record.exc_info[0].__name__
            line["traceback"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


class TextFormatter(logging.Formatter):
    """``TIME LEVEL LOGGER EVENT key=value ...``: the same fields as JSON, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created)) + f".{int(record.msecs):03d}"
        parts = [stamp, f"{record.levelname:<7}", record.name, record.getMessage()]
        for key, value in getattr(record, "fields", {}).items():
            if value is not None:
                if isinstance(value, str):
                    text = value if _PLAIN.fullmatch(value) else json.dumps(value)
                else:  # JSON escapes what is not visible ASCII; a space would still split the field
                    text = json.dumps(value, default=str, separators=(",", ":"))
                    text = text if _VISIBLE.fullmatch(text) else json.dumps(text)
                parts.append(f"{key}={text}")
        line = " ".join(parts)
        if record.exc_info and record.exc_info[0] is not None:
            line += "\n" + self.formatException(record.exc_info)
        return line


class _BatchedStream(logging.StreamHandler):  # type: ignore[type-arg]
    """Lines are written to the stream's buffer at once and flushed to the file at most
    FLUSH_EVERY seconds later, by a thread of their own, instead of one write(2) per line:
    the access log writes a line per request. A warning or worse is flushed at once, and
    so is everything left at exit (a SIGKILL may lose the last fraction of a second)."""

    FLUSH_EVERY = 0.2

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self._wake = threading.Event()
        threading.Thread(target=self._flush_forever, name="log-flush", daemon=True).start()
        atexit.register(self.flush_now)

    def flush(self) -> None:
        pass  # StreamHandler.emit calls this after every line

    def emit(self, record: logging.LogRecord) -> None:
        super().emit(record)
        if record.levelno >= logging.WARNING:
            self.flush_now()

    def flush_now(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            try:
                self.stream.flush()
            except (OSError, ValueError):  # a closed or broken stream: nothing to save
                pass

    def _flush_forever(self) -> None:
        while not self._wake.wait(self.FLUSH_EVERY):
            self.flush_now()


def setup(level: str = "INFO", fmt: str = "json") -> None:
    handler = _BatchedStream(sys.stdout)
    handler.setFormatter(TextFormatter() if fmt == "text" else JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # aiohttp's own access logger is replaced by AccessLog below
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    logging.getLogger("aiohttp.server").addFilter(_redact_parser_errors)


def setup_commands() -> None:
    """For the commands other than ``run``: their security events (sessions ended, a
    password changed) as JSON lines on stderr, apart from the command's answer on stdout."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    security = logging.getLogger("gateway.security")
    security.handlers[:] = [handler]
    security.setLevel(logging.INFO)
    security.propagate = False


def _redact_parser_errors(record: logging.LogRecord) -> bool:
    """aiohttp logs a request it cannot parse with the offending bytes, which may be a
    token or a cookie. Keep the fact and the kind of error, drop the bytes."""
    if record.exc_info and isinstance(record.exc_info[1], HttpProcessingError):
        record.fields = {"reason": record.exc_info[1].__class__.__name__}
        record.msg, record.args, record.exc_info, record.exc_text = "malformed_request", (), None, None
    return True


class AccessLog(AbstractAccessLogger):
    """The one place that sees every answer with its route, status and duration, once it
    is sent: it writes the access log line, counts the request in the metrics, and lets go
    of the answer's headers (see the end of log)."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        route = request.get(ROUTE)
        # a proxied route's index; else which of the gateway's own endpoints; else none
        label = str(route.index) if route is not None else request.get(ENDPOINT, "none")
        metrics.request(label, response.status, time)
        self.logger.info("request", extra={"fields": {
            "request_id": request.get(REQUEST_ID),
            "method": request.method,
            "path": request.get(PATH, "-"),
            "route": label,
            "upstream": route.upstream if route is not None else None,
            "status": response.status,
            "duration_ms": round(time * 1000, 2),
            "user": request.get(USER),
            "error": request.get(ERROR),
            "ip": request.get(IP, request.remote),
            "bytes_in": request.content.total_bytes,
            "bytes_out": response.body_length,
        }})
        # aiohttp's handler keeps a connection's last request and answer until its next
        # request: let go of the answer's headers, most of what an idle keep-alive
        # connection would otherwise cost (bench/memory.py: 11.3 -> 9.1 KiB each).
        response.headers.clear()
