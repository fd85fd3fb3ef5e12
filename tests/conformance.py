"""The providers of the shared conformance suite (tests/test_conformance.py), one entry each:
how to start its fake upstream, how the gateway is configured for it, what its refusals and
failures look like on the wire, and what it cannot do (CANNOT, with the reason, listed in
docs/providers.md).

Every fake speaks its provider's published wire format and validates what imgproxy sends it
(tests/specs/); the suite checks each fake still does (test_the_fake_checks_what_imgproxy_sends).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from tests.fake_azure import STABLE as AZURE_STABLE
from tests.fake_azure import FakeAzureOpenAI
from tests.fake_bfl import BFL_PNG, FakeBFL
from tests.fakes import FAKE_PNG, FakeOpenAI, FakeStability, FakeUpstream
from tests.fakes_google import FakeGoogle, service_account_file
from tests.fakes_v2 import FakeCompatibleHost, FakeStabilityV2

KEY = FakeUpstream.key
RETRY_AFTER = "7"
IMAGEN = "imagen-4.0-generate-001"
GEMINI_IMAGE = "gemini-2.5-flash-image"


@dataclass
class Refusal:
    """A prompt the fake refuses in its provider's own shape, and what the client must see."""

    prompt: str
    code: str = "content_policy_violation"
    words: tuple[str, ...] = ()  # the provider's reasons kept in the message
    n: int = 1
    param: str | None = None  # "prompt" where the prompt itself was refused
    type: str = "invalid_request_error"


@dataclass
class Entry:
    id: str
    fake: Callable[[], FakeUpstream] | None  # None: no upstream (placeholder)
    provider: Callable[[FakeUpstream, Path], dict]  # the provider's config (type, base_url, key, options)
    model: str  # the model name a client asks for
    models: dict  # the config's `models` section
    image: bytes | None  # what each image of an answer is (None: not a fixed image)
    max_n: int = 1  # the largest n the entry is asked for in one request
    size: str = "1024x1024"
    default_format: str = "url"  # what an answer carries when the client names no response_format
    relays_b64: bool = False  # b64_json answers are relayed as they arrive, not parsed first
    price: float | dict | None = None  # per image (or {size: per image}), standard quality; None: by tokens or credits
    cost: dict = field(default_factory=dict)  # extra `cost:` config (prices of configured models)
    refusals: tuple[Refusal, ...] = ()
    # The provider's own error bodies; each names the key, as careless upstreams do.
    rate_limited: object = None
    server_error: object = None
    bad_request: tuple[int, object] | None = None  # (status, body) of a 4xx refusal
    bad_request_code: str = "invalid_request_error"
    bad_request_param: str | None = None
    bad_request_words: str = ""  # the provider's words kept in the message
    # A request outside the provider's spec, sent straight to the fake with the headers imgproxy
    # sent it: (path, JSON body). The fake must notice.
    probe: tuple[str, dict] | None = None
    # What a request costs that was sent but not answered in time or in full (the provider may
    # have taken it): 0 where the provider bills delivered images only; an asynchronous
    # provider's job that may have been accepted is billed (docs/providers.md).
    billed_if_ambiguous: float = 0.0
    cannot: dict[str, str] = field(default_factory=dict)  # check -> why this provider cannot do it


def _openai(fake, tmp_path):
    return {"type": "openai", "base_url": f"{fake.base_url}/v1", "api_key": KEY}


def _openai_error(message: str, kind: str, code, param=None) -> dict:
    return {"error": {"message": f"{message} ({KEY}, masked {KEY[:5]}***{KEY[-3:]})", "type": kind, "param": param, "code": code}}


OPENAI_ERRORS = dict(
    rate_limited=_openai_error("Rate limit reached for images", "requests", "rate_limit_exceeded"),
    server_error=_openai_error("The server had an error processing your request.", "server_error", None),
    bad_request=(400, _openai_error("Invalid prompt: too vague", "invalid_request_error", "invalid_prompt", "prompt")),
    bad_request_code="invalid_prompt",
    bad_request_param="prompt",
    bad_request_words="Invalid prompt: too vague",
    probe=("/v1/images/generations", {"prompt": 5, "n": "many"}),
)
DALL_E_REFUSAL = Refusal("something forbidden", words=("safety system",))


