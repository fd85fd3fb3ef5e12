"""`imgproxy serve --workers N`: N server processes on one port, under a small supervisor.

Each worker is an ordinary `imgproxy serve` process with its own event loop, bound to the same
port with SO_REUSEPORT (the kernel spreads connections over them). The supervisor only starts
workers, restarts one that dies, and passes SIGTERM, SIGINT and SIGHUP on to all of them.
Metrics: the workers share a prometheus-client multiprocess directory, so one scrape of any
worker shows the whole group.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import re
import signal
import subprocess
import sys
import tempfile
import time

import yaml
from prometheus_client import multiprocess

log = logging.getLogger("imgproxy.workers")

WORKER_FLAG = "--reuse-port"
POLL = 0.1
# The status `imgproxy serve` exits with when it cannot start (a config it cannot serve, a
# port in use): restarting such a worker would only loop.
CANNOT_START = 2
RESTART_BACKOFF = (0.5, 1, 2, 4, 8)
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def worker_count(value: str) -> int:
    if value == "auto":
        return os.cpu_count() or 1
    count = int(value)
    if count < 1:
        raise ValueError("--workers must be at least 1")
    return count


class Supervisor:
    def __init__(self, count: int, worker_args: list[str]) -> None:
        self.count = count
        # -P: the installed package, never a source tree in the working directory.
        self.command = [sys.executable, "-P", "-m", "imgproxy.cli", "serve", WORKER_FLAG, *worker_args]
        self.metrics_dir = tempfile.mkdtemp(prefix="imgproxy-metrics-")
        self.env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": self.metrics_dir}
        self.workers: dict[int, subprocess.Popen] = {}  # by slot
        self.stopping = False
        self.restarts = 0

    def run(self) -> int:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._stop)
        signal.signal(signal.SIGHUP, self._forward)
        for slot in range(self.count):
            self._start(slot)
        log.info("supervising %d workers (pids %s)", self.count, ", ".join(str(p.pid) for p in self.workers.values()))
        code = 0
        while self.workers:
            time.sleep(POLL)
            for slot, proc in list(self.workers.items()):
                if proc.poll() is None:
                    continue
                del self.workers[slot]
                multiprocess.mark_process_dead(proc.pid, self.metrics_dir)
                if self.stopping:
                    continue
                if proc.returncode == CANNOT_START:
                    log.error("worker %d could not start; stopping the others", proc.pid)
                    code = CANNOT_START
                    self._stop()
                    continue
                delay = RESTART_BACKOFF[min(self.restarts, len(RESTART_BACKOFF) - 1)]
                self.restarts += 1
                log.error("worker %d exited with status %s; starting a new one in %gs", proc.pid, proc.returncode, delay)
                time.sleep(delay)
                if not self.stopping:
                    self._start(slot)
        return code

    def _start(self, slot: int) -> None:
        self.workers[slot] = subprocess.Popen(self.command, env=self.env, preexec_fn=_stop_with_parent)

    def _stop(self, signum=signal.SIGTERM, frame=None) -> None:
        self.stopping = True
        self._forward(signal.SIGTERM)

    def _forward(self, signum, frame=None) -> None:
        for proc in self.workers.values():
            if proc.poll() is None:
                proc.send_signal(signum)


def _stop_with_parent() -> None:
    """In a new worker: a SIGTERM (so a drain) if the supervisor dies, even by SIGKILL, so no
    orphan keeps the port."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def refusal(config, path: str) -> str | None:
    """Why this config cannot run on several workers, or None."""
    if config.state.backend == "memory" and not config.state.per_process:
        return (
            "--workers above 1 with the memory state backend would give every worker its own rate limits and budgets; "
            "use state.backend: redis, or set state.per_process: true if per-process limits are intended"
        )
    if not config.images.signing_key:
        return (
            f"--workers above 1 needs images.signing_key{_variable_hint(path)}: with a random key per worker, an image "
            "URL made by one worker would be refused by the others"
        )
    return None


def _variable_hint(path: str) -> str:
    """` (set $VAR)` when the file reads the signing key from the environment."""
    try:
        with open(path, encoding="utf-8") as file:
            raw = yaml.safe_load(file)
        written = str(raw["images"]["signing_key"])
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return ""
    found = re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", written)
    return f" (set {' or '.join('$' + name for name in found)})" if found else ""
