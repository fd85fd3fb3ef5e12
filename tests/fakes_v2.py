"""Fakes for the stability_v2 and openai_compatible adapters: Stability's v2beta stable-image
endpoints (multipart in, base64 JSON or image bytes out), and an OpenAI-compatible host that
wants its key in another header. Every request is checked against the provider's spec."""

from __future__ import annotations

import json

from aiohttp import web

from tests.fakes import FAKE_B64, FAKE_PNG, STABILITY_SPEC, FakeOpenAI, FakeUpstream, stability_validator

V2_REQUESTS = {"ultra": "V2betaGenerateUltraRequest", "core": "V2betaGenerateCoreRequest", "sd3": "V2betaGenerateSD3Request"}
V2_ANSWER = stability_validator("V2betaImageJSON")
V2_ERROR = stability_validator("V2betaError")
ACCEPT = STABILITY_SPEC["paths"]["/v2beta/stable-image/generate/core"]["post"]["parameters"][2]["schema"]["enum"]


class FakeStabilityV2(FakeUpstream):
    """POST /v2beta/stable-image/generate/{ultra,core,sd3} as Stability answers it: one image
    per call. Prompt words on cue: `forbidden` (403 content_moderation), `celebrity` (422
    public_figure), `blurry` (the first call's image is CONTENT_FILTERED)."""

    def __init__(self) -> None:
        super().__init__()
        self.endpoints: list[str] = []
        self.in_flight = 0
        self.most_in_flight = 0
        self.blurred = False

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v2beta/stable-image/generate/{endpoint}", self.generate)
        return app

    def error(self, status: int, name: str, *messages: str) -> web.Response:
        body = {"id": "296a972f666a44a1a3dfc9c28a1f56c0", "name": name, "errors": list(messages)}
        assert list(V2_ERROR.iter_errors(body)) == []
        return web.json_response(body, status=status)

    async def generate(self, request: web.Request) -> web.StreamResponse:
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            return await self.answer(request)
        finally:
            self.in_flight -= 1

    async def answer(self, request: web.Request) -> web.StreamResponse:
        if not self.authorized(request):
            return self.error(401, "unauthorized", "authorization: invalid or missing API key")
        endpoint = request.match_info["endpoint"]
        if endpoint not in V2_REQUESTS:
            return self.error(404, "not_found", f"no endpoint {endpoint}")
        if not request.content_type.startswith("multipart/form-data"):
            self.invalid.append(f"content-type {request.content_type}, not multipart/form-data")
        accept = request.headers.get("Accept", "image/*")
        if accept not in ACCEPT:
            self.invalid.append(f"accept {accept!r} not in {ACCEPT}")
        form = {name: value for name, value in (await request.post()).items()}
        self.requests.append(form)
        self.headers.append(request.headers.copy())
        self.endpoints.append(endpoint)
        self.invalid.extend(e.message for e in stability_validator(V2_REQUESTS[endpoint]).iter_errors(form))
        cued = await self.answer_cue(request)
        if cued is not None:
            return cued
        prompt = form["prompt"]
        if "forbidden" in prompt:
            return self.error(403, "content_moderation", "Your request was flagged by our content moderation system (category: violence), as a result your request was denied and you were not charged.")
        if "celebrity" in prompt:
            return self.error(422, "public_figure", "Our system detected the likeness of a public figure in your prompt.")
        reason = "SUCCESS"
        if "blurry" in prompt and not self.blurred:
            self.blurred, reason = True, "CONTENT_FILTERED"
        fmt = form.get("output_format", "png")
        if accept == "application/json":
            body = {"image": FAKE_B64, "seed": 343940597, "finish_reason": reason}
            assert list(V2_ANSWER.iter_errors(body)) == []
            return web.Response(text=json.dumps(body), headers={"Content-Type": f"application/json; type=image/{fmt}"})
        return web.Response(body=FAKE_PNG, headers={"Content-Type": f"image/{fmt}", "finish-reason": reason, "seed": "343940597"})


class FakeCompatibleHost(FakeOpenAI):
    """An OpenAI-compatible host that takes its key bare in X-Api-Key (as some self-hosted
    servers do); the rest is FakeOpenAI's, failures on cue included."""

    def authorized(self, request: web.Request) -> bool:
        return request.headers.get("X-Api-Key") == self.key and "Authorization" not in request.headers