def _azure(fake, tmp_path):
    return {"type": "azure_openai", "base_url": fake.base_url, "api_key": KEY, "options": {"api_version": AZURE_STABLE}}


def _azure_preview(fake, tmp_path):
    return {**_azure(fake, tmp_path), "options": {"api_version": "2025-04-01-preview"}}


AZURE_ERRORS = dict(
    rate_limited={"error": {"code": "429", "message": f"Requests to the Images_Generations Operation have exceeded the call rate limit ({KEY}, masked {KEY[:5]}***{KEY[-3:]})."}},
    server_error={"error": {"code": "InternalServerError", "message": f"The server had an error while processing your request ({KEY}, masked {KEY[:5]}***{KEY[-3:]})."}},
    bad_request=(400, {"error": {"code": "invalid_size", "message": f"The size is not supported by this model ({KEY}, masked {KEY[:5]}***{KEY[-3:]}).", "param": "size", "type": "invalid_request_error"}}),
    bad_request_code="invalid_size",
    bad_request_param="size",
    bad_request_words="The size is not supported by this model",
)
# Azure's filter results: the categories it filtered are kept in the message.
AZURE_REFUSAL = Refusal("something forbidden", words=("violence", "hate", "jailbreak"))


def _google(fake, tmp_path):
    return {"type": "google_genai", "base_url": fake.base_url, "api_key": KEY}


def _vertex(fake, tmp_path):
    credentials = service_account_file(tmp_path / "service-account.json", f"{fake.base_url}/token")
    return {"type": "vertex_ai", "base_url": fake.base_url, "options": {"project": "test-project", "location": "us-central1", "credentials_file": str(credentials)}}


def _google_error(code: int, status: str, message: str) -> dict:
    return {"error": {"code": code, "message": f"{message} ({KEY}, masked {KEY[:5]}***{KEY[-3:]})", "status": status}}


GOOGLE_ERRORS = dict(
    rate_limited=_google_error(429, "RESOURCE_EXHAUSTED", "Resource has been exhausted (e.g. check quota)."),
    server_error=_google_error(500, "INTERNAL", "Internal error encountered."),
    bad_request=(400, _google_error(400, "INVALID_ARGUMENT", "Request contains an invalid argument.")),
    bad_request_code="invalid_argument",
    bad_request_words="Request contains an invalid argument.",
)
VERTEX_PATH = "/v1/projects/test-project/locations/us-central1/publishers/google/models/{}"
IMAGEN_REFUSALS = (
    Refusal("something forbidden", words=("Responsible AI",), param="prompt"),  # the prompt refused
    Refusal("filter-all of it", words=("Violence", "filtered out"), n=2, param="prompt"),  # every image filtered
)
GEMINI_REFUSALS = (
    Refusal("something forbidden", words=("PROHIBITED_CONTENT", "HARM_CATEGORY_DANGEROUS_CONTENT"), param="prompt"),  # promptFeedback
    Refusal("an unsafe-image", words=("IMAGE_SAFETY", "HARM_CATEGORY_SEXUALLY_EXPLICIT"), param="prompt"),  # the candidate withheld
)
GEMINI_ONE = "Gemini image models return one image per request (n is 1)"


def _stability_error(name: str, message: str) -> dict:
    return {"id": "296a972f-666a-44a1-a3df-c9c28a1f56c0", "name": name, "message": f"{message} ({KEY}, masked {KEY[:5]}***{KEY[-3:]})"}


def _v2_error(name: str, message: str) -> dict:
    return {"id": "296a972f666a44a1a3dfc9c28a1f56c0", "name": name, "errors": [f"{message} ({KEY}, masked {KEY[:5]}***{KEY[-3:]})"]}


