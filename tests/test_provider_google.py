"""Google's image models (Imagen `predict`, Gemini `generateContent`) on the Gemini API
(`google_genai`, API key) and Vertex AI (`vertex_ai`, service-account access token), against
a fake Google that speaks the wire formats of tests/specs/ and misbehaves on cue."""

from __future__ import annotations

import asyncio
import base64
import json
import os
from pathlib import Path

import aiohttp
import pytest

from imgproxy.gateway import Gateway
from imgproxy.server import create_app
from tests.conftest import AUTH, CLIENT_KEY, assert_error, download, images_body, multipart_form
from tests.fakes import FAKE_PNG, Cue, FakeUpstream, tiny_png
from tests.fakes_google import ACCESS_TOKEN_PREFIX, PRIVATE_KEY_LINE, PRIVATE_KEY_PEM, FakeGoogle, service_account_file
from tests.conftest import usage_record as record

URL = "/v1/images/generations"
IMAGEN = "imagen-4.0-generate-001"
IMAGEN_PRICE = 0.04
SHARED_SPECS = Path(__file__).resolve().parents[2] / "shared" / "specs"


@pytest.fixture
async def google(aiohttp_server):
    fake = FakeGoogle()
    server = await aiohttp_server(fake.app())
    fake.base_url = str(server.make_url("")).rstrip("/")
    yield fake
    assert fake.invalid == [], f"imgproxy sent the fake Google a request outside the spec: {fake.invalid}"


@pytest.fixture
def credentials(tmp_path, google):
    return service_account_file(tmp_path / "service-account.json", f"{google.base_url}/token")


@pytest.fixture
def make_google(aiohttp_client, google, credentials, usage_log, tmp_path):
    async def make(*, api_key: str = FakeUpstream.key, credentials_file=None, total: float = 5, vertex_options: str = "", retries: int = 1, env=None, models: str = "", server: str = ""):
        creds = credentials if credentials_file is None else credentials_file
        text = f"""
auth:
  keys:
    - {{name: team-a, key: {CLIENT_KEY}}}
providers:
  gemini:
    type: google_genai
    base_url: {google.base_url}
    api_key: "{api_key}"
    timeouts: {{connect: 2, total: {total}}}
    retries: {{attempts: {retries}, backoff: 0}}
  vertex:
    type: vertex_ai
    base_url: {google.base_url}
    timeouts: {{connect: 2, total: {total}}}
    retries: {{attempts: {retries}, backoff: 0}}
    options: {{project: test-project, location: us-central1, credentials_file: "{creds}"{vertex_options}}}
models:
  {IMAGEN}: {{provider: gemini}}
  imagen-4.0-fast-generate-001: {{provider: gemini}}
  gemini-2.5-flash-image: {{provider: gemini}}
  gemini-3-pro-image-preview: {{provider: gemini}}
  vertex-imagen: {{provider: vertex, upstream_model: {IMAGEN}}}
  vertex-flash-image: {{provider: vertex, upstream_model: gemini-2.5-flash-image}}
{models}
images:
  directory: {tmp_path / "images"}
  signing_key: test-signing-key
cost:
  usage_log: {usage_log}
{server}
"""
        gateway = await Gateway.load(text=text, env=env or {})
        client = await aiohttp_client(create_app(gateway))
        client.gateway = gateway
        return client

    return make


@pytest.fixture
async def client(make_google):
    return await make_google()




async def post(client, body: dict):
    return await client.post(URL, json=body, headers=AUTH)


# The reference's basic example, on every route.

@pytest.mark.parametrize("model, path", [
    (IMAGEN, f"/v1beta/models/{IMAGEN}:predict"),
    ("vertex-imagen", f"/v1/projects/test-project/locations/us-central1/publishers/google/models/{IMAGEN}:predict"),
])
async def test_basic_example_in_url_and_b64_json(client, google, usage_log, model, path):
    resp = await post(client, {"model": model, "prompt": "A cute baby sea otter", "n": 2, "size": "1024x1024"})
    body = await images_body(resp)
    assert len(body["data"]) == 2 and all(set(item) >= {"url"} for item in body["data"])
    image = await download(client, body["data"][0]["url"])
    assert await image.read() == FAKE_PNG
    assert google.paths == [path]
    assert google.requests[0] == {
        "instances": [{"prompt": "A cute baby sea otter"}],
        "parameters": {"sampleCount": 2, "aspectRatio": "1:1", "includeRaiReason": True},
    }
    assert (await record(usage_log, resp.headers["x-request-id"]))["cost_usd"] == pytest.approx(2 * IMAGEN_PRICE)

    resp = await post(client, {"model": model, "prompt": "A cute baby sea otter", "n": 1, "size": "1024x1024", "response_format": "b64_json"})
    body = await images_body(resp)
    assert [base64.b64decode(item["b64_json"]) for item in body["data"]] == [FAKE_PNG]
    assert body["data"][0]["revised_prompt"] == "Enhanced: A cute baby sea otter"


