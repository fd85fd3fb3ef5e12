"""Fake OpenAI and Stability upstreams that speak the published wire formats, record what
they receive, and fail on cue. Every request body they get is validated against the spec."""

from __future__ import annotations

import asyncio
import base64
import json
import struct
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from aiohttp import web
from jsonschema import Draft202012Validator

SPECS = Path(__file__).parent / "specs"
OPENAI_SCHEMA = json.loads((SPECS / "openai-images.schema.json").read_text())
STABILITY_SPEC = yaml.safe_load((SPECS / "stability.yaml").read_text())
MODERATIONS_SPEC = yaml.safe_load((SPECS / "openai-moderations.yaml").read_text())
MODERATION_CATEGORIES = MODERATIONS_SPEC["components"]["schemas"]["CreateModerationResponse"]["properties"]["results"]["items"]["properties"]["categories"]["required"]


def openai_validator(name: str) -> Draft202012Validator:
    return Draft202012Validator({"$ref": f"#/$defs/{name}", "$defs": OPENAI_SCHEMA["$defs"]})


def stability_validator(name: str) -> Draft202012Validator:
    return Draft202012Validator({"$ref": f"#/components/schemas/{name}", "components": STABILITY_SPEC["components"]})


def moderations_validator(name: str) -> Draft202012Validator:
    return Draft202012Validator({"$ref": f"#/components/schemas/{name}", "components": MODERATIONS_SPEC["components"]})


def tiny_png(width: int = 2, height: int = 2, rgb: bytes = b"\x10\x80\xf0") -> bytes:
    """A valid PNG, made here so the fakes do not depend on the code under test."""
    raw = (b"\x00" + rgb * width) * height

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


FAKE_PNG = tiny_png()
FAKE_B64 = base64.b64encode(FAKE_PNG).decode()


@dataclass
class Cue:
    """How the fake answers the next request instead of normally."""

    status: int = 200
    body: object = None  # JSON-serialisable, or bytes sent as they are
    content_type: str = "application/json"
    delay: float = 0.0
    cut: bool = False  # promise a long body, send a little, drop the connection
    stall: bool = False  # promise a long body, send a little, then send nothing more for `delay`
    reset: bool = False  # read the request, then drop the connection without a word
    headers: dict = field(default_factory=dict)


class FakeUpstream:
    key = "sk-upstream-secret-0123456789"

    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        self.invalid: list[str] = []  # spec violations in what imgproxy sent
        self.cues: list[Cue] = []
        self.delay = 0.0
        self.base_url = ""
        # When set, a stream pauses after its first event until the test releases it.
        self.hold: asyncio.Event | None = None
        # When set, every image served is a different PNG (a fan-out test tells calls' images apart).
        self.distinct_images = False
        self.images_served = 0

    def next_png(self) -> bytes:
        if not self.distinct_images:
            return FAKE_PNG
        self.images_served += 1
        return tiny_png(rgb=self.images_served.to_bytes(3, "big"))

    def next_b64(self) -> str:
        return base64.b64encode(self.next_png()).decode() if self.distinct_images else FAKE_B64

    def cue(self, **kwargs) -> None:
        self.cues.append(Cue(**kwargs))

    def authorized(self, request: web.Request) -> bool:
        return request.headers.get("Authorization") == f"Bearer {self.key}"

    async def record(self, request: web.Request, validator: Draft202012Validator) -> dict:
        body = await request.json()
        self.requests.append(body)
        self.headers.append(request.headers.copy())
        self.invalid.extend(e.message for e in validator.iter_errors(body))
        return body

    async def answer_cue(self, request: web.Request) -> web.StreamResponse | None:
        if self.delay:
            await asyncio.sleep(self.delay)
        if not self.cues:
            return None
        cue = self.cues.pop(0)
        if not cue.stall:
            await asyncio.sleep(cue.delay)
        if cue.reset:
            request.transport.abort()
            return web.Response()  # never sent: the connection is gone
        if cue.cut:
            resp = web.StreamResponse(status=cue.status, headers={"Content-Type": cue.content_type})
            resp.content_length = 100_000
            await resp.prepare(request)
            await resp.write(b'{"created": 1, "data": [{"b64_json": "iVBOR')
            request.transport.close()
            return resp
        if cue.stall:
            resp = web.StreamResponse(status=cue.status, headers={"Content-Type": cue.content_type})
            resp.content_length = 100_000
            await resp.prepare(request)
            await resp.write(b'{"created": 1, "data": [{"b64_json": "iVBOR')
            await asyncio.sleep(cue.delay)
            return resp
        raw = cue.body if isinstance(cue.body, bytes) else json.dumps(cue.body).encode()
        return web.Response(status=cue.status, body=raw, content_type=cue.content_type, headers=cue.headers)


