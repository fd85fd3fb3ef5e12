"""Policy order: cheap local refusals, then limits and budget, then content checks that cost
money (the moderation model is a paid /moderations call). A caller over its limits never
drives a paid call."""

import asyncio
import time

import pytest
import yaml

from imgproxy.hookspecs import hookimpl
from imgproxy.plugins.cost import spend_periods
from tests.conftest import AUTH, assert_error, images_body

URL = "/v1/images/generations"
BODY = {"model": "dall-e-3", "prompt": "a lighthouse", "response_format": "b64_json"}  # $0.04 an image
MODERATION_MODEL = {"upstream": {"provider": "openai", "model": "omni-moderation-latest", "timeout": 2}}


def config(config_text, key_settings: dict, **sections) -> str:
    """The test gateway's config with settings on the test key and extra sections, as data."""
    data = yaml.safe_load(config_text())
    data["auth"]["keys"][0].update(key_settings)
    data.update(sections)
    return yaml.safe_dump(data)


async def test_a_key_over_its_rate_limit_makes_no_moderation_call(make_client, config_text, fake_openai):
    client = await make_client(config(config_text, {"rate_limit": {"requests_per_minute": 1}}, moderation=MODERATION_MODEL))
    await images_body(await client.post(URL, json=BODY, headers=AUTH))
    assert len(fake_openai.moderation_requests) == 1
    for _ in range(5):
        await assert_error(await client.post(URL, json=BODY, headers=AUTH), 429, "rate_limit_exceeded")
    assert len(fake_openai.moderation_requests) == 1
    assert len(fake_openai.requests) == 1


async def test_a_burst_over_the_rate_limit_makes_only_the_allowed_moderation_calls(make_client, config_text, fake_openai):
    client = await make_client(config(config_text, {"rate_limit": {"requests_per_minute": 3}}, moderation=MODERATION_MODEL))
    fake_openai.delay = 0.05  # the allowed ones are still in flight while the rest arrive
    responses = await asyncio.gather(*(client.post(URL, json=BODY, headers=AUTH) for _ in range(20)))
    statuses = sorted(resp.status for resp in responses)
    assert statuses == [200] * 3 + [429] * 17
    assert len(fake_openai.moderation_requests) == 3


async def test_a_key_over_its_budget_makes_no_moderation_call(make_client, config_text, fake_openai):
    client = await make_client(config(config_text, {"budget": {"daily_usd": 0.05}}, moderation=MODERATION_MODEL))
    await images_body(await client.post(URL, json=BODY, headers=AUTH))
    error = await assert_error(await client.post(URL, json=BODY, headers=AUTH), 429, "insufficient_quota")
    assert "daily budget" in error["message"]
    assert len(fake_openai.moderation_requests) == 1


@pytest.mark.parametrize(
    "settings, body, code, param",
    [
        ({"models": ["placeholder"]}, BODY, "model_not_allowed", "model"),
        ({}, {**BODY, "moderation": "low"}, "moderation_level_not_allowed", "moderation"),
    ],
)
async def test_an_unauthorised_request_is_neither_charged_nor_moderated(make_client, config_text, fake_openai, settings, body, code, param):
    key = {**settings, "rate_limit": {"requests_per_minute": 1}, "budget": {"daily_usd": 0.05}}
    client = await make_client(config(config_text, key, moderation=MODERATION_MODEL))
    for _ in range(3):
        refused = await client.post(URL, json=body, headers=AUTH)
        await assert_error(refused, 403, code, param)
        assert "x-ratelimit-remaining-requests" not in refused.headers
    assert fake_openai.moderation_requests == []
    # The one request a minute and the budget are still there.
    allowed = {**BODY, "model": "placeholder"} if settings else BODY
    resp = await client.post(URL, json=allowed, headers=AUTH)
    await images_body(resp)
    assert resp.headers["x-ratelimit-remaining-requests"] == "0"


async def test_a_content_refusal_releases_the_budget_but_counts_against_the_rate_limit(make_client, config_text, fake_openai):
    key = {"rate_limit": {"requests_per_minute": 2}, "budget": {"daily_usd": 0.05}}
    client = await make_client(config(config_text, key, moderation=MODERATION_MODEL))
    await assert_error(await client.post(URL, json={**BODY, "prompt": "something graphic"}, headers=AUTH), 400, "content_policy_violation", "prompt")
    assert fake_openai.requests == []
    # The $0.04 reserved for the refused request was released: this one fits the $0.05 budget.
    await images_body(await client.post(URL, json=BODY, headers=AUTH))
    day = spend_periods("team-a", int(time.time() // 60))[0][1]
    assert await client.gateway.state.get(day) == pytest.approx(0.04)  # one image spent, nothing held
    # But it was a request, so it took one of the two a minute (documented in docs/plugins.md).
    await assert_error(await client.post(URL, json=BODY, headers=AUTH), 429, "rate_limit_exceeded")
    assert len(fake_openai.moderation_requests) == 2


async def test_local_content_rules_run_after_the_limits(make_client, config_text, fake_openai):
    rules = {"categories": {"weapons": {"words": ["bazooka"]}}}
    client = await make_client(config(config_text, {"rate_limit": {"requests_per_minute": 1}}, moderation=rules))
    await assert_error(await client.post(URL, json={**BODY, "prompt": "a bazooka"}, headers=AUTH), 400, "content_policy_violation", "prompt")
    await assert_error(await client.post(URL, json={**BODY, "prompt": "a bazooka"}, headers=AUTH), 429, "rate_limit_exceeded")


async def test_a_third_party_content_check_cannot_jump_ahead_of_the_limits(make_client, config_text, fake_openai):
    calls = []

    class PaidCheck:
        """A content check that costs money, declared tryfirst: still after every limit."""

        @hookimpl(tryfirst=True)
        async def imgproxy_check_content(self, ctx):
            calls.append(ctx.response_headers.get("x-ratelimit-remaining-requests"))

    client = await make_client(config(config_text, {"rate_limit": {"requests_per_minute": 1}}), plugins=[PaidCheck()])
    await images_body(await client.post(URL, json=BODY, headers=AUTH))
    await assert_error(await client.post(URL, json=BODY, headers=AUTH), 429, "rate_limit_exceeded")
    assert calls == ["0"]  # called once, after the rate limit had been charged
