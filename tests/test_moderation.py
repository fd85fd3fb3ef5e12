"""plugins/moderation through HTTP: levels per key, content-policy rules, a moderation model,
and cool-downs for end users who keep violating the policy."""

import logging

import openai
import pytest

from tests.conftest import AUTH, CLIENT_KEY, assert_error, images_body
from tests.fakes import Cue

URL = "/v1/images/generations"
BODY = {"model": "placeholder", "prompt": "a quiet harbour", "response_format": "b64_json"}

RULES = """
moderation:
  categories:
    violence:
      words: [behead, "blood bath"]
      patterns: ['\\bkill(ing|ed)?\\b']
      action: {auto: block, low: flag}
    weapons:
      words: [bazooka]
  abuse: {max_violations: 2, window: 60, cooldown: 30}
"""


def with_key_settings(config_text, settings: str, extra: str = "") -> str:
    return config_text(extra=extra).replace(f"key: {CLIENT_KEY}", f"key: {CLIENT_KEY}\n      {settings}")


async def test_moderation_levels_per_key(make_client, config_text, fake_openai):
    client = await make_client()
    error = await assert_error(await client.post(URL, json={**BODY, "moderation": "low"}, headers=AUTH), 403, "moderation_level_not_allowed", "moderation")
    assert "team-a" in error["message"] and "allowed: auto" in error["message"]
    await images_body(await client.post(URL, json={**BODY, "moderation": "auto"}, headers=AUTH))

    client = await make_client(with_key_settings(config_text, "moderation_levels: [auto, low]"))
    await images_body(await client.post(URL, json={**BODY, "moderation": "low"}, headers=AUTH))
    # The level reaches a provider that takes it.
    await images_body(await client.post(URL, json={"model": "gpt-image-1", "prompt": "x", "moderation": "low"}, headers=AUTH))
    assert fake_openai.requests[-1]["moderation"] == "low"
    await images_body(await client.post(URL, json={"model": "dall-e-3", "prompt": "x", "moderation": "low", "response_format": "b64_json"}, headers=AUTH))
    assert "moderation" not in fake_openai.requests[-1]


@pytest.mark.parametrize(
    "prompt, category",
    [("Behead the statue", "violence"), ("a BLOOD BATH", "violence"), ("killing time", "violence"), ("a bazooka", "weapons")],
)
async def test_rules_block_before_any_upstream_call(make_client, config_text, fake_openai, prompt, category):
    client = await make_client(config_text(extra=RULES))
    resp = await client.post(URL, json={"model": "dall-e-3", "prompt": prompt}, headers=AUTH)
    error = await assert_error(resp, 400, "content_policy_violation", "prompt")
    assert f"'{category}'" in error["message"]
    assert fake_openai.requests == []


async def test_whole_words_only(make_client, config_text):
    client = await make_client(config_text(extra=RULES))
    await images_body(await client.post(URL, json={**BODY, "prompt": "skillful bazookas"}, headers=AUTH))


async def test_action_per_level(make_client, config_text, caplog):
    client = await make_client(with_key_settings(config_text, "moderation_levels: [auto, low]", RULES))
    with caplog.at_level(logging.WARNING):
        await images_body(await client.post(URL, json={**BODY, "prompt": "killing time", "moderation": "low"}, headers=AUTH))
    assert "flagged by violence" in caplog.text and "killing time" not in caplog.text  # prompts stay out of logs
    await assert_error(await client.post(URL, json={**BODY, "prompt": "a bazooka", "moderation": "low"}, headers=AUTH), 400, "content_policy_violation", "prompt")


async def test_prompts_logged_only_when_the_key_allows(make_client, config_text, caplog):
    client = await make_client(with_key_settings(config_text, "log_prompts: true", RULES))
    with caplog.at_level(logging.WARNING):
        await client.post(URL, json={**BODY, "prompt": "a bazooka", "user": "alice@example.com"}, headers=AUTH)
    assert "a bazooka" in caplog.text
    assert "alice@example.com" not in caplog.text  # the end user only ever appears hashed


