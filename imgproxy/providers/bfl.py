"""Black Forest Labs' FLUX API, an asynchronous one, behind a normal synchronous answer.

A generation is a job: POST /v1/{model} (header `x-key`) answers `{id, polling_url}`; the
polling URL is asked (GET) until its `status` is `Ready` (then `result.sample` is a signed
image URL, valid 10 minutes), `Request Moderated` / `Content Moderated`, or `Error`. All of it
runs within the attempt's time (UpstreamCall.timeout); the polling interval grows from
`options.poll_interval` to `options.max_poll_interval`. The polling and result URLs are
fetched only from the provider's hosts (base_url and image_hosts: `*.bfl.ai` by default).

Mapping: size → width/height (FLUX.1 [pro]/[dev], FLUX.2) or → aspect_ratio (1.1 [pro] ultra,
FLUX.1 Kontext; `auto`: none, so Kontext keeps the input image's ratio), output_format
jpeg/png passed; n → n jobs submitted in parallel (at most `options.max_parallel` at once)
and merged (Provider.fan_out). The image is always
downloaded, so the client gets it as b64_json or as a URL the gateway hosts.

Edits (FLUX.1 Kontext): the same job, its JSON body carrying the input images as base64
(`input_image`, then `input_image_2`...). That body is built in memory, once per request (all
n jobs send the same bytes), so the images together are bounded (MAX_INPUT_BYTES) and refused
with a 400 before any call.

Money: a submission BFL refused (401, 402, 413, 422, 429, a 5xx with an error body) produced
nothing. Once a job is accepted BFL runs and bills it, whatever happens next (a poll that
never says Ready, an Error status, a download that fails), so every later failure is
ambiguous (never retried by default) and the job is recorded as billed though undelivered
(`Outcome.undelivered_billed`). A moderated job is taken as not billed.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from dataclasses import replace
from math import gcd

from ..catalog import load_models
from ..egress import policy_for
from ..errors import GatewayError, UpstreamError, invalid_request, upstream_error
from ..messages import GeneratedImage, ImageRequest, ImagesResult
from ..plan import Plan
from ..routing import Target
from ..upstream import UpstreamCall
from .base import Provider, log
from .openai import RETRY_AFTER

DEFAULT_BASE_URL = "https://api.bfl.ai"
DEFAULT_IMAGE_HOSTS = ("*.bfl.ai",)  # regional API hosts (polling URLs) and the delivery CDN
MODERATED = ("Request Moderated", "Content Moderated")
CONTENT_TYPES = {"jpeg": "image/jpeg", "png": "image/png"}
MAX_IMAGE_BYTES = 64 * 1024 * 1024  # a 4 MP PNG is well below this
# Models that take an aspect ratio rather than width and height.
ASPECT_RATIO_MODELS = frozenset({"flux-pro-1.1-ultra", "flux-kontext-pro", "flux-kontext-max"})
# What a model makes when no output_format is sent (BFL's reference: Kontext png, the others jpeg).
DEFAULT_FORMATS = {"flux-kontext-pro": "png", "flux-kontext-max": "png"}
# The input images of one edit together, before base64 (which adds a third): BFL documents no
# limit for Kontext's JSON body, so a conservative one that keeps the body in memory small.
MAX_INPUT_BYTES = 20 * 1024 * 1024


class Accepted(Exception):
    """A job's failure after BFL accepted it: the job may run and be billed."""

    def __init__(self, error: GatewayError) -> None:
        super().__init__(error.message)
        self.error = error


