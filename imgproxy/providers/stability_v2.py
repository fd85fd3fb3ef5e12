"""Stability AI's v2beta stable-image API (Stable Image Ultra and Core, Stable Diffusion 3.5),
translated to and from OpenAI's shape.

One image per call: n > 1 becomes n calls, at most `options.max_parallel` (4) at a time, whose
images are merged (Provider.fan_out).
Mapping: size → aspect_ratio (the nearest of Stability's nine ratios: ASPECT_RATIOS),
output_format passed (SD3.5 has no webp: refused), style vivid/natural → style_preset
enhance/photographic, user → the stability-client-user-id header; quality has no counterpart
(the catalog refuses it). An image with finish_reason CONTENT_FILTERED is blurred, so it is
withheld. Images come back as base64 JSON (Accept: application/json), or as bytes (Accept:
image/*) when the gateway will host them anyway: a third fewer bytes and no base64 to decode.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import replace

import aiohttp

from ..catalog import load_models
from ..errors import GatewayError, UpstreamError, invalid_request, upstream_error
from ..messages import GeneratedImage, ImageRequest, ImagesResult
from ..plan import Plan
from ..routing import Target
from ..upstream import MAX_JSON_BYTES, UpstreamCall
from .base import Provider
from .openai import CONTENT_TYPES, RETRY_AFTER

DEFAULT_BASE_URL = "https://api.stability.ai"
# Width / height of each aspect_ratio the v2beta endpoints take.
ASPECT_RATIOS = {
    "21:9": 21 / 9, "16:9": 16 / 9, "3:2": 3 / 2, "5:4": 5 / 4, "1:1": 1.0,
    "4:5": 4 / 5, "2:3": 2 / 3, "9:16": 9 / 16, "9:21": 9 / 21,
}
# upstream_model → endpoint; any other upstream_model is an SD3 model id sent as `model`.
ENDPOINTS = {"stable-image-ultra": "ultra", "stable-image-core": "core"}
SD3_FORMATS = ("png", "jpeg")
STYLE_PRESETS = {"vivid": "enhance", "natural": "photographic"}
# Stability's documented penalty for going over its rate limit, when it sends no Retry-After.
RATE_LIMIT_SECONDS = "60"
# An end-user id Stability may receive in a header: printable ASCII, at most 256 characters.
_HEADER_SAFE = re.compile(r"[\x21-\x7e]{1,256}")


def aspect_ratio(size: str) -> str:
    """The allowed ratio nearest to WIDTHxHEIGHT's (by the logarithm: 2:1 and 1:2 are as far from 1:1)."""
    width, _, height = size.partition("x")
    wanted = math.log(int(width) / int(height))
    return min(ASPECT_RATIOS, key=lambda name: abs(math.log(ASPECT_RATIOS[name]) - wanted))


