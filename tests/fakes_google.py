"""A fake Google upstream: the Gemini API (x-goog-api-key) and Vertex AI (Bearer access token)
with Imagen `predict` and Gemini `generateContent`, and an OAuth token endpoint that checks the
service account's signed JWT (RFC 7523) and issues access tokens that expire. Every request
body is validated against the specs in tests/specs/; failures come on cue (see FakeUpstream)."""

from __future__ import annotations

import base64
import binascii
import json
import time
from pathlib import Path

import yaml
from aiohttp import web
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from jsonschema import Draft202012Validator

from tests.fakes import FakeUpstream

SPECS = Path(__file__).parent / "specs"
IMAGEN_SPEC = yaml.safe_load((SPECS / "google-imagen.yaml").read_text())
GENERATE_SPEC = yaml.safe_load((SPECS / "google-gemini-generate-content.yaml").read_text())


def _validator(spec: dict, name: str) -> Draft202012Validator:
    return Draft202012Validator({"$ref": f"#/components/schemas/{name}", "components": spec["components"]})


# The test service account. Its private key and every access token the fake issues are secrets
# the session scan (tests/conftest.py) looks for in every log line and response.
PRIVATE_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
PRIVATE_KEY_PEM = PRIVATE_KEY.private_bytes(
    serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
).decode()
# A line from the middle of the PEM: any copy of the key, or a large enough piece of it, has it.
PRIVATE_KEY_LINE = PRIVATE_KEY_PEM.splitlines()[10]
ACCESS_TOKEN_PREFIX = "ya29.c.fake-secret-access-token-"
SECRETS = {"GOOGLE_PRIVATE_KEY": PRIVATE_KEY_LINE, "GOOGLE_ACCESS_TOKEN": ACCESS_TOKEN_PREFIX}
CLIENT_EMAIL = "imgproxy@test-project.iam.gserviceaccount.com"
POLICY_MESSAGE = (
    "Image generation failed with the following error: The prompt could not be submitted. This prompt contains "
    "sensitive words that violate Google's Responsible AI practices. Try rephrasing the prompt. Support codes: 42876398"
)
# What Google answers a larger request with (the Gemini API documents 20 MB for one request).
MAX_REQUEST_BYTES = 20 * 1024 * 1024
RAI_REASON = "Your current safety filter threshold filtered out 1 generated images. You will not be charged for blocked images. Support codes: 56562880"