async def test_gemini_api_key_goes_in_its_header_and_nowhere_else(client, google):
    await images_body(await post(client, {"model": IMAGEN, "prompt": "a fox"}))
    headers = google.headers[0]
    assert headers["x-goog-api-key"] == FakeUpstream.key
    assert "Authorization" not in headers and "key=" not in google.paths[0]


async def test_openai_sdk_as_client(client, sdk_for, google):
    sdk = sdk_for(client)
    result = await sdk.images.generate(model=IMAGEN, prompt="a lighthouse", n=3, size="1408x768", response_format="b64_json")
    assert [base64.b64decode(item.b64_json) for item in result.data] == [FAKE_PNG] * 3
    assert google.requests[0]["parameters"]["aspectRatio"] == "16:9"
    result = await sdk.images.generate(model="gemini-2.5-flash-image", prompt="a lighthouse", size="1024x1024")
    assert result.data[0].url and result.usage.output_tokens == 1290


# Each parameter: passed, translated or refused.

@pytest.mark.parametrize("size, ratio, tier", [
    ("1024x1024", "1:1", None), ("896x1280", "3:4", None), ("1280x896", "4:3", None), ("768x1408", "9:16", None),
    ("1408x768", "16:9", None), ("2048x2048", "1:1", "2K"), ("1792x2560", "3:4", "2K"), ("2560x1792", "4:3", "2K"),
    ("1536x2816", "9:16", "2K"), ("2816x1536", "16:9", "2K"),
])
async def test_imagen_size_becomes_aspect_ratio_and_image_size(client, google, size, ratio, tier):
    await images_body(await post(client, {"model": IMAGEN, "prompt": "a fox", "size": size, "response_format": "b64_json"}))
    parameters = google.requests[0]["parameters"]
    assert parameters["aspectRatio"] == ratio
    assert parameters.get("sampleImageSize") == tier


@pytest.mark.parametrize("model, size, ratio, tier", [
    ("gemini-2.5-flash-image", "1344x768", "16:9", None),
    ("gemini-2.5-flash-image", "1536x672", "21:9", None),
    ("gemini-2.5-flash-image", "896x1152", "4:5", None),
    ("gemini-3-pro-image-preview", "1264x848", "3:2", None),
    ("gemini-3-pro-image-preview", "1696x2528", "2:3", "2K"),
    ("gemini-3-pro-image-preview", "4096x4096", "1:1", "4K"),
])
async def test_gemini_size_becomes_image_config(client, google, model, size, ratio, tier):
    await images_body(await post(client, {"model": model, "prompt": "a fox", "size": size, "response_format": "b64_json"}))
    sent = google.requests[0]
    assert sent["contents"] == [{"role": "user", "parts": [{"text": "a fox"}]}]
    assert sent["generationConfig"]["responseModalities"] == ["IMAGE"]
    assert sent["generationConfig"]["imageConfig"] == {"aspectRatio": ratio, **({"imageSize": tier} if tier else {})}


@pytest.mark.parametrize("body, param, code", [
    ({"size": "1792x1024"}, "size", "invalid_size"),  # a dall-e-3 size Imagen does not make
    ({"size": "4096x4096"}, "size", "invalid_size"),
    ({"n": 5}, "n", "invalid_n"),
    ({"quality": "hd"}, "quality", "unsupported_parameter"),
    ({"style": "vivid"}, "style", "unsupported_parameter"),
    ({"output_format": "webp"}, "output_format", "invalid_value"),
    ({"output_format": "png", "output_compression": 50}, "output_compression", "invalid_value"),
    ({"background": "transparent"}, "background", "unsupported_parameter"),
])
async def test_imagen_refuses_what_it_cannot_do_before_calling(client, google, body, param, code):
    resp = await post(client, {"model": IMAGEN, "prompt": "a fox", **body})
    error = await assert_error(resp, 400, code, param)
    assert google.requests == []  # refused before anything was paid for
    if param == "size":
        assert "1024x1024" in error["message"] and "1408x768" in error["message"]  # the sizes it does take


def served_pngs(count: int) -> set[bytes]:
    """The images a fake with distinct_images served first: each a different PNG."""
    return {tiny_png(rgb=k.to_bytes(3, "big")) for k in range(1, count + 1)}


async def test_gemini_n_is_fanned_out_one_image_per_call(client, google, usage_log):
    # Gemini answers one image per generateContent call: n=3 is three calls, merged, their
    # token counts summed and billed.
    google.distinct_images = True
    resp = await post(client, {"model": "gemini-2.5-flash-image", "prompt": "a fox", "n": 3, "response_format": "b64_json"})
    body = await images_body(resp)
    assert len(google.requests) == 3
    assert [r["generationConfig"]["candidateCount"] for r in google.requests] == [1, 1, 1]
    assert {base64.b64decode(item["b64_json"]) for item in body["data"]} == served_pngs(3)  # three distinct images, each the fake's
    assert (body["usage"]["output_tokens"], body["usage"]["input_tokens"]) == (3 * 1290, 3 * 2)
    usage = await record(usage_log, resp.headers["x-request-id"])
    assert usage["images"] == 3 and usage["cost_usd"] == pytest.approx(3 * (2 * 0.30 + 1290 * 30.0) / 1e6, abs=1e-6)
    # Above the model's max_n (4): refused before anything is paid for.
    await assert_error(await post(client, {"model": "gemini-2.5-flash-image", "prompt": "a fox", "n": 5}), 400, "invalid_n", "n")
    assert len(google.requests) == 3


