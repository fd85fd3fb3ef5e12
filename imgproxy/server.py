"""The aiohttp application: routes, request ids, and every error as an OpenAI envelope."""

from __future__ import annotations

import logging
import re
import time
import uuid

from aiohttp import web

from .errors import GatewayError
from .gateway import Gateway
from .imagestore import content_type_of
from .messages import RequestContext
from .pipeline import generate_images

log = logging.getLogger("imgproxy.server")

GATEWAY = web.AppKey("gateway", Gateway)
REQUEST_ID = web.RequestKey("request_id", str)
CONTEXT = web.RequestKey("context", RequestContext)
_CLIENT_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:/+=-]{1,128}$")


def create_app(gateway: Gateway) -> web.Application:
    app = web.Application(client_max_size=gateway.config.server.max_body_bytes, middlewares=[request_id, error_envelope])
    app[GATEWAY] = gateway
    app.on_response_prepare.append(_stamp_request_id)
    app.cleanup_ctx.append(_lifecycle)
    app.router.add_post("/v1/images/generations", post_generations)
    app.router.add_get("/v1/images/files/{name}", get_image_file)
    app.router.add_get("/healthz", healthz)
    return app


async def _lifecycle(app: web.Application):
    await app[GATEWAY].start()
    yield
    await app[GATEWAY].close()


@web.middleware
async def request_id(request: web.Request, handler):
    given = request.headers.get("x-request-id", "")
    request[REQUEST_ID] = given if _CLIENT_REQUEST_ID.match(given) else uuid.uuid4().hex
    return await handler(request)


async def _stamp_request_id(request: web.Request, response: web.StreamResponse) -> None:
    if REQUEST_ID in request:
        response.headers["x-request-id"] = request[REQUEST_ID]
    if CONTEXT in request:
        response.headers.update(request[CONTEXT].response_headers)


@web.middleware
async def error_envelope(request: web.Request, handler):
    try:
        return await handler(request)
    except GatewayError as error:
        return error.to_response()
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status)
        message = f"{request.method} {request.path}: {exc.reason}."
        return GatewayError(exc.status, message, code=code, headers={k: v for k, v in exc.headers.items() if k == "Allow"}).to_response()
    except Exception:
        log.exception("unhandled error (request %s)", request.get(REQUEST_ID))
        return GatewayError(500, "The gateway failed unexpectedly; the error was logged.", type="server_error", code="internal_error").to_response()


async def post_generations(request: web.Request) -> web.StreamResponse:
    ctx = RequestContext(gateway=request.app[GATEWAY], http=request, request_id=request[REQUEST_ID])
    request[CONTEXT] = ctx
    return await generate_images(ctx)


async def get_image_file(request: web.Request) -> web.StreamResponse:
    """Serve a hosted image to whoever holds its signed URL (the URL is the credential)."""
    gateway = request.app[GATEWAY]
    name = request.match_info["name"]
    try:
        expires = int(request.query.get("expires", ""))
    except ValueError:
        expires = None
    signature = request.query.get("signature", "")
    if expires is None or not gateway.signer.verify(name, expires, signature):
        raise GatewayError(403, "This image URL is not valid: its signature does not match.", type="invalid_request_error", code="invalid_signature")
    remaining = expires - int(time.time())
    if remaining <= 0:
        raise GatewayError(410, "This image URL has expired.", code="url_expired")
    path = gateway.store.path(name)
    if path is None:
        raise GatewayError(410, "This image is no longer stored.", code="image_gone")
    return web.FileResponse(
        path, headers={"Content-Type": content_type_of(name), "Cache-Control": f"private, max-age={remaining}"}
    )


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})
