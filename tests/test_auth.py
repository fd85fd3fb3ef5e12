"""plugins/auth: bearer keys from the config, compared as SHA-256 digests in constant time."""

import hashlib

import pytest

from tests.conftest import AUTH, CLIENT_KEY, assert_error, images_body

URL = "/v1/images/generations"
BODY = {"model": "placeholder", "prompt": "x", "response_format": "b64_json"}


@pytest.mark.parametrize(
    "headers, message",
    [
        ({}, "didn't provide an API key"),
        ({"Authorization": "Bearer sk-not-a-client-key"}, "Incorrect API key"),
        ({"Authorization": f"Basic {CLIENT_KEY}"}, "must be 'Bearer"),
        ({"Authorization": "Bearer"}, "must be 'Bearer"),
        ({"Authorization": "Bearer   "}, "must be 'Bearer"),
        ({"Authorization": f"Bearer {CLIENT_KEY} extra"}, "must be 'Bearer"),
        ({"Authorization": "Bearer \u00e9t\u00e9-key"}, "Incorrect API key"),
    ],
)
async def test_refused(client, headers, message):
    error = await assert_error(await client.post(URL, json=BODY, headers=headers), 401, "invalid_api_key")
    assert message in error["message"]
    assert CLIENT_KEY not in error["message"]


async def test_authentication_comes_before_validation(client):
    # An anonymous caller learns nothing about models or parameters.
    resp = await client.post(URL, json={"model": "no-such-model"})
    await assert_error(resp, 401, "invalid_api_key")


async def test_keys_from_list_hash_and_env_string(make_client, config_text):
    text = config_text().replace(
        f"key: {CLIENT_KEY}",
        f"key: {CLIENT_KEY}\n    - name: hashed\n      sha256: {hashlib.sha256(b'sk-hashed-key-abcdef').hexdigest()}"
        "\n    - name: paused\n      key: sk-disabled-key-000000\n      disabled: true\n  api_keys: sk-env-one-0000000, sk-env-two-0000000",
    )
    client = await make_client(text)
    for key in (CLIENT_KEY, "sk-hashed-key-abcdef", "sk-env-one-0000000", "sk-env-two-0000000"):
        await images_body(await client.post(URL, json=BODY, headers={"Authorization": f"Bearer {key}"}))
    error = await assert_error(await client.post(URL, json=BODY, headers={"Authorization": "Bearer sk-disabled-key-000000"}), 401, "api_key_disabled")
    assert "'paused'" in error["message"] and "disabled" in error["message"]


async def test_no_keys_generates_one_and_prints_it_once(make_client, config_text, capsys):
    text = config_text().replace(f"auth:\n  keys:\n    - name: team-a\n      key: {CLIENT_KEY}\n", "")
    client = await make_client(text)
    printed = capsys.readouterr().err
    generated = next(word for word in printed.split() if word.startswith("sk-imgproxy-"))
    await images_body(await client.post(URL, json=BODY, headers={"Authorization": f"Bearer {generated}"}))
    await assert_error(await client.post(URL, json=BODY), 401, "invalid_api_key")


async def test_duplicate_key_names_are_a_config_error(make_client, config_text):
    from imgproxy.config import ConfigError

    text = config_text().replace(f"key: {CLIENT_KEY}", f"key: {CLIENT_KEY}\n    - name: team-a\n      key: sk-another-key-0000000")
    with pytest.raises(ConfigError, match="unique"):
        await make_client(text)


@pytest.mark.parametrize(
    "entry, problem",
    [
        ("- name: x\n      key: short", "auth.keys.1.key"),
        ("- name: x\n      sha256: nothex", "auth.keys.1.sha256"),
        ("- name: x", "auth.keys.1"),
        ("- name: x\n      key: sk-long-enough-key-000\n      sha256: 87973c716a2e9ae4e8cc6a7b3a1d6f8b7e1cf13bd0eb4c53fb0a4b1f2a8c9d10", "auth.keys.1"),
        ("- name: x\n      key: sk-long-enough-key-000\n      colour: red", "auth.keys.1.colour"),
    ],
)
async def test_bad_key_entries(make_client, config_text, entry, problem):
    from imgproxy.config import ConfigError

    text = config_text().replace(f"key: {CLIENT_KEY}", f"key: {CLIENT_KEY}\n    {entry}")
    with pytest.raises(ConfigError) as caught:
        await make_client(text)
    assert caught.value.path == problem
    if problem == "auth.keys.1":
        assert caught.value.problem == "needs exactly one of: key, sha256"


