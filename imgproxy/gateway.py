"""One running configuration: settings, routing table, plugins, provider adapters and the
shared resources (connection pool, image store) they use."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets

import pluggy
import yaml

from .config import Config, parse_config, read_config_file
from .forwarder import Upstream
from .imagestore import FilesystemImageStore, UrlSigner
from .metrics import MULTIPROCESS, Metrics
from .pluginmanager import Hooks, build_plugin_manager
from .providers.base import Provider
from .routing import RoutingTable
from .state import MemoryState, State


class Shared:
    """What outlives a config reload: metrics, limiter and spend state, the fallback URL key."""

    def __init__(self) -> None:
        self.metrics = Metrics()
        self.in_flight = 0
        if not MULTIPROCESS:  # read at scrape time; a worker publishes it instead (Runtime)
            self.metrics.in_flight.set_function(lambda: self.in_flight)
        self.state: State = MemoryState()
        # Without a configured key, URLs are valid for this process only (said in the docs).
        self.signing_key = secrets.token_bytes(32)


class Gateway:
    def __init__(
        self, config: Config, pm: pluggy.PluginManager, adapters: dict[str, type[Provider]], shared: Shared | None = None
    ) -> None:
        self.shared = shared or Shared()
        self.metrics = self.shared.metrics
        self.state = self.shared.state
        self.config = config
        self.pm = pm
        self.hooks = Hooks(pm)
        self.routing = RoutingTable(config)
        self.upstream = Upstream()
        self.providers: dict[str, Provider] = {
            name: adapters[spec.type](spec, self.upstream) for name, spec in config.providers.items()
        }
        self.store = FilesystemImageStore(config.images.directory, config.images.url_ttl, self.metrics.store_operations)
        self.signer = UrlSigner(config.images.signing_key or self.shared.signing_key)
        self.in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._sweeper: asyncio.Task | None = None

    @classmethod
    async def load(
        cls, path: str | os.PathLike | None = None, *, text: str | None = None, env=None, extra_plugins=(), shared: Shared | None = None
    ) -> "Gateway":
        """Read and validate a config (a file, or `text`), load its plugins and let them configure."""
        source = str(path) if path is not None else "<config>"
        if text is None:
            text = read_config_file(path)
        enable, disable = _plugin_lists(text)
        pm = build_plugin_manager(enable, disable, source=source, extra=tuple(extra_plugins))
        adapters: dict[str, type[Provider]] = {}
        pm.hook.imgproxy_register_providers(register=adapters.__setitem__)
        key_settings: dict = {}
        for contributed in pm.hook.imgproxy_key_schema():
            key_settings.update(contributed or {})
        sections: dict = {}
        for contributed in pm.hook.imgproxy_config_schema(key_settings=key_settings):
            sections.update(contributed or {})
        config = parse_config(text, source=source, env=env, extra_sections=sections, provider_types=adapters)
        gateway = cls(config, pm, adapters, shared)
        await gateway.hooks.each("imgproxy_configure", gateway=gateway)
        return gateway

    # Requests in flight on this gateway: a reload closes it only after them, and the
    # in-flight gauge reads them at scrape time (no lock taken per request).
    def request_started(self) -> None:
        self.in_flight += 1
        self.shared.in_flight += 1
        self._idle.clear()

    def request_finished(self) -> None:
        self.in_flight -= 1
        self.shared.in_flight -= 1
        if self.in_flight == 0:
            self._idle.set()

    async def drained(self) -> None:
        await self._idle.wait()

    async def start(self) -> None:
        await self.upstream.start()
        await asyncio.to_thread(self.store.prepare)
        self._sweeper = asyncio.create_task(self.store.sweep_forever(self.config.images.sweep_interval))
        await self.hooks.each("imgproxy_startup", gateway=self)

    async def close(self) -> None:
        await self.hooks.each("imgproxy_shutdown", gateway=self)
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        await self.upstream.close()


def _plugin_lists(text: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The plugins section, read before full validation (which needs the plugins' schemas).
    Anything malformed is left for that validation to report."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError:
        return (), ()
    plugins = raw.get("plugins") if isinstance(raw, dict) else None
    if not isinstance(plugins, dict):
        return (), ()

    def names(key: str) -> tuple[str, ...]:
        value = plugins.get(key)
        return tuple(v for v in value if isinstance(v, str)) if isinstance(value, list) else ()

    return names("enable"), names("disable")