GOOGLE_503 = {"error": {"code": 503, "message": "The model is overloaded.", "status": "UNAVAILABLE"}}


async def test_gemini_fan_out_with_one_failed_call_delivers_and_bills_the_others(client, google, usage_log):
    google.distinct_images = True
    google.cue(status=503, body=GOOGLE_503)  # the first call to arrive fails, saying it made nothing
    resp = await post(client, {"model": "gemini-2.5-flash-image", "prompt": "a fox", "n": 3, "response_format": "b64_json"})
    body = await images_body(resp)
    assert len(google.requests) == 3 and len(body["data"]) == 2
    assert {base64.b64decode(item["b64_json"]) for item in body["data"]} == served_pngs(2)
    assert body["usage"]["output_tokens"] == 2 * 1290
    usage = await record(usage_log, resp.headers["x-request-id"])
    # Two images delivered, two billed: the failed call is not billed as delivered.
    assert usage["images"] == 2 and usage["cost_usd"] == pytest.approx(2 * (2 * 0.30 + 1290 * 30.0) / 1e6, abs=1e-6)
    assert "undelivered_billed" not in usage


async def test_gemini_fan_out_that_delivers_nothing_is_not_tried_again_if_a_call_may_have_generated(make_google, google, usage_log):
    # One call cut after it was sent (Google may have generated and billed it), two refused:
    # the answer is the ambiguous failure, and with retries allowed nothing is called again.
    client = await make_google(retries=3)
    google.cues += [Cue(status=503, body=GOOGLE_503), Cue(cut=True), Cue(status=503, body=GOOGLE_503)]
    resp = await post(client, {"model": "gemini-2.5-flash-image", "prompt": "a fox", "n": 3})
    await assert_error(resp, 502, "upstream_bad_response")
    assert resp.headers["x-should-retry"] == "false"
    assert len(google.requests) == 3
    # Every call failed but none of them for good: with no ambiguity they are tried again as a whole.
    google.requests.clear()
    google.cues += [Cue(status=503, body=GOOGLE_503)] * 3
    await images_body(await post(client, {"model": "gemini-2.5-flash-image", "prompt": "a fox", "n": 3}))
    assert len(google.requests) == 6


async def test_imagen_above_four_images_is_calls_of_at_most_four(make_google, google, usage_log):
    # sampleCount takes 1-4: a model configured for more (max_n: 6) makes two calls, 4 + 2.
    client = await make_google(models=f"  imagen-six: {{provider: gemini, upstream_model: {IMAGEN}, capabilities: {{max_n: 6}}}}")
    google.distinct_images = True
    resp = await post(client, {"model": "imagen-six", "prompt": "a fox", "n": 6, "response_format": "b64_json"})
    body = await images_body(resp)
    assert sorted(r["parameters"]["sampleCount"] for r in google.requests) == [2, 4]
    assert {base64.b64decode(item["b64_json"]) for item in body["data"]} == served_pngs(6)
    usage = await record(usage_log, resp.headers["x-request-id"])
    assert usage["images"] == 6 and usage["cost_usd"] == pytest.approx(6 * IMAGEN_PRICE)


async def test_imagen_output_format_and_compression_are_passed(client, google):
    body = await images_body(await post(client, {"model": IMAGEN, "prompt": "a fox", "output_format": "jpeg", "output_compression": 60, "response_format": "b64_json"}))
    assert google.requests[0]["parameters"]["outputOptions"] == {"mimeType": "image/jpeg", "compressionQuality": 60}
    assert len(body["data"]) == 1


# Content policy.

async def test_imagen_some_images_filtered_delivers_and_bills_the_rest(client, google, usage_log):
    resp = await post(client, {"model": IMAGEN, "prompt": "filter-one of them", "n": 3, "response_format": "b64_json"})
    body = await images_body(resp)
    assert len(body["data"]) == 2
    usage = await record(usage_log, resp.headers["x-request-id"])
    assert usage["images"] == 2 and usage["cost_usd"] == pytest.approx(2 * IMAGEN_PRICE)
    assert resp.headers["x-imgproxy-cost-usd"].startswith("0.08")


async def test_imagen_no_predictions_at_all_is_content_policy_violation(client, google):
    google.cue(body={})  # Google omits filtered images when it gives no reasons
    await assert_error(await post(client, {"model": IMAGEN, "prompt": "a fox"}), 400, "content_policy_violation", "prompt")


# Upstream failures.

async def test_a_bad_gemini_api_key_is_upstream_auth_failed(make_google, google):
    client = await make_google(api_key="AIza-wrong-key-0000000000")
    await assert_error(await post(client, {"model": IMAGEN, "prompt": "a fox"}), 502, "upstream_auth_failed")