class BflProvider(Provider):
    type = "bfl"
    models = load_models(__name__, "bfl.yaml")

    def __init__(self, config, upstream) -> None:
        if not config.base_url:  # the public API and its hosts; a base_url (a fake, a region) replaces both
            hosts = config.image_hosts or DEFAULT_IMAGE_HOSTS
            config = replace(config, base_url=DEFAULT_BASE_URL, image_hosts=hosts, egress=policy_for(DEFAULT_BASE_URL, hosts, None))
        super().__init__(config, upstream)
        options = config.options
        self.poll_interval = float(options.get("poll_interval", 0.5))
        self.max_poll_interval = float(options.get("max_poll_interval", 4.0))

    async def generate(self, request: ImageRequest, target: Target, plan: Plan, call: UpstreamCall) -> ImagesResult:
        key = self.require_key(request.model)
        body = self.build_body(request, target)
        return await self.run_jobs(request, target, call, key, body, json.dumps(body).encode())

    async def edit(self, request: ImageRequest, target: Target, plan: Plan, call: UpstreamCall) -> ImagesResult:
        images = request.form.images
        total = sum(image.size for image in images)
        # The core checked the images against edits.max_total_bytes; this bounds the body built
        # in memory whatever the capabilities say (an operator's override).
        if total > MAX_INPUT_BYTES:
            raise invalid_request(
                f"Invalid 'image': {request.model} takes input images of at most {MAX_INPUT_BYTES} bytes together "
                f"(they are sent as base64 in one JSON body), got {total}.", param="image", code="image_too_large",
            )
        key = self.require_key(request.model)
        body = self.build_body(request, target)
        payload = await asyncio.to_thread(_with_images, body, images)  # off the event loop: up to ~27 MB of JSON
        return await self.run_jobs(request, target, call, key, body, payload)

    async def run_jobs(self, request: ImageRequest, target: Target, call: UpstreamCall, key: str, body: dict, payload: bytes) -> ImagesResult:
        """n jobs of the same JSON `payload` (`body` without the input images), merged."""

        async def one(sub: ImageRequest, sub_call: UpstreamCall) -> ImagesResult:
            try:
                image = await self.run_job(
                    key, target.model.upstream_model, body, payload, time.monotonic() + sub_call.timeout, sub_call, inputs=request.form is not None
                )
            except Accepted as accepted:
                if accepted.error.code != "content_policy_violation":  # a moderated job is taken as not billed
                    call.outcome.undelivered_billed += 1  # accepted, so billed, but not delivered
                raise accepted.error from None
            except UpstreamError as error:
                # A submission cut or timed out after it was sent may have been accepted: billed at worst.
                call.outcome.undelivered_billed += not error.produced_nothing
                raise
            return ImagesResult(created=int(time.time()), images=[image])

        return await self.fan_out(request, target, call, one)  # one image per job (max_n_per_call: 1)

    def build_body(self, request: ImageRequest, target: Target) -> dict:
        width, _, height = request.size.partition("x")
        body = {"prompt": request.prompt}
        if request.size == "auto":
            pass  # the model's own choice (Kontext: the input image's aspect ratio)
        elif target.model.upstream_model in ASPECT_RATIO_MODELS:
            w, h = int(width), int(height)
            body["aspect_ratio"] = f"{w // gcd(w, h)}:{h // gcd(w, h)}"
        else:
            body["width"], body["height"] = int(width), int(height)
        if "output_format" in request.options:
            if request.options["output_format"] not in CONTENT_TYPES:
                raise invalid_request(
                    f"Invalid 'output_format': {request.model} makes jpeg or png images.", param="output_format", code="invalid_value"
                )
            body["output_format"] = request.options["output_format"]
        return body

    async def run_job(
        self, key: str, model: str, body: dict, payload: bytes, deadline: float, call: UpstreamCall, inputs: bool = False
    ) -> GeneratedImage:
        """One job: submit, poll, download. `inputs`: the payload holds input images (an edit)."""
        polling_url = await self.submit(key, model, payload, deadline, call)
        try:
            sample = await self.poll(key, polling_url, deadline, call, inputs)
            data, content_type = await self.upstream.fetch_image(
                call, self.config, sample, max_bytes=MAX_IMAGE_BYTES, timeout=self.left(deadline)
            )
        except GatewayError as error:
            if isinstance(error, UpstreamError):
                error.produced_nothing = False
            raise Accepted(error) from None
        content_type = CONTENT_TYPES.get(body.get("output_format") or DEFAULT_FORMATS.get(model, "jpeg"), content_type)
        return GeneratedImage(b64_json=base64.b64encode(data).decode(), content_type=content_type)

    async def submit(self, key: str, model: str, payload: bytes, deadline: float, call: UpstreamCall) -> str:
        url = f"{self.config.base_url}/v1/{model}"
        async with self.upstream.request(
            call, self.config, "POST", url, data=payload,
            headers={"x-key": key, "accept": "application/json", "content-type": "application/json"},
            timeout=self.left(deadline),
        ) as resp:
            answer = await self.upstream.read_json(resp, self.config) if _is_json(resp) else {}
        if resp.status != 200:
            raise self.map_submit_error(resp.status, answer, resp.headers.get("Retry-After"))
        polling_url = answer.get("polling_url")
        if not isinstance(answer.get("id"), str) or not isinstance(polling_url, str):
            # A 200 is an accepted job: without its polling URL it runs (and is billed) unseen.
            raise Accepted(upstream_error(f"The provider '{self.config.name}' accepted a job without saying where to find it."))
        return polling_url

    async def poll(self, key: str, polling_url: str, deadline: float, call: UpstreamCall, inputs: bool = False) -> str:
        """The result URL of a job once it is Ready; 504 when the attempt's time runs out first."""
        interval = self.poll_interval
        while True:
            left = deadline - time.monotonic()
            if left <= 0.01:
                raise upstream_error(
                    f"The provider '{self.config.name}' did not finish the image within {call.timeout:g} seconds.",
                    status=504, code="upstream_timeout", kind="timeout",
                )
            await asyncio.sleep(min(interval, left / 2))
            interval = min(interval * 1.5, self.max_poll_interval)
            async with self.upstream.request(
                call, self.config, "GET", polling_url, headers={"x-key": key, "accept": "application/json"}, timeout=self.left(deadline)
            ) as resp:
                answer = await self.upstream.read_json(resp, self.config) if _is_json(resp) else {}
            if resp.status in (401, 403):
                raise self.credentials_rejected(resp.status)
            if resp.status == 429 or resp.status >= 500:
                continue  # the job goes on whatever the poll's answer: ask again
            if resp.status != 200:
                raise self.upstream_error_for_status(resp.status)
            status = answer.get("status")
            if status == "Pending":
                continue
            if status == "Ready":
                result = answer.get("result")
                sample = result.get("sample") if isinstance(result, dict) else None
                if not isinstance(sample, str):
                    raise upstream_error(f"The provider '{self.config.name}' said the image is ready but gave no URL for it.")
                return sample
            if status in MODERATED:
                raise self.moderated(status, answer.get("details"), inputs)
            log.warning("provider %s: job ended with status %s", self.config.name, self.redact(status)[:40])
            raise upstream_error(f"The provider '{self.config.name}' failed to generate the image.", kind="5xx")

    def moderated(self, status: str, details, inputs: bool = False) -> GatewayError:
        """400 content_policy_violation naming BFL's moderation reasons (plain words only).
        `inputs`: the request had input images, which BFL's input moderation checks too."""
        reasons = []
        if isinstance(details, dict):
            for value in details.values():
                for reason in value if isinstance(value, list) else [value]:
                    if isinstance(reason, str) and reason.replace(" ", "").isalnum() and len(reason) <= 64:
                        reasons.append(self.redact(reason))
        request = status == "Request Moderated"
        said = ("the prompt or the input images" if inputs else "the prompt") if request else "the generated image"
        message = f"Your request was rejected by the provider's content moderation ({said})"
        message += f": {', '.join(dict.fromkeys(reasons))}." if reasons else "."
        return GatewayError(400, message, code="content_policy_violation", param="prompt" if request and not inputs else None)

    def map_submit_error(self, status: int, answer: dict, retry: str | None) -> GatewayError:
        """A submission BFL refused: it will not run, so nothing was produced or billed."""
        if status in (401, 403):
            return self.credentials_rejected(status)
        if status == 402:
            log.error("provider %s reports its account is out of credits", self.config.name)
            return upstream_error(
                f"The provider '{self.config.name}' account has no credits left.", code="upstream_quota_exceeded", kind="quota", produced_nothing=True
            )
        if status == 429:
            return UpstreamError(
                429, f"The provider '{self.config.name}' has too many jobs running; try again later.", type="requests",
                code="rate_limit_exceeded", kind="rate_limited", produced_nothing=True,
                headers={"Retry-After": retry} if retry and RETRY_AFTER.fullmatch(retry) else None,
            )
        if status == 413:  # the job's JSON (an edit's images) larger than BFL takes: refused, never run
            return GatewayError(400, f"The input images are larger than the provider '{self.config.name}' accepts.", param="image", code="image_too_large")
        if status in (400, 422):
            detail = answer.get("detail")
            first = detail[0] if isinstance(detail, list) and detail and isinstance(detail[0], dict) else {}
            return GatewayError(400, self.upstream_message(first.get("msg"), status), code="invalid_value")
        return self.upstream_error_for_status(status, error_body=bool(answer))

    def left(self, deadline: float) -> float:
        return max(deadline - time.monotonic(), 0.001)


def _is_json(resp) -> bool:
    return resp.content_type == "application/json"


def _with_images(body: dict, images) -> bytes:
    """The JSON body of an edit: `body` and the input images as base64, in the form's order
    (`input_image`, `input_image_2`, ...), encoded once for all of the request's jobs."""
    fields = {f"input_image_{i}" if i > 1 else "input_image": base64.b64encode(image.read()).decode() for i, image in enumerate(images, 1)}
    return json.dumps({**body, **fields}).encode()
