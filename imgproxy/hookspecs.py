"""The hooks a plugin can implement, in the order a request meets them.

At start-up:
  1. imgproxy_register_providers  – add provider adapter types
  2. imgproxy_key_schema, imgproxy_config_schema – add per-key settings and top-level
     sections to proxy.yaml
  3. imgproxy_configure           – read those sections, build per-gateway state
  4. imgproxy_startup / imgproxy_shutdown – when the server starts serving and stops

Per request (after the body is parsed, schema-checked, routed and capability-checked):
  5. imgproxy_authenticate        – who is calling
  6. imgproxy_check_request       – may this request go upstream
     … the provider adapter calls the upstream …
  7. imgproxy_rewrite_response    – shape the answer for the client
  8. imgproxy_record_usage        – account for what happened (always runs, also on failure)

Hooks may be `async def`: the core calls one implementation at a time and awaits it before
calling the next (so pluggy hook wrappers do not apply). A hook refuses a request by raising
`imgproxy.errors.GatewayError`, which the client receives as an OpenAI error envelope. The
most recently registered implementation runs first: third-party plugins before the built-ins,
which run as auth, moderation, ratelimit, cost, rewrite; `tryfirst`/`trylast` adjust that.
"""

from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("imgproxy")
hookimpl = pluggy.HookimplMarker("imgproxy")


@hookspec
def imgproxy_register_providers(register):
    """Add provider adapters: call `register(type_name, adapter_class)` for each.

    `adapter_class` subclasses `imgproxy.providers.base.Provider`; a provider in proxy.yaml
    whose `type` is `type_name` is served by it.
    """


@hookspec
def imgproxy_key_schema():
    """Return `{setting_name: json_schema}` for per-client-key settings this plugin reads (for
    example `rate_limit`), or None. They are allowed on each key entry of the auth section and
    reach request hooks as `ctx.identity.settings[setting_name]`."""


@hookspec
def imgproxy_config_schema(key_settings):
    """Return `{section_name: json_schema}` for the top-level proxy.yaml sections this plugin
    reads, or None. The sections are validated with the rest of the file at load time.
    `key_settings` holds every plugin's per-key setting schemas, for the plugin that declares
    client keys."""


@hookspec
def imgproxy_configure(gateway):
    """Set up this plugin for a loaded gateway: read `gateway.config.sections[...]`, keep state
    on the plugin instance. Runs once per gateway, before it serves. May be async. Raise
    `imgproxy.config.ConfigError` for a bad section."""


@hookspec
def imgproxy_startup(gateway):
    """The server is about to accept requests: open connections, start background tasks,
    announce things. May be async. Not called by `imgproxy check-config`."""


@hookspec
def imgproxy_shutdown(gateway):
    """The server has stopped accepting requests: release what startup acquired. May be async."""


@hookspec
def imgproxy_authenticate(ctx):
    """Identify the caller of a request: return an `imgproxy.messages.Identity`, or None when
    this plugin does not recognise the credentials. The first non-None result wins and the
    rest are not awaited; if all return None the request gets 401. Raise GatewayError to
    refuse outright (for example a disabled key)."""


@hookspec
def imgproxy_check_request(ctx):
    """Decide before any upstream call whether the request may proceed (policy, moderation,
    rate limit, budget). Every implementation runs; raise GatewayError to refuse. `ctx.request`
    is the validated ImageRequest and `ctx.identity` the caller."""


@hookspec
def imgproxy_rewrite_response(ctx, result):
    """Shape the provider's answer (`imgproxy.messages.ImagesResult`) for the client, in place:
    host images, convert between url and b64_json, drop fields. Every implementation runs.
    Not called for answers streamed straight through (server-sent events, or a body that
    needs no change) unless a check_request hook set `ctx.needs_body = True`."""


@hookspec
def imgproxy_record_usage(ctx, outcome):
    """Account for a finished request: `outcome` (imgproxy.messages.Outcome) holds the status,
    the error code if any, the images returned and the upstream's usage. Runs for every
    request that reached authentication, successful or not, after the response is complete.
    Every implementation runs; an exception here is logged and does not reach the client."""
