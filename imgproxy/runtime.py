"""The running gateway and its replacement when the config file changes.

A reload builds a whole new Gateway from the file; only if that succeeds does it take new
requests, while requests already in flight finish on the old one, which is closed after them.
A bad file changes nothing: the old config keeps serving, and the failure is logged and
counted. Metrics, limiter and spend state outlive reloads (they live in `Shared`).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import logging
import signal
from pathlib import Path

from .config import ConfigError
from .gateway import Gateway
from .metrics import MULTIPROCESS

log = logging.getLogger("imgproxy.config")

PUBLISH_INTERVAL = 1.0  # seconds between a worker's in-flight gauge updates


class Runtime:
    def __init__(
        self, gateway: Gateway, path: str | None = None, reload_interval: float = 0, extra_plugins=(), freeze_heap: bool = False
    ) -> None:
        self.gateway = gateway
        self.freeze_heap = freeze_heap
        self.shared = gateway.shared
        self.path = path
        self.reload_interval = reload_interval
        self.extra_plugins = extra_plugins
        self.shutting_down = False
        self._digest = self._file_digest()
        self._watcher: asyncio.Task | None = None
        self._publisher: asyncio.Task | None = None
        self._retiring: set[asyncio.Task] = set()
        self._lock = asyncio.Lock()

    def _file_digest(self) -> bytes | None:
        if self.path is None:
            return None
        try:
            return hashlib.sha256(Path(self.path).read_bytes()).digest()
        except OSError:
            return None

    async def start(self) -> None:
        await self.gateway.start()
        self._freeze_heap()
        if self.path is not None:
            with contextlib.suppress(NotImplementedError, RuntimeError):  # no signals off the main thread
                asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(self.reload()))
            if self.reload_interval > 0:
                self._watcher = asyncio.create_task(self._watch())
        if MULTIPROCESS:
            self._publisher = asyncio.create_task(self._publish_in_flight())

    async def close(self) -> None:
        self.shutting_down = True
        for task in (self._watcher, self._publisher):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        for task in list(self._retiring):
            await task
        await self.gateway.close()
        await self.shared.state.close()

    async def _publish_in_flight(self) -> None:
        # Other workers' scrapes read this process's gauge from its file, not from a callback.
        while True:
            self.shared.metrics.in_flight.set(self.shared.in_flight)
            await asyncio.sleep(PUBLISH_INTERVAL)

    async def _watch(self) -> None:
        # Kubernetes updates a mounted ConfigMap by swapping a symlink: compare content, not mtimes.
        while True:
            await asyncio.sleep(self.reload_interval)
            if self._file_digest() != self._digest:
                await self.reload()

    async def reload(self) -> bool:
        """Load the config file again; True if the new config now serves."""
        async with self._lock:
            self._digest = self._file_digest()
            metrics = self.shared.metrics
            try:
                new = await Gateway.load(self.path, shared=self.shared, extra_plugins=self.extra_plugins)
                await new.start()
            except ConfigError as exc:
                metrics.config_reloads.labels("failure").inc()
                log.error("config reload failed, the previous config keeps serving: %s", exc)
                return False
            except Exception:
                metrics.config_reloads.labels("failure").inc()
                log.exception("config reload failed, the previous config keeps serving")
                return False
            old, self.gateway = self.gateway, new
            metrics.config_reloads.labels("success").inc()
            metrics.config_loaded.set_to_current_time()
            log.info("config reloaded from %s: %d models", self.path, len(new.config.models))
            task = asyncio.create_task(self._retire(old))
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)
            return True

    async def _retire(self, old: Gateway) -> None:
        await old.drained()
        await old.close()
        del old  # unreachable now, so the collection below frees it
        self._freeze_heap()

    def _freeze_heap(self) -> None:
        """Take what lives as long as the config (it, the plugins, imported modules: ~50,000
        objects) out of the garbage collector's sight. Under load a full collection would walk
        them all every few thousand requests, 20-90 ms each time on a small VM; frozen, it takes
        about 1 ms. Unfrozen and collected first, so a retired config's cycles are freed."""
        if self.freeze_heap:
            gc.unfreeze()
            gc.collect()
            gc.freeze()
