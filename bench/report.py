"""From the raw samples of a run to its tables: medians, ratios, the targets met or not, and
the machine the run was taken on."""

from __future__ import annotations

import os
import platform
import subprocess
from importlib import metadata
from typing import Any

from bench.harness import median
from bench.servers import CONFIGS

PACKAGES = ("aiohttp", "PyJWT", "cryptography", "argon2-cffi", "redis", "aiosqlite", "PyYAML")


def machine() -> dict[str, Any]:
    cpu = "unknown"
    for line in open("/proc/cpuinfo", encoding="utf-8"):
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    tools = {}
    for name, args in (("nginx", ["nginx", "-v"]), ("haproxy", ["haproxy", "-v"]), ("wrk", ["wrk", "-v"])):
        try:
            out = subprocess.run(args, capture_output=True, text=True, timeout=10)
            tools[name] = (out.stdout + out.stderr).splitlines()[0].strip()
        except (OSError, IndexError, subprocess.TimeoutExpired):
            tools[name] = "missing"
    versions = {}
    for package in PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "missing"
    return {"cpu": cpu, "cores": os.cpu_count(), "kernel": platform.release(),
            "python": platform.python_version(), "packages": versions, "tools": tools}


def spread(values: list[float]) -> float:
    """(max - min) / median: how far apart the rounds were."""
    mid = median(values)
    return (max(values) - min(values)) / mid if mid else 0.0


