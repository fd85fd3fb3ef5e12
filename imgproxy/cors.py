"""CORS for browser clients: preflights answered for the origins in `server.cors_origins`,
and every answer under /v1/ to such an origin (error envelopes, streamed answers and image
files included) marked as readable by it.

Not aiohttp-cors: it answers preflights through an OPTIONS route added per resource, which
the API description would then list, and fixes its origins when the app is built, while
these are read from the config serving each request, so a reload changes them.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from aiohttp import web

from .errors import GatewayError

API_PREFIX = "/v1/"
# Request headers a browser client may send: what the Images API and imgproxy read, and what
# the OpenAI SDKs add (their x-stainless-* telemetry, organisation and project). Requested
# headers outside these are left out of the preflight's answer, so the browser refuses the
# request and says which header it was.
ALLOW_HEADERS = (
    "authorization", "content-type", "idempotency-key", "x-request-id", "traceparent", "tracestate",
    "openai-organization", "openai-project", "openai-beta",
)
_SDK_HEADER = re.compile(r"x-stainless-[a-z0-9-]{1,64}")
# Response headers a page may read (others than the CORS-safelisted ones): the request id,
# the rate-limit state, the cost, the wait after a refusal, and imgproxy's other notes.
_EXPOSED = re.compile(r"x-request-id|retry-after|x-ratelimit-[a-z0-9-]+|x-imgproxy-[a-z0-9-]+", re.IGNORECASE)
# How long a browser may reuse a preflight's answer (Chrome caps it at 7200): short, so that
# an origin removed from the config stops working soon after a reload.
MAX_AGE = "600"

_GRANTS = ("Access-Control-Allow-Origin", "Access-Control-Allow-Credentials", "Access-Control-Expose-Headers")

ORIGINS = web.AppKey("cors_origins", Callable[[], tuple[str, ...]])


def setup(app: web.Application, origins: Callable[[], tuple[str, ...]]) -> None:
    """`origins()` gives the allowed origins of the config now serving."""
    app[ORIGINS] = origins
    app.on_response_prepare.append(_mark_response)


def allowed(origins: tuple[str, ...], origin: str | None) -> str | None:
    """What Access-Control-Allow-Origin says to this origin, or None if nothing. With `*`
    it is `*` itself, with which browsers never send credentials."""
    if origin is None or not origins:
        return None
    if origin in origins:
        return origin
    return "*" if "*" in origins else None


def is_preflight(request: web.Request) -> bool:
    """A browser's preflight (OPTIONS with Origin and Access-Control-Request-Method) for a path
    of the API that exists; anything else is routed as usual (404, or 405 with Allow)."""
    return (
        request.path.startswith(API_PREFIX)
        and "Origin" in request.headers
        and "Access-Control-Request-Method" in request.headers
        and isinstance(request.match_info.http_exception, web.HTTPMethodNotAllowed)
    )


def preflight(request: web.Request) -> web.Response:
    """204 with what the browser may send, for an allowed origin (which _mark_response names);
    403 for any other. No key is asked for: browsers send none with a preflight."""
    if allowed(request.app[ORIGINS](), request.headers["Origin"]) is None:
        raise GatewayError(
            403, "Cross-origin requests from this origin are not allowed by this gateway (server.cors_origins).",
            type="permission_error", code="cors_origin_not_allowed",
        )
    requested = (name.strip().lower() for name in request.headers.get("Access-Control-Request-Headers", "").split(","))
    sdk_headers = sorted({name for name in requested if _SDK_HEADER.fullmatch(name)})
    methods = request.match_info.http_exception.allowed_methods
    return web.Response(status=204, headers={
        "Access-Control-Allow-Methods": ", ".join(sorted(methods)),
        "Access-Control-Allow-Headers": ", ".join((*ALLOW_HEADERS, *sdk_headers)),
        "Access-Control-Max-Age": MAX_AGE,
        "Vary": "Access-Control-Request-Method, Access-Control-Request-Headers",
    })


async def _mark_response(request: web.Request, response: web.StreamResponse) -> None:
    # Run as the headers are about to be sent, so streamed answers are marked too.
    if not request.path.startswith(API_PREFIX):
        return
    origins = request.app[ORIGINS]()
    if not origins:
        return
    # Granted here only, preflights included: never by a plugin's header or one copied from an upstream.
    for name in _GRANTS:
        response.headers.popall(name, None)
    # The answer depends on the Origin header whenever CORS is on: caches must keep them apart.
    _add_vary(response, "Origin")
    origin = allowed(origins, request.headers.get("Origin"))
    if origin is None:
        return
    response.headers["Access-Control-Allow-Origin"] = origin
    exposed = list(dict.fromkeys(name for name in response.headers if _EXPOSED.fullmatch(name)))
    if exposed:
        response.headers["Access-Control-Expose-Headers"] = ", ".join(exposed)


def _add_vary(response: web.StreamResponse, name: str) -> None:
    vary = response.headers.get("Vary")
    if vary is None:
        response.headers["Vary"] = name
    elif name.lower() not in (v.strip().lower() for v in vary.split(",")):
        response.headers["Vary"] = f"{vary}, {name}"