class StabilityV2Provider(Provider):
    type = "stability_v2"
    models = load_models(__name__, "stability_v2.yaml")

    def __init__(self, config, upstream) -> None:
        if not config.base_url:  # egress=None: the policy is worked out again for the default host
            config = replace(config, base_url=DEFAULT_BASE_URL, egress=None)
        super().__init__(config, upstream)

    async def generate(self, request: ImageRequest, target: Target, plan: Plan, call: UpstreamCall) -> ImagesResult:
        key = self.require_key(request.model)
        upstream_model = target.model.upstream_model
        endpoint = ENDPOINTS.get(upstream_model, "sd3")
        output_format = request.options.get("output_format", "png")
        if endpoint == "sd3" and output_format not in SD3_FORMATS:
            raise invalid_request(
                f"Invalid output_format for {request.model}: must be png or jpeg.", param="output_format", code="invalid_value"
            )
        fields = self.form_fields(request, upstream_model if endpoint == "sd3" else None, output_format)
        headers = {"Authorization": f"Bearer {key}", "Accept": "image/*" if plan.decode_inline else "application/json"}
        if request.user is not None and _HEADER_SAFE.fullmatch(request.user):
            headers["stability-client-user-id"] = request.user
        url = f"{self.config.base_url}/v2beta/stable-image/generate/{endpoint}"

        async def one(sub: ImageRequest, sub_call: UpstreamCall) -> ImagesResult:
            image = await self.one_image(sub_call, url, fields, dict(headers), CONTENT_TYPES[output_format], sub_call.timeout)
            return ImagesResult(created=int(time.time()), images=[image])

        return await self.fan_out(request, target, call, one)  # one image per call (max_n_per_call: 1)

    def form_fields(self, request: ImageRequest, sd3_model: str | None, output_format: str) -> list[tuple[str, str]]:
        fields = [("prompt", request.prompt), ("aspect_ratio", aspect_ratio(request.size)), ("output_format", output_format)]
        if sd3_model is not None:
            fields += [("mode", "text-to-image"), ("model", sd3_model)]
        if request.style in STYLE_PRESETS:
            fields.append(("style_preset", STYLE_PRESETS[request.style]))
        return fields

    async def one_image(self, call: UpstreamCall, url: str, fields, headers: dict, content_type: str, timeout: float):
        form = aiohttp.FormData(fields, default_to_multipart=True)  # one per call: a FormData is consumed
        raw = None
        async with self.upstream.request(call, self.config, "POST", url, timeout=timeout, data=form, headers=headers) as resp:
            if resp.status == 200 and headers["Accept"] == "image/*" and resp.content_type == content_type:
                raw = await self.read_image(resp)
                body = {"finish_reason": resp.headers.get("finish-reason")}
            else:
                body = await self.upstream.read_json(resp, self.config) if resp.content_type == "application/json" else {}
        if resp.status != 200:
            raise self.map_error(resp.status, body, resp.headers.get("Retry-After"))
        if body.get("finish_reason") == "CONTENT_FILTERED":  # a blurred image: withheld, not billed
            raise GatewayError(400, "Your request was rejected by the provider's content filter.", code="content_policy_violation")
        if body.get("finish_reason") != "SUCCESS" or not (raw or isinstance(body.get("image"), str)):
            raise upstream_error(f"The provider '{self.config.name}' generated no usable image.")
        if raw is not None:
            return GeneratedImage(data=raw, content_type=content_type)
        return GeneratedImage(b64_json=body["image"], content_type=content_type)

    async def read_image(self, resp) -> bytearray:
        """The image bytes, bounded (a cut or a timeout while reading is mapped by the exchange)."""
        data = bytearray()
        async for chunk in resp.content.iter_any():
            data += chunk
            if len(data) > MAX_JSON_BYTES:
                raise upstream_error(f"The provider '{self.config.name}' sent an image larger than this gateway takes.")
        return data

    def map_error(self, status: int, body: dict, retry_after: str | None) -> GatewayError:
        """Our error rebuilt from the status, `name` and the redacted `errors`; nothing else."""
        name = self.plain_word(body.get("name"))
        messages = body.get("errors")
        text = " ".join(m for m in messages if isinstance(m, str)) if isinstance(messages, list) else None
        message = self.upstream_message(text, status)
        if status == 403 and name == "content_moderation":
            return GatewayError(400, message, code="content_policy_violation")
        if status in (401, 403):
            return self.credentials_rejected(status)
        if status == 422 and name == "public_figure":
            return GatewayError(400, message, code="content_policy_violation", param="prompt")
        if status in (400, 413, 422):
            return GatewayError(400, message, code=name)
        if status == 429:
            retry = retry_after if retry_after and RETRY_AFTER.fullmatch(retry_after) else RATE_LIMIT_SECONDS
            return UpstreamError(
                429, message, type="requests", code="rate_limit_exceeded", kind="rate_limited", produced_nothing=True,
                headers={"Retry-After": retry},
            )
        return self.upstream_error_for_status(status, error_body=name is not None)