def peak_rows(samples: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    nginx = samples.get("nginx")
    ref_rps = median([s["requests_per_s"] for s in nginx]) if nginx else None
    ref_cpu = median([s["cpu_us_per_request"] for s in nginx]) if nginx else None
    rows = []
    for name, runs in samples.items():
        rps = median([s["requests_per_s"] for s in runs])
        cpu = median([s["cpu_us_per_request"] for s in runs])
        rows.append({
            "config": name, "what": CONFIGS[name][1],
            "rps_over_nginx": round(rps / ref_rps, 3) if ref_rps else None,
            "cpu_over_nginx": round(cpu / ref_cpu, 2) if ref_cpu else None,
            "requests_per_s": round(rps),
            "p50_ms": round(median([s["p50_ms"] for s in runs]), 3),
            "p99_ms": round(median([s["p99_ms"] for s in runs]), 3),
            "cpu_us_per_request": round(cpu, 1),
            "rps_spread": round(spread([s["requests_per_s"] for s in runs]), 3),
            "errors": sum(s["errors"] for s in runs),
        })
    return rows


def fixed_rows(fixed: dict[str, Any]) -> dict[str, Any]:
    samples = fixed["samples"]
    out: dict[str, Any] = {}
    for name, runs in samples.items():
        out[name] = {"requests_per_s": round(median([s["requests_per_s"] for s in runs])),
                     "p50_ms": round(median([s["p50_ms"] for s in runs]), 3),
                     "p99_ms": round(median([s["p99_ms"] for s in runs]), 3),
                     "p99_spread": round(spread([s["p99_ms"] for s in runs]), 3),
                     "errors": sum(s["errors"] for s in runs)}
    pairs = list(zip(samples.get("direct", []), samples.get("gateway", []), strict=False))
    if pairs:
        out["added_p99_ms"] = round(median([g["p99_ms"] - d["p99_ms"] for d, g in pairs]), 3)
    with_logins = list(zip(samples.get("gateway", []), samples.get("gateway+logins", []), strict=False))
    if with_logins:
        out["p99_logins_ratio"] = round(median([w["p99_ms"] / g["p99_ms"] for g, w in with_logins]), 3)
    return out


def targets(peak: dict[str, list[dict[str, Any]]], fixed: dict[str, Any] | None, memory: dict[str, Any] | None,
            streaming: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Ratios between configurations are paired by round (the two runs were taken a few
    seconds apart) and the median of the per-round ratios is kept: a slow round then
    weighs on both sides of its ratio instead of on one median."""
    rows: list[dict[str, Any]] = []

    def add(what: str, value: float | None, op: str, limit: float) -> None:
        ok = None if value is None else (value <= limit if op == "<=" else value >= limit)
        rows.append({"target": what, "value": None if value is None else round(value, 3),
                     "limit": f"{op} {limit:g}", "pass": ok})

    def ratio(a: str, b: str, key: str) -> float | None:
        if a not in peak or b not in peak:
            return None
        return median([x[key] / y[key] for x, y in zip(peak[a], peak[b], strict=True) if y[key]])

    # "same token": one token on every request (its signature is checked once, then
    # remembered); "new tokens": each request brings a token the gateway has not seen.
    add("CPU/request, gateway HS256 ÷ nginx proxy_pass (same token)",
        ratio("gw-hs256", "nginx", "cpu_us_per_request"), "<=", 3)
    add("CPU/request, gateway HS256 ÷ nginx proxy_pass (new tokens)",
        ratio("gw-hs256-new", "nginx", "cpu_us_per_request"), "<=", 3)
    add("throughput, EdDSA ÷ HS256 (same token)", ratio("gw-eddsa", "gw-hs256", "requests_per_s"), ">=", 0.95)
    add("throughput, RS256 ÷ HS256 (same token)", ratio("gw-rs256", "gw-hs256", "requests_per_s"), ">=", 0.95)
    add("throughput, EdDSA ÷ HS256 (new tokens)", ratio("gw-eddsa-new", "gw-hs256-new", "requests_per_s"),
        ">=", 0.95)
    add("throughput, RS256 ÷ HS256 (new tokens)", ratio("gw-rs256-new", "gw-hs256-new", "requests_per_s"),
        ">=", 0.95)
    add("throughput, --workers 2 ÷ 1 worker (both on 2 CPUs)",
        ratio("gw-2w-2cpu", "gw-1w-2cpu", "requests_per_s"), ">=", 1.7)
    add("added p99 over direct at half peak (ms)", fixed.get("added_p99_ms") if fixed else None, "<=", 2)
    add("proxied p99 with 10 logins/s ÷ without", fixed.get("p99_logins_ratio") if fixed else None, "<=", 1.5)
    growth = None
    if streaming:
        growth = max(max(r["growth_mib"], r["growth_hwm_mib"] or 0) for r in streaming["results"].values())
    add("RSS growth streaming 1 GiB, worst direction (MiB)", growth, "<=", 50)
    add("RSS per idle keep-alive connection (KiB)", memory["kib_per_connection"] if memory else None, "<=", 10)
    return rows


def render(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [f"gateway side-by-side benchmark — {report['date']}; {m['cpu']}, {m['cores']} cores, "
             f"Linux {m['kernel']}, Python {m['python']}",
             f"medians of {report['rounds']} interleaved rounds of {report['seconds']:g} s; proxies on CPU 1, "
             "upstream nginx and wrk on CPU 0 (-t1 -c32) unless noted", ""]
    if report.get("peak"):
        header = ("config", "req/s ÷ nginx", "CPU/req ÷ nginx", "req/s", "p50 ms", "p99 ms", "CPU µs/req",
                  "spread", "errors")
        lines.append("  ".join(f"{h:>15}" for h in header))
        for row in report["peak"]:
            cells = (row["config"], row["rps_over_nginx"], row["cpu_over_nginx"], row["requests_per_s"],
                     row["p50_ms"], row["p99_ms"], row["cpu_us_per_request"], f"{row['rps_spread']:.0%}",
                     row["errors"])
            lines.append("  ".join(f"{'-' if c is None else c!s:>15}" for c in cells))
        lines.append("  (gw-1w-2cpu and gw-2w-2cpu: the gateway on both CPUs, sharing CPU 0 with the "
                     "upstream and wrk; spread: (max - min) / median of req/s over rounds)")
        lines.append("")
    if fixed := report.get("fixed"):
        lines.append(f"fixed load ~{fixed['target_rate_per_s']:.0f} req/s (half the HS256 peak): "
                     f"{fixed['connections']} connections, each waiting {fixed['delay_ms']} ms between requests")
        for name in ("direct", "gateway", "gateway+logins"):
            if name in fixed["result"]:
                r = fixed["result"][name]
                lines.append(f"  {name:>15}: {r['requests_per_s']:>6} req/s  p50 {r['p50_ms']:.3f} ms  "
                             f"p99 {r['p99_ms']:.3f} ms  (p99 spread {r['p99_spread']:.0%}, errors {r['errors']})")
        lines.append("")
    if one := report.get("serial"):
        lines.append("one connection, back to back (no queue): "
                     + "; ".join(f"{name} p50 {r['p50_ms']:.3f} ms, p99 {r['p99_ms']:.3f} ms"
                                 for name, r in one["result"].items() if isinstance(r, dict)))
        lines.append("")
    if mem := report.get("memory"):
        lines.append(f"memory: idle RSS {mem['idle_rss_mib']} MiB; with {mem['opened']} idle keep-alive "
                     f"connections {mem['held_rss_mib']} MiB ({mem['kib_per_connection']} KiB each; "
                     f"fds {mem['fds_before']} -> {mem['fds_held']}); after they close {mem['after_close_rss_mib']} MiB")
    if st := report.get("streaming"):
        parts = [f"{d} {r['growth_mib']} MiB (HWM {r['growth_hwm_mib']}), {r['throughput_mib_s']} MiB/s, "
                 f"{'verified' if r['verified'] else 'NOT VERIFIED'}" for d, r in st["results"].items()]
        lines.append(f"streaming {st['bytes_each_way'] / 2**20:g} MiB each way, RSS growth: " + "; ".join(parts))
    for refresh in report.get("refresh", []):
        rows = ", ".join(f"c={r['concurrency']}: {r['rotations_per_s']}/s ({r['rotations_over_healthz']} × healthz, "
                         f"{r['gateway_cpu_us_per_rotation']} µs CPU)" for r in refresh["results"])
        lines.append(f"{refresh['benchmark']}: {rows}")
    if report.get("targets"):
        lines += ["", f"{'target':<62} {'value':>9} {'limit':>8}  result"]
        for t in report["targets"]:
            result = "not measured" if t["pass"] is None else ("pass" if t["pass"] else "FAIL")
            value = "-" if t["value"] is None else f"{t['value']:g}"
            lines.append(f"{t['target']:<62} {value:>9} {t['limit']:>8}  {result}")
    return "\n".join(lines)
