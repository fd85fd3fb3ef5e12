"""Upstream refusals and failures become the right status and code, never leaking the key."""

import json
import logging
import socket

import aiohttp
import pytest

from tests.conftest import AUTH, assert_error, images_body
from tests.fakes import FakeUpstream

URL = "/v1/images/generations"
DALLE = {"model": "dall-e-3", "prompt": "a lighthouse"}


def no_key_in(*texts: str) -> None:
    for text in texts:
        assert FakeUpstream.key not in text
        assert "sk-up***" not in text  # nor the upstream's masked echo of it


async def test_rejected_provider_key_is_502_without_the_key(make_client, config_text, caplog):
    text = config_text().replace(f"api_key: {FakeUpstream.key}", "api_key: sk-wrong-provider-key-123", 1)
    client = await make_client(text)
    with caplog.at_level(logging.INFO):
        resp = await client.post(URL, json=DALLE, headers=AUTH)
        error = await assert_error(resp, 502, "upstream_auth_failed")
    assert error["type"] == "server_error" and "credentials" in error["message"]
    raw = json.dumps(error)
    no_key_in(raw, caplog.text)
    assert "sk-wrong-provider-key-123" not in raw + caplog.text
    assert "rejected imgproxy's credentials" in caplog.text  # the operator is told


async def test_upstream_404_means_wrong_upstream_model(client, fake_openai):
    fake_openai.cue(status=404, body={"error": {"message": "The model does not exist", "type": "invalid_request_error", "param": None, "code": "model_not_found"}})
    await assert_error(await client.post(URL, json=DALLE, headers=AUTH), 502, "upstream_model_not_found")


async def test_upstream_out_of_quota_is_502(client, fake_openai):
    fake_openai.cue(status=429, body={"error": {"message": "You exceeded your current quota", "type": "insufficient_quota", "param": None, "code": "insufficient_quota"}})
    await assert_error(await client.post(URL, json=DALLE, headers=AUTH), 502, "upstream_quota_exceeded")


async def test_upstream_400_keeps_its_meaning(client, fake_openai):
    fake_openai.cue(status=400, body={"error": {"message": "Invalid prompt: too vague", "type": "invalid_request_error", "param": "prompt", "code": "invalid_prompt"}})
    error = await assert_error(await client.post(URL, json=DALLE, headers=AUTH), 400, "invalid_prompt", "prompt")
    assert error["message"] == "Invalid prompt: too vague"


async def test_upstream_timeout_is_504(make_client, fake_openai):
    client = await make_client(total_timeout=0.3)
    fake_openai.cue(delay=1.0, body={"created": 1, "data": []})
    error = await assert_error(await client.post(URL, json=DALLE, headers=AUTH), 504, "upstream_timeout")
    assert "0.3 seconds" in error["message"]


async def test_model_timeout_overrides_provider_timeout(make_client, config_text, fake_openai):
    text = config_text().replace("dall-e-3: {provider: openai}", "dall-e-3: {provider: openai, timeout: 0.2}")
    client = await make_client(text)
    fake_openai.cue(delay=1.0, body={"created": 1, "data": []})
    error = await assert_error(await client.post(URL, json=DALLE, headers=AUTH), 504, "upstream_timeout")
    assert "0.2 seconds" in error["message"]


async def test_connection_refused_is_502(make_client, config_text, fake_openai):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client = await make_client(config_text().replace(fake_openai.base_url, f"http://127.0.0.1:{port}"))
    error = await assert_error(await client.post(URL, json=DALLE, headers=AUTH), 502, "upstream_unavailable")
    assert "openai" in error["message"]


@pytest.mark.parametrize(
    "cue",
    [
        {"body": b"<html>Bad gateway</html>", "content_type": "text/html"},
        {"body": b"not json at all", "content_type": "application/json"},
        {"body": {"created": 1, "data": "nope"}},
        {"body": {"created": 1, "data": [{"nothing": True}]}},
        {"body": ["a", "list"]},
        {"cut": True},
    ],
)
@pytest.mark.parametrize("response_format", ["url", "b64_json"])
async def test_garbage_or_truncated_answer_is_502(client, fake_openai, cue, response_format):
    fake_openai.cue(**cue)
    resp = await client.post(URL, json={**DALLE, "response_format": response_format}, headers=AUTH)
    if cue.get("cut") and response_format == "b64_json":
        # Streamed straight through: the status was already sent, so the client sees the cut.
        assert resp.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()
        return
    await assert_error(resp, 502, "upstream_bad_response")