def service_account_file(path: Path, token_uri: str) -> Path:
    path.write_text(json.dumps({
        "type": "service_account",
        "project_id": "test-project",
        "private_key_id": "0123456789abcdef",
        "private_key": PRIVATE_KEY_PEM,
        "client_email": CLIENT_EMAIL,
        "token_uri": token_uri,
    }))
    return path


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class FakeGoogle(FakeUpstream):
    def __init__(self) -> None:
        super().__init__()
        self.token_lifetime = 3600  # expires_in of the tokens issued
        self.tokens: dict[str, float] = {}  # token -> when it expires (time.time())
        self.token_requests: list[dict] = []  # the verified JWT claims, with the time they came
        self.token_cues: list = []
        self.paths: list[str] = []
        self.predict_request = _validator(IMAGEN_SPEC, "VertexImagenPredictRequest")
        self.gemini_predict_request = _validator(IMAGEN_SPEC, "GeminiImagenPredictRequest")
        self.predict_response = _validator(IMAGEN_SPEC, "ImagenPredictResponse")
        self.generate_request = _validator(GENERATE_SPEC, "GenerateContentRequest")
        self.generate_response = _validator(GENERATE_SPEC, "GenerateContentResponse")
        self.error_response = _validator(IMAGEN_SPEC, "GoogleError")
        self.image_tokens = 1290
        self.input_image_tokens = 560  # per input image of an edit (Gemini 3 Pro Image's count)
        # Per generateContent request: the input images as (mimeType, decoded bytes).
        self.inline_images: list[list[tuple[str, bytes]]] = []

    def app(self) -> web.Application:
        # Google's own bound on a request (above it: 400, checked in serve); edits carry images.
        app = web.Application(client_max_size=2 * MAX_REQUEST_BYTES)
        app.router.add_post("/v1beta/models/{call}", self.gemini_api)
        app.router.add_post("/v1/projects/{project}/locations/{location}/publishers/google/models/{call}", self.vertex)
        app.router.add_post("/token", self.token)
        return app

    def error(self, code: int, status: str, message: str, details=None) -> web.Response:
        body = {"error": {"code": code, "message": message, "status": status, **({"details": details} if details else {})}}
        assert list(self.error_response.iter_errors(body)) == []
        return web.json_response(body, status=code)

    # The OAuth token endpoint.
    async def token(self, request: web.Request) -> web.StreamResponse:
        form = await request.post()
        if self.token_cues:
            cues, self.cues = self.cues, [self.token_cues.pop(0)]
            try:
                return await self.answer_cue(request)
            finally:
                self.cues = cues
        if form.get("grant_type") != "urn:ietf:params:oauth:grant-type:jwt-bearer":
            return web.json_response({"error": "unsupported_grant_type"}, status=400)
        try:
            header_b64, claims_b64, signature_b64 = str(form["assertion"]).split(".")
            PRIVATE_KEY.public_key().verify(
                _unb64(signature_b64), f"{header_b64}.{claims_b64}".encode(), padding.PKCS1v15(), hashes.SHA256()
            )
            header, claims = json.loads(_unb64(header_b64)), json.loads(_unb64(claims_b64))
        except Exception:  # noqa: BLE001 (any broken assertion is an invalid grant)
            return web.json_response({"error": "invalid_grant", "error_description": "Invalid JWT Signature."}, status=400)
        now = time.time()
        if (
            header.get("alg") != "RS256" or claims.get("iss") != CLIENT_EMAIL or claims.get("aud") != str(request.url)
            or not claims.get("iat", 0) - 60 <= now <= claims.get("exp", 0) or "cloud-platform" not in claims.get("scope", "")
        ):
            return web.json_response({"error": "invalid_grant", "error_description": "Invalid JWT claims."}, status=400)
        self.token_requests.append({**claims, "received": now})
        token = f"{ACCESS_TOKEN_PREFIX}{len(self.token_requests)}"
        self.tokens[token] = now + self.token_lifetime
        return web.json_response({"access_token": token, "expires_in": self.token_lifetime, "token_type": "Bearer"})

    def revoke(self) -> None:
        self.tokens.clear()

    # The image endpoints.
    async def gemini_api(self, request: web.Request) -> web.StreamResponse:
        if request.headers.get("x-goog-api-key") != self.key:
            # What Google answers for a bad key: a 400, its reason in an ErrorInfo detail.
            info = {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID", "domain": "googleapis.com"}
            return self.error(400, "INVALID_ARGUMENT", "API key not valid. Please pass a valid API key.", [info])
        return await self.serve(request, vertex=False)

    async def vertex(self, request: web.Request) -> web.StreamResponse:
        token = request.headers.get("Authorization", "").removeprefix("Bearer ")
        if self.tokens.get(token, 0) <= time.time():
            return self.error(401, "UNAUTHENTICATED", "Request had invalid authentication credentials. Expected OAuth 2 access token.")
        if request.headers.get("x-goog-user-project") != request.match_info["project"]:
            return self.error(403, "PERMISSION_DENIED", "Quota project mismatch.")
        return await self.serve(request, vertex=True)

    async def serve(self, request: web.Request, vertex: bool) -> web.StreamResponse:
        model, _, method = request.match_info["call"].partition(":")
        self.paths.append(request.path)
        if request.content_length is None or request.content_length > MAX_REQUEST_BYTES:
            self.invalid.append(f"a request body of {request.content_length} bytes")
            return self.error(400, "INVALID_ARGUMENT", f"Request payload size exceeds the limit: {MAX_REQUEST_BYTES} bytes.")
        if method == "predict":
            body = await self.record(request, self.predict_request if vertex else self.gemini_predict_request)
        elif method == "generateContent":
            body = await self.record(request, self.generate_request)
            self.inline_images.append(self.inline_parts(body["contents"][0]["parts"]))
        else:
            return self.error(404, "NOT_FOUND", "Method not found.")
        cued = await self.answer_cue(request)
        if cued is not None:
            return cued
        if not model.startswith(("imagen-", "gemini-")):
            return self.error(404, "NOT_FOUND", f"Publisher Model `{model}` not found.")
        answer = self.predict(body) if method == "predict" else self.generate(body)
        if isinstance(answer, web.Response):
            return answer
        schema = self.predict_response if method == "predict" else self.generate_response
        errors = [e.message for e in schema.iter_errors(answer)]
        assert errors == [], f"the fake's own answer is outside the spec: {errors}"
        return web.json_response(answer)

    def predict(self, body: dict):
        prompt = body["instances"][0]["prompt"]
        if "forbidden" in prompt:
            return self.error(400, "INVALID_ARGUMENT", POLICY_MESSAGE)
        parameters = body.get("parameters", {})
        n = parameters.get("sampleCount", 4)
        mime = parameters.get("outputOptions", {}).get("mimeType", "image/png")
        filtered = n if "filter-all" in prompt else 1 if "filter-one" in prompt else 0
        predictions = [{"bytesBase64Encoded": self.next_b64(), "mimeType": mime, "prompt": "Enhanced: " + prompt} for _ in range(n - filtered)]
        if parameters.get("includeRaiReason"):
            predictions += [{"raiFilteredReason": RAI_REASON, "safetyAttributes": {"categories": ["Violence"], "scores": [0.9]}}] * filtered
        return {"predictions": predictions}

    def inline_parts(self, parts: list[dict]) -> list[tuple[str, bytes]]:
        """An edit's input images, each decoded strictly (Google refuses broken base64)."""
        images = []
        for part in parts:
            if "inlineData" in part:
                try:
                    data = base64.b64decode(part["inlineData"]["data"], validate=True)
                except (binascii.Error, ValueError):
                    self.invalid.append("inlineData.data is not base64")
                    data = b""
                images.append((part["inlineData"]["mimeType"], data))
        return images

    def generate(self, body: dict):
        parts = body["contents"][0]["parts"]
        texts = [part["text"] for part in parts if "text" in part]
        images = [part for part in parts if "inlineData" in part]
        prompt = texts[0] if texts else ""
        text_tokens = len(prompt) // 4 + 1  # a realistic count, under the gateway's worst case of one per 2 characters
        image_in = self.input_image_tokens * len(images)
        prompt_tokens = text_tokens + image_in
        details = [{"modality": "TEXT", "tokenCount": text_tokens}] + ([{"modality": "IMAGE", "tokenCount": image_in}] if images else [])
        usage = {"promptTokenCount": prompt_tokens, "candidatesTokenCount": self.image_tokens, "totalTokenCount": prompt_tokens + self.image_tokens,
                 "promptTokensDetails": details, "candidatesTokensDetails": [{"modality": "IMAGE", "tokenCount": self.image_tokens}]}
        if "forbidden" in prompt:
            return {"promptFeedback": {"blockReason": "PROHIBITED_CONTENT", "safetyRatings": [{"category": "HARM_CATEGORY_DANGEROUS_CONTENT", "probability": "HIGH", "blocked": True}]},
                    "usageMetadata": {"promptTokenCount": prompt_tokens, "totalTokenCount": prompt_tokens}}
        if "unsafe-image" in prompt:
            return {"candidates": [{"finishReason": "IMAGE_SAFETY", "safetyRatings": [{"category": "HARM_CATEGORY_SEXUALLY_EXPLICIT", "probability": "HIGH", "blocked": True}]}],
                    "usageMetadata": {"promptTokenCount": prompt_tokens, "totalTokenCount": prompt_tokens}}
        parts = [{"text": "Here is your image."}, {"inlineData": {"mimeType": "image/png", "data": self.next_b64()}}]
        return {"candidates": [{"content": {"role": "model", "parts": parts}, "finishReason": "STOP"}], "usageMetadata": usage}
