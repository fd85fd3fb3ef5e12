"""Bad requests get a clear OpenAI-style error, and nothing reaches the upstream."""

import pytest

from tests.conftest import AUTH, assert_error, images_body

URL = "/v1/images/generations"


@pytest.mark.parametrize(
    "body, code, param",
    [
        ({"model": "dall-e-3"}, "missing_required_parameter", "prompt"),
        ({"model": "dall-e-3", "prompt": ""}, "invalid_value", "prompt"),
        ({"model": "dall-e-3", "prompt": 42}, "invalid_value", "prompt"),
        ({"model": "dall-e-2", "prompt": "x", "n": "4"}, "invalid_value", "n"),
        ({"model": "dall-e-2", "prompt": "x", "n": 11}, "invalid_value", "n"),
        ({"model": "dall-e-2", "prompt": "x", "n": 0}, "invalid_value", "n"),
        ({"model": "dall-e-3", "prompt": "x", "quality": "ultra"}, "invalid_value", "quality"),
        ({"model": "dall-e-3", "prompt": "x", "response_format": "png"}, "invalid_value", "response_format"),
        ({"model": "dall-e-3", "prompt": "x", "size": "big"}, "invalid_value", "size"),
        ({"model": "dall-e-3", "prompt": "x", "style": "noir"}, "invalid_value", "style"),
        ({"model": "dall-e-3", "prompt": "x", "moderation": "none"}, "invalid_value", "moderation"),
        ({"model": "dall-e-3", "prompt": "x", "user": ["a"]}, "invalid_value", "user"),
        ({"model": "dall-e-3", "prompt": "x", "seed": 4}, "unknown_parameter", "seed"),
        ({"model": 3, "prompt": "x"}, "invalid_value", "model"),
        ({"prompt": "x"}, "missing_required_parameter", "model"),
    ],
)
async def test_schema_errors(client, fake_openai, body, code, param):
    resp = await client.post(URL, json=body, headers=AUTH)
    error = await assert_error(resp, 400, code, param)
    assert error["type"] == "invalid_request_error"
    assert param in error["message"]
    assert fake_openai.requests == []


@pytest.mark.parametrize(
    "body, code, param, words",
    [
        ({"model": "dall-e-3", "prompt": "x", "n": 2}, "invalid_n", "n", "must be 1"),
        ({"model": "dall-e-2", "prompt": "x", "size": "1792x1024"}, "invalid_size", "size", "must be 256x256, 512x512, or 1024x1024"),
        ({"model": "dall-e-3", "prompt": "x", "size": "512x512"}, "invalid_size", "size", "Invalid size for dall-e-3: must be 1024x1024, 1792x1024, or 1024x1792"),
        ({"model": "dall-e-2", "prompt": "x", "quality": "hd"}, "invalid_quality", "quality", "must be standard"),
        ({"model": "dall-e-3", "prompt": "x", "quality": "high"}, "invalid_quality", "quality", "must be standard or hd"),
        ({"model": "dall-e-2", "prompt": "x", "style": "natural"}, "unsupported_parameter", "style", "not supported by dall-e-2"),
        ({"model": "dall-e-3", "prompt": "x", "background": "transparent"}, "unsupported_parameter", "background", "not supported"),
        ({"model": "dall-e-3", "prompt": "x", "stream": True}, "unsupported_parameter", "stream", "not supported"),
        ({"model": "dall-e-2", "prompt": "x" * 1001}, "string_above_max_length", "prompt", "at most 1000"),
        ({"model": "gpt-image-1", "prompt": "x", "stream": True, "response_format": "url"}, "invalid_value", "response_format", "cannot be streamed"),
        ({"model": "sdxl", "prompt": "x", "size": "1024x768"}, "invalid_size", "size", "1152x896"),
        ({"model": "placeholder", "prompt": "x", "size": "1000x1001"}, "invalid_size", "size", "steps of 8"),
    ],
)
async def test_capability_errors(client, fake_openai, fake_stability, body, code, param, words):
    resp = await client.post(URL, json=body, headers=AUTH)
    error = await assert_error(resp, 400, code, param)
    assert words in error["message"]
    assert fake_openai.requests == [] and fake_stability.requests == []


async def test_null_means_not_given(client, fake_openai):
    resp = await client.post(URL, json={"model": "dall-e-3", "prompt": "x", "n": None, "style": None, "quality": None}, headers=AUTH)
    await images_body(resp)
    assert fake_openai.requests[-1]["n"] == 1 and fake_openai.requests[-1]["style"] == "vivid"


async def test_unknown_model_is_404(client):
    resp = await client.post(URL, json={"model": "dall-e-9", "prompt": "x"}, headers=AUTH)
    error = await assert_error(resp, 404, "model_not_found", "model")
    assert "dall-e-9" in error["message"]
    resp = await client.post(URL, json={"model": "stability/dall-e-3", "prompt": "x"}, headers=AUTH)
    await assert_error(resp, 404, "model_not_found", "model")


async def test_alias_and_default_model(make_client, fake_stability):
    client = await make_client(extra="default_model: sdxl")
    resp = await client.post(URL, json={"prompt": "x"}, headers=AUTH)
    await images_body(resp)
    assert fake_stability.engines == ["stable-diffusion-xl-1024-v1-0"]


async def test_malformed_json(client):
    resp = await client.post(URL, data=b'{"prompt": ', headers={**AUTH, "Content-Type": "application/json"})
    error = await assert_error(resp, 400, "invalid_json")
    assert "not valid JSON" in error["message"]


async def test_json_that_is_not_an_object(client):
    resp = await client.post(URL, data=b'["prompt"]', headers={**AUTH, "Content-Type": "application/json"})
    await assert_error(resp, 400, "invalid_json")


async def test_non_json_content_type(client):
    resp = await client.post(URL, data=b"prompt=cat", headers={**AUTH, "Content-Type": "application/x-www-form-urlencoded"})
    error = await assert_error(resp, 415, "unsupported_media_type")
    assert "application/json" in error["message"]


async def test_oversized_body_is_413(make_client, fake_openai):
    client = await make_client(extra="server: {max_body_bytes: 2048}")
    resp = await client.post(URL, json={"model": "dall-e-3", "prompt": "x" * 5000}, headers=AUTH)
    error = await assert_error(resp, 413, "request_too_large")
    assert "2048" in error["message"]
    assert fake_openai.requests == []


async def test_unknown_route_and_method(client):
    await assert_error(await client.get("/v1/nothing", headers=AUTH), 404, "not_found")
    resp = await client.get(URL, headers=AUTH)
    await assert_error(resp, 405, "method_not_allowed")
    assert "POST" in resp.headers["Allow"]


async def test_request_id_kept_or_generated(client):
    resp = await client.post(URL, json={"model": "placeholder", "prompt": "x", "response_format": "b64_json"}, headers={**AUTH, "x-request-id": "abc-123"})
    assert resp.headers["x-request-id"] == "abc-123"
    resp = await client.post(URL, json={}, headers={**AUTH, "x-request-id": "bad id\twith spaces"})
    assert resp.status == 400 and len(resp.headers["x-request-id"]) == 32


async def test_oversized_chunked_body_is_413(make_client, fake_openai):
    client = await make_client(extra="server: {max_body_bytes: 2048}")

    async def chunks():
        yield b'{"model": "dall-e-3", "prompt": "'
        for _ in range(10):
            yield b"x" * 500
        yield b'"}'

    resp = await client.post(URL, data=chunks(), headers={**AUTH, "Content-Type": "application/json"})
    await assert_error(resp, 413, "request_too_large")
    assert fake_openai.requests == []
