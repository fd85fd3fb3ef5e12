"""Google's image models (Imagen `predict`, Gemini `generateContent`) on the Gemini API
(`google_genai`, API key) and Vertex AI (`vertex_ai`, service-account access token), against
a fake Google that speaks the wire formats of tests/specs/ and misbehaves on cue."""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path

import pytest

from imgproxy.gateway import Gateway
from imgproxy.server import create_app
from tests.conftest import AUTH, CLIENT_KEY, assert_error, download, images_body
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
def usage_log(tmp_path):
    return tmp_path / "usage.jsonl"


@pytest.fixture
def credentials(tmp_path, google):
    return service_account_file(tmp_path / "service-account.json", f"{google.base_url}/token")


@pytest.fixture
def make_google(aiohttp_client, google, credentials, usage_log, tmp_path):
    async def make(*, api_key: str = FakeUpstream.key, credentials_file=None, total: float = 5, vertex_options: str = "", retries: int = 1, env=None, models: str = ""):
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
