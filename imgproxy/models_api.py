"""GET /v1/models and GET /v1/models/{model}: the models a key may use, in OpenAI's format,
with what imgproxy lets each one do in an `imgproxy` extension field."""

from __future__ import annotations

import dataclasses

from aiohttp import web

from .catalog import OPTIONAL_PARAMETERS
from .errors import GatewayError
from .gateway import Gateway
from .messages import Identity, RequestContext
from .pipeline import authenticate
from .routing import Route, model_not_found

# OpenAI's `created` is when a model was published. imgproxy's tables have no such date, and
# anything taken from the running process (the config's load time) would differ between
# replicas and restarts, so every model says 0.
CREATED = 0


async def list_models(gateway: Gateway, http: web.Request, request_id: str) -> web.Response:
    identity = await _caller(gateway, http, request_id)
    routing = gateway.routing
    data = [model_object(route) for route in routing.routes() if not routing.retired(route.model) and await _may_use(gateway, identity, route)]
    return web.json_response({"object": "list", "data": data})


async def retrieve_model(gateway: Gateway, http: web.Request, request_id: str, requested: str) -> web.Response:
    """A name, an alias or `provider/model`, as a generation request may name it. A model the
    key may not use gets the same 404 as one that does not exist."""
    identity = await _caller(gateway, http, request_id)
    route = gateway.routing.resolve(requested)
    if not await _may_use(gateway, identity, route):
        raise model_not_found(requested)
    headers: dict[str, str] = {}
    gateway.routing.check_retired(route.model, headers)
    return web.json_response(model_object(route), headers=headers)


async def _caller(gateway: Gateway, http: web.Request, request_id: str) -> Identity:
    # The authentication of a generation request; the context is not the server's CONTEXT, so
    # a listing is neither metered nor counted as a generation.
    return await authenticate(RequestContext(gateway=gateway, http=http, request_id=request_id))


async def _may_use(gateway: Gateway, identity: Identity, route: Route) -> bool:
    """The allow-list decision of a generation request (imgproxy_authorize_model)."""
    try:
        await gateway.hooks.call("imgproxy_authorize_model", identity=identity, model=route.model)
    except GatewayError:
        return False
    return True


def model_object(route: Route) -> dict:
    model, caps = route.model, route.model.capabilities
    custom = caps.custom_sizes
    return {
        "id": model.name,
        "object": "model",
        "created": CREATED,
        "owned_by": route.provider.name,
        "imgproxy": {
            "provider": route.provider.name,
            "provider_type": route.provider.type,
            "aliases": list(model.aliases),
            "sizes": list(caps.sizes),
            "custom_sizes": {"min": custom.min, "max": custom.max, "multiple_of": custom.multiple_of} if custom else None,
            "default_size": caps.default_size,
            "max_n": caps.max_n,
            "qualities": list(caps.qualities),
            "default_quality": caps.default_quality,
            "styles": list(caps.styles),
            "default_style": caps.default_style,
            # Whatever the upstream returns, the rewrite plugin converts it (docs/plugins.md).
            "response_formats": ["url", "b64_json"],
            "default_response_format": caps.default_response_format,
            "parameters": [name for name in OPTIONAL_PARAMETERS if name in caps.parameters],
            "max_prompt_length": caps.max_prompt_length,
            # When the provider stops serving it (UTC date), and the public name to use instead.
            "shutdown": model.shutdown.isoformat() if model.shutdown else None,
            "replacement": model.replacement,
            # What POST /v1/images/edits and /variations take (None: the model does neither).
            "edits": dataclasses.asdict(caps.edits) if caps.edits else None,
            "variations": dataclasses.asdict(caps.variations) if caps.variations else None,
        },
    }