@pytest.mark.parametrize("status, word", [(401, "UNAUTHENTICATED"), (403, "PERMISSION_DENIED")])
async def test_upstream_401_and_403_are_upstream_auth_failed(client, google, status, word):
    google.cue(status=status, body={"error": {"code": status, "message": f"denied {FakeUpstream.key}", "status": word}})
    resp = await post(client, {"model": IMAGEN, "prompt": "a fox"})
    error = await assert_error(resp, 502, "upstream_auth_failed")
    assert FakeUpstream.key not in error["message"]


async def test_upstream_429_is_429_with_retry_after_from_retry_info(client, google):
    details = [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "17s"}]
    google.cue(status=429, body={"error": {"code": 429, "message": "Resource has been exhausted (e.g. check quota).", "status": "RESOURCE_EXHAUSTED", "details": details}})
    resp = await post(client, {"model": IMAGEN, "prompt": "a fox"})
    await assert_error(resp, 429, "rate_limit_exceeded")
    assert resp.headers["Retry-After"] == "17"


@pytest.mark.parametrize("cue", [
    {"cut": True},
    {"body": b"<html>502 Bad Gateway</html>", "content_type": "text/html"},
    {"body": b'{"predictions": [{"bytesBase64Encoded": "not base64 at all!"}]}'},
    {"body": b'{"predictions": "nope"}'},
    {"body": b'{"predictions": [{"bytesBase64Enc'},
])
async def test_a_cut_or_garbage_answer_is_502(client, google, usage_log, cue):
    google.cue(**cue)
    resp = await post(client, {"model": IMAGEN, "prompt": "a fox", "response_format": "b64_json"})
    await assert_error(resp, 502, "upstream_bad_response")
    assert (await record(usage_log, resp.headers["x-request-id"]))["cost_usd"] == 0


async def test_gemini_answer_without_image_is_502(client, google):
    google.cue(body={"candidates": [{"content": {"parts": [{"text": "I cannot draw that."}]}, "finishReason": "STOP"}]})
    await assert_error(await post(client, {"model": "gemini-2.5-flash-image", "prompt": "a fox"}), 502, "upstream_bad_response")


async def test_gemini_api_without_key_is_503_provider_not_configured(make_google, google):
    client = await make_google(api_key="")
    await assert_error(await post(client, {"model": IMAGEN, "prompt": "a fox"}), 503, "provider_not_configured")
    assert google.requests == []


# Cost: the price of what was delivered.

async def test_gemini_is_billed_by_its_image_output_tokens(client, google, usage_log):
    resp = await post(client, {"model": "gemini-2.5-flash-image", "prompt": "a fox", "response_format": "b64_json"})
    body = await images_body(resp)
    assert body["usage"]["output_tokens"] == 1290 and body["usage"]["input_tokens"] == 2
    usage = await record(usage_log, resp.headers["x-request-id"])
    assert usage["cost_usd"] == pytest.approx((2 * 0.30 + 1290 * 30.0) / 1e6, abs=1e-6)


async def test_gemini_token_bill_never_exceeds_the_worst_case_of_the_image(client, google, usage_log):
    google.image_tokens = 10_000_000  # an upstream that claims absurd usage
    resp = await post(client, {"model": "gemini-2.5-flash-image", "prompt": "a fox", "response_format": "b64_json"})
    await images_body(resp)
    cost = (await record(usage_log, resp.headers["x-request-id"]))["cost_usd"]
    assert cost == pytest.approx(0.039 + len("a fox") / 2 * 0.30 / 1e6, abs=1e-6)


async def test_a_fanned_out_token_bill_is_capped_with_the_prompt_read_by_every_call(client, google, usage_log):
    # The worst case of n images counts the prompt once per call: each call reads it, and the
    # provider bills it each time (a cap with one prompt would bill less than was spent).
    google.image_tokens = 10_000_000
    prompt = "a fox " * 400
    resp = await post(client, {"model": "gemini-2.5-flash-image", "prompt": prompt, "n": 3, "response_format": "b64_json"})
    await images_body(resp)
    cost = (await record(usage_log, resp.headers["x-request-id"]))["cost_usd"]
    assert cost == pytest.approx(3 * (0.039 + len(prompt) / 2 * 0.30 / 1e6), abs=1e-6)


async def test_gemini_3_pro_4k_is_reserved_at_its_4k_price(client, google, usage_log):
    google.image_tokens = 2000
    resp = await post(client, {"model": "gemini-3-pro-image-preview", "prompt": "a fox", "size": "4096x4096", "response_format": "b64_json"})
    await images_body(resp)
    assert (await record(usage_log, resp.headers["x-request-id"]))["cost_usd"] == pytest.approx((2 * 2.0 + 2000 * 120.0) / 1e6, abs=1e-6)


# Edits: the Gemini image models take the input images inline in generateContent.

