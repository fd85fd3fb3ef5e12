"""OpenAI's newer GPT image models from the catalog (providers/openai.yaml), against the fake
OpenAI: their parameters, gpt-image-2's free sizes, and each model's own token prices."""

from __future__ import annotations

import base64

import pytest
import yaml

from imgproxy.gateway import Gateway
from imgproxy.server import create_app
from tests.conftest import AUTH, CLIENT_KEY, assert_error, images_body
from tests.fakes import FAKE_B64, FakeUpstream, tiny_png
from tests.conftest import usage_records as records

NEW = ("gpt-image-1-mini", "gpt-image-1.5", "gpt-image-2")


@pytest.fixture
async def client(aiohttp_client, fake_openai, tmp_path):
    raw = {
        "auth": {"keys": [{"name": "team-a", "key": CLIENT_KEY}]},
        "providers": {"openai": {"type": "openai", "base_url": f"{fake_openai.base_url}/v1", "api_key": FakeUpstream.key}},
        "models": {name: {"provider": "openai"} for name in NEW},
        "images": {"directory": str(tmp_path / "images"), "signing_key": "test-signing-key"},
        "cost": {"usage_log": str(tmp_path / "usage.jsonl")},
    }
    gateway = await Gateway.load(text=yaml.safe_dump(raw), env={})
    return await aiohttp_client(create_app(gateway))


async def post(client, body):
    return await client.post("/v1/images/generations", json=body, headers=AUTH)


@pytest.mark.parametrize(
    "model, text_in, image_in, out",
    [("gpt-image-1-mini", 2.0, 2.5, 8.0), ("gpt-image-1.5", 5.0, 8.0, 32.0), ("gpt-image-2", 5.0, 8.0, 30.0)],
)
async def test_each_model_is_billed_its_own_token_prices(client, fake_openai, tmp_path, model, text_in, image_in, out):
    body = {"model": model, "prompt": "a logo", "n": 2, "quality": "medium", "size": "1024x1536", "background": "transparent", "output_format": "webp"}
    result = await images_body(await post(client, body))
    assert len(result["data"]) == 2
    sent = fake_openai.requests[-1]
    assert {k: sent[k] for k in body} == body and "response_format" not in sent and sent["moderation"] == "auto"
    (record,) = await records(tmp_path / "usage.jsonl")
    # The fake's usage: 10 text and 40 image tokens in, 50 out.
    assert record["cost_usd"] == pytest.approx((10 * text_in + 40 * image_in + 50 * out) / 1e6, abs=1e-6)


@pytest.mark.parametrize("size", ["1536x864", "1920x1088", "3840x2160", "2160x3840", "3840x1280", "256x768"])
async def test_gpt_image_2_takes_free_sizes_within_its_limits(client, fake_openai, size):
    await images_body(await post(client, {"model": "gpt-image-2", "prompt": "p", "size": size}))
    assert fake_openai.requests[-1]["size"] == size


@pytest.mark.parametrize(
    "model, size",
    [
        ("gpt-image-2", "3840x3840"),  # more pixels than 3840x2160
        ("gpt-image-2", "3840x1264"),  # wider than 3:1
        ("gpt-image-2", "1000x1000"),  # not in steps of 16
        ("gpt-image-2", "4096x1024"),  # a side above 3840
        ("gpt-image-2", "240x240"),  # a side below 256
        ("gpt-image-1.5", "1536x864"),  # no free sizes before gpt-image-2
        ("gpt-image-1-mini", "1792x1024"),
    ],
)
async def test_sizes_outside_the_limits_are_refused(client, fake_openai, model, size):
    error = await assert_error(await post(client, {"model": model, "prompt": "p", "size": size}), 400, "invalid_size", "size")
    assert model in error["message"]
    assert fake_openai.requests == []


async def test_a_free_size_without_usage_is_billed_at_the_largest_size(client, fake_openai, tmp_path):
    fake_openai.cue(body={"created": 1, "data": [{"b64_json": FAKE_B64}]})
    await images_body(await post(client, {"model": "gpt-image-2", "prompt": "p", "size": "1920x1088", "quality": "high"}))
    (record,) = await records(tmp_path / "usage.jsonl")
    assert record["cost_usd"] == pytest.approx(1.112)


async def test_quality_levels_beyond_the_published_spec_are_refused(client, fake_openai):
    await assert_error(await post(client, {"model": "gpt-image-2", "prompt": "p", "quality": "xhigh"}), 400, "invalid_value", "quality")
    assert fake_openai.requests == []


