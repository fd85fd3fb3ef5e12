"""The stability_v2 adapter over real sockets: Stability's v2beta stable-image endpoints
(FakeStabilityV2 checks every multipart request against the spec), the conformance cases."""

import base64
import json

import pytest

from imgproxy.egress import UrlRefused
from imgproxy.gateway import Gateway
from imgproxy.server import create_app
from tests.conftest import AUTH, CLIENT_KEY, assert_each_image_is, assert_error, images_body, serve_fake
from tests.fakes import FAKE_PNG, FakeUpstream
from tests.fakes_v2 import FakeStabilityV2

URL = "/v1/images/generations"


@pytest.fixture
async def fake_v2(aiohttp_server):
    async for fake in serve_fake(aiohttp_server, FakeStabilityV2()):
        yield fake


def config(base_url: str, tmp_path, api_key: str = FakeUpstream.key, total: float = 5, options: str = "{}") -> str:
    return f"""
auth:
  keys:
    - {{name: team-a, key: {CLIENT_KEY}}}
providers:
  stability-v2:
    type: stability_v2
    base_url: {base_url}
    api_key: {api_key}
    timeouts: {{connect: 2, total: {total}}}
    options: {options}
models:
  stable-image-core: {{provider: stability-v2, aliases: [core]}}
  stable-image-ultra: {{provider: stability-v2, aliases: [ultra]}}
  sd3.5-large: {{provider: stability-v2}}
  sd3.5-large-turbo: {{provider: stability-v2}}
  sd3.5-medium: {{provider: stability-v2}}
images:
  directory: {tmp_path / "images"}
  signing_key: test-signing-key
cost:
  usage_log: {tmp_path / "usage.jsonl"}
"""


@pytest.fixture
def v2_client(aiohttp_client, fake_v2, tmp_path):
    async def make(**kwargs):
        gateway = await Gateway.load(text=config(fake_v2.base_url, tmp_path, **kwargs), env={})
        return await aiohttp_client(create_app(gateway))

    return make


