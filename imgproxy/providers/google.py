"""Google's image models, translated to and from OpenAI's shape: Imagen (`predict` with
`instances`/`parameters`) and the Gemini image models (`generateContent` with image output),
on the Gemini API with an API key (`google_genai`) or on Vertex AI with a service account's
access token (`vertex_ai`).

Mapping: size → the nearest `aspectRatio` the model takes (the catalog lists each model's
exact output sizes, so any other size is refused by the core before we are called), plus
`sampleImageSize` (Imagen) or `imageConfig.imageSize` (Gemini) for the larger sizes; n →
`sampleCount` (Imagen; Gemini answers one image a call, so its models take n=1);
output_format png/jpeg and output_compression → `outputOptions` (Imagen); the enhanced prompt
Imagen returns → revised_prompt. Filtered images are left out and not billed; if none is left,
the request is refused as `content_policy_violation` with the reasons Google gave.

Edits (Gemini image models only): the same `generateContent` call with each input image as an
`inlineData` part (its real kind as `mimeType`, base64 `data`) after the prompt. Gemini takes
no mask, so a mask is refused, never dropped. The body holds every image in base64, so it is
built once per edit, off the event loop, within the request size Google documents, and the
same bytes are sent by every call of a fanned-out n.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import re
import time

from .. import limits
from ..catalog import load_models
from ..egress import policy_for
from ..errors import GatewayError, UpstreamError, upstream_error
from ..messages import GeneratedImage, ImageRequest, ImagesResult
from ..plan import Plan
from ..redaction import redact
from ..routing import Target
from ..upstream import UpstreamCall
from .base import Provider, log
from .google_auth import AccessTokens, not_configured

IMAGEN_RATIOS = ("1:1", "3:4", "4:3", "9:16", "16:9")
GEMINI_RATIOS = ("1:1", "2:3", "3:2", "3:4", "4:3", "4:5", "5:4", "9:16", "16:9", "21:9")
IMAGEN_MIME = {"png": "image/png", "jpeg": "image/jpeg"}
# Google's words for a prompt its Responsible AI filters refused (a 400 INVALID_ARGUMENT).
POLICY_WORDS = re.compile(r"Responsible AI|sensitive words|safety (?:filter|setting)|violate", re.IGNORECASE)
# Gemini finish or block reasons that mean a safety filter withheld the output.
SAFETY_REASONS = {"SAFETY", "IMAGE_SAFETY", "PROHIBITED_CONTENT", "IMAGE_PROHIBITED_CONTENT", "BLOCKLIST", "SPII", "RECITATION", "IMAGE_RECITATION"}
# ErrorInfo reasons that say the operator's key or project is at fault (Google answers a bad key with a 400).
KEY_REASONS = {"API_KEY_INVALID", "API_KEY_SERVICE_BLOCKED", "API_KEY_HTTP_REFERRER_BLOCKED", "SERVICE_DISABLED", "CONSUMER_INVALID"}
RETRY_SECONDS = re.compile(r"(\d{1,6})(?:\.\d+)?s")
RETRY_AFTER = re.compile(r"\d{1,9}|[A-Z][a-z]{2}, \d{2} [A-Z][a-z]{2} \d{4} \d{2}:\d{2}:\d{2} GMT")
# The input images' raw bytes together when a model's `edits` names no max_total_bytes: their
# base64 (4/3) and the longest prompt stay within the 20 MB Google documents for one request.
INLINE_IMAGES_MAX_BYTES = 14_000_000


def is_imagen(target: Target) -> bool:
    return "imagen" in (target.model.catalog or target.model.upstream_model)


def aspect(size: str, ratios: tuple[str, ...]) -> tuple[str, int]:
    """The ratio of `ratios` nearest to WIDTHxHEIGHT, and the longer side (for the 1K/2K/4K tier)."""
    width, _, height = size.partition("x")
    w, h = int(width), int(height)
    nearest = min(ratios, key=lambda r: abs(int(r.split(":")[0]) / int(r.split(":")[1]) - w / h))
    return nearest, max(w, h)


def tier(longest: int) -> str:
    return "1K" if longest <= 1600 else "2K" if longest <= 3200 else "4K"


class GoogleProvider(Provider):
    """What the Gemini API and Vertex AI share: the two wire formats and Google's errors."""

    models = load_models(__name__, "google.yaml")
    default_base_url = ""

    def __init__(self, config, upstream) -> None:
        if not config.base_url:  # base_url overrides Google's host (tests point it at fakes)
            base = self.default_base_url_for(config)
            config = dataclasses.replace(config, base_url=base, egress=policy_for(base, config.image_hosts, None))
        super().__init__(config, upstream)

    def default_base_url_for(self, config) -> str:
        return self.default_base_url

    async def generate(self, request: ImageRequest, target: Target, plan: Plan, call: UpstreamCall) -> ImagesResult:
        # Imagen makes up to 4 images a call (sampleCount), the Gemini models one: a larger n
        # is parallel calls, merged, their token counts summed (max_n_per_call in google.yaml).
        return await self.fan_out(request, target, call, lambda sub, sub_call: self.generate_once(sub, target, sub_call))

    async def edit(self, request: ImageRequest, target: Target, plan: Plan, call: UpstreamCall) -> ImagesResult:
        if is_imagen(target):
            # Imagen edits through other models (imagen-3.0-capability-001) with referenceImages
            # and edit modes: a different request, not this one with images added.
            raise GatewayError(
                400, f"The model '{request.model}' is an Imagen model; imgproxy edits with the Gemini image models only.",
                param="model", code="unsupported_operation",
            )
        self.check_edit(request, target)
        # The body is held until the last call ends: counted with the answers the process holds.
        limits.charge(4 * -(-sum(upload.size for upload in request.form.images) // 3) + len(request.prompt.encode()))
        body = await asyncio.to_thread(self.gemini_edit_body, request, target)
        return await self.fan_out(request, target, call, lambda sub, sub_call: self.generate_once(sub, target, sub_call, body))

    async def generate_once(self, request: ImageRequest, target: Target, call: UpstreamCall, edit_body: bytes | None = None) -> ImagesResult:
        imagen = is_imagen(target)
        if edit_body is not None:  # already JSON: the same bytes for every call
            payload = {"data": edit_body}
        else:
            payload = {"json": self.imagen_body(request, target) if imagen else self.gemini_body(request, target)}
        url = self.model_url(target.model.upstream_model, "predict" if imagen else "generateContent")
        headers = await self.auth_headers(request, call)
        sent = {**headers, "Content-Type": "application/json"} if edit_body is not None else headers
        async with self.upstream.request(call, self.config, "POST", url, headers=sent, **payload) as resp:
            answer = await self.upstream.read_json(resp, self.config) if resp.content_type == "application/json" else {}
        if resp.status != 200:
            raise self.map_error(resp.status, answer, resp, headers)
        if not answer and resp.content_type != "application/json":
            raise upstream_error(f"The provider '{self.config.name}' returned an answer that is not JSON.")
        return self.parse_imagen(answer) if imagen else self.parse_gemini(answer, request)

    # Subclasses: where a model is and how to authenticate.
    def model_url(self, model: str, method: str) -> str:
        raise NotImplementedError

    async def auth_headers(self, request: ImageRequest, call: UpstreamCall) -> dict:
        raise NotImplementedError

    def rejected(self, headers: dict) -> None:
        """The provider answered 401 for these credentials."""

    # Imagen: predict.
    def imagen_body(self, request: ImageRequest, target: Target) -> dict:
        ratio, longest = aspect(request.size, IMAGEN_RATIOS)
        parameters = {"sampleCount": request.n, "aspectRatio": ratio, "includeRaiReason": True}
        if tier(longest) != "1K":
            parameters["sampleImageSize"] = tier(longest)
        output_format = request.options.get("output_format")
        if output_format is not None:
            if output_format not in IMAGEN_MIME:
                raise GatewayError(
                    400, f"The model '{request.model}' returns png or jpeg, not {output_format}.", param="output_format", code="invalid_value"
                )
            parameters["outputOptions"] = {"mimeType": IMAGEN_MIME[output_format]}
        compression = request.options.get("output_compression")
        if compression is not None:
            if output_format != "jpeg":
                raise GatewayError(400, "output_compression applies only to output_format jpeg.", param="output_compression", code="invalid_value")
            parameters["outputOptions"]["compressionQuality"] = compression
        return {"instances": [{"prompt": request.prompt}], "parameters": parameters}

    def parse_imagen(self, body: dict) -> ImagesResult:
        predictions = body.get("predictions", [])
        if not isinstance(predictions, list) or not all(isinstance(p, dict) for p in predictions):
            raise upstream_error(f"The provider '{self.config.name}' returned predictions that are not a list of objects.")
        images, reasons = [], []
        for prediction in predictions:
            data = prediction.get("bytesBase64Encoded")
            if isinstance(data, str) and data:
                mime = prediction.get("mimeType")
                revised = prediction.get("prompt")
                images.append(GeneratedImage(
                    b64_json=data,
                    content_type=mime if mime in IMAGEN_MIME.values() else "image/png",
                    revised_prompt=self.redact(revised) if isinstance(revised, str) and revised else None,
                ))
            else:
                reasons.append(self.filter_reason(prediction))
        if not images:
            # Google leaves filtered images out (or, with includeRaiReason, sends only the reason).
            raise self.content_policy(reasons or ["every image was filtered"])
        if reasons:
            log.info("provider %s withheld %d filtered images", self.config.name, len(reasons))
        return ImagesResult(created=int(time.time()), images=images, filtered=len(reasons))

    def filter_reason(self, prediction: dict) -> str:
        reason = prediction.get("raiFilteredReason")
        categories = (prediction.get("safetyAttributes") or {}).get("categories") if isinstance(prediction.get("safetyAttributes"), dict) else None
        words = [self.redact(reason)] if isinstance(reason, str) and reason.strip() else []
        if isinstance(categories, list):
            words += [c for c in (self.plain_category(c) for c in categories) if c]
        return "; ".join(words) or "filtered"

    def plain_category(self, value) -> str | None:
        return value if isinstance(value, str) and re.fullmatch(r"[A-Za-z0-9 _/&-]{1,64}", value) and self.redact(value) == value else None

    # Gemini image models: generateContent.
    def gemini_body(self, request: ImageRequest, target: Target) -> dict:
        ratio, longest = aspect(request.size, GEMINI_RATIOS)
        image_config = {"aspectRatio": ratio}
        if tier(longest) != "1K":
            image_config["imageSize"] = tier(longest)
        return {
            "contents": [{"role": "user", "parts": [{"text": request.prompt}]}],
            "generationConfig": {"responseModalities": ["IMAGE"], "candidateCount": 1, "imageConfig": image_config},
        }

    def check_edit(self, request: ImageRequest, target: Target) -> None:
        """Before anything is read or sent: no mask (even where the capabilities were widened to
        allow one), and the images within one request's size."""
        form = request.form
        if form.mask is not None:
            raise GatewayError(
                400, f"'mask' is not supported by {request.model}: Gemini takes no mask; say in the prompt what to change.",
                param="mask", code="unsupported_parameter",
            )
        limits = target.model.capabilities.edits
        most = (limits.max_total_bytes if limits is not None else None) or INLINE_IMAGES_MAX_BYTES
        total = sum(upload.size for upload in form.images)
        if total > most:
            raise GatewayError(
                400, f"Invalid 'image': {request.model} takes input images of at most {most} bytes together "
                f"(they travel base64-encoded in one request), got {total}.", param="image", code="image_too_large",
            )

    def gemini_edit_body(self, request: ImageRequest, target: Target) -> bytes:
        """The generateContent body of an edit, as JSON bytes: the prompt, then each input image
        inline (runs in a worker thread: it reads spooled files and encodes megabytes)."""
        body = self.gemini_body(request, target)
        parts = body["contents"][0]["parts"]
        for upload in request.form.images:
            parts.append({"inlineData": {"mimeType": upload.content_type, "data": base64.b64encode(upload.read()).decode("ascii")}})
        return json.dumps(body).encode()

    def parse_gemini(self, body: dict, request: ImageRequest) -> ImagesResult:
        feedback = body.get("promptFeedback")
        if isinstance(feedback, dict) and feedback.get("blockReason"):
            raise self.content_policy([self.plain_category(feedback.get("blockReason")) or "blocked", *self.ratings(feedback)])
        candidates = body.get("candidates")
        if not isinstance(candidates, list) or not all(isinstance(c, dict) for c in candidates):
            raise upstream_error(f"The provider '{self.config.name}' returned no candidates.")
        images, reasons = [], []
        for candidate in candidates:
            content = candidate.get("content") if isinstance(candidate.get("content"), dict) else {}
            parts = content.get("parts") if isinstance(content.get("parts"), list) else []
            found = False
            for part in parts:
                inline = part.get("inlineData") if isinstance(part, dict) else None
                if isinstance(inline, dict) and isinstance(inline.get("data"), str) and inline["data"]:
                    mime = inline.get("mimeType")
                    images.append(GeneratedImage(b64_json=inline["data"], content_type=mime if mime in IMAGEN_MIME.values() else "image/png"))
                    found = True
            if not found and candidate.get("finishReason") in SAFETY_REASONS:
                reasons.append(", ".join([candidate["finishReason"], *self.ratings(candidate)]))
        if not images and reasons:
            raise self.content_policy(reasons)
        if not images:
            raise upstream_error(f"The provider '{self.config.name}' generated no image.")
        images = images[: request.n]
        return ImagesResult(created=int(time.time()), images=images, usage=self.gemini_usage(body.get("usageMetadata"), images), filtered=len(reasons))

    def ratings(self, holder: dict) -> list[str]:
        """The categories a safety rating marks as blocked or likely, for the refusal's message."""
        ratings = holder.get("safetyRatings")
        if not isinstance(ratings, list):
            return []
        found = []
        for rating in ratings:
            if isinstance(rating, dict) and (rating.get("blocked") or rating.get("probability") in ("MEDIUM", "HIGH")):
                category = self.plain_category(rating.get("category"))
                if category:
                    found.append(category)
        return found

    def gemini_usage(self, metadata, images: list) -> dict | None:
        """Google's token counts in OpenAI's usage shape, for the token price: the prompt's
        tokens as input (an edit's input images as image tokens), the image-output tokens as
        output. None if they are not counts."""
        if not isinstance(metadata, dict):
            return None
        prompt = metadata.get("promptTokenCount")
        image_tokens = self.image_token_count(metadata.get("candidatesTokensDetails"))
        if type(prompt) is not int or prompt < 0 or image_tokens is None:
            return None
        # An edit's input images are part of the prompt's count; promptTokensDetails says how
        # much (without it, or if it claims more than the whole, all of it counts as text).
        image_input = self.image_token_count(metadata.get("promptTokensDetails")) or 0
        if image_input > prompt:
            image_input = 0
        return {
            "input_tokens": prompt,
            "output_tokens": image_tokens,
            "total_tokens": prompt + image_tokens,
            "input_tokens_details": {"text_tokens": prompt - image_input, "image_tokens": image_input},
        }

    def image_token_count(self, details) -> int | None:
        """The IMAGE modality's tokens of a list of ModalityTokenCount, or None if none are counts."""
        if not isinstance(details, list):
            return None
        counts = [d.get("tokenCount") for d in details if isinstance(d, dict) and d.get("modality") == "IMAGE"]
        if counts and all(type(c) is int and c >= 0 for c in counts):
            return sum(counts)
        return None

    def content_policy(self, reasons: list[str]) -> GatewayError:
        shown = "; ".join(dict.fromkeys(r for r in reasons if r))[:1000]
        return GatewayError(
            400, f"Your request was rejected by the provider's safety filters: {shown}.", code="content_policy_violation", param="prompt"
        )

    # Google's errors: the google.rpc.Status envelope.
    def map_error(self, status: int, body: dict, resp, headers: dict) -> GatewayError:
        """Our error rebuilt from the status, the envelope's `status` word and a redacted
        `message`; nothing else of the body reaches the client."""
        error = body.get("error") if isinstance(body.get("error"), dict) else {}
        word = self.plain_word(error.get("status").lower()) if isinstance(error.get("status"), str) else None
        message = self.upstream_message(error.get("message"), status)
        reasons = {d.get("reason") for d in error.get("details") or () if isinstance(d, dict)} if isinstance(error.get("details"), list) else set()
        if status == 401 or (status == 403 and word == "permission_denied") or reasons & KEY_REASONS:
            self.rejected(headers)
            return self.credentials_rejected(status)
        if status == 400 and POLICY_WORDS.search(message):
            return GatewayError(400, message, code="content_policy_violation", param="prompt")
        if status == 400:
            return GatewayError(400, message, code=word or "invalid_argument")
        if status == 429:
            retry = self.retry_after(resp, error)
            return UpstreamError(
                429, message, type="requests", code="rate_limit_exceeded", kind="rate_limited", produced_nothing=True,
                headers={"Retry-After": retry} if retry else None,
            )
        return self.upstream_error_for_status(status, error_body=bool(error))

    def retry_after(self, resp, error: dict) -> str | None:
        """Retry-After as Google gave it: the header, else the RetryInfo detail's retryDelay."""
        header = resp.headers.get("Retry-After")
        if header and RETRY_AFTER.fullmatch(header):
            return header
        for detail in error.get("details") or ():
            delay = detail.get("retryDelay") if isinstance(detail, dict) else None
            match = RETRY_SECONDS.fullmatch(delay) if isinstance(delay, str) else None
            if match:
                return str(int(match[1]) + (1 if "." in delay else 0))
        return None


class GoogleGenAIProvider(GoogleProvider):
    """The Gemini API (generativelanguage.googleapis.com) with an API key."""

    type = "google_genai"
    default_base_url = "https://generativelanguage.googleapis.com"

    def model_url(self, model: str, method: str) -> str:
        return f"{self.config.base_url}/v1beta/models/{model}:{method}"

    async def auth_headers(self, request: ImageRequest, call: UpstreamCall) -> dict:
        return {"x-goog-api-key": self.require_key(request.model)}


class VertexAIProvider(GoogleProvider):
    """Vertex AI with a service account's OAuth access token (options: project, location,
    credentials_file, token_refresh_margin)."""

    type = "vertex_ai"
    needs_key = False

    def __init__(self, config, upstream) -> None:
        super().__init__(config, upstream)
        options = self.config.options
        self.project = str(options.get("project") or "")
        self.location = str(options.get("location") or "us-central1")
        self.tokens = AccessTokens(
            self.config, upstream, str(options.get("credentials_file") or ""), float(options.get("token_refresh_margin", 300))
        )

    def default_base_url_for(self, config) -> str:
        location = str(config.options.get("location") or "us-central1")
        return "https://aiplatform.googleapis.com" if location == "global" else f"https://{location}-aiplatform.googleapis.com"

    def model_url(self, model: str, method: str) -> str:
        return f"{self.config.base_url}/v1/projects/{self.project}/locations/{self.location}/publishers/google/models/{model}:{method}"

    async def auth_headers(self, request: ImageRequest, call: UpstreamCall) -> dict:
        if not self.project or not self.tokens.credentials_file:
            missing = "options.project" if not self.project else "options.credentials_file (GOOGLE_APPLICATION_CREDENTIALS)"
            raise not_configured(self.config.name, f"{missing} is not set")
        token = await self.tokens.get(call)
        return {"Authorization": f"Bearer {token}", "x-goog-user-project": self.project}

    def rejected(self, headers: dict) -> None:
        self.tokens.forget(headers.get("Authorization", "").removeprefix("Bearer "))

    def redact(self, text) -> str:
        return redact(str(text), tuple(s for s in (self.config.api_key, self.tokens.token) if s))
