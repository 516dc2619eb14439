"""The side-by-side benchmark: the gateway against nginx and HAProxy in front of one upstream.

    python -m bench [--quick] [--only NAME ...] [--rounds 5] [--seconds 5] [--json PATH]

Phases (each may be picked with --only, as may the configurations of bench/servers.py):

  peak       every configuration at full load (wrk -t1 -c32), interleaved over rounds:
             requests/s, p50/p99, the proxy's CPU time per request (all its processes)
  fixed      half the gateway's HS256 peak, held by wrk's per-connection delay: p99 direct
             vs through the gateway (the added latency), and with 10 logins/s running;
             then one connection, back to back: p50/p99 with no queue in front
  memory     idle RSS, and RSS with 10,000 idle keep-alive connections
  streaming  RSS growth while 1 GiB streams each way (bench/streaming.py)
  refresh    refresh rotations per second on SQLite and Redis (bench/refresh.py)

Prints the tables and the targets, and writes them with the machine's description to
bench/results/side-by-side.json. Everything started is stopped on the way out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import signal
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from bench import load, memory, refresh, report, servers, streaming
from bench.harness import family, set_affinity
from gateway.config import parse_size

PHASES = ("peak", "fixed", "memory", "streaming", "refresh")
RESULTS = Path(__file__).parent / "results" / "side-by-side.json"


def _choose(only: list[str]) -> tuple[list[str], list[str]]:
    picked = [n for item in only for n in item.split(",") if n]
    unknown = [n for n in picked if n not in servers.CONFIGS and n not in PHASES]
    if unknown:
        raise SystemExit(f"--only: unknown {', '.join(unknown)}; choose from "
                         f"{', '.join([*PHASES, *servers.CONFIGS])}")
    configs = [n for n in servers.CONFIGS if n in picked] or list(servers.CONFIGS)
    phases = [p for p in PHASES if p in picked] or (["peak"] if picked else list(PHASES))
    return configs, phases


async def run(args: argparse.Namespace, configs: list[str], phases: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                           "machine": report.machine(), "rounds": args.rounds, "seconds": args.seconds,
                           "phases": phases}
    needed = set(configs if "peak" in phases else [])
    needed |= {"direct", "gw-hs256"} if "fixed" in phases else set()
    needed |= {"gw-public"} if "memory" in phases else set()
    if needed:
        with tempfile.TemporaryDirectory(prefix="gateway-bench-") as tmp, ExitStack() as stack:
            print(f"starting {', '.join(sorted(needed))}", flush=True)
            targets = await servers.start(Path(tmp), [n for n in servers.CONFIGS if n in needed], stack)
            hs256_peak = None
            if "peak" in phases:
                print("peak load", flush=True)
                samples = await load.peak({n: targets[n] for n in configs}, args.rounds, args.seconds)
                out["peak_samples"] = samples
                out["peak"] = report.peak_rows(samples)
                hs256_peak = next((r["requests_per_s"] for r in out["peak"] if r["config"] == "gw-hs256"), None)
            if "fixed" in phases:
                if hs256_peak is None:
                    alone = await load.peak({"gw-hs256": targets["gw-hs256"]}, 1, args.seconds)
                    hs256_peak = round(alone["gw-hs256"][0]["requests_per_s"])
                print(f"fixed load at half the HS256 peak ({hs256_peak} req/s)", flush=True)
                fixed = await load.fixed_load(targets["direct"], targets["gw-hs256"], hs256_peak / 2,
                                              args.rounds, args.seconds, with_logins=True)
                out["fixed"] = {**fixed, "result": report.fixed_rows(fixed)}
                print("one connection, back to back", flush=True)
                one = await load.serial(targets["direct"], targets["gw-hs256"], args.rounds, args.seconds)
                out["serial"] = {**one, "result": report.fixed_rows(one)}
            if "memory" in phases:
                print(f"memory: {args.connections} idle keep-alive connections", flush=True)
                target = targets["gw-public"]
                set_affinity(family(target.pid), target.cpus)
                out["memory"] = await memory.idle_connections(target.url, target.pid, args.connections)
    if "streaming" in phases:
        print(f"streaming {args.size} each way", flush=True)
        out["streaming"] = await streaming.bench(parse_size(args.size), 0.05)
    if "refresh" in phases:
        out["refresh"] = []
        for store in (None, args.redis):
            print(f"refresh rotations on {store or 'SQLite'}", flush=True)
            out["refresh"].append(await refresh.bench(args.seconds, min(args.rounds, 3), [1, 32], store))
    out["targets"] = report.targets(out.get("peak_samples", {}), out.get("fixed", {}).get("result"),
                                    out.get("memory"), out.get("streaming"))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short run: 2 rounds of 2 s, smaller sizes")
    parser.add_argument("--only", action="append", default=[], metavar="NAME",
                        help=f"a phase ({', '.join(PHASES)}) or configuration ({', '.join(servers.CONFIGS)}); "
                             "repeatable or comma-separated")
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--seconds", type=float)
    parser.add_argument("--connections", type=int, help="idle keep-alive connections (default 10000)")
    parser.add_argument("--size", help="bytes streamed each way (default 1g)")
    parser.add_argument("--redis", default=os.environ.get("GATEWAY_BENCH_REDIS", "redis://127.0.0.1:6379/14"))
    parser.add_argument("--json", type=Path, help=f"where to write the results (default {RESULTS}; "
                                                  "with --quick, a temporary file)")
    args = parser.parse_args()
    args.rounds = args.rounds or (2 if args.quick else 5)
    args.seconds = args.seconds or (2.0 if args.quick else 5.0)
    args.connections = args.connections or (2000 if args.quick else 10000)
    args.size = args.size or ("64m" if args.quick else "1g")
    args.json = args.json or (Path(tempfile.gettempdir()) / "gateway-bench-quick.json" if args.quick else RESULTS)
    configs, phases = _choose(args.only)
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # the gateway inherits it
    if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > 1:
        os.sched_setaffinity(0, servers.LOAD_CPUS)  # this process drives load, like wrk
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # stopped like Ctrl-C: cleanly
    try:
        result = asyncio.run(run(args, configs, phases))
    except KeyboardInterrupt:
        print("interrupted; everything started was stopped", file=sys.stderr)
        sys.exit(130)
    print()
    print(report.render(result))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwritten to {args.json}")


if __name__ == "__main__":
    main()
