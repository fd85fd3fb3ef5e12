"""The hooks a plugin can implement, in the order a request meets them.

At start-up:
  1. imgproxy_register_providers  – add provider adapter types
  2. imgproxy_key_schema, imgproxy_config_schema – add per-key settings and top-level
     sections to proxy.yaml
  3. imgproxy_configure           – read those sections, build per-gateway state
  4. imgproxy_startup / imgproxy_shutdown – when the server starts serving and stops

Per request (after the body is parsed, schema-checked, routed and capability-checked):
  5. imgproxy_authenticate        – who is calling (first result wins)
  6. imgproxy_authorize_model     – may this caller use this model at all (also decides what
                                    GET /v1/models lists for it)
     imgproxy_authorize_request   – may this caller use these options (local, cheap)
  7. imgproxy_check_limits        – rate limits, budget reservations
  8. imgproxy_check_content       – content policy, moderation model (may cost money)
     … the provider adapter calls the upstream …
     imgproxy_change_target      – before a fallback is called: move reservations to it
  9. imgproxy_rewrite_response    – shape the answer for the client
 10. imgproxy_record_usage        – account for what happened (always runs, also on failure)

The core fixes the order of the phases 6–8, so a caller refused by a cheap local check or
over its limits never makes the gateway pay for a moderation call. Within one hook the most
recently registered implementation runs first: third-party plugins before the built-ins,
which run as auth, moderation, ratelimit, cost, rewrite; `tryfirst`/`trylast` adjust that.

Hooks may be `async def`: the core calls one implementation at a time and awaits it before
calling the next (so pluggy hook wrappers do not apply). How the results are combined is
declared here, on each spec, and read by the runner (`imgproxy.pluginmanager.Hooks`):
`firstresult=True` stops at the first non-None result; `guarded` hooks run every
implementation whatever the others raise; the rest run every implementation and an
exception stops the rest. A hook refuses a request by raising
`imgproxy.errors.GatewayError`, which the client receives as an OpenAI error envelope.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

import pluggy

if TYPE_CHECKING:
    from .config import ModelConfig
    from .gateway import Gateway
    from .messages import Identity, ImagesResult, Outcome, RequestContext
    from .providers.base import Provider
    from .routing import Target

hookspec = pluggy.HookspecMarker("imgproxy")
hookimpl = pluggy.HookimplMarker("imgproxy")

_F = TypeVar("_F", bound=Callable[..., Any])


def guarded(spec: _F) -> _F:
    """Declare that every implementation of this hook runs even if another one raises (the
    exception is logged, never sent to the client)."""
    spec.imgproxy_guarded = True  # type: ignore[attr-defined]
    return spec


# A JSON Schema, as a dict.
Schema = Mapping[str, Any]
# Hooks may return their result directly or as an awaitable.
MaybeAwaitable = Awaitable[None] | None


@hookspec
def imgproxy_register_providers(register: Callable[[str, type[Provider]], None]) -> None:
    """Add provider adapters: call `register(type_name, adapter_class)` for each.

    `adapter_class` subclasses `imgproxy.providers.base.Provider`; a provider in proxy.yaml
    whose `type` is `type_name` is served by it.
    """


@hookspec
def imgproxy_key_schema() -> Mapping[str, Schema] | None:
    """Return `{setting_name: json_schema}` for per-client-key settings this plugin reads (for
    example `rate_limit`), or None. They are allowed on each key entry of the auth section and
    reach request hooks as `ctx.identity.settings[setting_name]`."""


@hookspec
def imgproxy_config_schema(key_settings: Mapping[str, Schema]) -> Mapping[str, Schema] | None:
    """Return `{section_name: json_schema}` for the top-level proxy.yaml sections this plugin
    reads, or None. The sections are validated with the rest of the file at load time.
    `key_settings` holds every plugin's per-key setting schemas, for the plugin that declares
    client keys."""


@hookspec
def imgproxy_configure(gateway: Gateway) -> MaybeAwaitable:
    """Set up this plugin for a loaded gateway: read `gateway.config.sections[...]`, keep state
    on the plugin instance. Runs once per gateway, before it serves. May be async. Raise
    `imgproxy.config.ConfigError` for a bad section."""


@hookspec
def imgproxy_startup(gateway: Gateway) -> MaybeAwaitable:
    """The server is about to accept requests: open connections, start background tasks,
    announce things. May be async. Not called by `imgproxy check-config`."""


@hookspec
def imgproxy_shutdown(gateway: Gateway) -> MaybeAwaitable:
    """The server has stopped accepting requests: release what startup acquired. May be async."""


@hookspec(firstresult=True)
def imgproxy_authenticate(ctx: RequestContext) -> Identity | Awaitable[Identity | None] | None:
    """Identify the caller of a request: return an `imgproxy.messages.Identity`, or None when
    this plugin does not recognise the credentials. Stops at the first non-None result (an
    async implementation's awaited result): the implementations after it are not called. If
    all return None the request gets 401. Raise GatewayError to refuse outright (for example a
    disabled key). Runs before the body is read: `ctx.request` is still None."""


@hookspec
def imgproxy_authorize_model(identity: Identity, model: ModelConfig) -> MaybeAwaitable:
    """May this caller use this model at all: raise GatewayError to refuse. The same answer
    decides whether a generation may go ahead (before imgproxy_authorize_request) and whether
    `GET /v1/models` shows the model to this caller, so it may depend only on the caller and
    the model (`model.name`, `.aliases`, `.provider`, `.upstream_model`), never on a request.
    Every implementation runs; keep it cheap and local (it runs once per model for a listing)."""


@hookspec
def imgproxy_authorize_request(ctx: RequestContext) -> MaybeAwaitable:
    """May this caller make this request at all: options the key may use, end users cooling
    down (which models it may use is imgproxy_authorize_model's, which has passed). Keep it
    cheap and local (no paid or remote call). Every implementation runs; raise GatewayError to
    refuse. `ctx.request` is the validated ImageRequest and `ctx.identity` the caller."""


@hookspec
def imgproxy_check_limits(ctx: RequestContext) -> MaybeAwaitable:
    """Charge the caller's limits: rate limits, budget reservations. Runs after every
    authorize_request hook passed and before any content check. Every implementation runs;
    raise GatewayError to refuse. Whatever is reserved here is settled in record_usage, which
    also runs when a later hook refuses the request."""


@hookspec
def imgproxy_check_content(ctx: RequestContext) -> MaybeAwaitable:
    """Check the request's content: local content-policy rules, then anything that costs money
    or leaves the process (a moderation model). Runs only for a caller within its limits.
    Every implementation runs; raise GatewayError to refuse."""


@hookspec
def imgproxy_change_target(ctx: RequestContext, previous: Target) -> MaybeAwaitable:
    """The request moves to a fallback: `previous` (an `imgproxy.routing.Target`) failed
    without producing anything, and `ctx.target` and `ctx.request` (translated for the
    fallback's capabilities) are what will be called next. Release what check_limits reserved
    for `previous` and reserve for the new target (its worst case); raise GatewayError to
    refuse the fallback, which is then not called. Every implementation runs."""


@hookspec
def imgproxy_rewrite_response(ctx: RequestContext, result: ImagesResult) -> MaybeAwaitable:
    """Shape the provider's answer (`imgproxy.messages.ImagesResult`) for the client, in place:
    host images, convert between url and b64_json, drop fields. Every implementation runs.
    Not called for answers streamed straight through (server-sent events, or a body that
    needs no change) unless a request-check hook set `ctx.needs_body = True`."""


@hookspec
@guarded
def imgproxy_record_usage(ctx: RequestContext, outcome: Outcome) -> MaybeAwaitable:
    """Account for a finished request: `outcome` (imgproxy.messages.Outcome) holds the status,
    the error code if any, the images returned and the upstream's usage. Runs for every
    request that reached authentication, successful or not, after the response is complete.
    Every implementation runs, whatever the others raise; an exception here is logged and
    does not reach the client."""