# n above what one call makes (max_n_per_call): parallel calls, merged (Provider.fan_out).

ERROR_500 = {"error": {"message": "The server had an error while processing your request.", "type": "server_error", "param": None, "code": None}}


@pytest.fixture
async def fan_client(aiohttp_client, fake_openai, tmp_path):
    raw = {
        "auth": {"keys": [{"name": "team-a", "key": CLIENT_KEY}]},
        "providers": {"openai": {"type": "openai", "base_url": f"{fake_openai.base_url}/v1", "api_key": FakeUpstream.key}},
        "models": {
            # OpenAI takes n=1 for dall-e-3 (the catalog's max_n_per_call): an operator who allows 3 gets 3 calls.
            "dall-e-3-x3": {"provider": "openai", "upstream_model": "dall-e-3", "capabilities": {"max_n": 3}},
            # A host that makes at most 2 images a call.
            "gpt-image-by-2": {"provider": "openai", "upstream_model": "gpt-image-1", "capabilities": {"max_n_per_call": 2}},
        },
        "images": {"directory": str(tmp_path / "images"), "signing_key": "test-signing-key"},
        "cost": {"usage_log": str(tmp_path / "usage.jsonl")},
    }
    gateway = await Gateway.load(text=yaml.safe_dump(raw), env={})
    return await aiohttp_client(create_app(gateway))


async def test_dall_e_3_n_3_is_three_calls_of_one_image(fan_client, fake_openai, tmp_path):
    fake_openai.distinct_images = True
    resp = await post(fan_client, {"model": "dall-e-3-x3", "prompt": "a fox", "n": 3, "response_format": "b64_json"})
    body = await images_body(resp)
    assert [(r["model"], r["n"]) for r in fake_openai.requests] == [("dall-e-3", 1)] * 3
    images = [base64.b64decode(item["b64_json"]) for item in body["data"]]
    assert set(images) == {tiny_png(rgb=k.to_bytes(3, "big")) for k in (1, 2, 3)}  # three distinct images, each the fake's
    assert all(item["revised_prompt"] == "Revised: a fox" for item in body["data"])
    (record,) = await records(tmp_path / "usage.jsonl")
    assert (record["n"], record["images"], record["cost_usd"]) == (3, 3, pytest.approx(3 * 0.04))


async def test_one_failed_call_of_three_delivers_two_billed_as_two(fan_client, fake_openai, tmp_path):
    fake_openai.distinct_images = True
    fake_openai.cue(status=500, body=ERROR_500)
    resp = await post(fan_client, {"model": "dall-e-3-x3", "prompt": "a fox", "n": 3, "response_format": "b64_json"})
    body = await images_body(resp)
    assert len(fake_openai.requests) == 3 and len(body["data"]) == 2
    assert {base64.b64decode(item["b64_json"]) for item in body["data"]} == {tiny_png(rgb=k.to_bytes(3, "big")) for k in (1, 2)}
    (record,) = await records(tmp_path / "usage.jsonl")
    assert (record["images"], record["cost_usd"]) == (2, pytest.approx(2 * 0.04))
    assert "undelivered_billed" not in record and resp.headers["x-imgproxy-cost-usd"] == "0.080000"


async def test_calls_of_at_most_max_n_per_call_with_their_usage_summed(fan_client, fake_openai, tmp_path):
    resp = await post(fan_client, {"model": "gpt-image-by-2", "prompt": "a fox", "n": 3})
    body = await images_body(resp)
    assert sorted(r["n"] for r in fake_openai.requests) == [1, 2] and len(body["data"]) == 3
    # The fake's usage per call: 10 text and 40 image tokens in, 50 out; two calls.
    assert body["usage"] == {"total_tokens": 200, "input_tokens": 100, "output_tokens": 100, "input_tokens_details": {"text_tokens": 20, "image_tokens": 80}}
    (record,) = await records(tmp_path / "usage.jsonl")
    assert record["cost_usd"] == pytest.approx(2 * (10 * 5.0 + 40 * 10.0 + 50 * 40.0) / 1e6, abs=1e-6)


async def test_a_stream_is_never_fanned_out(fan_client, fake_openai):
    resp = await post(fan_client, {"model": "gpt-image-by-2", "prompt": "a fox", "n": 3, "stream": True})
    await assert_error(resp, 400, "invalid_n", "n")
    await images_body(await post(fan_client, {"model": "dall-e-3-x3", "prompt": "a fox", "n": 1}))  # one call: as before
    assert [r["n"] for r in fake_openai.requests] == [1]
