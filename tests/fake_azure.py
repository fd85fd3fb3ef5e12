"""A fake Azure OpenAI resource: deployments' image generations as Azure answers them.

Requests to api-version 2024-10-21 are validated against Azure's published spec
(tests/specs/azure-openai-images.yaml, DALL-E 3 deployments); preview versions serve the GPT
image models, whose bodies are OpenAI's CreateImageRequest without `model` (Azure's preview
spec is not vendored here). Answers and errors carry Azure's content-filter annotations.
"""

from __future__ import annotations

import time

import yaml
from aiohttp import web
from jsonschema import Draft202012Validator

from tests.fakes import FAKE_B64, SPECS, FakeOpenAI, FakeUpstream, openai_validator

AZURE_SPEC = yaml.safe_load((SPECS / "azure-openai-images.yaml").read_text())
STABLE = "2024-10-21"
SAFE = {"filtered": False, "severity": "safe"}


def azure_validator(name: str) -> Draft202012Validator:
    return Draft202012Validator({"$ref": f"#/components/schemas/{name}", "components": AZURE_SPEC["components"]})


def filter_results(**blocked: str) -> dict:
    """Azure's per-category results: `blocked` maps a category to the severity that was filtered."""
    results = {c: ({"filtered": True, "severity": blocked[c]} if c in blocked else dict(SAFE)) for c in ("sexual", "violence", "hate", "self_harm")}
    return results


class FakeAzureOpenAI(FakeUpstream):
    """POST /openai/deployments/{deployment}/images/generations?api-version=..."""

    def __init__(self) -> None:
        super().__init__()
        # deployment name → the model it runs (what Azure's resource knows, not the request)
        self.deployments = {"my-dalle3": "dall-e-3", "team gpt/image": "gpt-image-1", "gpt2-deploy": "gpt-image-2"}
        self.paths: list[str] = []  # the raw path and query of each request
        self.stable = azure_validator("imageGenerationsRequest")
        self.preview = openai_validator("CreateImageRequest")
        self.answers = azure_validator("generateImagesResponse")
        self.uploads: list = []  # per edit: (field name, content type, bytes) of each file
        self.errors = azure_validator("dalleErrorResponse")

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/openai/deployments/{deployment}/images/generations", self.generations)
        app.router.add_post("/openai/deployments/{deployment}/images/edits", self.edits)
        app.router.add_get("/files/{name}", self.file)
        return app

    def authorized(self, request: web.Request) -> bool:
        return request.headers.get("api-key") == self.key or request.headers.get("Authorization") == f"Bearer {self.key}"

    def error(self, status: int, error: dict, headers: dict | None = None) -> web.Response:
        problems = [e.message for e in self.errors.iter_errors({"error": error})]
        assert problems == [], f"the fake's own error is outside Azure's spec: {problems}"
        return web.json_response({"error": error}, status=status, headers=headers)

    async def file(self, request: web.Request) -> web.Response:
        from tests.fakes import FAKE_PNG

        return web.Response(body=FAKE_PNG, content_type="image/png")

    async def edits(self, request: web.Request) -> web.StreamResponse:
        """GPT image deployments' edits (api-version 2025-04-01-preview and later): OpenAI's
        multipart form without `model`, the answer with Azure's filter annotations."""
        self.paths.append(request.raw_path)
        if not self.authorized(request):
            return self.error(401, {"code": "401", "message": "Access denied due to invalid subscription key or wrong API endpoint."})
        body = await FakeOpenAI.record_form(self, request, "CreateImageEditRequest")
        if "model" in body:
            self.invalid.append("Azure takes no 'model': the deployment decides")
        if not self.deployments.get(request.match_info["deployment"], "").startswith("gpt-image"):
            return self.error(404, {"code": "DeploymentNotFound", "message": "The API deployment for this resource does not exist."})
        cued = await self.answer_cue(request)
        if cued is not None:
            return cued
        item = {"b64_json": FAKE_B64, "content_filter_results": filter_results()}
        usage = {"total_tokens": 4500, "input_tokens": 340, "output_tokens": 4160, "input_tokens_details": {"text_tokens": 100, "image_tokens": 240}}
        return web.json_response({"created": int(time.time()), "data": [item] * (body.get("n") or 1), "usage": usage})

    async def generations(self, request: web.Request) -> web.StreamResponse:
        self.paths.append(request.raw_path)
        version = request.query.get("api-version")
        if not version:
            return self.error(404, {"code": "404", "message": "Resource not found"})
        if not self.authorized(request):
            return self.error(401, {"code": "401", "message": "Access denied due to invalid subscription key or wrong API endpoint."})
        deployment = request.match_info["deployment"]
        model = self.deployments.get(deployment)
        body = await self.record(request, self.stable if version == STABLE else self.preview)
        if "model" in body:
            self.invalid.append("Azure takes no 'model': the deployment decides")
        if "moderation" in body:
            self.invalid.append("Azure takes no 'moderation': content filters are set per deployment")
        if model is None:
            return self.error(404, {"code": "DeploymentNotFound", "message": "The API deployment for this resource does not exist."})
        cued = await self.answer_cue(request)
        if cued is not None:
            return cued
        prompt = body["prompt"]
        if "forbidden" in prompt:
            return self.error(400, {
                "code": "content_policy_violation",
                "message": "Your request was rejected as a result of our safety system.",
                "param": "prompt",
                "type": "invalid_request_error",
                "inner_error": {
                    "code": "ResponsibleAIPolicyViolation",
                    "content_filter_results": {**filter_results(violence="high", hate="medium"), "jailbreak": {"filtered": True, "detected": True}},
                },
            })
        gpt_image = model.startswith("gpt-image")
        if body.get("stream"):
            # GPT image deployments stream OpenAI's image_generation events.
            usage = {"total_tokens": 4260, "input_tokens": 100, "output_tokens": 4160, "input_tokens_details": {"text_tokens": 100, "image_tokens": 0}}
            return await FakeOpenAI.stream(self, request, body, usage)
        data = []
        for i in range(body.get("n") or 1):
            if "withheld" in prompt and i == 0:
                # The output filter withheld this image: no data, its filter results say why.
                data.append({"content_filter_results": filter_results(sexual="medium")})
                continue
            if gpt_image or body.get("response_format") == "b64_json":
                item = {"b64_json": FAKE_B64}
            else:
                item = {"url": f"{self.base_url}/files/generated_0{i}.png?se=2026-11-25T20%3A00%3A00Z&sig=abc"}
            if model == "dall-e-3":
                item["revised_prompt"] = "Revised: " + prompt
            item.update(content_filter_results=filter_results(), prompt_filter_results={**filter_results(), "jailbreak": {"filtered": False, "detected": False}})
            data.append(item)
        answer = {"created": int(time.time()), "data": data}
        problems = [e.message for e in self.answers.iter_errors(answer)]
        assert problems == [], f"the fake's own answer is outside Azure's spec: {problems}"
        if gpt_image:
            answer["usage"] = {"total_tokens": 4260, "input_tokens": 100, "output_tokens": 4160, "input_tokens_details": {"text_tokens": 100, "image_tokens": 0}}
        return web.json_response(answer)
