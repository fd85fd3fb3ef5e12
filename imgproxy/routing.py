"""The routing table: a public model name, alias or `provider/model` → model and provider."""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from email.utils import format_datetime

from .config import Config, ModelConfig, ProviderConfig
from .errors import GatewayError


@dataclass(frozen=True)
class Target:
    """One attempt's destination: a model and the provider that serves it."""

    model: ModelConfig
    provider: ProviderConfig


@dataclass(frozen=True)
class Route(Target):
    """What a public model name resolves to: its own target first, then its fallbacks."""

    fallbacks: tuple[Target, ...] = ()


def utc_today() -> datetime.date:
    return datetime.datetime.now(datetime.timezone.utc).date()


class RoutingTable:
    def __init__(self, config: Config, today=utc_today) -> None:
        # Read per request, so a running gateway stops serving a model at its shutdown's midnight.
        self.today = today
        self._by_name: dict[str, Route] = {}
        self._by_provider: dict[tuple[str, str], Route] = {}
        targets = {}
        for model in config.models.values():
            for name in (model.name, *model.aliases):
                targets[name] = Target(model, config.providers[model.provider])
        for model in config.models.values():
            route = Route(model, config.providers[model.provider], tuple(targets[name] for name in model.fallbacks))
            for name in (model.name, *model.aliases):
                self._by_name[name] = route
                self._by_provider[(model.provider, name)] = route
            # `openai/dall-e-3` also works when the public name differs from the upstream's.
            self._by_provider.setdefault((model.provider, model.upstream_model), route)

    def resolve(self, requested: str) -> Route:
        route = self._by_name.get(requested)
        if route is None and "/" in requested:
            provider, _, name = requested.partition("/")
            route = self._by_provider.get((provider, name))
        if route is None:
            raise model_not_found(requested)
        return route

    def retired(self, model: ModelConfig) -> bool:
        return model.shutdown is not None and model.retired(self.today())

    def check_retired(self, model: ModelConfig, headers: dict[str, str]) -> None:
        """Refuse a model past its shutdown date; before it, say when it goes (RFC 8594 Sunset)."""
        if model.shutdown is None:
            return
        if model.retired(self.today()):
            raise model_retired(model)
        midnight = datetime.datetime.combine(model.shutdown, datetime.time(), datetime.timezone.utc)
        headers["Sunset"] = format_datetime(midnight, usegmt=True)

    def routes(self) -> list[Route]:
        """Each model once, in the config's order."""
        return list({id(route): route for route in self._by_name.values()}.values())

    def rows(self) -> list[tuple[str, str, str, str]]:
        """(public name, aliases, provider, upstream model) for every model, for check-config."""
        seen, rows = set(), []
        for route in self._by_name.values():
            if route.model.name not in seen:
                seen.add(route.model.name)
                m = route.model
                rows.append((m.name, ", ".join(m.aliases), f"{route.provider.name} ({route.provider.type})", m.upstream_model))
        return rows


def model_not_found(requested: str) -> GatewayError:
    """Also the answer for a model the caller may not see: the same words whether it exists or not."""
    return GatewayError(
        404,
        f"The model '{requested}' does not exist or is not served by this gateway.",
        code="model_not_found",
        param="model",
    )


def model_retired(model: ModelConfig) -> GatewayError:
    """404 like OpenAI's answer for a model it removed (docs/configuration.md says why not 410),
    with its own code and the model to use instead when this gateway serves one."""
    instead = f" Use '{model.replacement}' instead." if model.replacement else ""
    return GatewayError(
        404,
        f"The model '{model.name}' was shut down on {model.shutdown.isoformat()} and is no longer served.{instead}",
        code="model_retired",
        param="model",
    )
