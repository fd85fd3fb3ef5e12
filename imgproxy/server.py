"""The aiohttp application: routes, request ids, access log and metrics, and every error as an
OpenAI envelope."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import time

from aiohttp import HttpVersion11, web
from prometheus_client import CONTENT_TYPE_LATEST

from . import cors, models_api
from .errors import GatewayError
from .gateway import Gateway
from .listener import OPS_MAX_CONNECTIONS, GuardedRunner, Listener
from .stores import StoreUnavailable, UrlSigner, content_type_of
from .logs import access_log, request_id_var
from .messages import RequestContext
from .metrics import exposition
from .pipeline import serve_images
from .runtime import Runtime
from .serving import ListenFailed

log = logging.getLogger("imgproxy.server")

RUNTIME = web.AppKey("runtime", Runtime)
REQUEST_ID = web.RequestKey("request_id", str)
CONTEXT = web.RequestKey("context", RequestContext)
_CLIENT_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:/+=-]{1,128}$")
# A signed image URL as UrlSigner writes it: a Unix time and a hex HMAC-SHA256.
_EXPIRES = re.compile(r"[1-9][0-9]{0,11}")
_SIGNATURE = re.compile(r"[0-9a-f]{64}")
# Probes and scrapes: no access log line, no request metrics.
QUIET_PATHS = {"/healthz", "/readyz", "/metrics"}
MAX_BODY_CEILING = 1024**3


def create_app(served: Gateway | Runtime, *, reuse_port: bool = False) -> web.Application:
    """`reuse_port`: the workers of `serve --workers N` share the operations port too."""
    runtime = served if isinstance(served, Runtime) else Runtime(served)
    # Bodies are limited per config in read_json_body; this is only aiohttp's outer bound.
    app = web.Application(middlewares=[serve_request], client_max_size=MAX_BODY_CEILING)
    app[RUNTIME] = runtime
    app.cleanup_ctx.append(_lifecycle)
    cors.setup(app, lambda: runtime.gateway.config.server.cors_origins)
    app.router.add_post("/v1/images/generations", images_endpoint("generate"), expect_handler=expectation)
    app.router.add_post("/v1/images/edits", images_endpoint("edit"), expect_handler=expectation)
    app.router.add_post("/v1/images/variations", images_endpoint("variation"), expect_handler=expectation)
    app.router.add_get("/v1/images/files/{name}", get_image_file, expect_handler=expectation)
    app.router.add_get("/v1/models", get_models, expect_handler=expectation)
    # `.+`: a model may be named provider/model, as in a generation request.
    app.router.add_get("/v1/models/{model:.+}", get_model, expect_handler=expectation)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    metrics = runtime.gateway.config.metrics
    if metrics.port is None:
        app.router.add_get("/metrics", get_metrics)
    else:
        app.cleanup_ctx.append(_metrics_site(metrics.host, metrics.port, reuse_port))
    return app


async def expectation(request: web.Request) -> None:
    """`Expect: 100-continue` is answered as aiohttp answers it; any other expectation is
    ignored (RFC 9110 allows it), so the request gets its ordinary answer, an envelope like
    every other, where aiohttp would send a plain-text 417 that quotes the header."""
    if request.version == HttpVersion11 and request.headers.get("Expect", "").lower() == "100-continue":
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # the 100 is not part of the answer's size


def metrics_app(runtime: Runtime) -> web.Application:
    """The operations port: metrics and health probes, which a sidecar's kubelet can reach
    while the API itself listens on localhost only."""
    app = web.Application()
    app[RUNTIME] = runtime
    app.router.add_get("/metrics", get_metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app


async def _lifecycle(app: web.Application):
    runtime = app[RUNTIME]
    try:
        await runtime.start()
    except BaseException:
        with contextlib.suppress(Exception):  # stop what did start (connection pools, the store); the first error is the one to tell
            await runtime.close()
        raise
    yield
    await runtime.close()


def _metrics_site(host: str, port: int, reuse_port: bool):
    async def serve_metrics(app: web.Application):
        # Its own connection cap and count: probes must answer while the API port is flooded.
        runtime = app[RUNTIME]
        server = runtime.gateway.config.server
        guard = Listener("ops", OPS_MAX_CONNECTIONS, server, runtime.shared.metrics)
        runner = GuardedRunner(metrics_app(runtime), guard, access_log=None, keepalive_timeout=server.keepalive_timeout)
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port, reuse_port=reuse_port or None).start()
        except OSError as exc:
            await runner.cleanup()
            raise ListenFailed(host, port, exc) from None
        yield
        await runner.cleanup()

    return serve_metrics


@web.middleware
async def serve_request(request: web.Request, handler):
    """Around every request: its id, every error rendered as an OpenAI envelope, then one
    access-log line and the request metrics. (One middleware: each layer costs a coroutine.)"""
    given = request.headers.get("x-request-id", "")
    request_id = request[REQUEST_ID] = given if _CLIENT_REQUEST_ID.match(given) else os.urandom(16).hex()
    token = request_id_var.set(request_id)
    started, status = time.monotonic(), 500
    try:
        try:
            if request.method == "OPTIONS" and cors.is_preflight(request):
                # Browsers send no key with a preflight: answered here, before any handler.
                response = cors.preflight(request)
            else:
                response = await handler(request)
        except Exception as exc:
            response = error_response(request, exc)
        status = response.status
        ctx = request.get(CONTEXT)
        if ctx is not None and ctx.outcome.client_left:
            status = 499  # answered, but nobody was there to read it (the record says so too)
        if not response.prepared:  # a streamed answer was stamped before its first byte
            if ctx is not None:
                ctx.stamp(response)
            else:
                response.headers["x-request-id"] = request_id
        return response
    except asyncio.CancelledError:
        status = 499  # the client went away
        raise
    finally:
        # The context refers to the request: dropping it here spares the garbage collector a
        # reference cycle per request.
        ctx = request.pop(CONTEXT, None)
        if request.path not in QUIET_PATHS:
            seconds = time.monotonic() - started
            if ctx is not None:
                ctx.gateway.metrics.observe_request(ctx, status, seconds)
            access_log.write(f"{request.method} {request.path} {status}", request_id, access_fields(request, ctx, status, seconds))
        request_id_var.reset(token)


def access_fields(request: web.Request, ctx: RequestContext | None, status: int, seconds: float) -> dict:
    # The path only: an image URL's query string is its credential.
    fields = {"method": request.method, "path": request.path, "status": status, "duration_seconds": round(seconds, 4)}
    if ctx is None:
        return fields
    outcome = ctx.outcome
    fields.update(
        key=ctx.identity.name if ctx.identity else None,
        # The target that served (or failed last): a fallback's when one took over.
        model=ctx.target.model.name if ctx.target else None,
        provider=ctx.target.provider.name if ctx.target else None,
        attempts=outcome.attempts,
        n=ctx.request.n if ctx.request else None,
        images=outcome.images,
        upstream_seconds=round(outcome.upstream_seconds, 4) if outcome.upstream_seconds is not None else None,
        bytes=outcome.bytes_sent,
        cost_usd=round(outcome.cost_usd, 6),
        error=outcome.error_code,
        user=ctx.user_hash if ctx.request else None,
    )
    if ctx.request and ctx.request.dropped:  # as in the x-imgproxy-dropped-params header
        fields["dropped_params"] = ",".join(ctx.request.dropped)
    if ctx.request and ctx.identity and ctx.identity.settings.get("log_prompts"):
        fields["prompt"] = ctx.request.prompt
    traceparent = request.headers.get("traceparent")
    if traceparent:
        fields["traceparent"] = traceparent
    return fields


def error_response(request: web.Request, exc: Exception) -> web.StreamResponse:
    """Every error as an OpenAI envelope (redirects, which aiohttp raises too, pass)."""
    if isinstance(exc, GatewayError):
        return exc.to_response()
    if isinstance(exc, web.HTTPException):
        if exc.status < 400:
            raise exc
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status)
        message = f"{request.method} {request.path}: {exc.reason}."
        return GatewayError(exc.status, message, code=code, headers={k: v for k, v in exc.headers.items() if k == "Allow"}).to_response()
    log.error("unhandled error", exc_info=exc)
    return GatewayError(500, "The gateway failed unexpectedly; the error was logged.", type="server_error", code="internal_error").to_response()


def images_endpoint(operation: str):
    """The handler of POST /v1/images/generations, /edits or /variations (`operation`)."""

    async def handler(request: web.Request) -> web.StreamResponse:
        gateway = request.app[RUNTIME].gateway
        ctx = RequestContext(gateway=gateway, http=request, request_id=request[REQUEST_ID])
        request[CONTEXT] = ctx
        gateway.request_started()
        try:
            return await serve_images(ctx, operation)
        finally:
            gateway.request_finished()

    return handler


async def get_models(request: web.Request) -> web.Response:
    return await models_api.list_models(request.app[RUNTIME].gateway, request, request[REQUEST_ID])


async def get_model(request: web.Request) -> web.Response:
    gateway = request.app[RUNTIME].gateway
    return await models_api.retrieve_model(gateway, request, request[REQUEST_ID], request.match_info["model"])


async def get_image_file(request: web.Request) -> web.StreamResponse:
    """Serve a hosted image to whoever holds its signed URL (the URL is the credential)."""
    gateway = request.app[RUNTIME].gateway
    name = request.match_info["name"]
    remaining = check_image_url(gateway.signer, name, request.query, int(time.time()))
    try:
        image = await gateway.store.open(name)
    except StoreUnavailable:
        raise GatewayError(503, "The image store is not answering; try again shortly.", type="server_error", code="image_store_unavailable") from None
    if image is None:
        raise GatewayError(410, "This image is no longer stored.", code="image_gone")
    try:
        response = web.StreamResponse(headers={"Content-Type": content_type_of(name), "Cache-Control": f"private, max-age={remaining}"})
        if image.size is not None:
            response.content_length = image.size
        await response.prepare(request)
        try:
            async for chunk in image.chunks:
                await response.write(chunk)
        except StoreUnavailable as exc:
            # The status is sent: cut the connection so the client sees a short body, not an image.
            log.warning("image store failed while serving an image: %s", exc.reason)
            request.transport.abort()
            return response
        await response.write_eof()
        return response
    finally:
        await image.close()


def check_image_url(signer: UrlSigner, name: str, query, now: int) -> int:
    """The seconds left on a correctly signed, unexpired image URL; else 403 or 410. Each part
    must have the form the gateway writes before it is used: int() would take " 7" or "٧",
    hmac.compare_digest raises TypeError on non-ASCII text, and names are ASCII tokens."""
    expires, signature = query.get("expires", ""), query.get("signature", "")
    well_formed = name.isascii() and _EXPIRES.fullmatch(expires) and _SIGNATURE.fullmatch(signature)
    if not (well_formed and signer.verify(name, int(expires), signature)):
        raise GatewayError(403, "This image URL is not valid: its signature does not match.", code="invalid_signature")
    remaining = int(expires) - now
    if remaining <= 0:
        raise GatewayError(410, "This image URL has expired.", code="url_expired")
    return remaining


async def healthz(request: web.Request) -> web.Response:
    """Liveness: the event loop answers. Never tied to a provider's health."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Readiness: a config is loaded, the image store is writable, shared state answers."""
    runtime = request.app[RUNTIME]
    checks = {
        "config": True,
        "image_store": await runtime.gateway.store.ready(),
        "state": await runtime.shared.state.ping(),
        "shutting_down": runtime.shutting_down,
    }
    ready = checks["image_store"] and checks["state"] and not runtime.shutting_down
    answer = {"status": "ready" if ready else "not ready", "checks": checks}
    if "verbose" in request.query:
        # Shown, never judged: an open circuit sends requests to fallbacks, it does not make
        # this replica unready (that would take every replica out during a provider outage).
        answer["circuits"] = runtime.gateway.circuits.states()
    return web.json_response(answer, status=200 if ready else 503)


async def get_metrics(request: web.Request) -> web.Response:
    body = exposition(request.app[RUNTIME].shared.metrics.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