JPEG = b"\xff\xd8\xff\xe0" + bytes(range(256)) * 2  # recognised by its first bytes, as Google would
WEBP = b"RIFF\x24\x00\x00\x00WEBPVP8 " + bytes(range(255, -1, -1)) * 2
FLASH = "gemini-2.5-flash-image"
PRO = "gemini-3-pro-image-preview"
PRO_PRICE = {"text_input": 2.0, "image_input": 2.0, "output": 120.0}


def big_png(size: int) -> bytes:
    """A PNG's signature and header, then `size` random bytes (imgproxy reads only the head)."""
    return tiny_png(64, 64)[:33] + os.urandom(size)


def edit_form(fields: dict, files: list[tuple[str, bytes]]) -> aiohttp.FormData:
    return multipart_form(fields, files, content_type="image/png")


async def post_edit(client, fields: dict, files: list[tuple[str, bytes]]):
    return await client.post("/v1/images/edits", data=edit_form(fields, files), headers=AUTH)


@pytest.mark.parametrize("model, path", [
    (FLASH, f"/v1beta/models/{FLASH}:generateContent"),
    ("vertex-flash-image", f"/v1/projects/test-project/locations/us-central1/publishers/google/models/{FLASH}:generateContent"),
])
async def test_sdk_edit_sends_the_prompt_and_every_image_inline_byte_for_byte(client, google, sdk_for, usage_log, model, path):
    # The client labels all three as PNG; the mimeType Google gets is each image's real kind.
    # The PNG is above 1 MiB, so the gateway kept it in a temporary file: read back whole.
    png = big_png(1_500_000)
    answer = await sdk_for(client).images.with_raw_response.edit(
        model=model, prompt="put them on a beach", size="1248x832", response_format="b64_json",
        image=[("a.png", png, "image/png"), ("b.png", JPEG, "image/png"), ("c.png", WEBP, "image/png")],
    )
    result = answer.parse()
    assert [base64.b64decode(item.b64_json) for item in result.data] == [FAKE_PNG]
    assert google.paths == [path]
    sent = google.requests[0]
    assert sent["contents"][0]["parts"][0] == {"text": "put them on a beach"}
    assert sent["generationConfig"] == {"responseModalities": ["IMAGE"], "candidateCount": 1, "imageConfig": {"aspectRatio": "3:2"}}
    assert google.inline_images == [[("image/png", png), ("image/jpeg", JPEG), ("image/webp", WEBP)]]
    usage = await record(usage_log, answer.headers["x-request-id"])
    assert usage["operation"] == "edit" and usage["images"] == 1


async def test_edit_is_billed_by_its_tokens_input_images_included(make_google, google, usage_log):
    client = await make_google()
    prompt = "give the cat a hat"
    resp = await post_edit(client, {"model": PRO, "prompt": prompt, "n": 2, "response_format": "b64_json"},
                           [("image[]", tiny_png(8, 8)), ("image[]", JPEG)])
    body = await images_body(resp)
    # n=2 is two calls (one image each); each carries both images and is billed for them.
    assert len(google.requests) == 2 and google.inline_images == [[("image/png", tiny_png(8, 8)), ("image/jpeg", JPEG)]] * 2
    text = len(prompt) // 4 + 1
    assert body["usage"]["input_tokens_details"] == {"text_tokens": 2 * text, "image_tokens": 2 * 2 * 560}
    assert body["usage"]["input_tokens"] == 2 * (text + 2 * 560) and body["usage"]["output_tokens"] == 2 * 1290
    expected = 2 * (text * PRO_PRICE["text_input"] + 2 * 560 * PRO_PRICE["image_input"] + 1290 * PRO_PRICE["output"]) / 1e6
    assert (await record(usage_log, resp.headers["x-request-id"]))["cost_usd"] == pytest.approx(expected, abs=1e-6)


async def test_edit_token_bill_is_capped_at_the_worst_case_of_its_input_images(client, google, usage_log):
    google.input_image_tokens = 10_000_000  # an upstream that claims absurd input usage
    prompt = "add a moon"
    resp = await post_edit(client, {"model": FLASH, "prompt": prompt, "response_format": "b64_json"}, [("image[]", tiny_png()), ("image[]", JPEG)])
    await images_body(resp)
    cost = (await record(usage_log, resp.headers["x-request-id"]))["cost_usd"]
    # One image at its per-image worst, the prompt at one token per two characters, each input image at 8,192 tokens.
    assert cost == pytest.approx(0.039 + len(prompt) / 2 * 0.30 / 1e6 + 2 * 8192 * 0.30 / 1e6, abs=1e-6)


