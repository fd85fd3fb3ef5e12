"""OpenAI's newer GPT image models from the catalog (providers/openai.yaml), against the fake
OpenAI: their parameters, gpt-image-2's free sizes, and each model's own token prices."""

from __future__ import annotations

import pytest
import yaml

from imgproxy.gateway import Gateway
from imgproxy.server import create_app
from tests.conftest import AUTH, CLIENT_KEY, assert_error, images_body
from tests.fakes import FAKE_B64, FakeUpstream
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
    [("gpt-image-1-mini", 2.0, 2.5, 8.0), ("gpt-image-1.5", 5.0, 8.0, 32.0), ("gpt-image-2", 5.0, 8.0, 32.0)],
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
    assert record["cost_usd"] == pytest.approx(1.055)


async def test_quality_levels_beyond_the_published_spec_are_refused(client, fake_openai):
    await assert_error(await post(client, {"model": "gpt-image-2", "prompt": "p", "quality": "xhigh"}), 400, "invalid_value", "quality")
    assert fake_openai.requests == []