class FakeOpenAI(FakeUpstream):
    """POST /v1/images/generations as OpenAI answers it; image URLs served from /files/."""

    def __init__(self) -> None:
        super().__init__()
        self.validator = openai_validator("CreateImageRequest")
        self.image_b64 = FAKE_B64  # what b64_json carries; a test may make it large
        self.moderation_requests: list[dict] = []
        self.moderation_cues: list[Cue] = []
        # Per edit or variation: the files received, as (field name, content type, bytes).
        self.uploads: list[list[tuple[str, str, bytes]]] = []

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)  # uploads to edit, as OpenAI takes them
        app.router.add_post("/v1/images/generations", self.generations)
        app.router.add_post("/v1/images/edits", self.edits)
        app.router.add_post("/v1/images/variations", self.variations)
        app.router.add_post("/v1/moderations", self.moderations)
        app.router.add_get("/files/{name}", self.file)
        return app

    # Words in the input that this fake's moderation model flags, and as what.
    FLAGS = {"graphic": ["violence", "violence/graphic"], "minors": ["sexual", "sexual/minors"]}

    async def moderations(self, request: web.Request) -> web.StreamResponse:
        if not self.authorized(request):
            return web.json_response({"error": {"message": "Incorrect API key provided.", "type": "invalid_request_error", "param": None, "code": "invalid_api_key"}}, status=401)
        body = await request.json()
        self.moderation_requests.append(body)
        self.invalid.extend(e.message for e in moderations_validator("CreateModerationRequest").iter_errors(body))
        if self.moderation_cues:
            cues, self.cues = self.cues, [self.moderation_cues.pop(0)]
            try:
                return await self.answer_cue(request)
            finally:
                self.cues = cues
        flagged = {category for word, categories in self.FLAGS.items() if word in body["input"] for category in categories}
        answer = {
            "id": "modr-0123",
            "model": body.get("model", "omni-moderation-latest"),
            "results": [
                {
                    "flagged": bool(flagged),
                    "categories": {c: c in flagged for c in MODERATION_CATEGORIES},
                    "category_scores": {c: 0.9 if c in flagged else 0.001 for c in MODERATION_CATEGORIES},
                    "category_applied_input_types": {c: ["text"] for c in MODERATION_CATEGORIES},
                }
            ],
        }
        errors = [e.message for e in moderations_validator("CreateModerationResponse").iter_errors(answer)]
        assert errors == [], f"the fake's own moderation answer is outside the spec: {errors}"
        return web.json_response(answer)

    async def file(self, request: web.Request) -> web.Response:
        return web.Response(body=FAKE_PNG, content_type="image/png")

    async def generations(self, request: web.Request) -> web.StreamResponse:
        if not self.authorized(request):
            return self.wrong_key()
        body = await self.record(request, self.validator)
        return await self.images(request, body, "image_generation")

    async def edits(self, request: web.Request) -> web.StreamResponse:
        if not self.authorized(request):
            return self.wrong_key()
        body = await self.record_form(request, "CreateImageEditRequest")
        return await self.images(request, body, "image_edit")

    async def variations(self, request: web.Request) -> web.StreamResponse:
        if not self.authorized(request):
            return self.wrong_key()
        body = await self.record_form(request, "CreateImageVariationRequest")
        return await self.images(request, {"prompt": "", **body}, "image_generation")

    async def record_form(self, request: web.Request, schema: str) -> dict:
        """A multipart edit or variation as OpenAI reads it: text fields typed as the spec
        types them, files kept in `uploads`; the whole checked against the spec's schema."""
        if request.content_type != "multipart/form-data":
            self.invalid.append(f"{schema} sent as {request.content_type}")
            return {}
        body, files = {}, []
        async for part in await request.multipart():
            data = await part.read()
            if part.filename is not None:
                files.append((part.name, part.headers.get("Content-Type", ""), bytes(data)))
            elif part.name in body:
                self.invalid.append(f"{schema}: field {part.name} sent twice")
            else:
                body[part.name] = data.decode()
        for name in ("n", "output_compression", "partial_images"):
            if name in body and body[name].isdigit():
                body[name] = int(body[name])
        if "stream" in body:
            body["stream"] = body["stream"] == "true"
        images = [name for name, _, _ in files if name in ("image", "image[]")]
        if images:
            body["image"] = "<file>" if images == ["image"] else ["<file>"] * len(images)
            if len(images) > 1 and set(images) != {"image[]"}:
                self.invalid.append(f"{schema}: several images not all sent as image[]")
        if any(name == "mask" for name, _, _ in files):
            body["mask"] = "<file>"
        self.invalid.extend(e.message for e in openai_validator(schema).iter_errors(body))
        self.requests.append(body)
        self.headers.append(request.headers.copy())
        self.uploads.append(files)
        return body

    def wrong_key(self) -> web.Response:
        return web.json_response(
            {"error": {"message": "Incorrect API key provided: sk-up***789.", "type": "invalid_request_error", "param": None, "code": "invalid_api_key"}},
            status=401,
        )

    async def images(self, request: web.Request, body: dict, event: str) -> web.StreamResponse:
        cued = await self.answer_cue(request)
        if cued is not None:
            return cued
        model = body.get("model", "dall-e-2")
        gpt_image = model.startswith("gpt-image")
        if "forbidden" in body["prompt"]:
            code, kind = ("moderation_blocked", "image_generation_user_error") if gpt_image else ("content_policy_violation", "invalid_request_error")
            return web.json_response(
                {"error": {"message": "Your request was rejected as a result of our safety system.", "type": kind, "param": None, "code": code}},
                status=400,
            )
        usage = {"total_tokens": 100, "input_tokens": 50, "output_tokens": 50, "input_tokens_details": {"text_tokens": 10, "image_tokens": 40}}
        if body.get("stream"):
            return await self.stream(request, body, usage, event)
        data = []
        for i in range(body.get("n") or 1):
            item = {"b64_json": self.next_b64() if self.distinct_images else self.image_b64} if gpt_image or body.get("response_format") == "b64_json" else {"url": f"{self.base_url}/files/img-{i}.png?se=2026"}
            if model == "dall-e-3":
                item["revised_prompt"] = "Revised: " + body["prompt"]
            data.append(item)
        answer = {"created": int(time.time()), "data": data}
        if gpt_image:
            answer.update(usage=usage, background="opaque", output_format=body.get("output_format", "png"), size="1024x1024", quality="high")
        return web.json_response(answer)

    async def stream(self, request: web.Request, body: dict, usage: dict, event_prefix: str = "image_generation") -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        common = {"created_at": int(time.time()), "size": "1024x1024", "quality": "high", "background": "opaque", "output_format": "png"}
        for i in range(body.get("partial_images") or 0):
            event = {"type": f"{event_prefix}.partial_image", "b64_json": FAKE_B64, "partial_image_index": i, **common}
            await resp.write(f"event: {event_prefix}.partial_image\ndata: {json.dumps(event)}\n\n".encode())
            if self.hold is not None:
                await self.hold.wait()
        event = {"type": f"{event_prefix}.completed", "b64_json": FAKE_B64, "usage": usage, **common}
        await resp.write(f"event: {event_prefix}.completed\ndata: {json.dumps(event)}\n\n".encode())
        await resp.write_eof()
        return resp


