"""Loading plugins: the built-ins by default, third-party ones when proxy.yaml enables them.

Both come from the `imgproxy` entry-point group. An entry point may name a class (one instance
is made per gateway, so state is never shared between gateways) or a module.
"""

from __future__ import annotations

import inspect
from importlib.metadata import entry_points
from typing import Any

import pluggy

from . import hookspecs
from .config import ConfigError

ENTRY_POINT_GROUP = "imgproxy"
DEFAULT_PLUGINS = ("auth", "rewrite")


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
    wanted = [n for n in DEFAULT_PLUGINS if n not in disable] + [n for n in enable if n not in DEFAULT_PLUGINS]
    for name in wanted:
        if name not in available:
            raise ConfigError(source, ["plugins"], f"built-in plugin {name!r} is not installed: reinstall imgproxy (pip install .)")
        pm.register(_instantiate(available[name].load()), name=name)
    for plugin in extra:
        pm.register(_instantiate(plugin))
    return pm


def _instantiate(obj: Any) -> Any:
    return obj() if inspect.isclass(obj) else obj


async def await_me_maybe(value: Any) -> Any:
    """Hooks may be sync or async: await what needs awaiting."""
    if inspect.isawaitable(value):
        return await value
    return value