async def test_a_mask_is_refused_never_dropped(make_google, google, sdk_for, usage_log):
    # The catalog says mask: false, so the core refuses; an operator who widened a model's
    # capabilities to take one still gets a refusal from the adapter, before any call.
    client = await make_google(models=f"""  flash-with-mask:
    provider: gemini
    upstream_model: {FLASH}
    capabilities: {{edits: {{max_images: 3, max_image_bytes: 7000000, image_types: [png], mask: true}}}}
""")
    for model in (FLASH, "flash-with-mask"):
        resp = await post_edit(client, {"model": model, "prompt": "remove the car"}, [("image", tiny_png(4, 4)), ("mask", tiny_png(4, 4, b"\x00\x00\x00"))])
        body = await assert_error(resp, 400, "unsupported_parameter", "mask")
    # The adapter's refusal comes after the hooks: recorded, at no cost.
    assert "Gemini takes no mask" in body["message"]
    assert (await record(usage_log, resp.headers["x-request-id"]))["cost_usd"] == 0
    assert google.requests == []
    # Without the mask the same edit goes through.
    await images_body(await post_edit(client, {"model": "flash-with-mask", "prompt": "remove the car"}, [("image", tiny_png(4, 4))]))
    assert len(google.requests) == 1


async def test_images_beyond_one_requests_size_are_refused_before_any_call(make_google, google, usage_log):
    # Three images of 6 MB each are each within 7 MB, but together their base64 (24 MB) would
    # exceed the 20 MB Google takes in one request. An operator's edits block that names no
    # max_total_bytes still gets the adapter's bound.
    client = await make_google(models=f"""  flash-no-total:
    provider: gemini
    upstream_model: {FLASH}
    capabilities: {{edits: {{max_images: 3, max_image_bytes: 7000000, image_types: [png]}}}}
""")
    images = [("image[]", big_png(6_000_000)) for _ in range(3)]
    for model in (FLASH, "flash-no-total", "vertex-flash-image"):
        resp = await post_edit(client, {"model": model, "prompt": "merge them"}, images)
        body = await assert_error(resp, 400, "image_too_large", "image")
        assert "14000000 bytes together" in body["message"]
        if model == "flash-no-total":  # refused by the adapter, after the hooks: recorded at no cost
            assert (await record(usage_log, resp.headers["x-request-id"]))["cost_usd"] == 0
    assert google.paths == [] and google.token_requests == []


async def test_the_largest_edit_allowed_fits_googles_request_limit(client, google, usage_log):
    # The hard case of the bound: images of exactly max_total_bytes together and the longest
    # prompt, of characters JSON escapes to 12 bytes each, still fit 20,000,000 bytes.
    images = [("image[]", big_png(7_000_000 - 33)), ("image[]", big_png(7_000_000 - 33))]
    assert sum(len(data) for _, data in images) == 14_000_000
    prompt = "\U0001F3A8" * 32000
    resp = await post_edit(client, {"model": PRO, "prompt": prompt, "response_format": "b64_json"}, images)
    await images_body(resp)
    assert int(google.headers[0]["Content-Length"]) <= 20_000_000
    assert google.inline_images == [[("image/png", data) for _, data in images]]
    assert google.requests[0]["contents"][0]["parts"][0]["text"] == prompt


async def test_a_fallback_that_cannot_take_the_images_together_is_skipped(make_google, google):
    # The images' total is checked for every fallback before it is called, like their count.
    client = await make_google(models=f"""  pro-with-fallback:
    provider: gemini
    upstream_model: {PRO}
    fallbacks: [flash-small-total]
  flash-small-total:
    provider: gemini
    upstream_model: {FLASH}
    capabilities: {{edits: {{max_images: 3, max_image_bytes: 7000000, max_total_bytes: 1000, image_types: [png]}}}}
""")
    small, large = [("image[]", tiny_png(2, 2))] * 2, [("image[]", big_png(500))] * 2  # 2 x 533 bytes: over 1000 together
    google.cue(status=503, body=GOOGLE_503)
    await assert_error(await post_edit(client, {"model": "pro-with-fallback", "prompt": "x"}, large), 502, "upstream_error")
    assert [p.rsplit("/", 1)[1] for p in google.paths] == [f"{PRO}:generateContent"]
    google.cue(status=503, body=GOOGLE_503)
    await images_body(await post_edit(client, {"model": "pro-with-fallback", "prompt": "x"}, small))
    assert [p.rsplit("/", 1)[1] for p in google.paths[1:]] == [f"{PRO}:generateContent", f"{FLASH}:generateContent"]


async def test_edit_bodies_count_against_the_process_memory_budget(make_google, google):
    # The base64 body is held in memory while its calls run: counted with the upstream answers
    # held, so many large edits at once get 503 instead of a growing heap.
    client = await make_google(server="server: {max_upstream_buffer_bytes: 2000000}")
    resp = await post_edit(client, {"model": FLASH, "prompt": "x"}, [("image", big_png(1_600_000))])  # 2.13 MB in base64
    await assert_error(resp, 503, "server_overloaded")
    assert google.paths == []
    await images_body(await post_edit(client, {"model": FLASH, "prompt": "x"}, [("image", big_png(1_200_000))]))  # 1.6 MB
    assert len(google.paths) == 1
    buffer = client.gateway.shared.upstream_buffer
    for _ in range(100):  # released when the request's task has ended
        if buffer.held == 0:
            break
        await asyncio.sleep(0.02)
    assert buffer.held == 0


