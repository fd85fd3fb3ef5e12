"""Loading plugins: the built-ins by default, third-party ones when proxy.yaml enables them.

Both come from the `imgproxy` entry-point group. An entry point may name a class (one instance
is made per gateway, so state is never shared between gateways) or a module.
"""

from __future__ import annotations

import inspect
import logging
from types import CoroutineType
from importlib.metadata import entry_points
from typing import Any

import pluggy

from . import hookspecs
from .config import ConfigError

ENTRY_POINT_GROUP = "imgproxy"
# Built-ins in the order their request hooks run. pluggy calls the most recently registered
# plugin first, so they are registered in reverse, and third-party plugins (registered
# after them) run before all of them.
DEFAULT_PLUGINS = ("auth", "moderation", "ratelimit", "cost", "rewrite")


def build_plugin_manager(
    enable: tuple[str, ...] = (), disable: tuple[str, ...] = (), *, source: str = "<config>", extra: tuple = ()
) -> pluggy.PluginManager:
    pm = pluggy.PluginManager("imgproxy")
    pm.add_hookspecs(hookspecs)
    from . import providers  # the built-in provider adapters, registered as a core plugin

    pm.register(providers, name="providers")
    available = {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}
    for name in disable:
        if name not in DEFAULT_PLUGINS:
            raise ConfigError(source, ["plugins", "disable"], f"{name!r} is not a built-in plugin ({', '.join(DEFAULT_PLUGINS)})")
    for name in enable:
        if name not in available:
            raise ConfigError(source, ["plugins", "enable"], f"no installed plugin declares the entry point {name!r} in group {ENTRY_POINT_GROUP!r}")
    wanted = [n for n in reversed(DEFAULT_PLUGINS) if n not in disable] + [n for n in enable if n not in DEFAULT_PLUGINS]
    for name in wanted:
        if name not in available:
            raise ConfigError(source, ["plugins"], f"built-in plugin {name!r} is not installed: reinstall imgproxy (pip install .)")
        pm.register(_instantiate(available[name].load()), name=name)
    for plugin in extra:
        pm.register(_instantiate(plugin))
    return pm


def _instantiate(obj: Any) -> Any:
    return obj() if inspect.isclass(obj) else obj


def _awaitable(value: Any) -> bool:
    """Hooks may be sync or async (checked inline by the callers: a wrapper coroutine per hook
    call would cost more than the check)."""
    return type(value) is CoroutineType or inspect.isawaitable(value)


class Hooks:
    """Runs a gateway's hooks one implementation at a time, in pluggy's order.

    pluggy's own hook call would create every coroutine at once: a refusal by one
    implementation could leave the others never awaited, and sync implementations would all
    run before any async one. So each implementation is awaited before the next is called
    (pluggy hook wrappers therefore do not apply). The implementations are looked up once per
    gateway, not on every request.
    """

    def __init__(self, pm: pluggy.PluginManager) -> None:
        self._impls = {
            name: tuple((impl.function, tuple(impl.argnames), impl.plugin_name) for impl in reversed(getattr(pm.hook, name).get_hookimpls()))
            for name in dir(hookspecs)
            if name.startswith("imgproxy_")
        }

    def has(self, name: str) -> bool:
        return bool(self._impls[name])

    async def each(self, name: str, **kwargs) -> None:
        """Run every implementation; an exception stops the rest."""
        for function, argnames, _ in self._impls[name]:
            result = function(*[kwargs[arg] for arg in argnames])
            if result is not None and _awaitable(result):
                await result

    async def first(self, name: str, **kwargs) -> Any:
        """The first non-None result; the implementations after it are not called."""
        for function, argnames, _ in self._impls[name]:
            result = function(*[kwargs[arg] for arg in argnames])
            if result is not None and _awaitable(result):
                result = await result
            if result is not None:
                return result
        return None

    async def each_guarded(self, name: str, log: logging.Logger, **kwargs) -> None:
        """Run every implementation whatever the others do; exceptions are logged."""
        for function, argnames, plugin in self._impls[name]:
            try:
                result = function(*[kwargs[arg] for arg in argnames])
                if result is not None and _awaitable(result):
                    await result
            except Exception:
                log.exception("the %s hook of plugin %s failed", name, plugin)
