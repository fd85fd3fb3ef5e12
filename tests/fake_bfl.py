"""A fake Black Forest Labs API: submit a job, poll it until it is Ready, download the image.

It speaks the wire format of tests/specs/bfl.yaml (a copy of the shared spec): every
submission is validated against its endpoint's input schema, and no field outside it may be
sent; every answer the fake gives is validated against AsyncResponse / ResultResponse. It
records what it received and can misbehave on cue: `cues` for submissions, `poll_cues` for
polls, `pending` polls before Ready, `never_ready`, `polling_base` / `sample_base` (other hosts).
The input images of a Kontext edit are decoded (strict base64, a PNG or JPEG) and kept in
`inputs`, one list per submission.
"""

from __future__ import annotations

import base64
import binascii
import itertools

import yaml
from aiohttp import web
from jsonschema import Draft202012Validator

from tests.fakes import SPECS, Cue, FakeUpstream, tiny_png

BFL_SPEC = yaml.safe_load((SPECS / "bfl.yaml").read_text())
SCHEMAS = BFL_SPEC["components"]["schemas"]
_int = {"type": "integer"}
# The published spec has FLUX 1.1 [pro]'s inputs only; the other endpoints' inputs are
# ASSEMBLED from BFL's API reference pages (docs.bfl.ai), the fields imgproxy may send.
ASSEMBLED = {
    "flux-dev": {"type": "object", "properties": {
        "prompt": {"type": "string"}, "width": {**_int, "minimum": 256, "maximum": 1440, "multipleOf": 32},
        "height": {**_int, "minimum": 256, "maximum": 1440, "multipleOf": 32}, "output_format": {"enum": ["jpeg", "png"]},
        "seed": _int, "steps": _int, "guidance": {"type": "number"}, "safety_tolerance": _int, "prompt_upsampling": {"type": "boolean"},
    }, "required": ["prompt"]},
    "flux-pro-1.1-ultra": {"type": "object", "properties": {
        "prompt": {"type": "string"}, "aspect_ratio": {"type": "string", "pattern": "^[0-9]+:[0-9]+$"},
        "output_format": {"enum": ["jpeg", "png"]}, "seed": _int, "safety_tolerance": _int, "raw": {"type": "boolean"},
    }, "required": ["prompt"]},
    "flux-2-pro": {"type": "object", "properties": {
        "prompt": {"type": "string"}, "width": {**_int, "minimum": 64, "multipleOf": 16}, "height": {**_int, "minimum": 64, "multipleOf": 16},
        "output_format": {"enum": ["jpeg", "png"]}, "seed": _int, "safety_tolerance": _int,
    }, "required": ["prompt"]},
}
ASSEMBLED["flux-2-flex"] = ASSEMBLED["flux-2-max"] = ASSEMBLED["flux-2-pro"]
# FLUX.1 Kontext [pro] / [max], ASSEMBLED from BFL's API reference (docs.bfl.ai, "Edit or create
# an image with FLUX.1 Kontext", as of 2026-11-25): every body field the page shows.
_nullable_string = {"type": ["string", "null"]}
INPUT_IMAGES = ("input_image", "input_image_2", "input_image_3", "input_image_4")  # _2.._4: "Experimental Multiref"
ASSEMBLED["flux-kontext-pro"] = ASSEMBLED["flux-kontext-max"] = {"type": "object", "properties": {
    "prompt": {"type": "string"}, **{name: _nullable_string for name in INPUT_IMAGES}, "seed": {"type": ["integer", "null"]},
    "aspect_ratio": {"type": ["string", "null"], "pattern": "^[0-9]+:[0-9]+$"},  # "between 21:9 and 9:21"
    "output_format": {"enum": ["jpeg", "png", None]}, "webhook_url": {"type": ["string", "null"], "minLength": 1, "maxLength": 2083},
    "webhook_secret": _nullable_string, "prompt_upsampling": {"type": "boolean"},
    "safety_tolerance": {**_int, "minimum": 0, "maximum": 6},
}, "required": ["prompt"]}
DEFAULT_FORMATS = {"flux-kontext-pro": "png", "flux-kontext-max": "png"}  # the others: jpeg


def bfl_validator(name: str) -> Draft202012Validator:
    return Draft202012Validator({"$ref": f"#/components/schemas/{name}", "components": BFL_SPEC["components"]})


INPUTS = {"flux-pro-1.1": bfl_validator("FluxPro11Inputs")} | {name: Draft202012Validator(s) for name, s in ASSEMBLED.items()}
ASYNC_RESPONSE = bfl_validator("AsyncResponse")
RESULT_RESPONSE = bfl_validator("ResultResponse")
PROPERTIES = {"flux-pro-1.1": set(SCHEMAS["FluxPro11Inputs"]["properties"])} | {n: set(s["properties"]) for n, s in ASSEMBLED.items()}
# The PNG the fake delivers: 3x1, so a test can tell it from anything else.
BFL_PNG = tiny_png(3, 1, b"\x01\x02\x03")