async def test_repeat_offenders_cool_down(make_client, config_text, fake_openai, caplog):
    client = await make_client(config_text(extra=RULES))
    bad = {**BODY, "prompt": "a bazooka", "user": "mallory"}
    for _ in range(2):
        await assert_error(await client.post(URL, json=bad, headers=AUTH), 400, "content_policy_violation", "prompt")
    refused = await client.post(URL, json={**BODY, "user": "mallory"}, headers=AUTH)
    error = await assert_error(refused, 403, "user_cooling_down", "user")
    assert 1 <= int(refused.headers["Retry-After"]) <= 31
    assert "mallory" not in error["message"] + caplog.text
    await images_body(await client.post(URL, json={**BODY, "user": "alice"}, headers=AUTH))  # others are unaffected
    await images_body(await client.post(URL, json=BODY, headers=AUTH))  # as is the key itself


async def test_upstream_refusals_count_as_violations(make_client, config_text, fake_openai, fake_stability):
    client = await make_client(config_text(extra=RULES))
    await assert_error(await client.post(URL, json={"model": "dall-e-3", "prompt": "forbidden", "user": "eve"}, headers=AUTH), 400, "content_policy_violation")
    # Stability's filtered artifact (one of two) counts as well.
    await images_body(await client.post(URL, json={"model": "sdxl", "prompt": "blurry", "n": 2, "user": "eve"}, headers=AUTH))
    await assert_error(await client.post(URL, json={**BODY, "user": "eve"}, headers=AUTH), 403, "user_cooling_down", "user")


MODEL_CHECK = """
moderation:
  upstream: {provider: openai, model: omni-moderation-latest, timeout: 0.5}
"""


async def test_moderation_model_blocks_flagged_prompts(make_client, config_text, fake_openai):
    client = await make_client(with_key_settings(config_text, "moderation_levels: [auto, low]", MODEL_CHECK))
    error = await assert_error(await client.post(URL, json={**BODY, "prompt": "something graphic"}, headers=AUTH), 400, "content_policy_violation", "prompt")
    assert "violence/graphic" in error["message"]
    assert fake_openai.moderation_requests[-1] == {"model": "omni-moderation-latest", "input": "something graphic"}
    # At the low level only the categories listed for it block.
    await images_body(await client.post(URL, json={**BODY, "prompt": "something graphic", "moderation": "low"}, headers=AUTH))
    await assert_error(await client.post(URL, json={**BODY, "prompt": "minors", "moderation": "low"}, headers=AUTH), 400, "content_policy_violation", "prompt")
    await images_body(await client.post(URL, json=BODY, headers=AUTH))


@pytest.mark.parametrize("failure", [{"status": 500, "body": {}}, {"delay": 1.0, "body": {}}, {"body": {"results": "nope"}}, {"body": b"<html>", "content_type": "text/html"}])
async def test_moderation_model_failure_fails_closed_or_open(make_client, config_text, fake_openai, failure):
    client = await make_client(config_text(extra=MODEL_CHECK))
    fake_openai.moderation_cues.append(Cue(**failure))
    error = await assert_error(await client.post(URL, json=BODY, headers=AUTH), 503, "moderation_unavailable")
    assert "unavailable" in error["message"]
    client = await make_client(config_text(extra=MODEL_CHECK.replace("timeout: 0.5", "timeout: 0.5, on_failure: allow")))
    fake_openai.moderation_cues.append(Cue(**failure))
    await images_body(await client.post(URL, json=BODY, headers=AUTH))


@pytest.mark.parametrize(
    "extra, path",
    [
        ("moderation: {categories: {x: {patterns: ['(unclosed']}}}", "moderation.categories.x.patterns.0"),
        ("moderation: {categories: {x: {}}}", "moderation.categories.x"),
        ("moderation: {categories: {x: {words: [a], action: {auto: shout}}}}", "moderation.categories.x.action.auto"),
        ("moderation: {upstream: {provider: stability}}", "moderation.upstream.provider"),
    ],
)
async def test_bad_moderation_config(make_client, config_text, extra, path):
    from imgproxy.config import ConfigError

    with pytest.raises(ConfigError) as caught:
        await make_client(config_text(extra=extra))
    assert caught.value.path == path


async def test_sdk_error_types(make_client, config_text, sdk_for):
    client = await make_client(config_text(extra=RULES))
    sdk = sdk_for(client)
    with pytest.raises(openai.BadRequestError) as caught:
        await sdk.images.generate(model="placeholder", prompt="a bazooka")
    assert caught.value.code == "content_policy_violation"
    with pytest.raises(openai.PermissionDeniedError) as caught:
        await sdk.images.generate(model="placeholder", prompt="x", moderation="low")
    assert caught.value.code == "moderation_level_not_allowed"
