"""plugins/cost through HTTP: prices, reconciliation, usage records and budgets."""

import asyncio
import json

import openai
import pytest

from imgproxy.config import ConfigError
from tests.conftest import AUTH, CLIENT_KEY, assert_error, images_body

URL = "/v1/images/generations"


def budget(config_text, setting: str, extra: str = "") -> str:
    return config_text(extra=extra).replace(f"key: {CLIENT_KEY}", f"key: {CLIENT_KEY}\n      budget: {setting}")


def records(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize(
    "body, cost",
    [
        ({"model": "dall-e-3", "prompt": "x"}, "0.040000"),
        ({"model": "dall-e-3", "prompt": "x", "quality": "hd", "size": "1792x1024"}, "0.120000"),
        ({"model": "dall-e-3", "prompt": "x", "response_format": "b64_json"}, "0.040000"),  # streamed through
        ({"model": "dall-e-2", "prompt": "x", "n": 4, "size": "512x512"}, "0.072000"),
        # gpt-image-1: from the upstream's usage, 10 text + 40 image input tokens and 50 output.
        ({"model": "gpt-image-1", "prompt": "x"}, "0.002450"),
        ({"model": "sdxl", "prompt": "x", "n": 2, "quality": "hd"}, "0.006600"),
        ({"model": "sdxl", "prompt": "blurry", "n": 2}, "0.002000"),  # one filtered: one image paid
        ({"model": "placeholder", "prompt": "x"}, "0.000000"),
    ],
)
async def test_cost_header(client, body, cost):
    resp = await client.post(URL, json=body, headers=AUTH)
    await images_body(resp)
    assert resp.headers["x-imgproxy-cost-usd"] == cost


async def test_usage_records(make_client, config_text, tmp_path):
    log = tmp_path / "usage.jsonl"
    client = await make_client(config_text(extra=f"cost: {{usage_log: {log}}}"))
    await images_body(await client.post(URL, json={"model": "dall-e-2", "prompt": "secret prompt", "n": 2, "size": "256x256", "user": "alice"}, headers={**AUTH, "x-request-id": "r-1"}))
    await assert_error(await client.post(URL, json={"model": "dall-e-3", "prompt": "forbidden", "user": "alice"}, headers={**AUTH, "x-request-id": "r-2"}), 400, "content_policy_violation")
    resp = await client.post(URL, json={"model": "gpt-image-1", "prompt": "x", "stream": True}, headers={**AUTH, "x-request-id": "r-3"})
    await resp.read()
    await client.close()  # the log is closed at shutdown
    first, second, third = records(log)
    assert first["request_id"] == "r-1" and first["key"] == "team-a" and first["model"] == "dall-e-2" and first["provider"] == "openai"
    assert (first["n"], first["images"], first["size"], first["quality"], first["status"], first["error"]) == (2, 2, "256x256", "standard", 200, None)
    assert first["cost_usd"] == 0.032 and first["latency_seconds"] > 0
    assert first["user"] and first["user"] != "alice" and first["user"] == second["user"]
    assert (second["status"], second["error"], second["cost_usd"]) == (400, "content_policy_violation", 0.0)
    # The streaming path is reconciled at the final event, from its usage.
    assert (third["images"], third["cost_usd"]) == (1, 0.00245)
    assert "secret prompt" not in log.read_text()


async def test_requests_refused_before_their_model_is_known_are_recorded_too(make_client, config_text, tmp_path, fake_openai):
    log = tmp_path / "usage.jsonl"
    client = await make_client(config_text(extra=f"cost: {{usage_log: {log}}}"))
    refusals = [
        ({"data": b"not json", "headers": {**AUTH, "Content-Type": "application/json", "x-request-id": "q-1"}}, 400, "invalid_json"),
        ({"json": {"model": "no-such-model", "prompt": "x"}, "headers": {**AUTH, "x-request-id": "q-2"}}, 404, "model_not_found"),
        ({"json": {"model": "dall-e-3", "prompt": "x", "size": "999x999"}, "headers": {**AUTH, "x-request-id": "q-3"}}, 400, "invalid_size"),
    ]
    for kwargs, status, code in refusals:
        resp = await client.post(URL, **kwargs)
        await assert_error(resp, status, code, (await resp.json())["error"]["param"])
        assert resp.headers["x-imgproxy-cost-usd"] == "0.000000"
    await client.close()
    found = [(r["request_id"], r["status"], r["error"], r["cost_usd"], r["key"]) for r in records(log)]
    assert found == [("q-1", 400, "invalid_json", 0.0, "team-a"), ("q-2", 404, "model_not_found", 0.0, "team-a"), ("q-3", 400, "invalid_size", 0.0, "team-a")]
    assert records(log)[2]["requested_model"] == "dall-e-3" and records(log)[1]["model"] is None
    assert fake_openai.requests == []


async def test_daily_budget(make_client, config_text):
    client = await make_client(budget(config_text, "{daily_usd: 0.10}"))
    for _ in range(2):
        await images_body(await client.post(URL, json={"model": "dall-e-3", "prompt": "x"}, headers=AUTH))
    error = await assert_error(await client.post(URL, json={"model": "dall-e-3", "prompt": "x"}, headers=AUTH), 429, "insufficient_quota")
    assert "daily budget of $0.10" in error["message"] and "spent $0.08" in error["message"] and "T00:00:00Z" in error["message"]
    assert error["type"] == "insufficient_quota"
    # A cheaper request still fits.
    await images_body(await client.post(URL, json={"model": "dall-e-2", "prompt": "x", "size": "256x256"}, headers=AUTH))


async def test_concurrent_requests_cannot_overrun_a_budget(make_client, config_text, fake_openai):
    client = await make_client(budget(config_text, "{daily_usd: 0.10}"))
    fake_openai.delay = 0.3
    responses = await asyncio.gather(*(client.post(URL, json={"model": "dall-e-3", "prompt": "x"}, headers=AUTH) for _ in range(5)))
    assert sorted(r.status for r in responses) == [200, 200, 429, 429, 429]
    assert len(fake_openai.requests) == 2


async def test_failed_requests_are_refunded(make_client, config_text, fake_openai):
    client = await make_client(budget(config_text, "{daily_usd: 0.04}"))
    fake_openai.cue(status=500, body={})
    await assert_error(await client.post(URL, json={"model": "dall-e-3", "prompt": "x"}, headers=AUTH), 502, "upstream_error")
    await images_body(await client.post(URL, json={"model": "dall-e-3", "prompt": "x"}, headers=AUTH))
    await assert_error(await client.post(URL, json={"model": "dall-e-3", "prompt": "x"}, headers=AUTH), 429, "insufficient_quota")


async def test_reservation_is_settled_to_the_real_cost(make_client, config_text):
    # gpt-image-1 reserves the worst case ($0.25 for a high 1536 image) but costs $0.00245.
    client = await make_client(budget(config_text, "{monthly_usd: 0.30}"))
    for _ in range(3):
        await images_body(await client.post(URL, json={"model": "gpt-image-1", "prompt": "x"}, headers=AUTH))
    error = await assert_error(await client.post(URL, json={"model": "gpt-image-1", "prompt": "x", "n": 2}, headers=AUTH), 429, "insufficient_quota")
    assert "monthly budget" in error["message"]


async def test_per_minute_budget_and_sdk_error(make_client, config_text, sdk_for):
    client = await make_client(budget(config_text, "{usd_per_minute: 0.05}"))
    sdk = sdk_for(client)
    await sdk.images.generate(model="dall-e-3", prompt="x")
    with pytest.raises(openai.RateLimitError) as caught:
        await sdk.images.generate(model="dall-e-3", prompt="x")
    assert caught.value.code == "insufficient_quota" and "per-minute" in caught.value.message


async def test_price_overrides_and_unpriced_models(make_client, config_text):
    extra = "cost: {prices: {dall-e-3: {per_image: {'*': {'*': 1.5}}}}, credit_usd: 0.02}"
    house = "  house: {provider: openai, upstream_model: house-model, capabilities: {max_n: 1}}\n"
    text = config_text(extra=extra).replace("models:\n", "models:\n" + house)
    # An unpriced model is a config error (it was metered at $0 with a warning before).
    with pytest.raises(ConfigError) as caught:
        await make_client(text)
    assert caught.value.path == "models.house" and "no price for model 'house'" in caught.value.problem
    client = await make_client(text.replace(house, house.replace("{max_n: 1}}", "{max_n: 1}, free: true}")))
    resp = await client.post(URL, json={"model": "dall-e-3", "prompt": "x"}, headers=AUTH)
    assert resp.headers["x-imgproxy-cost-usd"] == "1.500000"
    resp = await client.post(URL, json={"model": "sdxl", "prompt": "x"}, headers=AUTH)
    assert resp.headers["x-imgproxy-cost-usd"] == "0.004000"
