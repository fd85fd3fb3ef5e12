"""Real processes for tests that need them: `imgproxy serve` as users run it (the installed
console script) and the cheap mock upstream of the benchmarks, on free loopback ports."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
IMGPROXY = str(Path(sys.executable).parent / "imgproxy")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "STABILITY_", "IMGPROXY_", "PROMETHEUS_"))}
    return {**env, **extra}


def wait_for_port(port: int, proc: subprocess.Popen | None = None, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            if proc is not None and proc.poll() is not None:
                raise AssertionError(f"the process exited with {proc.returncode}: {proc.communicate()[1]}") from None
            if time.monotonic() > deadline:
                raise AssertionError(f"nothing listens on port {port}") from None
            time.sleep(0.05)


def mock_upstream(*args: str) -> tuple[subprocess.Popen, int]:
    """tests.benchmarks.mock_upstream on a free port (OpenAI-shaped answers, optional delay)."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.benchmarks.mock_upstream", "--port", str(port), *args],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    wait_for_port(port, proc)
    return proc, port


def http(method: str, url: str, body: dict | None = None, key: str | None = None, timeout: float = 30) -> tuple[int, dict, dict]:
    """(status, JSON body or {}, headers) of one request; connection failures raise OSError."""
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            raw, status, got = resp.read(), resp.status, dict(resp.headers)
    except urllib.error.HTTPError as error:
        raw, status, got = error.read(), error.code, dict(error.headers)
    try:
        return status, json.loads(raw) if raw else {}, got
    except ValueError:
        return status, {"raw": raw.decode(errors="replace")}, got


def metric(text: str, name: str) -> float:
    """The sum of a metric's samples in a Prometheus text exposition."""
    total, found = 0.0, False
    for line in text.splitlines():
        if line.startswith(name) and line[len(name)] in " {":
            total += float(line.rsplit(" ", 1)[1])
            found = True
    assert found, f"{name} is not in the scrape"
    return total