class FakeBFL(FakeUpstream):
    def __init__(self) -> None:
        super().__init__()
        self.models: list[str] = []  # the endpoint of each submission
        self.polls: list[str] = []  # the job id of each poll
        self.downloads = 0
        self.poll_cues: list[Cue] = []
        self.pending = 2  # polls answered Pending before Ready
        self.never_ready = False
        self.polling_base = ""  # where polling URLs point (default: this fake)
        self.sample_base = ""  # where result URLs point (default: this fake)
        self.jobs: dict[str, dict] = {}
        self.inputs: list[list[bytes]] = []  # the decoded input images of each submission
        self._ids = itertools.count(1)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)  # a Kontext edit's JSON carries its images
        app.router.add_get("/v1/get_result", self.get_result)
        app.router.add_post("/v1/{model}", self.submit)
        app.router.add_get("/results/{name}", self.result_file)
        return app

    def authorized(self, request: web.Request) -> bool:
        return request.headers.get("x-key") == self.key

    def answer(self, body: dict, validator: Draft202012Validator) -> web.Response:
        errors = [e.message for e in validator.iter_errors(body)]
        assert errors == [], f"the fake's own answer is outside the spec: {errors}"
        return web.json_response(body)

    async def submit(self, request: web.Request) -> web.StreamResponse:
        if not self.authorized(request):
            return web.json_response({"detail": "Not authenticated"}, status=401)
        model = request.match_info["model"]
        if model not in INPUTS:
            return web.json_response({"detail": "Not Found"}, status=404)
        body = await self.record(request, INPUTS[model])
        self.models.append(model)
        self.invalid.extend(f"{model}: field {name!r} is not an input" for name in set(body) - PROPERTIES[model])
        self.inputs.append(self.decode_inputs(model, body))
        cued = await self.answer_cue(request)
        if cued is not None:
            return cued
        job = f"job-{next(self._ids)}"
        self.jobs[job] = {"prompt": body["prompt"], "polls": 0, "format": body.get("output_format") or DEFAULT_FORMATS.get(model, "jpeg")}
        base = self.polling_base or self.base_url
        return self.answer({"id": job, "polling_url": f"{base}/v1/get_result?id={job}"}, ASYNC_RESPONSE)

    def decode_inputs(self, model: str, body: dict) -> list[bytes]:
        """The input images, in order; a gap (input_image_3 without _2), bad base64 or bytes
        that are not an image are spec violations."""
        given = [name for name in INPUT_IMAGES if body.get(name) is not None]
        if given != list(INPUT_IMAGES[: len(given)]):
            self.invalid.append(f"{model}: input images {given} are not in order")
        images = []
        for name in given:
            try:
                data = base64.b64decode(body[name], validate=True)
            except (binascii.Error, ValueError, TypeError):
                self.invalid.append(f"{model}: {name} is not base64")
                continue
            if not data.startswith((b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff")):
                self.invalid.append(f"{model}: {name} is not a PNG or JPEG image")
            images.append(data)
        return images

    async def get_result(self, request: web.Request) -> web.StreamResponse:
        if not self.authorized(request):
            return web.json_response({"detail": "Not authenticated"}, status=401)
        job_id = request.query.get("id", "")
        self.polls.append(job_id)
        if self.poll_cues:
            cues, self.cues = self.cues, [self.poll_cues.pop(0)]
            try:
                return await self.answer_cue(request)
            finally:
                self.cues = cues
        job = self.jobs.get(job_id)
        if job is None:
            return self.answer({"id": job_id, "status": "Task not found"}, RESULT_RESPONSE)
        job["polls"] += 1
        prompt = job["prompt"]
        if self.never_ready or job["polls"] <= self.pending:
            return self.answer({"id": job_id, "status": "Pending", "progress": 0.5}, RESULT_RESPONSE)
        if "forbidden" in prompt:
            return self.answer({"id": job_id, "status": "Request Moderated", "details": {"Moderation Reasons": ["Derivative Works"]}}, RESULT_RESPONSE)
        if "explicit" in prompt:
            return self.answer({"id": job_id, "status": "Content Moderated", "details": {"Moderation Reasons": ["NSFW"]}}, RESULT_RESPONSE)
        if "crash" in prompt:
            return self.answer({"id": job_id, "status": "Error", "details": {"error": "internal"}}, RESULT_RESPONSE)
        base = self.sample_base or self.base_url
        sample = f"{base}/results/{job_id}.{job['format'].replace('jpeg', 'jpg')}?se=2026&sig=abc"
        return self.answer({"id": job_id, "status": "Ready", "result": {"sample": sample, "prompt": prompt, "seed": 42}}, RESULT_RESPONSE)

    async def result_file(self, request: web.Request) -> web.Response:
        self.downloads += 1
        content_type = "image/png" if request.match_info["name"].endswith(".png") else "image/jpeg"
        return web.Response(body=self.next_png() if self.distinct_images else BFL_PNG, content_type=content_type)