@pytest.mark.parametrize("prompt, words", [("forbidden edit", "PROHIBITED_CONTENT"), ("unsafe-image edit", "IMAGE_SAFETY")])
async def test_a_content_policy_refusal_of_an_edit(client, google, usage_log, prompt, words):
    resp = await post_edit(client, {"model": FLASH, "prompt": prompt}, [("image", tiny_png())])
    body = await assert_error(resp, 400, "content_policy_violation", "prompt")
    assert words in body["message"]
    assert len(google.requests) == 1 and google.inline_images == [[("image/png", tiny_png())]]
    usage = await record(usage_log, resp.headers["x-request-id"])
    assert usage["operation"] == "edit" and usage["cost_usd"] == 0 and usage["error"] == "content_policy_violation"


async def test_an_edit_that_failed_for_nothing_is_sent_again_whole(make_google, google, usage_log):
    client = await make_google(retries=2)
    google.cue(status=503, body=GOOGLE_503)
    png = big_png(2_000_000)
    resp = await post_edit(client, {"model": FLASH, "prompt": "sharpen", "response_format": "b64_json"}, [("image", png)])
    await images_body(resp)
    assert google.inline_images == [[("image/png", png)]] * 2
    assert (await record(usage_log, resp.headers["x-request-id"]))["attempts"] == 2


async def test_imagen_and_variations_are_still_refused(make_google, google):
    # Imagen edits with other models (capability models, referenceImages): even a model given
    # edits capabilities by the operator is refused by the adapter, as are variations.
    client = await make_google(models=f"""  imagen-with-edits:
    provider: gemini
    upstream_model: {IMAGEN}
    capabilities: {{edits: {{max_images: 1, max_image_bytes: 7000000, image_types: [png]}}}}
""")
    for model in (IMAGEN, "imagen-with-edits"):
        resp = await post_edit(client, {"model": model, "prompt": "a hat"}, [("image", tiny_png())])
        await assert_error(resp, 400, "unsupported_operation", "model")
    resp = await client.post("/v1/images/variations", data=edit_form({"model": FLASH}, [("image", tiny_png())]), headers=AUTH)
    await assert_error(resp, 400, "unsupported_operation", "model")
    assert google.requests == []


async def test_too_many_images_for_the_model_are_refused(client, google):
    resp = await post_edit(client, {"model": FLASH, "prompt": "a collage"}, [("image[]", tiny_png())] * 4)
    await assert_error(resp, 400, "too_many_images", "image")
    assert google.requests == []


# Vertex AI's service-account token.

async def test_vertex_token_is_fetched_once_and_reused(client, google):
    for _ in range(3):
        await images_body(await post(client, {"model": "vertex-imagen", "prompt": "a fox", "response_format": "b64_json"}))
    assert len(google.token_requests) == 1
    assert {h["Authorization"] for h in google.headers} == {f"Bearer {ACCESS_TOKEN_PREFIX}1"}
    assert google.headers[0]["x-goog-user-project"] == "test-project"


async def test_vertex_token_is_refreshed_before_it_expires(make_google, google):
    client = await make_google(vertex_options=", token_refresh_margin: 300")
    google.token_lifetime = 301  # within the margin one second after it is issued
    await images_body(await post(client, {"model": "vertex-imagen", "prompt": "a fox", "response_format": "b64_json"}))
    first = f"{ACCESS_TOKEN_PREFIX}1"
    await asyncio.sleep(1.2)
    await images_body(await post(client, {"model": "vertex-flash-image", "prompt": "a fox", "response_format": "b64_json"}))
    assert len(google.token_requests) == 2
    assert google.headers[1]["Authorization"] == f"Bearer {ACCESS_TOKEN_PREFIX}2"
    # The new token came while the old one was still valid: a refresh before expiry, not after a refusal.
    assert google.token_requests[1]["received"] < google.tokens[first]


async def test_vertex_token_the_provider_refuses_is_replaced_on_the_next_request(client, google):
    await images_body(await post(client, {"model": "vertex-imagen", "prompt": "a fox", "response_format": "b64_json"}))
    google.revoke()
    await assert_error(await post(client, {"model": "vertex-imagen", "prompt": "a fox"}), 502, "upstream_auth_failed")
    await images_body(await post(client, {"model": "vertex-imagen", "prompt": "a fox", "response_format": "b64_json"}))
    assert len(google.token_requests) == 2


async def test_vertex_credentials_file_named_by_the_environment(make_google, google, credentials):
    client = await make_google(credentials_file="${GOOGLE_APPLICATION_CREDENTIALS:-}", env={"GOOGLE_APPLICATION_CREDENTIALS": str(credentials)})
    await images_body(await post(client, {"model": "vertex-imagen", "prompt": "a fox", "response_format": "b64_json"}))
    assert len(google.token_requests) == 1


async def test_vertex_assertion_is_signed_for_the_file_token_uri(client, google):
    await images_body(await post(client, {"model": "vertex-imagen", "prompt": "a fox", "response_format": "b64_json"}))
    claims = google.token_requests[0]
    assert claims["aud"] == f"{google.base_url}/token" and claims["iss"].endswith(".iam.gserviceaccount.com")
    assert claims["exp"] - claims["iat"] <= 3600