def records(tmp_path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "usage.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("response_format", ["url", "b64_json"])
async def test_reference_example(v2_client, fake_v2, response_format):
    client = await v2_client()
    body = {"model": "core", "prompt": "A cute baby sea otter", "n": 2, "size": "1024x1024", "response_format": response_format}
    answer = await images_body(await client.post(URL, json=body, headers=AUTH))
    assert len(answer["data"]) == 2
    await assert_each_image_is(client, answer, response_format, FAKE_PNG)
    # One image per call: two calls, each a text-to-image request for 1:1, as base64 JSON or,
    # for images the gateway hosts, as bytes.
    assert fake_v2.endpoints == ["core", "core"]
    assert all(form == {"prompt": "A cute baby sea otter", "aspect_ratio": "1:1", "output_format": "png"} for form in fake_v2.requests)
    accept = "image/*" if response_format == "url" else "application/json"
    assert all(h["Accept"] == accept and h["Authorization"] == f"Bearer {FakeUpstream.key}" for h in fake_v2.headers)


async def test_openai_sdk(v2_client, fake_v2, sdk_for):
    sdk = sdk_for(await v2_client())
    result = await sdk.images.generate(model="stable-image-ultra", prompt="a lighthouse", size="1792x1024", response_format="b64_json")
    assert base64.b64decode(result.data[0].b64_json) == FAKE_PNG
    assert (fake_v2.endpoints, fake_v2.requests[0]["aspect_ratio"]) == (["ultra"], "16:9")


@pytest.mark.parametrize(
    "size, ratio",
    [("1024x1024", "1:1"), ("1792x1024", "16:9"), ("1024x1792", "9:16"), ("1536x1024", "3:2"), ("1024x1536", "2:3"),
     ("2100x900", "21:9"), ("900x2100", "9:21"), ("1280x1024", "5:4"), ("1024x1280", "4:5"), ("64x16384", "9:21")],
)
async def test_size_becomes_the_nearest_aspect_ratio(v2_client, fake_v2, size, ratio):
    client = await v2_client()
    await images_body(await client.post(URL, json={"model": "core", "prompt": "x", "size": size}, headers=AUTH))
    assert fake_v2.requests[0]["aspect_ratio"] == ratio


async def test_parameters_translated(v2_client, fake_v2):
    client = await v2_client()
    body = {"model": "sd3.5-large-turbo", "prompt": "x", "style": "natural", "output_format": "jpeg", "user": "end-user-7", "response_format": "b64_json"}
    await images_body(await client.post(URL, json=body, headers=AUTH))
    await images_body(await client.post(URL, json={"model": "ultra", "prompt": "y", "style": "vivid", "output_format": "webp"}, headers=AUTH))
    sd3, ultra = fake_v2.requests
    assert fake_v2.endpoints == ["sd3", "ultra"]
    assert sd3 == {"prompt": "x", "aspect_ratio": "1:1", "output_format": "jpeg", "mode": "text-to-image", "model": "sd3.5-large-turbo", "style_preset": "photographic"}
    assert ultra["style_preset"] == "enhance" and ultra["output_format"] == "webp" and "model" not in ultra
    # The end-user id goes in Stability's header for it, as the OpenAI adapter passes `user`.
    assert fake_v2.headers[0]["stability-client-user-id"] == "end-user-7" and "stability-client-user-id" not in fake_v2.headers[1]


@pytest.mark.parametrize(
    "body, code, param",
    [
        ({"model": "core", "prompt": "x", "quality": "hd"}, "unsupported_parameter", "quality"),
        ({"model": "sd3.5-medium", "prompt": "x", "output_format": "webp"}, "invalid_value", "output_format"),
        ({"model": "core", "prompt": "x", "background": "transparent"}, "unsupported_parameter", "background"),
        ({"model": "core", "prompt": "x", "output_compression": 50}, "unsupported_parameter", "output_compression"),
        ({"model": "core", "prompt": "x", "stream": True, "response_format": "b64_json"}, "unsupported_parameter", "stream"),
        ({"model": "core", "prompt": "x", "n": 11}, "invalid_value", "n"),
        ({"model": "core", "prompt": "x", "size": "auto"}, "invalid_size", "size"),
        ({"model": "core", "prompt": "x" * 10001}, "string_above_max_length", "prompt"),
    ],
)
async def test_parameters_refused(v2_client, fake_v2, body, code, param):
    client = await v2_client()
    error = await assert_error(await client.post(URL, json=body, headers=AUTH), 400, code, param)
    assert error["message"]
    assert fake_v2.requests == []


@pytest.mark.parametrize("n", [1, 3])
async def test_content_moderation_is_a_content_policy_violation(v2_client, fake_v2, n):
    client = await v2_client()
    error = await assert_error(await client.post(URL, json={"model": "core", "prompt": "forbidden", "n": n}, headers=AUTH), 400, "content_policy_violation")
    assert "category: violence" in error["message"]  # the provider's filter category is kept
    error = await assert_error(await client.post(URL, json={"model": "core", "prompt": "celebrity"}, headers=AUTH), 400, "content_policy_violation", "prompt")
    assert "public figure" in error["message"]


async def test_filtered_images_are_withheld_and_not_billed(v2_client, fake_v2, tmp_path):
    client = await v2_client()
    resp = await client.post(URL, json={"model": "core", "prompt": "blurry", "n": 3, "response_format": "b64_json"}, headers=AUTH)
    assert len((await images_body(resp))["data"]) == 2
    assert resp.headers["x-imgproxy-cost-usd"] == "0.060000"
    # Only one image, filtered: a content policy refusal, nothing billed.
    fake_v2.blurred = False
    await assert_error(await client.post(URL, json={"model": "core", "prompt": "blurry"}, headers=AUTH), 400, "content_policy_violation")
    await client.close()
    assert [(r["images"], r["cost_usd"]) for r in records(tmp_path)] == [(2, 0.06), (0, 0.0)]


async def test_rejected_key_is_502_and_the_key_never_shown(v2_client, fake_v2, caplog):
    client = await v2_client()
    # A provider that echoes the key it was sent in its error.
    fake_v2.cue(status=401, body={"id": "x", "name": "unauthorized", "errors": [f"bad key {FakeUpstream.key}"]})
    error = await assert_error(await client.post(URL, json={"model": "core", "prompt": "x"}, headers=AUTH), 502, "upstream_auth_failed")
    assert FakeUpstream.key not in json.dumps(error) and FakeUpstream.key not in caplog.text
    wrong = await v2_client(api_key="sk-wrong-key-000000000000")
    await assert_error(await wrong.post(URL, json={"model": "core", "prompt": "x"}, headers=AUTH), 502, "upstream_auth_failed")
    # Content moderation is a 403 too, and stays a content policy refusal (tested above).


@pytest.mark.parametrize("retry_after, expected", [("7", "7"), (None, "60"), ("soon; key=x", "60")])
async def test_rate_limit_is_429_with_retry_after(v2_client, fake_v2, retry_after, expected):
    client = await v2_client()
    headers = {"Retry-After": retry_after} if retry_after else {}
    fake_v2.cue(status=429, body={"id": "rate_limit_exceeded", "name": "rate_limit_exceeded", "errors": ["You have exceeded the rate limit."]}, headers=headers)
    resp = await client.post(URL, json={"model": "core", "prompt": "x"}, headers=AUTH)
    await assert_error(resp, 429, "rate_limit_exceeded")
    assert resp.headers["Retry-After"] == expected


@pytest.mark.parametrize(
    "cue, code",
    [
        ({"status": 500, "body": {"id": "x", "name": "internal_error", "errors": ["An unexpected server error has occurred."]}}, "upstream_error"),
        ({"status": 503, "body": b"<html>Service Unavailable</html>", "content_type": "text/html"}, "upstream_error"),
        ({"status": 200, "body": b"<html>not json</html>", "content_type": "application/json"}, "upstream_bad_response"),
        ({"status": 200, "body": {"seed": 1, "finish_reason": "SUCCESS"}}, "upstream_bad_response"),  # no image
        ({"status": 200, "body": {"image": "not base64!", "seed": 1, "finish_reason": "SUCCESS"}}, "upstream_bad_response"),
        ({"status": 200, "cut": True}, "upstream_bad_response"),
        ({"status": 200, "cut": True, "content_type": "image/png"}, "upstream_bad_response"),
        ({"status": 200, "body": b"", "content_type": "image/png", "headers": {"finish-reason": "SUCCESS"}}, "upstream_bad_response"),
    ],
)
@pytest.mark.parametrize("response_format", ["url", "b64_json"])
async def test_server_errors_garbage_and_cuts_are_502(v2_client, fake_v2, tmp_path, cue, code, response_format):
    client = await v2_client()
    fake_v2.cue(**cue)
    body = {"model": "core", "prompt": "x", "response_format": response_format}
    await assert_error(await client.post(URL, json=body, headers=AUTH), 502, code)
    await client.close()
    assert records(tmp_path)[0]["cost_usd"] == 0.0


async def test_a_failed_call_of_several_keeps_the_images_paid_for(v2_client, fake_v2, tmp_path):
    client = await v2_client()
    fake_v2.cue(status=500, body={"id": "x", "name": "internal_error", "errors": ["oops"]})
    resp = await client.post(URL, json={"model": "sd3.5-large", "prompt": "x", "n": 3, "response_format": "b64_json"}, headers=AUTH)
    assert len((await images_body(resp))["data"]) == 2
    assert len(fake_v2.requests) == 3  # nothing called again
    assert resp.headers["x-imgproxy-cost-usd"] == "0.130000"  # two images at 6.5 credits


async def test_fan_out_is_bounded(v2_client, fake_v2):
    client = await v2_client()
    fake_v2.delay = 0.2
    answer = await images_body(await client.post(URL, json={"model": "core", "prompt": "x", "n": 10, "response_format": "b64_json"}, headers=AUTH))
    assert len(answer["data"]) == 10 and len(fake_v2.requests) == 10
    assert fake_v2.most_in_flight == 4


async def test_fan_out_bound_is_the_providers_max_parallel(v2_client, fake_v2):
    client = await v2_client(options="{max_parallel: 2}")
    fake_v2.delay = 0.2
    answer = await images_body(await client.post(URL, json={"model": "core", "prompt": "x", "n": 5, "response_format": "b64_json"}, headers=AUTH))
    assert len(answer["data"]) == 5 and len(fake_v2.requests) == 5
    assert fake_v2.most_in_flight == 2


@pytest.mark.parametrize(
    "model, n, cost",
    [("core", 2, 0.06), ("ultra", 1, 0.08), ("sd3.5-large", 1, 0.065), ("sd3.5-large-turbo", 2, 0.08), ("sd3.5-medium", 1, 0.035)],
)
async def test_usage_record_costs_what_was_delivered(v2_client, fake_v2, tmp_path, model, n, cost):
    client = await v2_client()
    resp = await client.post(URL, json={"model": model, "prompt": "x", "n": n}, headers=AUTH)
    assert len((await images_body(resp))["data"]) == n
    await client.close()
    (record,) = records(tmp_path)
    assert (record["images"], record["provider"]) == (n, "stability-v2")
    assert record["cost_usd"] == pytest.approx(cost) and resp.headers["x-imgproxy-cost-usd"] == f"{cost:.6f}"


async def test_default_host_is_stability(tmp_path):
    gateway = await Gateway.load(text=config("", tmp_path).replace("    base_url: \n", ""), env={})
    adapter = gateway.providers["stability-v2"]
    assert adapter.config.base_url == "https://api.stability.ai"
    url = "https://api.stability.ai/v2beta/stable-image/generate/core"
    assert adapter.config.egress.target(url) == url
    with pytest.raises(UrlRefused):
        adapter.config.egress.target("https://elsewhere.example/v2beta/stable-image/generate/core")


async def test_calls_waiting_for_their_turn_share_the_attempts_time(v2_client, fake_v2, tmp_path):
    # Eight calls, four at a time, each answered after 1.5 s, within 2.5 s for the attempt: the
    # second four have 1 s left and time out (each on its own clock they would all succeed).
    client = await v2_client(total=2.5)
    fake_v2.delay = 1.5
    resp = await client.post(URL, json={"model": "core", "prompt": "x", "n": 8, "response_format": "b64_json"}, headers=AUTH)
    assert len((await images_body(resp))["data"]) == 4
    assert resp.headers["x-imgproxy-cost-usd"] == "0.120000"


@pytest.mark.parametrize("options", ["{max_parallel: 0}", "{max_parallel: many}"])
async def test_a_fan_out_bound_that_would_never_call_is_a_config_error(tmp_path, options):
    from imgproxy.config import ConfigError

    with pytest.raises(ConfigError) as caught:
        await Gateway.load(text=config("http://127.0.0.1:9", tmp_path, options=options), env={})
    assert caught.value.path == "providers.stability-v2.options.max_parallel"
