"""POST /v1/images/generations, step by step: the line every request walks."""

from __future__ import annotations

import asyncio
import json
import logging
import time

from aiohttp import web

from .errors import GatewayError, UpstreamError, upstream_error
from .inline_images import AnswerCheck, valid_base64
from .messages import Identity, ImagesResult, RequestContext
from .plan import plan_attempt
from .relay import StreamTap, forward_stream
from .upstream import UpstreamCall
from .validation import check_capabilities, check_schema, read_json_body

log = logging.getLogger("imgproxy.pipeline")


async def generate_images(ctx: RequestContext) -> web.StreamResponse:
    # Authentication comes first so that anonymous callers can neither probe the model table
    # nor make the gateway read and validate their bodies.
    ctx.identity = await authenticate(ctx)
    response = None
    try:
        ctx.body = await read_json_body(ctx.http, ctx.gateway.config.server.max_body_bytes)
        check_schema(ctx.body)
        ctx.route = ctx.gateway.routing.resolve(requested_model(ctx))
        ctx.request = check_capabilities(ctx.body, ctx.route)
        # A retry with the same Idempotency-Key gets the first answer: no limits, no upstream call.
        replay = await ctx.gateway.idempotency.begin(ctx)
        if replay is not None:
            ctx.outcome.status = replay.status
            return replay
        admit_upstream_answer(ctx)
        await check_request(ctx)
        response = await call_provider(ctx)
        ctx.outcome.status = response.status
        return response
    except GatewayError as error:
        ctx.outcome.status, ctx.outcome.error_code = error.status, error.code
        response = error.to_response()
        raise
    except asyncio.CancelledError:
        # Cancelled (the drain timeout of a shutdown ran out): if the provider was already
        # called, it bills the request whether or not an answer arrives.
        ctx.outcome.status, ctx.outcome.error_code = 499, "client_closed_request"
        ctx.outcome.cut = ctx.outcome.upstream_called
        raise
    except Exception:
        ctx.outcome.status, ctx.outcome.error_code = 500, "internal_error"
        raise
    finally:
        await ctx.gateway.idempotency.finish(ctx, response)
        await record_usage(ctx)


async def authenticate(ctx: RequestContext) -> Identity:
    hooks = ctx.gateway.hooks
    if not hooks.has("imgproxy_authenticate"):
        return Identity("anonymous")  # the auth plugin was disabled on purpose
    identity = await hooks.call("imgproxy_authenticate", ctx=ctx)
    if identity is None:
        if "Authorization" not in ctx.http.headers:
            raise GatewayError(
                401, "You didn't provide an API key: send 'Authorization: Bearer <your imgproxy key>'.", code="invalid_api_key"
            )
        raise GatewayError(401, "Incorrect API key provided.", code="invalid_api_key")
    return identity


async def check_request(ctx: RequestContext) -> None:
    # Cheapest first: a caller refused locally, or over its limits, never makes the gateway
    # pay for a content check (a moderation model is a paid upstream call).
    hooks = ctx.gateway.hooks
    await hooks.call("imgproxy_authorize_request", ctx=ctx)
    await hooks.call("imgproxy_check_limits", ctx=ctx)
    await hooks.call("imgproxy_check_content", ctx=ctx)


def admit_upstream_answer(ctx: RequestContext) -> None:
    # Shed load before any paid call (and before rate limits and budgets are charged) while
    # the answers being read already fill the process's memory budget: 503 with Retry-After.
    ctx.gateway.shared.upstream_buffer.admit(ctx.gateway.config.server.max_upstream_buffer_bytes)


def requested_model(ctx: RequestContext) -> str:
    model = ctx.body.get("model") or ctx.gateway.config.default_model
    if model is None:
        raise GatewayError(400, "Missing required parameter: 'model'.", param="model", code="missing_required_parameter")
    return model


async def call_provider(ctx: RequestContext) -> web.StreamResponse:
    # The core decides what it needs from this attempt (imgproxy.plan); the adapter only
    # translates; the answer is relayed as it arrives or shaped by the rewrite hooks.
    gateway, outcome = ctx.gateway, ctx.outcome
    target = ctx.target = ctx.route
    read_body = ctx.needs_body or target.model.name in gateway.body_needed
    plan = plan_attempt(ctx.request, target, gateway.config.images, read_body)
    call = UpstreamCall.for_request(ctx, target.model.timeout or target.provider.total_timeout)
    started = time.monotonic()
    try:
        reply = await gateway.providers[target.provider.name].generate(ctx.request, target, plan, call)
        if isinstance(reply, ImagesResult):
            outcome.upstream_seconds = time.monotonic() - started
            outcome.filtered = reply.filtered
            await gateway.hooks.each("imgproxy_rewrite_response", ctx=ctx, result=reply)
            return images_response(ctx, reply)
        async with reply:  # the one place an upstream response handed over is released
            if reply.content_type == "text/event-stream":
                tap = StreamTap(sse=True)
            else:  # relayed only as far as it is a valid answer to this request
                tap = AnswerCheck(ctx.request.n, ctx.request.response_format)
            response = await forward_stream(ctx, reply, tap)
        outcome.upstream_seconds = time.monotonic() - started
        outcome.images, outcome.usage = tap.images, tap.usage
        return response
    except GatewayError as error:
        if outcome.upstream_called:
            outcome.upstream_error_kind = error.kind if isinstance(error, UpstreamError) else None
            outcome.upstream_seconds = time.monotonic() - started
        raise


def images_response(ctx: RequestContext, result: ImagesResult) -> web.Response:
    want = ctx.request.response_format
    del result.images[ctx.request.n :]  # never more than asked for, whichever provider sent them
    for image in result.images:
        if (image.url if want == "url" and not image.inline_reason else image.b64_json) is None:
            raise GatewayError(
                500, f"No plugin turned the provider's answer into response_format '{want}' (is the rewrite plugin disabled?).",
                type="server_error", code="internal_error",
            )
        if want == "b64_json" and not valid_base64(image.b64_json):
            raise upstream_error(f"The provider '{ctx.target.provider.name}' returned an image that is not valid base64.")
    ctx.outcome.images, ctx.outcome.usage = len(result.images), result.usage
    body = json.dumps(result.to_json()).encode()
    ctx.outcome.bytes_sent = len(body)
    return web.Response(body=body, content_type="application/json")


async def record_usage(ctx: RequestContext) -> None:
    # Accounting must never turn a served request into an error, nor one plugin's failure
    # lose another's record.
    await ctx.gateway.hooks.call("imgproxy_record_usage", ctx=ctx, outcome=ctx.outcome)
