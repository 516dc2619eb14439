"""Every metric the gateway exports, and the small functions the rest of the code calls.

Labels take values from fixed sets only: a value from the client (a path, a username, an
error string) would let anyone grow the series without bound. Anything outside a set is
counted as "other".

With `gateway run --workers N` the supervisor calls use_multiprocess_dir() before forking;
each worker then writes its values to its own files there and a scrape through any worker
sums them (prometheus-client's multiprocess mode).
"""

from __future__ import annotations

import os
from typing import Any, Final

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
    multiprocess,
    values,
)

MULTIPROC_ENV: Final = "PROMETHEUS_MULTIPROC_DIR"

STATUS_CLASSES: Final = frozenset({"1xx", "2xx", "3xx", "4xx", "5xx"})
OWN_ROUTES: Final = frozenset({"auth", "health", "metrics", "jwks", "none"})
UPSTREAM_ERROR_KINDS: Final = frozenset({"connect", "timeout", "reset", "invalid_response", "tls"})
# Why a proxied request's access token was refused (tokens.py and pipeline.py give these).
AUTH_FAILURE_REASONS: Final = frozenset(
    {
        "missing",
        "malformed",
        "ambiguous_credentials",
        "unknown_kid",
        "bad_header",
        "bad_signature",
        "bad_time_claims",
        "expired",
        "not_yet_valid",
        "lifetime_too_long",
        "wrong_issuer",
        "wrong_audience",
        "bad_claims",
        "revoked",
    }
)
_AUTH_FAILURE_NAMES: Final = {"unauthorized": "missing", "session_revoked": "revoked"}
# grace: a just-rotated token presented again within reuse_grace (answered, not rotated)
REFRESH_OUTCOMES: Final = frozenset({"rotated", "grace", "reused", "expired", "revoked", "invalid"})
LOGIN_OUTCOMES: Final = frozenset({"ok", "failed", "throttled"})
RELOAD_OUTCOMES: Final = ("ok", "failed")
MAX_REQUEST_SERIES: Final = 4096  # (route, status) pairs whose series are kept at hand

# Seconds; from a cached local hop to a slow upstream page.
DURATION_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


# The *_created series double the output and say nothing a scraper needs here.
disable_created_metrics()  # type: ignore[no-untyped-call]


class _Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "gateway_requests",
            "Requests answered, by matched route and status class",
            ["route", "status_class"],
            registry=registry,
        )
        self.request_duration = Histogram(
            "gateway_request_duration_seconds",
            "Time from the request's arrival to its response, by matched route",
            ["route"],
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.upstream_errors = Counter(
            "gateway_upstream_errors",
            "Proxied requests the upstream failed, by kind of failure",
            ["kind"],
            registry=registry,
        )
        self.auth_failures = Counter(
            "gateway_auth_failures",
            "Proxied requests refused for their access token, by reason",
            ["reason"],
            registry=registry,
        )
        self.refresh = Counter(
            "gateway_refresh",
            "Refresh-token presentations, by outcome",
            ["outcome"],
            registry=registry,
        )
        self.logins = Counter(
            "gateway_logins",
            "Login attempts, by outcome",
            ["outcome"],
            registry=registry,
        )
        self.active_sessions = Gauge(
            "gateway_active_sessions",
            "Live sessions (refresh-token families) in the store, counted at scrape time",
            registry=registry,
            # Every worker counts the same shared store; the latest count is the answer.
            multiprocess_mode="livemostrecent",
        )
        self.config_reloads = Counter(
            "gateway_config_reloads",
            "Configuration reloads, by outcome",
            ["outcome"],
            registry=registry,
        )
        # (route label, status) -> the request counter's and the histogram's series: labels()
        # costs more than the count itself, and a request is counted on every answer.
        self.request_series: dict[tuple[str, int], tuple[Any, Any]] = {}
        # Series that should read 0 rather than be absent before the first event.
        for outcome in LOGIN_OUTCOMES:
            self.logins.labels(outcome)
        for outcome in REFRESH_OUTCOMES:
            self.refresh.labels(outcome)
        for outcome in RELOAD_OUTCOMES:
            self.config_reloads.labels(outcome)

    def unregister(self, registry: CollectorRegistry) -> None:
        for collector in (
            self.requests,
            self.request_duration,
            self.upstream_errors,
            self.auth_failures,
            self.refresh,
            self.logins,
            self.active_sessions,
            self.config_reloads,
        ):
            registry.unregister(collector)


_m = _Metrics(REGISTRY)


def _bounded(value: str, allowed: frozenset[str]) -> str:
    return value if value in allowed else "other"


def status_class(status: int) -> str:
    return _bounded(f"{status // 100}xx", STATUS_CLASSES)


def request(route: str, status: int, seconds: float) -> None:
    """One answered request. route: a route's index as a string, or one of OWN_ROUTES."""
    series = _m.request_series.get((route, status))
    if series is None:
        label = route if route.isdecimal() and len(route) <= 4 else _bounded(route, OWN_ROUTES)
        series = (_m.requests.labels(label, status_class(status)), _m.request_duration.labels(label))
        if len(_m.request_series) < MAX_REQUEST_SERIES:  # bounded: routes x statuses
            _m.request_series[(route, status)] = series
    count, duration = series
    count.inc()
    duration.observe(max(seconds, 0.0))


def upstream_error(kind: str) -> None:
    _m.upstream_errors.labels(_bounded(kind, UPSTREAM_ERROR_KINDS)).inc()


def auth_failure(reason: str) -> None:
    reason = _AUTH_FAILURE_NAMES.get(reason, reason)
    _m.auth_failures.labels(_bounded(reason, AUTH_FAILURE_REASONS)).inc()


def refresh(outcome: str) -> None:
    _m.refresh.labels(_bounded(outcome, REFRESH_OUTCOMES)).inc()


def login(outcome: str) -> None:
    _m.logins.labels(_bounded(outcome, LOGIN_OUTCOMES)).inc()


def config_reloaded(ok: bool) -> None:
    _m.config_reloads.labels("ok" if ok else "failed").inc()


def active_sessions(count: int) -> None:
    _m.active_sessions.set(count)


def multiprocess_dir() -> str | None:
    return os.environ.get(MULTIPROC_ENV) or None


def use_multiprocess_dir(path: str) -> None:
    """Switch this process, and every process forked from it later, to multiprocess mode.

    prometheus-client picks how values are stored when it is imported and when a metric
    (or a labelled child) is made, so the metrics are made again here.
    """
    global _m
    os.environ[MULTIPROC_ENV] = path
    values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call]
    _m.unregister(REGISTRY)
    _m = _Metrics(REGISTRY)


def process_dead(pid: int) -> None:
    """A worker exited: its live gauges no longer count."""
    path = multiprocess_dir()
    if path is not None:
        multiprocess.mark_process_dead(pid, path)  # type: ignore[no-untyped-call]


def render() -> tuple[bytes, str]:
    """The Prometheus text exposition and its content type."""
    path = multiprocess_dir()
    if path is None:
        # This process's metrics plus the default process, platform and GC collectors.
        return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
    # Sum over every worker's files. process_* metrics are left out: they would describe
    # only whichever worker happened to answer the scrape.
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path)  # type: ignore[no-untyped-call]
    return generate_latest(registry), CONTENT_TYPE_LATEST