class FakeStability(FakeUpstream):
    """POST /v1/generation/{engine_id}/text-to-image as Stability's v1 API answers it."""

    SDXL = {"1024x1024", "1152x896", "1216x832", "1344x768", "1536x640", "640x1536", "768x1344", "832x1216", "896x1152"}

    def __init__(self) -> None:
        super().__init__()
        self.validator = stability_validator("V1TextToImageRequestBody")
        self.engines: list[str] = []

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/generation/{engine_id}/text-to-image", self.text_to_image)
        return app

    def error(self, status: int, name: str, message: str) -> web.Response:
        # Stability's real error bodies are {id, name, message} (no `status`).
        return web.json_response({"id": "296a972f-666a-44a1-a3df-c9c28a1f56c0", "name": name, "message": message}, status=status)

    async def text_to_image(self, request: web.Request) -> web.StreamResponse:
        if not self.authorized(request):
            return self.error(401, "unauthorized", "missing authorization header")
        body = await self.record(request, self.validator)
        self.engines.append(request.match_info["engine_id"])
        cued = await self.answer_cue(request)
        if cued is not None:
            return cued
        if request.match_info["engine_id"] != "stable-diffusion-xl-1024-v1-0":
            return self.error(404, "not_found", f"The specified engine (ID {request.match_info['engine_id']}) was not found.")
        if f"{body.get('width')}x{body.get('height')}" not in self.SDXL:
            return self.error(400, "invalid_sdxl_v1_dimensions", "Incorrect dimensions specified for SDXL v0.9 or v1.0 engine.")
        if "forbidden" in body["text_prompts"][0]["text"]:
            return self.error(400, "invalid_prompts", "One or more of the prompts contains filtered words")
        artifacts = []
        for i in range(body.get("samples", 1)):
            reason = "CONTENT_FILTERED" if "blurry" in body["text_prompts"][0]["text"] and i == 0 else "SUCCESS"
            artifacts.append({"base64": FAKE_B64, "finishReason": reason, "seed": 1050625087 + i})
        return web.json_response({"artifacts": artifacts})
