"""POST /v1/images/generations, /edits and /variations, step by step: the line every request walks."""

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
from .resilience import counts_as_failure, translate
from .routing import Target
from .uploads import Form, read_form, typed_fields
from .upstream import UpstreamCall
from .validation import check_capabilities, check_schema, read_json_body

log = logging.getLogger("imgproxy.pipeline")


# The provider method for each operation.
PROVIDER_METHODS = {"generate": "generate", "edit": "edit", "variation": "vary"}


async def serve_images(ctx: RequestContext, operation: str = "generate") -> web.StreamResponse:
    """`operation`: generate (a JSON body), edit or variation (a form with uploaded images)."""
    # Authentication comes first so that anonymous callers can neither probe the model table
    # nor make the gateway read and validate their bodies.
    ctx.identity = await authenticate(ctx)
    response = form = None
    try:
        form = await read_request(ctx, operation)
        check_schema(ctx.body, operation)
        ctx.route = ctx.target = ctx.gateway.routing.resolve(requested_model(ctx))
        ctx.request = check_capabilities(ctx.body, ctx.route, operation, form)
        # A retry with the same Idempotency-Key gets the first answer: no limits, no upstream call.
        replay = await ctx.gateway.idempotency.begin(ctx)
        if replay is not None:
            ctx.outcome.status = replay.status
            return replay
        admit_upstream_answer(ctx)
        await check_request(ctx)
        response = await call_provider(ctx)
        ctx.outcome.status = response.status
        transport = ctx.http.transport
        if ctx.outcome.error_code is None and (transport is None or transport.is_closing()):
            # The client hung up while the image was generated: the provider billed it, the
            # record says 499 at the real cost, and an Idempotency-Key retry gets this answer.
            ctx.outcome.status, ctx.outcome.error_code, ctx.outcome.client_left = 499, "client_closed_request", True
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
        if form is not None:  # first: nothing below needs the uploads, and it never waits
            form.discard()
        await ctx.gateway.idempotency.finish(ctx, response)
        await record_usage(ctx)


async def read_request(ctx: RequestContext, operation: str) -> Form | None:
    """The body into ctx.body: JSON for a generation; for an edit or a variation, a form whose
    images are kept aside (imgproxy.uploads) and whose text fields are the body. A body that
    drips in for longer than `server.body_timeout` would hold its connection (and a spool
    file): 408."""
    if ctx.http.content.is_eof():  # all here already (a small body usually comes with its headers): no timer
        return await read_body(ctx, operation)
    seconds = ctx.gateway.config.server.body_timeout
    try:
        async with asyncio.timeout(seconds):
            return await read_body(ctx, operation)
    except TimeoutError:
        raise GatewayError(408, f"The request body did not arrive within {seconds:g} seconds.", code="request_timeout") from None


async def read_body(ctx: RequestContext, operation: str) -> Form | None:
    server = ctx.gateway.config.server
    if operation == "generate":
        ctx.body = await read_json_body(ctx.http, server.max_body_bytes)
        return None
    slots = ctx.gateway.shared.uploads
    slots.take(server.max_uploads)
    form = await read_form(ctx.http, server.max_upload_bytes, release=slots.release)
    ctx.body = typed_fields(form.fields, integers=("n", "output_compression", "partial_images"), booleans=("stream",))
    return form


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
    await hooks.call("imgproxy_authorize_model", identity=ctx.identity, model=ctx.route.model)
    # After the allow-list, so a key learns of a retired model only if it may use it.
    if ctx.route.model.shutdown is not None:  # most models have no shutdown date
        ctx.gateway.routing.check_retired(ctx.route.model, ctx.response_headers)
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
    # The model's own target, then its fallbacks, each tried (and retried) only while every
    # failure so far surely produced nothing: a client never pays for two generations
    # (imgproxy.resilience). One deadline covers them all.
    route = ctx.route
    budget = route.model.deadline or route.model.timeout or route.provider.total_timeout
    deadline = time.monotonic() + budget
    failure = None
    for target, request in candidates(ctx):
        if target is not route:
            if isinstance(failure, UpstreamError):  # the request's last failure is counted with it
                metrics = ctx.gateway.metrics
                metrics.child(metrics.upstream_errors, ctx.target.provider.name, failure.kind).inc()
            await change_target(ctx, target, request)
        try:
            return await attempt_target(ctx, target, deadline, budget)
        except GatewayError as error:
            if not (error.code == "provider_unavailable" or target.provider.retries.may_try_again(error)):
                raise
            failure = error
        if time.monotonic() >= deadline:
            break
    raise failure


