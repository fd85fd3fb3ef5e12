"""Shaping every provider's answer as the client asked: `url` or `b64_json`.

Base64 images become URLs on imgproxy itself (stored, HMAC-signed, expiring); provider URLs
are re-hosted or passed through (`images.upstream_urls`); URLs become base64 when the client
wants the image inline. Provider URLs are fetched only from that provider's own hosts.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import time
from urllib.parse import urlencode

from imgproxy.errors import GatewayError, upstream_error
from imgproxy.hookspecs import hookimpl
from imgproxy.messages import GeneratedImage, RequestContext
from imgproxy.stores import StoreUnavailable
from imgproxy.upstream import UpstreamCall

FETCH_TIMEOUT = 60.0


class RewritePlugin:
    @hookimpl
    async def imgproxy_rewrite_response(self, ctx: RequestContext, result):
        want = ctx.request.response_format
        todo = [image for image in result.images if self._needs_work(ctx, image, want)]
        if len(todo) == 1:
            await self._convert(ctx, todo[0], want)
        elif todo:
            await asyncio.gather(*(self._convert(ctx, image, want) for image in todo))

    def _needs_work(self, ctx: RequestContext, image: GeneratedImage, want: str) -> bool:
        if want == "b64_json":
            return image.b64_json is None
        return image.url is None or ctx.gateway.config.images.upstream_urls == "rehost"

    async def _convert(self, ctx: RequestContext, image: GeneratedImage, want: str) -> None:
        images = ctx.gateway.config.images
        if want == "b64_json":
            if image.data is None:
                image.data, image.content_type = await self._fetch(ctx, image.url)
            image.b64_json, image.url, image.data = base64.b64encode(image.data).decode(), None, None
            return
        if image.data is not None:  # decoded by the adapter as it arrived
            data = image.data
        elif image.b64_json is not None:
            try:
                data = base64.b64decode(image.b64_json, validate=True)
            except binascii.Error:
                raise upstream_error("The provider returned an image that is not valid base64.") from None
        elif images.upstream_urls == "rehost":
            data, image.content_type = await self._fetch(ctx, image.url)
        else:
            return
        try:
            image.url, image.b64_json, image.data = await self._host(ctx, data, image.content_type), None, None
        except StoreUnavailable:
            # The image is paid for: never lost because the store is down.
            if images.on_store_failure == "error":
                raise GatewayError(
                    503, "The generated image could not be stored for a URL; ask for response_format b64_json or try again.",
                    type="server_error", code="image_store_unavailable",
                ) from None
            image.url, image.data = None, None
            image.b64_json = image.b64_json or base64.b64encode(data).decode()
            image.inline_reason = "store_unavailable"
            ctx.response_headers["x-imgproxy-image-fallback"] = "store_unavailable"

    async def _fetch(self, ctx: RequestContext, url: str) -> tuple[bytes, str]:
        return await ctx.gateway.upstream.fetch_image(
            UpstreamCall.for_request(ctx, FETCH_TIMEOUT), ctx.target.provider, url, max_bytes=ctx.gateway.config.images.max_image_bytes, timeout=FETCH_TIMEOUT
        )

    async def _host(self, ctx: RequestContext, data: bytes, content_type: str) -> str:
        gateway = ctx.gateway
        name = await gateway.store.put(data, content_type)
        direct = await gateway.store.url_for(name, gateway.config.images.url_ttl)
        if direct is not None:
            return direct
        expires = int(time.time()) + gateway.config.images.url_ttl
        query = urlencode({"expires": expires, "signature": gateway.signer.signature(name, expires)})
        base = gateway.config.images.public_base_url or f"{ctx.http.scheme}://{ctx.http.host}"
        return f"{base}/v1/images/files/{name}?{query}"
