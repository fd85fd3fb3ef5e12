"""OpenAI's Images API (dall-e-2, dall-e-3, GPT image models)."""

from __future__ import annotations

import re

import aiohttp

from ..catalog import load_models
from ..errors import GatewayError, UpstreamError, upstream_error
from ..inline_images import RESPONSE_ENUMS, valid_usage
from ..messages import GeneratedImage, ImageRequest, ImagesResult, StreamedReply
from ..plan import Plan
from ..routing import Target
from ..upstream import UpstreamCall
from .base import Provider, log, request_param

CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
POLICY_CODES = {"content_policy_violation", "moderation_blocked"}
# Seconds or an HTTP date: the only Retry-After values passed on to the client.
RETRY_AFTER = re.compile(r"\d{1,9}|[A-Z][a-z]{2}, \d{2} [A-Z][a-z]{2} \d{4} \d{2}:\d{2}:\d{2} GMT")


class OpenAIProvider(Provider):
    type = "openai"
    models = load_models(__name__, "openai.yaml")

    async def generate(self, request: ImageRequest, target: Target, plan: Plan, call: UpstreamCall) -> ImagesResult | StreamedReply:
        # n above the model's max_n_per_call (dall-e-3 takes 1; a host may take fewer than its
        # models' max_n): parallel calls, merged. The plan then never streams an answer through.
        return await self.fan_out(
            request, target, call, lambda sub, sub_call: self.post(sub, plan, sub_call, self.endpoint(target), json=self.build_body(sub, target, plan.upstream_format))
        )

    async def edit(self, request: ImageRequest, target: Target, plan: Plan, call: UpstreamCall) -> ImagesResult | StreamedReply:
        return await self.fan_out(request, target, call, lambda sub, sub_call: self.post_form(sub, target, plan, sub_call, "edits"))

    async def vary(self, request: ImageRequest, target: Target, plan: Plan, call: UpstreamCall) -> ImagesResult | StreamedReply:
        return await self.fan_out(request, target, call, lambda sub, sub_call: self.post_form(sub, target, plan, sub_call, "variations"))

    async def post_form(self, request: ImageRequest, target: Target, plan: Plan, call: UpstreamCall, operation: str) -> ImagesResult | StreamedReply:
        return await self.post(request, plan, call, self.endpoint(target, operation), data=self.build_form(request, target, plan.upstream_format))

    async def post(self, request: ImageRequest, plan: Plan, call: UpstreamCall, url: str, **body) -> ImagesResult | StreamedReply:
        key = self.require_key(request.model)
        resp = await self.upstream.send(call, self.config, "POST", url, headers=self.auth_headers(key), **body)
        try:
            return await self.answer(request, plan, resp)
        except BaseException:
            resp.release()
            raise

    def endpoint(self, target: Target, operation: str = "generations") -> str:
        return f"{self.config.base_url}/images/{operation}"

    def auth_headers(self, key: str) -> dict:
        return {"Authorization": f"Bearer {key}"}

    async def answer(self, request: ImageRequest, plan: Plan, resp) -> ImagesResult | StreamedReply:
        if resp.status != 200:
            raise self.map_error(resp.status, await self.upstream.read_json(resp, self.config) if _is_json(resp) else {}, resp)
        if request.stream:
            if resp.content_type != "text/event-stream":
                raise upstream_error(f"The provider '{self.config.name}' did not answer with an event stream.")
            return StreamedReply(resp, "text/event-stream")
        if plan.stream_through and _is_json(resp):
            # Peek before the client's status is fixed: garbage must still become a 502.
            first = await self.upstream.first_chunk(resp, self.config)
            if not first.lstrip().startswith(b"{"):
                raise upstream_error(f"The provider '{self.config.name}' returned an answer that is not a JSON object.")
            return StreamedReply(resp, "application/json", first)
        if plan.decode_inline:
            # The images will be hosted: decode them as they arrive rather than hold the answer.
            body, decoded = await self.upstream.read_inline_images(resp, self.config, keep=request.n)
            resp.release()
            return self.parse(body, request, decoded)
        body = await self.upstream.read_json(resp, self.config)
        resp.release()
        return self.parse(body, request)

    def build_body(self, request: ImageRequest, target: Target, upstream_format: str | None) -> dict:
        caps = target.model.capabilities
        body = {"model": target.model.upstream_model, "prompt": request.prompt, "n": request.n, "size": request.size}
        if request.quality is not None:
            body["quality"] = request.quality
        if request.style is not None:
            body["style"] = request.style
        if len(caps.upstream_formats) > 1:
            body["response_format"] = upstream_format
        if request.user is not None:
            body["user"] = request.user
        if caps.upstream_moderation:
            body["moderation"] = request.moderation
        body.update(request.options)
        return body

    def build_form(self, request: ImageRequest, target: Target, upstream_format: str | None) -> aiohttp.FormData:
        """An edit's or a variation's multipart form, as OpenAI's SDK sends it: the parameters
        as text, one `image` (or several `image[]`) and the `mask` streamed from where the
        gateway keeps them (imgproxy.uploads), under names of our own, not the client's."""
        fields = self.build_body(request, target, upstream_format)
        fields.pop("moderation", None)  # a parameter of generations only
        if request.operation == "variation":
            fields.pop("prompt")
            fields.pop("quality", None)
        form = aiohttp.FormData()
        for name, value in fields.items():
            form.add_field(name, str(value).lower() if isinstance(value, bool) else str(value))
        uploads = request.form
        name = "image" if len(uploads.images) == 1 else "image[]"
        for index, upload in enumerate(uploads.images):
            form.add_field(name, upload.payload(), filename=f"image-{index}.{upload.kind}", content_type=upload.content_type)
        if uploads.mask is not None:
            form.add_field("mask", uploads.mask.payload(), filename="mask.png", content_type="image/png")
        return form

    def parse(self, body: dict, request: ImageRequest, decoded: list[bytearray | None] | None = None) -> ImagesResult:
        """`decoded`: the images of a body read by read_inline_images, whose b64_json values
        are empty in `body`. Images beyond the `n` asked for are dropped: never delivered, never
        paid for. Fields outside the ImagesResponse shape are left out."""
        data = body.get("data")
        if not isinstance(data, list) or not all(isinstance(item, dict) for item in data):
            raise upstream_error(f"The provider '{self.config.name}' returned no image list.")
        if decoded is not None and len(decoded) != sum(isinstance(item.get("b64_json"), str) for item in data):
            raise upstream_error(f"The provider '{self.config.name}' returned images outside its image list.")
        if len(data) > request.n:
            log.warning("provider %s returned %d images where %d were asked for: the rest dropped", self.config.name, len(data), request.n)
            data = data[: request.n]
        inline = iter(decoded or ())
        extra = {key: body[key] for key, allowed in RESPONSE_ENUMS.items() if body.get(key) in allowed}
        content_type = CONTENT_TYPES.get(extra.get("output_format") or request.options.get("output_format"), "image/png")
        images = []
        for item in data:
            b64, url, revised = item.get("b64_json"), item.get("url"), item.get("revised_prompt")
            if not (isinstance(b64, str) or isinstance(url, str)):
                raise upstream_error(f"The provider '{self.config.name}' returned an image without data.")
            image = GeneratedImage(b64_json=b64, url=url, revised_prompt=revised if isinstance(revised, str) else None, content_type=content_type)
            if decoded is not None and isinstance(b64, str):
                image.data, image.b64_json = next(inline), None
            images.append(image)
        created = body.get("created")
        return ImagesResult(
            created=created if isinstance(created, int) else 0,
            images=images,
            usage=_numbers(body["usage"]) if valid_usage(body.get("usage")) else None,
            extra=extra,
        )

    def map_error(self, status: int, body: dict, resp) -> GatewayError:
        """Our error rebuilt from the status and the known fields of OpenAI's error body; no
        other part of the body reaches the client (it may echo the key)."""
        error = body.get("error") if isinstance(body.get("error"), dict) else {}
        code, kind = self.plain_word(error.get("code")), self.plain_word(error.get("type"))
        message = self.upstream_message(error.get("message"), status)
        if status in (401, 403):
            return self.credentials_rejected(status)
        if code in POLICY_CODES or (status == 400 and kind == "image_generation_user_error"):
            return GatewayError(400, message, type=kind or "invalid_request_error", code=code or "content_policy_violation")
        if status == 429 and code == "insufficient_quota":
            log.error("provider %s reports its account is out of quota", self.config.name)
            return upstream_error(
                f"The provider '{self.config.name}' account has no quota left.", code="upstream_quota_exceeded", kind="quota", produced_nothing=True
            )
        if status == 429:
            retry = resp.headers.get("Retry-After")
            return UpstreamError(
                429, message, type=kind or "requests", code=code or "rate_limit_exceeded", kind="rate_limited", produced_nothing=True,
                headers={"Retry-After": retry} if retry and RETRY_AFTER.fullmatch(retry) else None,
            )
        if status in (400, 422):
            return GatewayError(400, message, type=kind or "invalid_request_error", code=code, param=request_param(error.get("param")))
        return self.upstream_error_for_status(status, error_body=bool(error))


def _numbers(usage: dict) -> dict:
    """Token counts only: usage goes to the client and to usage records, so no upstream text does."""
    kept = {}
    for name, value in usage.items():
        if isinstance(value, dict):
            kept[name] = _numbers(value)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            kept[name] = value
    return kept


def _is_json(resp) -> bool:
    return resp.content_type == "application/json"
