"""Stability AI's v1 text-to-image API (SDXL 1.0), translated to and from OpenAI's shape.

Mapping: size → width/height (SDXL takes nine fixed sizes, enforced by the catalog),
n → samples, quality standard/hd → 30/50 diffusion steps, style vivid/natural → the
`enhance`/`photographic` style presets (no preset when style is not given). Artifacts whose
finishReason is CONTENT_FILTERED or ERROR are left out; if none is left, the request fails.
"""

from __future__ import annotations

import time

from ..catalog import load_models
from ..errors import GatewayError, UpstreamError, upstream_error
from ..messages import GeneratedImage, ImageRequest, ImagesResult
from ..plan import Plan
from ..routing import Target
from ..upstream import UpstreamCall
from .base import Provider, log
from .openai import RETRY_AFTER

STEPS = {"standard": 30, "hd": 50}
STYLE_PRESETS = {"vivid": "enhance", "natural": "photographic"}


class StabilityProvider(Provider):
    type = "stability"
    models = load_models(__name__, "stability.yaml")

    async def generate(self, request: ImageRequest, target: Target, plan: Plan, call: UpstreamCall) -> ImagesResult:
        # samples takes up to 10, the catalog's max_n: fanned out only if a config lowers max_n_per_call.
        return await self.fan_out(request, target, call, lambda sub, sub_call: self.generate_once(sub, target, sub_call))

    async def generate_once(self, request: ImageRequest, target: Target, call: UpstreamCall) -> ImagesResult:
        key = self.require_key(request.model)
        engine = target.model.upstream_model
        url = f"{self.config.base_url}/v1/generation/{engine}/text-to-image"
        async with self.upstream.request(
            call,
            self.config,
            "POST",
            url,
            json=self.build_body(request),
            headers={"Authorization": f"Bearer {key}", "Accept": "application/json"},
        ) as resp:
            body = await self.upstream.read_json(resp, self.config) if resp.content_type == "application/json" else {}
        if resp.status != 200:
            raise self.map_error(resp.status, body, resp.headers.get("Retry-After"))
        if not body:
            raise upstream_error(f"The provider '{self.config.name}' returned an answer that is not JSON.")
        return self.parse(body)

    def build_body(self, request: ImageRequest) -> dict:
        width, _, height = request.size.partition("x")
        body = {
            "text_prompts": [{"text": request.prompt, "weight": 1}],
            "width": int(width),
            "height": int(height),
            "samples": request.n,
            "steps": STEPS.get(request.quality or "standard", 30),
        }
        if request.style in STYLE_PRESETS:
            body["style_preset"] = STYLE_PRESETS[request.style]
        return body

    def parse(self, body: dict) -> ImagesResult:
        artifacts = body.get("artifacts")
        if not isinstance(artifacts, list) or not all(isinstance(a, dict) for a in artifacts):
            raise upstream_error(f"The provider '{self.config.name}' returned no artifacts.")
        images, filtered, failed = [], 0, 0
        for artifact in artifacts:
            reason = artifact.get("finishReason")
            if reason == "CONTENT_FILTERED":
                filtered += 1
            elif reason == "SUCCESS" and isinstance(artifact.get("base64"), str):
                images.append(GeneratedImage(b64_json=artifact["base64"], content_type="image/png"))
            else:
                failed += 1
        if not images and filtered:
            raise GatewayError(
                400,
                "Your request was rejected by the provider's content filter.",
                code="content_policy_violation",
            )
        if not images:
            raise upstream_error(f"The provider '{self.config.name}' generated no usable image.")
        if filtered or failed:
            log.info("provider %s withheld %d filtered and %d failed artifacts", self.config.name, filtered, failed)
        return ImagesResult(created=int(time.time()), images=images, filtered=filtered)

    def map_error(self, status: int, body: dict, retry_after: str | None = None) -> GatewayError:
        """Our error rebuilt from the status, `name` and a redacted `message`; nothing else."""
        name = self.plain_word(body.get("name"))
        message = self.upstream_message(body.get("message"), status)
        if status in (401, 403):
            return self.credentials_rejected(status)
        if status == 400 and name == "invalid_prompts":
            return GatewayError(400, message, code="content_policy_violation", param="prompt")
        if status == 400:
            return GatewayError(400, message, code=name)
        if status == 429:
            # The provider's Retry-After, when well-formed, tells the client when to come back.
            headers = {"Retry-After": retry_after} if retry_after and RETRY_AFTER.fullmatch(retry_after) else None
            return UpstreamError(429, message, type="requests", code="rate_limit_exceeded", kind="rate_limited", produced_nothing=True, headers=headers)
        return self.upstream_error_for_status(status, error_body=name is not None or bool(body.get("message")))