def candidates(ctx: RequestContext):
    """(target, request) for the route's own target, then each fallback that can serve the
    request (translated or skipped per the model's fallback_strictness)."""
    yield ctx.route, ctx.request
    original, model = ctx.request, ctx.route.model
    for target in ctx.route.fallbacks:
        if ctx.gateway.routing.retired(target.model):
            continue  # shut down: never called
        request = translate(original, target.model.name, target.model.capabilities, model.fallback_strictness, model.unsupported_parameters == "drop")
        if request is not None:
            yield target, request


async def change_target(ctx: RequestContext, target: Target, request) -> None:
    # The budget follows the target actually called: the plugins release what they reserved
    # for the previous one and reserve the fallback's worst case, or refuse it.
    previous = ctx.target
    ctx.target, ctx.request = target, request
    ctx.gateway.metrics.child(ctx.gateway.metrics.fallbacks, ctx.route.model.name, target.model.name).inc()
    log.info("request %s falls back from %s to %s", ctx.request_id, previous.model.name, target.model.name)
    await ctx.gateway.hooks.call("imgproxy_change_target", ctx=ctx, previous=previous)


async def attempt_target(ctx: RequestContext, target: Target, deadline: float, budget: float) -> web.StreamResponse:
    """Call one target, again after a failure its provider's retry policy allows, while the
    deadline leaves time for the wait and the call."""
    gateway, outcome = ctx.gateway, ctx.outcome
    policy, breaker, metrics = target.provider.retries, gateway.circuits.for_target(target), gateway.metrics
    provider = target.provider.name
    attempt = 0
    while True:
        attempt += 1
        headers = ctx.response_headers  # which target served (or failed last), on every answer
        headers["x-imgproxy-provider"], headers["x-imgproxy-model"] = provider, target.model.name
        if ctx.request.dropped:  # what this target's call leaves out (a fallback's list includes the model's)
            headers["x-imgproxy-dropped-params"] = ", ".join(ctx.request.dropped)
        else:  # not what an earlier fallback left out
            headers.pop("x-imgproxy-dropped-params", None)
        if breaker is not None and not breaker.allow():
            headers["x-imgproxy-attempts"] = str(outcome.attempts)
            metrics.child(metrics.upstream_attempts, provider, "circuit_open").inc()
            raise GatewayError(
                503, f"The provider '{provider}' is failing and is not being called for now; try again later.",
                type="server_error", code="provider_unavailable", headers={"Retry-After": str(breaker.retry_after())},
            )
        outcome.attempts += 1
        headers["x-imgproxy-attempts"] = str(outcome.attempts)
        try:
            # What is left of the deadline: all of it for the request's first call.
            left = budget if outcome.attempts == 1 else deadline - time.monotonic()
            response = await call_once(ctx, target, min(target.model.timeout or target.provider.total_timeout, left))
        except (asyncio.CancelledError, Exception) as error:
            if not isinstance(error, GatewayError):  # cancelled, or our own fault: no verdict on the provider
                if breaker is not None:
                    breaker.cancel_probe()
                raise
            failed = counts_as_failure(error)
            if breaker is not None:
                breaker.record(failed)
            metrics.child(metrics.upstream_attempts, provider, "failure" if failed else "refusal").inc()
            if not (policy.retryable(error) and attempt < policy.attempts):
                raise
            wait = policy.delay(attempt, error)
            if time.monotonic() + wait >= deadline:
                raise
            metrics.child(metrics.upstream_errors, provider, error.kind).inc()  # the last one is counted with the request
            log.info("request %s: %s failed (%s), again in %.2fs", ctx.request_id, provider, error.kind, wait)
            await asyncio.sleep(wait)
            continue
        broken = outcome.upstream_error_kind is not None  # broken off after the status was sent
        if breaker is not None:
            breaker.record(broken)
        metrics.child(metrics.upstream_attempts, provider, "failure" if broken else "success").inc()
        return response


async def call_once(ctx: RequestContext, target: Target, timeout: float) -> web.StreamResponse:
    # The core decides what it needs from this attempt (imgproxy.plan); the adapter only
    # translates; the answer is relayed as it arrives or shaped by the rewrite hooks.
    gateway, outcome = ctx.gateway, ctx.outcome
    outcome.upstream_error_kind = None
    read_body = ctx.needs_body or target.model.name in gateway.body_needed
    plan = plan_attempt(ctx.request, target, gateway.config.images, read_body)
    call = UpstreamCall.for_request(ctx, timeout)
    started = time.monotonic()
    try:
        provider = gateway.providers[target.provider.name]
        reply = await getattr(provider, PROVIDER_METHODS[ctx.request.operation])(ctx.request, target, plan, call)
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