async def test_vertex_invalid_grant_is_upstream_auth_failed_and_calls_no_model(client, google):
    google.token_cues.append(Cue(status=400, body={"error": "invalid_grant", "error_description": "Invalid JWT Signature."}))
    await assert_error(await post(client, {"model": "vertex-imagen", "prompt": "a fox"}), 502, "upstream_auth_failed")
    assert google.requests == []


@pytest.mark.parametrize("cue, code", [
    ({"status": 500, "body": {"error": "internal_failure"}}, "upstream_error"),
    ({"cut": True}, "upstream_bad_response"),
    ({"status": 200, "body": {"access_token": 5}}, "upstream_bad_response"),
])
async def test_vertex_token_endpoint_failure_is_502_and_calls_no_model(client, google, cue, code):
    google.token_cues.append(Cue(**cue))
    await assert_error(await post(client, {"model": "vertex-imagen", "prompt": "a fox"}), 502, code)
    assert google.requests == []


async def test_a_token_endpoint_failure_produced_nothing_so_it_is_retried(make_google, google, usage_log):
    client = await make_google(retries=2)
    # A 5xx from the token endpoint: no image was asked for, so a retry cannot pay twice.
    google.token_cues.append(Cue(status=503, body={"error": "temporarily_unavailable"}))
    resp = await post(client, {"model": "vertex-imagen", "prompt": "a fox", "response_format": "b64_json"})
    await images_body(resp)
    assert len(google.requests) == 1  # one image call, paid once
    assert (await record(usage_log, resp.headers["x-request-id"]))["cost_usd"] == pytest.approx(IMAGEN_PRICE)


async def test_an_image_call_that_timed_out_is_never_retried(make_google, google):
    client = await make_google(total=0.5, retries=3)
    google.cue(delay=2, body={"predictions": []})
    await assert_error(await post(client, {"model": IMAGEN, "prompt": "a fox"}), 504, "upstream_timeout")
    await asyncio.sleep(0.1)
    assert len(google.requests) == 1  # Google may have generated (and billed) it: no second call


async def test_google_429_and_5xx_produced_nothing_so_they_are_retried(make_google, google):
    client = await make_google(retries=3)
    google.cue(status=429, body={"error": {"code": 429, "message": "Quota exceeded.", "status": "RESOURCE_EXHAUSTED"}})
    google.cue(status=503, body={"error": {"code": 503, "message": "The service is currently unavailable.", "status": "UNAVAILABLE"}})
    await images_body(await post(client, {"model": IMAGEN, "prompt": "a fox", "response_format": "b64_json"}))
    assert len(google.requests) == 3


@pytest.mark.parametrize("content", [None, "not json", json.dumps({"private_key": "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n", "client_email": "x", "token_uri": "http://127.0.0.1:1/token"})])
async def test_vertex_without_usable_credentials_is_503_that_shows_no_key(make_google, google, tmp_path, content):
    path = tmp_path / "missing.json"
    if content is not None:
        path.write_text(content)
    client = await make_google(credentials_file=path)
    error = await assert_error(await post(client, {"model": "vertex-imagen", "prompt": "a fox"}), 503, "provider_not_configured")
    assert "credentials_file" in error["message"] and "AAAA" not in error["message"]
    assert google.requests == [] and google.token_requests == []


async def test_private_key_and_tokens_never_in_logs_or_answers(client, google, all_log_output, tmp_path):
    google.cue(status=401, body={"error": {"code": 401, "message": "Request had invalid authentication credentials.", "status": "UNAUTHENTICATED"}})
    await assert_error(await post(client, {"model": "vertex-imagen", "prompt": "a fox"}), 502, "upstream_auth_failed")
    resp = await post(client, {"model": "vertex-imagen", "prompt": "a fox", "response_format": "b64_json"})
    text = await resp.text()
    logs = "\n".join(all_log_output)
    assert google.token_requests  # a key was used and tokens issued...
    for secret in (PRIVATE_KEY_LINE, ACCESS_TOKEN_PREFIX, FakeUpstream.key):
        assert secret not in logs and secret not in text  # ...and none of them shows
    assert "-----BEGIN PRIVATE KEY-----" in PRIVATE_KEY_PEM and "BEGIN PRIVATE KEY" not in logs


# The translation's ground truth.

def test_the_imagen_spec_copy_matches_the_shared_one():
    if not SHARED_SPECS.is_dir():
        pytest.skip("no shared/specs beside this checkout")
    here = Path(__file__).resolve().parent / "specs" / "google-imagen.yaml"
    assert here.read_bytes() == (SHARED_SPECS / "google-imagen.yaml").read_bytes()


def test_catalog_prices_have_source_and_date():
    from imgproxy.providers.google import GoogleProvider

    for name, entry in GoogleProvider.models.items():
        assert entry.price is not None, name
        assert entry.sources["price"][0].startswith("https://") and entry.sources["price"][1], name
