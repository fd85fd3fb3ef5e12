"""Loading plugins: the built-ins by import path, third-party ones when proxy.yaml enables them.

Built-ins are imported from `imgproxy.plugins` directly, never looked up by entry-point name:
an installed distribution that declares an entry point called `auth` cannot stand in for the
auth plugin. Third-party plugins come from the `imgproxy` entry-point group, and only the
names `plugins.enable` lists are looked up there. An entry point may name a class (one
instance is made per gateway, so state is never shared between gateways) or a module.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import operator
from collections.abc import Callable, Coroutine
from importlib.metadata import entry_points
from types import CoroutineType
from typing import Any

import pluggy

from . import hookspecs
from .config import ConfigError

ENTRY_POINT_GROUP = "imgproxy"
# Built-ins in the order their request hooks run. pluggy calls the most recently registered
# plugin first, so they are registered in reverse, and third-party plugins (registered
# after them) run before all of them.
DEFAULT_PLUGINS = {
    "auth": "imgproxy.plugins.auth:AuthPlugin",
    "moderation": "imgproxy.plugins.moderation:ModerationPlugin",
    "ratelimit": "imgproxy.plugins.ratelimit:RateLimitPlugin",
    "cost": "imgproxy.plugins.cost:CostPlugin",
    "rewrite": "imgproxy.plugins.rewrite:RewritePlugin",
}

log = logging.getLogger("imgproxy.hooks")


def build_plugin_manager(
    enable: tuple[str, ...] = (), disable: tuple[str, ...] = (), *, source: str = "<config>", extra: tuple = ()
) -> pluggy.PluginManager:
    pm = pluggy.PluginManager("imgproxy")
    pm.add_hookspecs(hookspecs)
    from . import providers  # the built-in provider adapters, registered as a core plugin

    pm.register(providers, name="providers")
    builtins = ", ".join(DEFAULT_PLUGINS)
    for name in disable:
        if name not in DEFAULT_PLUGINS:
            raise ConfigError(source, ["plugins", "disable"], f"{name!r} is not a built-in plugin ({builtins})")
    third_party = []
    for name in enable:
        if name in DEFAULT_PLUGINS:
            raise ConfigError(
                source, ["plugins", "enable"],
                f"{name!r} is the name of a built-in plugin ({builtins}): built-ins are always loaded from imgproxy "
                "itself (leave them out of plugins.enable, list them in plugins.disable to turn them off), and a "
                "third-party plugin may not take their names",
            )
        third_party.append((name, _entry_point(name, source)))
    for name, path in reversed(DEFAULT_PLUGINS.items()):
        if name not in disable:
            module, _, attr = path.partition(":")
            pm.register(_instantiate(getattr(importlib.import_module(module), attr)), name=name)
    for name, entry_point in third_party:
        pm.register(_instantiate(entry_point.load()), name=name)
    for plugin in extra:
        pm.register(_instantiate(plugin))
    try:
        # A hook implementation that matches no spec (a misspelt or retired hook name) would
        # silently never run: for a policy plugin that means a policy not applied.
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise ConfigError(source, ["plugins"], f"plugin {pm.get_name(exc.plugin)!r} implements a hook imgproxy does not have: {exc}") from None
    return pm


def _entry_point(name: str, source: str):
    found = list(entry_points(group=ENTRY_POINT_GROUP, name=name))
    if not found:
        raise ConfigError(source, ["plugins", "enable"], f"no installed plugin declares the entry point {name!r} in group {ENTRY_POINT_GROUP!r}")
    targets = {ep.value for ep in found}
    if len(targets) > 1:
        owners = ", ".join(sorted(f"{ep.dist.name if ep.dist else '?'} ({ep.value})" for ep in found))
        raise ConfigError(source, ["plugins", "enable"], f"more than one installed distribution declares the plugin {name!r}: {owners}")
    return found[0]


def _instantiate(obj: Any) -> Any:
    return obj() if inspect.isclass(obj) else obj


# An implementation as the runners call it: the function, the name of its one argument (most
# take only `ctx`) or else a getter of its arguments from the call's keywords, and its plugin's
# name. Made once per gateway: a list of arguments built per call cost more than the call.
Impl = tuple[Callable[..., Any], "str | None", "Callable[[dict], tuple] | None", str]


def _impl(function: Callable[..., Any], argnames: tuple[str, ...], plugin: str) -> Impl:
    if len(argnames) == 1:
        return function, argnames[0], None, plugin
    return function, None, operator.itemgetter(*argnames) if argnames else _no_arguments, plugin  # 2+ names: a tuple


def _no_arguments(kwargs: dict) -> tuple:
    return ()


class Hooks:
    """Runs a gateway's hooks one implementation at a time, in pluggy's order.

    pluggy's own hook call would create every coroutine at once: a refusal by one
    implementation could leave the others never awaited, and sync implementations would all
    run before any async one. So each implementation is awaited before the next is called
    (pluggy hook wrappers therefore do not apply). How results combine is read from each
    hook's spec (`firstresult`, `guarded`), and the runner for each hook is made once per
    gateway, not on every request.
    """

    def __init__(self, pm: pluggy.PluginManager) -> None:
        self._impls: dict[str, tuple[Impl, ...]] = {}
        self._runners: dict[str, Callable[[dict[str, Any]], Coroutine[Any, Any, Any]]] = {}
        for name in dir(hookspecs):
            if not name.startswith("imgproxy_"):
                continue
            caller = getattr(pm.hook, name)
            impls = tuple(_impl(impl.function, tuple(impl.argnames), impl.plugin_name) for impl in reversed(caller.get_hookimpls()))
            self._impls[name] = impls
            if caller.spec.opts.get("firstresult"):
                self._runners[name] = _first(impls)
            elif getattr(caller.spec.function, "imgproxy_guarded", False):
                self._runners[name] = _guarded(name, impls)
            else:
                self._runners[name] = _each(impls)

    def has(self, name: str) -> bool:
        return bool(self._impls[name])

    def call(self, name: str, **kwargs: Any) -> Coroutine[Any, Any, Any]:
        """Run the hook `name` as its spec declares; await the result. For a firstresult hook
        that is the first non-None result, else None."""
        return self._runners[name](kwargs)  # the dict itself: not unpacked and packed again

    # The names used before the specs declared their semantics; they do the same as call().
    def each(self, name: str, **kwargs: Any) -> Coroutine[Any, Any, Any]:
        return self._runners[name](kwargs)

    first = each

    def each_guarded(self, name: str, _log: logging.Logger | None = None, **kwargs: Any) -> Coroutine[Any, Any, Any]:
        return self._runners[name](kwargs)


def _each(impls: tuple[Impl, ...]):
    async def run(kwargs: dict[str, Any]) -> None:
        """Every implementation; an exception stops the rest."""
        for function, one, args, _ in impls:
            result = function(kwargs[one]) if one is not None else function(*args(kwargs))
            if result is not None and (type(result) is CoroutineType or inspect.isawaitable(result)):
                await result

    return run


def _first(impls: tuple[Impl, ...]):
    async def run(kwargs: dict[str, Any]) -> Any:
        """The first non-None result; the implementations after it are not called."""
        for function, one, args, _ in impls:
            result = function(kwargs[one]) if one is not None else function(*args(kwargs))
            if result is not None and (type(result) is CoroutineType or inspect.isawaitable(result)):
                result = await result
            if result is not None:
                return result
        return None

    return run


def _guarded(name: str, impls: tuple[Impl, ...]):
    async def run(kwargs: dict[str, Any]) -> None:
        """Every implementation whatever the others do; exceptions are logged."""
        for function, one, args, plugin in impls:
            try:
                result = function(kwargs[one]) if one is not None else function(*args(kwargs))
                if result is not None and (type(result) is CoroutineType or inspect.isawaitable(result)):
                    await result
            except Exception:
                log.exception("the %s hook of plugin %s failed", name, plugin)

    return run