async def test_model_globs_and_key_defaults(make_client, config_text):
    text = config_text().replace(
        f"key: {CLIENT_KEY}",
        f"key: {CLIENT_KEY}\n      models: ['dall-e-*', sdxl]\n    - name: other\n      key: sk-other-key-00000000",
    ).replace("auth:\n", "auth:\n  key_defaults: {models: [placeholder]}\n")
    client = await make_client(text)
    for model in ("dall-e-2", "openai/dall-e-3", "sdxl", "stable-diffusion-xl-1024-v1-0", "stability/sdxl"):
        resp = await client.post(URL, json={"model": model, "prompt": "x", "response_format": "b64_json"}, headers=AUTH)
        assert resp.status == 200, (model, await resp.text())
    for _ in range(2):  # the second refusal comes from the remembered decision
        error = await assert_error(await client.post(URL, json=BODY, headers=AUTH), 403, "model_not_allowed", "model")
        assert error["type"] == "permission_error" and "team-a" in error["message"] and "placeholder" in error["message"]
    other = {"Authorization": "Bearer sk-other-key-00000000"}
    await images_body(await client.post(URL, json=BODY, headers=other))  # from key_defaults
    await assert_error(await client.post(URL, json={"model": "dall-e-2", "prompt": "x"}, headers=other), 403, "model_not_allowed", "model")


@pytest.mark.parametrize("api_keys", ["abc", "sk-7chr", "sk-long-enough-key-000,sk-7chr", " sk-long-enough-key-000 , abc ,"])
async def test_one_length_rule_for_every_client_key(make_client, config_text, api_keys):
    from imgproxy.config import ConfigError
    from imgproxy.plugins.auth import MIN_KEY_LENGTH

    text = config_text().replace("auth:\n", "auth:\n  api_keys: ${IMGPROXY_API_KEYS}\n")
    short = next(k.strip() for k in api_keys.split(",") if k.strip() and len(k.strip()) < MIN_KEY_LENGTH)
    with pytest.raises(ConfigError) as caught:
        await make_client(text, env={"IMGPROXY_API_KEYS": api_keys})
    assert caught.value.path == "auth.api_keys"
    assert "$IMGPROXY_API_KEYS" in caught.value.problem and f"shorter than {MIN_KEY_LENGTH} characters" in caught.value.problem
    assert short not in str(caught.value)  # named by where it came from, never by its value
    # The same rule as for a key written under auth.keys.
    with pytest.raises(ConfigError) as caught:
        await make_client(config_text().replace(f"key: {CLIENT_KEY}", f"key: {CLIENT_KEY[:MIN_KEY_LENGTH - 1]}"))
    assert caught.value.path == "auth.keys.0.key"


async def test_a_key_of_exactly_the_minimum_length_is_accepted(make_client, config_text):
    text = config_text().replace("auth:\n", "auth:\n  api_keys: ${IMGPROXY_API_KEYS}\n")
    client = await make_client(text, env={"IMGPROXY_API_KEYS": "sk-8char"})
    await images_body(await client.post(URL, json=BODY, headers={"Authorization": "Bearer sk-8char"}))


def test_documented_example_keys_follow_the_rule():
    import re
    from pathlib import Path

    from imgproxy.plugins.auth import MIN_KEY_LENGTH

    repo = Path(__file__).resolve().parents[1]
    text = "".join((repo / name).read_text() for name in ("README.md", "docs/deployment.md", "docs/policies.md", "docs/configuration.md"))
    examples = re.findall(r"(?:IMGPROXY_API_KEYS=|api-keys=|Bearer |api_key=\")([^\s\"\\]+)", text)
    keys = [key for found in examples for key in found.split(",") if key != "sk-..." and not key.startswith("<")]
    assert keys, "no example keys found: the pattern no longer matches the docs"
    assert [key for key in keys if len(key) < MIN_KEY_LENGTH] == []
