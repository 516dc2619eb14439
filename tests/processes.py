"""Real ``gateway`` processes for the tests that need them (crashes, workers, replicas)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_gateway(config: Path, *args: str, log: Path | None = None) -> subprocess.Popen[bytes]:
    out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115 (kept open by the child)
    return subprocess.Popen([sys.executable, "-m", "gateway", "run", "-c", str(config), *args],
                            stdout=out, stderr=subprocess.STDOUT if log else subprocess.PIPE)


async def until_healthy(http: aiohttp.ClientSession, url: str, proc: subprocess.Popen[bytes],
                        seconds: float = 15) -> None:
    """Wait until ``url``/healthz answers 200 (the process is listening); fail if the process
    dies or ``seconds`` pass."""
    deadline = time.monotonic() + seconds
    while True:
        assert proc.poll() is None, f"the gateway exited with {proc.returncode}"
        try:
            async with http.get(f"{url}/healthz") as resp:
                if resp.status == 200:
                    return
        except aiohttp.ClientConnectionError:
            pass
        assert time.monotonic() < deadline, f"the gateway did not come up within {seconds} s"
        await asyncio.sleep(0.05)


def stop(proc: subprocess.Popen[bytes], timeout: float = 15) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            return proc.wait()
    return proc.returncode