ENTRIES = (
    Entry(
        "openai-dall-e-2", FakeOpenAI, _openai, "dall-e-2", {"dall-e-2": {"provider": "openai"}}, FAKE_PNG,
        max_n=4, size="512x512", price={"1024x1024": 0.02, "512x512": 0.018}, relays_b64=True, refusals=(DALL_E_REFUSAL,), **OPENAI_ERRORS,
    ),
    Entry(
        "openai-dall-e-3", FakeOpenAI, _openai, "dall-e-3", {"dall-e-3": {"provider": "openai"}}, FAKE_PNG,
        price=0.04, relays_b64=True, refusals=(DALL_E_REFUSAL,), **OPENAI_ERRORS,
        cannot={"n>1": "dall-e-3 generates one image per request (OpenAI's limit)"},
    ),
    Entry(
        # OpenAI's GPT image models refuse with their own code, which the SDKs know: kept.
        "openai-gpt-image-1", FakeOpenAI, _openai, "gpt-image-1", {"gpt-image-1": {"provider": "openai"}}, FAKE_PNG,
        max_n=2, default_format="b64_json", refusals=(Refusal("something forbidden", code="moderation_blocked", type="image_generation_user_error"),), **OPENAI_ERRORS,
    ),
    Entry(
        "azure-dall-e-3", FakeAzureOpenAI, _azure, "azure-dall-e-3",
        {"azure-dall-e-3": {"provider": "azure", "upstream_model": "my-dalle3", "catalog": "dall-e-3"}}, FAKE_PNG,
        price=0.04, refusals=(AZURE_REFUSAL,), probe=(f"/openai/deployments/my-dalle3/images/generations?api-version={AZURE_STABLE}", {"prompt": 5}),
        cannot={"n>1": "dall-e-3 deployments generate one image per request"}, **AZURE_ERRORS,
    ),
    Entry(
        "azure-gpt-image-1", FakeAzureOpenAI, _azure_preview, "azure-gpt-image-1",
        {"azure-gpt-image-1": {"provider": "azure", "upstream_model": "team gpt/image", "catalog": "gpt-image-1"}}, FAKE_PNG,
        max_n=2, default_format="b64_json", refusals=(AZURE_REFUSAL,), probe=("/openai/deployments/team%20gpt%2Fimage/images/generations?api-version=2025-04-01-preview", {"prompt": 5}),
        **AZURE_ERRORS,
    ),
    Entry(
        "google-imagen", FakeGoogle, _google, IMAGEN, {IMAGEN: {"provider": "google"}}, FAKE_PNG,
        max_n=2, price=0.04, refusals=IMAGEN_REFUSALS, probe=(f"/v1beta/models/{IMAGEN}:predict", {"instances": "a fox"}), **GOOGLE_ERRORS,
    ),
    Entry(
        "google-gemini-image", FakeGoogle, _google, GEMINI_IMAGE, {GEMINI_IMAGE: {"provider": "google"}}, FAKE_PNG,
        refusals=GEMINI_REFUSALS, probe=(f"/v1beta/models/{GEMINI_IMAGE}:generateContent", {"contents": "a fox"}),
        cannot={"n>1": GEMINI_ONE}, **GOOGLE_ERRORS,
    ),
    Entry(
        "vertex-imagen", FakeGoogle, _vertex, "vertex-imagen", {"vertex-imagen": {"provider": "vertex", "upstream_model": IMAGEN}}, FAKE_PNG,
        max_n=2, price=0.04, refusals=IMAGEN_REFUSALS, probe=(VERTEX_PATH.format(f"{IMAGEN}:predict"), {"instances": "a fox"}), **GOOGLE_ERRORS,
    ),
    Entry(
        "vertex-gemini-image", FakeGoogle, _vertex, "vertex-flash-image",
        {"vertex-flash-image": {"provider": "vertex", "upstream_model": GEMINI_IMAGE}}, FAKE_PNG,
        refusals=GEMINI_REFUSALS, probe=(VERTEX_PATH.format(f"{GEMINI_IMAGE}:generateContent"), {"contents": "a fox"}),
        cannot={"n>1": GEMINI_ONE}, **GOOGLE_ERRORS,
    ),
    Entry(
        "bfl", FakeBFL, lambda fake, tmp_path: {"type": "bfl", "base_url": fake.base_url, "api_key": KEY, "options": {"poll_interval": 0.01, "max_poll_interval": 0.05}},
        "flux-pro-1.1", {"flux-pro-1.1": {"provider": "bfl"}}, BFL_PNG, max_n=2, price=0.04,
        refusals=(Refusal("a forbidden logo", words=("the prompt", "Derivative Works"), param="prompt"), Refusal("something explicit", words=("the generated image", "NSFW"))),
        rate_limited={"detail": f"Too many active tasks ({KEY}, masked {KEY[:5]}***{KEY[-3:]})"},
        server_error={"detail": f"Internal Server Error ({KEY}, masked {KEY[:5]}***{KEY[-3:]})"},
        bad_request=(422, {"detail": [{"loc": ["body", "width"], "msg": f"width must be a multiple of 32 ({KEY}, masked {KEY[:5]}***{KEY[-3:]})", "type": "value_error"}]}),
        bad_request_code="invalid_value", bad_request_words="width must be a multiple of 32",
        probe=("/v1/flux-pro-1.1", {"prompt": 5, "width": "wide"}),
        billed_if_ambiguous=0.04,
    ),
    Entry(
        "stability-v1", FakeStability, lambda fake, tmp_path: {"type": "stability", "base_url": fake.base_url, "api_key": KEY},
        "stable-diffusion-xl-1024-v1-0", {"stable-diffusion-xl-1024-v1-0": {"provider": "stability"}}, FAKE_PNG, max_n=2,
        # invalid_prompts; every artifact CONTENT_FILTERED
        refusals=(Refusal("something forbidden", words=("filtered words",), param="prompt"), Refusal("blurry", words=("content filter",))),
        rate_limited=_stability_error("rate_limit_exceeded", "You have exceeded the rate limit"),
        server_error=_stability_error("server_error", "An unexpected server error occurred"),
        bad_request=(400, _stability_error("invalid_samples", "Samples must be between 1 and 10")),
        bad_request_code="invalid_samples", bad_request_words="Samples must be between 1 and 10",
        probe=("/v1/generation/stable-diffusion-xl-1024-v1-0/text-to-image", {"text_prompts": "a fox", "samples": 0}),
    ),
    Entry(
        "stability-v2", FakeStabilityV2, lambda fake, tmp_path: {"type": "stability_v2", "base_url": fake.base_url, "api_key": KEY},
        "stable-image-core", {"stable-image-core": {"provider": "stability-v2"}}, FAKE_PNG, max_n=2, price=0.03,
        refusals=(Refusal("something forbidden", words=("category: violence",)), Refusal("a celebrity", words=("public figure",), param="prompt"), Refusal("blurry", words=("content filter",))),
        rate_limited=_v2_error("rate_limit_exceeded", "You have exceeded the rate limit."),
        server_error=_v2_error("internal_error", "An unexpected server error has occurred."),
        bad_request=(400, _v2_error("bad_request", "aspect_ratio: invalid")),
        bad_request_code="bad_request", bad_request_words="aspect_ratio: invalid",
        probe=("/v2beta/stable-image/generate/core", {"aspect_ratio": "1:1"}),
    ),
    Entry(
        "openai-compatible", FakeCompatibleHost,
        lambda fake, tmp_path: {"type": "openai_compatible", "base_url": f"{fake.base_url}/v1", "api_key": KEY, "options": {"key_header": "X-Api-Key", "key_prefix": ""}},
        "flux", {"flux": {"provider": "host", "upstream_model": "black-forest-labs/FLUX.1-schnell", "capabilities": {
            "sizes": ["1024x1024", "512x512"], "default_size": "1024x1024", "max_n": 4, "max_prompt_length": 4000, "upstream_formats": ["url", "b64_json"]}}},
        FAKE_PNG, max_n=4, price=0.003, relays_b64=True, cost={"prices": {"flux": {"per_image": {"*": {"*": 0.003}}}}},
        refusals=(DALL_E_REFUSAL,), **OPENAI_ERRORS,
    ),
    Entry(
        "placeholder", None, lambda fake, tmp_path: {"type": "placeholder"}, "placeholder", {"placeholder": {"provider": "placeholder"}}, None,
        max_n=4, price=0.0,
        cannot={check: "no upstream: images are made in the gateway" for check in ("refusal", "upstream errors", "timeout", "wire spec")},
    ),
)

# The provider name each entry's config uses (the models above name it).
PROVIDER_NAMES = {entry.id: next(iter(entry.models.values()))["provider"] for entry in ENTRIES}


def cannot(check: str) -> list[tuple[str, str]]:
    """(entry id, reason) of every entry that cannot do `check`."""
    return [(entry.id, entry.cannot[check]) for entry in ENTRIES if check in entry.cannot]