async def test_missing_provider_key_names_the_variable(make_client, config_text):
    text = config_text().replace(f"api_key: {FakeUpstream.key}", "api_key: ${OPENAI_API_KEY:-}", 1)
    client = await make_client(text, env={})
    error = await assert_error(await client.post(URL, json=DALLE, headers=AUTH), 503, "provider_not_configured")
    assert "OPENAI_API_KEY" in error["message"]
    # Other providers keep working.
    await images_body(await client.post(URL, json={"model": "placeholder", "prompt": "x"}, headers=AUTH))


async def test_request_id_and_traceparent_reach_upstream(client, fake_openai):
    trace = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    resp = await client.post(URL, json=DALLE, headers={**AUTH, "x-request-id": "req-42", "traceparent": trace})
    await images_body(resp)
    sent = fake_openai.headers[-1]
    assert sent["x-request-id"] == "req-42" and sent["traceparent"] == trace
    assert sent["Authorization"] == f"Bearer {FakeUpstream.key}"  # the client's key is replaced


class TestStability:
    SDXL = {"model": "stable-diffusion-xl-1024-v1-0", "prompt": "a lighthouse"}

    async def test_translation(self, client, fake_stability):
        resp = await client.post(URL, json={**self.SDXL, "n": 3, "size": "1344x768", "quality": "hd", "style": "natural", "response_format": "b64_json"}, headers=AUTH)
        body = await images_body(resp)
        assert len(body["data"]) == 3 and all("b64_json" in item for item in body["data"])
        sent = fake_stability.requests[-1]
        assert sent == {"text_prompts": [{"text": "a lighthouse", "weight": 1}], "width": 1344, "height": 768, "samples": 3, "steps": 50, "style_preset": "photographic"}
        assert fake_stability.headers[-1]["Accept"] == "application/json"

    async def test_filtered_artifacts_are_left_out(self, client):
        resp = await client.post(URL, json={**self.SDXL, "prompt": "blurry", "n": 2}, headers=AUTH)
        body = await images_body(resp)
        assert len(body["data"]) == 1

    async def test_bad_key_and_server_error(self, make_client, config_text, fake_stability):
        text = config_text().replace(f"api_key: {FakeUpstream.key}\n  placeholder", "api_key: sk-bad-stability-key\n  placeholder")
        client = await make_client(text)
        error = await assert_error(await client.post(URL, json=self.SDXL, headers=AUTH), 502, "upstream_auth_failed")
        assert "sk-bad" not in error["message"]

    async def test_rate_limit_keeps_retry_after(self, client, fake_stability):
        fake_stability.cue(status=429, headers={"Retry-After": "7"}, body={"id": "x", "name": "rate_limit_exceeded", "message": "You have exceeded the rate limit"})
        resp = await client.post(URL, json=self.SDXL, headers=AUTH)
        await assert_error(resp, 429, "rate_limit_exceeded")
        assert resp.headers["Retry-After"] == "7"
        fake_stability.cue(status=429, headers={"Retry-After": "soon; key=x"}, body={"id": "x", "name": "rate_limit_exceeded", "message": "slow down"})
        resp = await client.post(URL, json=self.SDXL, headers=AUTH)
        await assert_error(resp, 429, "rate_limit_exceeded")
        assert "Retry-After" not in resp.headers  # only seconds or an HTTP date are passed on

    async def test_server_error_and_garbage(self, client, fake_stability):
        fake_stability.cue(status=500, body={"id": "x", "name": "server_error", "message": "An unexpected server error occurred"})
        await assert_error(await client.post(URL, json=self.SDXL, headers=AUTH), 502, "upstream_error")
        fake_stability.cue(body=b"<html>", content_type="text/html")
        await assert_error(await client.post(URL, json=self.SDXL, headers=AUTH), 502, "upstream_bad_response")
        fake_stability.cue(body={"artifacts": [{"finishReason": "ERROR"}]})
        await assert_error(await client.post(URL, json=self.SDXL, headers=AUTH), 502, "upstream_bad_response")
