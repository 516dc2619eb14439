"""Logs: JSON lines on stdout, one per request (the access log) and one per security event.

Fields come from ``extra={"fields": {...}}``. Nothing here ever receives a token, a cookie
value, a password or the query string: the access log takes the normalized path, which
has no query.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.http_exceptions import HttpProcessingError

from .state import ERROR, IP, PATH, ROUTE, USER


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


def setup(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # aiohttp's own access logger is replaced by AccessLog below
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    logging.getLogger("aiohttp.server").addFilter(_redact_parser_errors)


def _redact_parser_errors(record: logging.LogRecord) -> bool:
    """aiohttp logs a request it cannot parse with the offending bytes, which may be a
    token or a cookie. Keep the fact and the kind of error, drop the bytes."""
    if record.exc_info and isinstance(record.exc_info[1], HttpProcessingError):
        record.fields = {"reason": record.exc_info[1].__class__.__name__}
        record.msg, record.args, record.exc_info, record.exc_text = "malformed_request", (), None, None
    return True


class AccessLog(AbstractAccessLogger):
    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        route = request.get(ROUTE)
        self.logger.info("request", extra={"fields": {
            "method": request.method,
            "path": request.get(PATH, "-"),
            "route": route.index if route is not None else None,
            "upstream": route.upstream if route is not None else None,
            "status": response.status,
            "duration_ms": round(time * 1000, 2),
            "user": request.get(USER),
            "error": request.get(ERROR),
            "ip": request.get(IP, request.remote),
            "bytes_in": request.content_length,
            "bytes_out": response.body_length,
        }})
