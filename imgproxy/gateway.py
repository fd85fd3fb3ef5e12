"""One running configuration: settings, routing table, plugins, provider adapters and the
shared resources (connection pool, image store) they use."""

from __future__ import annotations

import asyncio
import logging
import os
import secrets

import pluggy
import yaml

from .config import Config, ConfigError, StateConfig, parse_config, read_config_file, without_values
from .catalog import merged
from .idempotency import Idempotency
from .limits import UploadSlots, UpstreamBuffer
from .metrics import MULTIPROCESS, Metrics
from .pluginmanager import Hooks, build_plugin_manager
from .providers.base import Provider
from .resilience import Circuits
from .routing import RoutingTable
from .state import MemoryState, State
from .state_guard import GuardedState
from .stores import UnsafeStore, UrlSigner, build_store
from .upstream import Upstream

log = logging.getLogger("imgproxy.gateway")


class Shared:
    """What outlives a config reload: metrics, limiter and spend state, the fallback URL key.
    The state backend is chosen by the first config; changing it takes a restart."""

    def __init__(self, config: Config | None = None) -> None:
        self.metrics = Metrics()
        self.in_flight = 0
        if not MULTIPROCESS:  # read at scrape time; a worker publishes it instead (Runtime)
            self.metrics.in_flight.set_function(lambda: self.in_flight)
        self.state_config = config.state if config else StateConfig()
        self.state: State = make_state(self.state_config, self.metrics)
        self.upstream_buffer = UpstreamBuffer(self.metrics)
        self.uploads = UploadSlots()
        # Without a configured key, URLs are valid for this process only (said in the docs).
        self.signing_key = secrets.token_bytes(32)


class Gateway:
    def __init__(
        self, config: Config, pm: pluggy.PluginManager, adapters: dict[str, type[Provider]], shared: Shared | None = None
    ) -> None:
        self.shared = shared or Shared(config)
        if config.state != self.shared.state_config:
            log.warning("the state section changed: it takes effect at the next restart")
        self.metrics = self.shared.metrics
        self.state = self.shared.state
        self.config = config
        self.idempotency = Idempotency(self.state, config.idempotency)
        self.pm = pm
        self.hooks = Hooks(pm)
        self.routing = RoutingTable(config)
        # Every registered adapter's models (capabilities and published prices).
        self.catalog = merged(adapters.values())
        # Public names of models whose answers a plugin must read whole (token-priced metering):
        # the planner never streams them through.
        self.body_needed: set[str] = set()
        self.upstream = Upstream(spec.egress.addresses for spec in config.providers.values())
        self.providers: dict[str, Provider] = {
            name: adapters[spec.type](spec, self.upstream) for name, spec in config.providers.items()
        }
        # Per process: each worker's breakers learn from its own calls (docs/operations.md).
        self.circuits = Circuits(self.metrics.circuit_changed)
        self.metrics.prepare(config)
        self.store = build_store(config.images, self.metrics.store_operations)
        self.signer = UrlSigner(config.images.signing_key or self.shared.signing_key)
        self.in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

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
        try:
            gateway = cls(config, pm, adapters, shared)
        except ConfigError as exc:  # an adapter's check of its options, made without the file's name
            raise ConfigError(source, exc.path, exc.problem) from None
        try:
            await asyncio.to_thread(gateway.store.check)
        except UnsafeStore as exc:
            raise ConfigError(source, exc.key, exc.problem) from None
        try:
            await gateway.hooks.each("imgproxy_configure", gateway=gateway)
        except ConfigError as exc:  # a plugin's own check: it may quote a value from the environment
            raise without_values(exc, config.refs, os.environ if env is None else env) from None
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
        await self.store.start()
        await self.hooks.each("imgproxy_startup", gateway=self)

    async def close(self) -> None:
        await self.idempotency.close()
        await self.hooks.each("imgproxy_shutdown", gateway=self)
        await self.store.close()
        await self.upstream.close()


def make_state(config: StateConfig, metrics: Metrics) -> State:
    if config.backend == "memory":
        return MemoryState()
    from .redis_state import RedisState  # only deployments that use Redis need the package

    backend = RedisState(config.url, config.key_prefix, config.timeout)
    log.info("state backend: redis at %s, on_unavailable %s", backend.url, config.on_unavailable)
    return GuardedState(backend, config.on_unavailable, metrics.state_errors)


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
