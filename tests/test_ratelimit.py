"""plugins/ratelimit through HTTP: per-key request and image limits with OpenAI's headers."""

import openai
import pytest

from tests.conftest import AUTH, CLIENT_KEY, assert_error, images_body

URL = "/v1/images/generations"
BODY = {"model": "placeholder", "prompt": "x", "size": "256x256", "response_format": "b64_json"}


def limited(config_text, setting: str) -> str:
    return config_text().replace(f"key: {CLIENT_KEY}", f"key: {CLIENT_KEY}\n      rate_limit: {setting}")


async def test_requests_per_minute(make_client, config_text):
    client = await make_client(limited(config_text, "{requests_per_minute: 2}"))
    first = await client.post(URL, json=BODY, headers=AUTH)
    await images_body(first)
    assert first.headers["x-ratelimit-limit-requests"] == "2"
    assert first.headers["x-ratelimit-remaining-requests"] == "1"
    assert first.headers["x-ratelimit-reset-requests"] == "30s"
    assert "x-ratelimit-limit-images" not in first.headers
    await images_body(await client.post(URL, json=BODY, headers=AUTH))
    refused = await client.post(URL, json=BODY, headers=AUTH)
    error = await assert_error(refused, 429, "rate_limit_exceeded")
    assert "2 requests per minute" in error["message"] and "team-a" in error["message"]
    assert refused.headers["Retry-After"] == "30"
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"


async def test_images_per_minute_counts_n(make_client, config_text, fake_openai):
    client = await make_client(limited(config_text, "{requests_per_minute: 100, images_per_minute: 5}"))
    resp = await client.post(URL, json={**BODY, "n": 4}, headers=AUTH)
    await images_body(resp)
    assert resp.headers["x-ratelimit-remaining-images"] == "1"
    assert resp.headers["x-ratelimit-remaining-requests"] == "99"
    refused = await client.post(URL, json={**BODY, "n": 2}, headers=AUTH)
    await assert_error(refused, 429, "rate_limit_exceeded")
    # Refused as a whole: the request limit was not charged either.
    assert refused.headers["x-ratelimit-remaining-requests"] == "99"
    await images_body(await client.post(URL, json=BODY, headers=AUTH))
    too_many = await client.post(URL, json={**BODY, "n": 6}, headers=AUTH)
    error = await assert_error(too_many, 429, "rate_limit_exceeded")
    assert "ask for fewer" in error["message"] and "Retry-After" not in too_many.headers


async def test_per_user_limits(make_client, config_text):
    client = await make_client(limited(config_text, "{requests_per_minute: 1, per_user: true}"))
    await images_body(await client.post(URL, json={**BODY, "user": "alice"}, headers=AUTH))
    await images_body(await client.post(URL, json={**BODY, "user": "bob"}, headers=AUTH))
    await assert_error(await client.post(URL, json={**BODY, "user": "alice"}, headers=AUTH), 429, "rate_limit_exceeded")


async def test_keys_are_limited_separately(make_client, config_text):
    text = limited(config_text, "{requests_per_minute: 1}").replace("auth:\n", "auth:\n  api_keys: sk-second-key-0000000\n")
    client = await make_client(text)
    await images_body(await client.post(URL, json=BODY, headers=AUTH))
    await assert_error(await client.post(URL, json=BODY, headers=AUTH), 429, "rate_limit_exceeded")
    await images_body(await client.post(URL, json=BODY, headers={"Authorization": "Bearer sk-second-key-0000000"}))


async def test_sdk_sees_a_rate_limit_error(make_client, config_text, sdk_for):
    client = await make_client(limited(config_text, "{requests_per_minute: 1}"))
    sdk = sdk_for(client)
    await sdk.images.generate(**BODY)
    with pytest.raises(openai.RateLimitError) as caught:
        await sdk.images.generate(**BODY)
    assert caught.value.code == "rate_limit_exceeded"
