"""Metrics, the access log, health probes and config reloads."""

import asyncio
import json
import logging
import platform
import shutil
import subprocess

import pytest
from prometheus_client.parser import text_string_to_metric_families

import imgproxy
from imgproxy.gateway import Gateway
from imgproxy.logs import JsonFormatter
from imgproxy.runtime import Runtime
from imgproxy.server import RUNTIME, create_app
from tests.conftest import AUTH, CLIENT_KEY, assert_error, images_body
from tests.fakes import FakeUpstream

URL = "/v1/images/generations"


async def scrape(client) -> dict:
    resp = await client.get("/metrics")
    assert resp.status == 200 and resp.content_type == "text/plain"
    samples = {}
    for family in text_string_to_metric_families(await resp.text()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def traffic(client, fake_openai):
    await images_body(await client.post(URL, json={"model": "dall-e-3", "prompt": "x", "quality": "hd"}, headers=AUTH))
    await images_body(await client.post(URL, json={"model": "dall-e-2", "prompt": "x", "n": 3, "size": "256x256", "response_format": "b64_json"}, headers=AUTH))
    await assert_error(await client.post(URL, json={"model": "made-up-model-123", "prompt": "x"}, headers=AUTH), 404, "model_not_found", "model")
    await assert_error(await client.post(URL, json={"model": "dall-e-3", "prompt": "x"}, headers={"Authorization": "Bearer nope"}), 401, "invalid_api_key")
    fake_openai.cue(status=500, body={})
    await assert_error(await client.post(URL, json={"model": "dall-e-3", "prompt": "x"}, headers=AUTH), 502, "upstream_error")


async def test_metrics_after_traffic(client, fake_openai):
    await traffic(client, fake_openai)
    samples = await scrape(client)
    assert value(samples, "imgproxy_requests_total", model="dall-e-3", provider="openai", key="team-a", status="200") == 1
    assert value(samples, "imgproxy_requests_total", model="dall-e-2", provider="openai", key="team-a", status="200") == 1
    assert value(samples, "imgproxy_requests_total", model="unknown", provider="unknown", key="team-a", status="404") == 1
    assert value(samples, "imgproxy_requests_total", model="unknown", provider="unknown", key="unknown", status="401") == 1
    assert value(samples, "imgproxy_images_generated_total", model="dall-e-2", size="256x256", quality="standard") == 3
    assert value(samples, "imgproxy_cost_usd_total", key="team-a", model="dall-e-3", provider="openai") == pytest.approx(0.08)
    assert value(samples, "imgproxy_cost_usd_total", key="team-a", model="dall-e-2", provider="openai") == pytest.approx(0.048)
    assert value(samples, "imgproxy_upstream_errors_total", provider="openai", kind="5xx") == 1
    assert value(samples, "imgproxy_request_duration_seconds_count", model="dall-e-3", provider="openai") == 2
    assert value(samples, "imgproxy_upstream_duration_seconds_count", model="dall-e-3", provider="openai") == 2
    assert value(samples, "imgproxy_response_bytes_total", model="dall-e-2") > 0
    assert value(samples, "imgproxy_image_store_operations_total", operation="put", result="ok") == 1
    assert value(samples, "imgproxy_in_flight_requests") == 0
    assert value(samples, "imgproxy_build_info", version=imgproxy.__version__, python=platform.python_version()) == 1
    # Bounded labels: a model a client made up never becomes a label value.
    assert not any("made-up-model-123" in str(labels) for _, labels in samples)


async def test_a_provider_without_a_key_is_no_upstream_call(make_client, config_text):
    client = await make_client(config_text().replace(f"api_key: {FakeUpstream.key}", "api_key: ''", 1))
    await assert_error(await client.post(URL, json={"model": "dall-e-3", "prompt": "x"}, headers=AUTH), 503, "provider_not_configured")
    samples = await scrape(client)
    assert value(samples, "imgproxy_requests_total", model="dall-e-3", provider="openai", key="team-a", status="503") == 1
    assert value(samples, "imgproxy_upstream_duration_seconds_count", model="dall-e-3", provider="openai") == 0
    assert not any(name == "imgproxy_upstream_errors_total" and value for (name, _), value in samples.items())


async def test_refusals_by_reason(make_client, config_text):
    text = config_text().replace(f"key: {CLIENT_KEY}", f"key: {CLIENT_KEY}\n      rate_limit: {{requests_per_minute: 1}}\n      models: [placeholder]")
    client = await make_client(text)
    body = {"model": "placeholder", "prompt": "x", "response_format": "b64_json"}
    await images_body(await client.post(URL, json=body, headers=AUTH))
    await assert_error(await client.post(URL, json=body, headers=AUTH), 429, "rate_limit_exceeded")
    await assert_error(await client.post(URL, json={**body, "model": "dall-e-2"}, headers=AUTH), 403, "model_not_allowed", "model")
    await assert_error(await client.post(URL, json={**body, "moderation": "low"}, headers=AUTH), 403, "moderation_level_not_allowed", "moderation")
    samples = await scrape(client)
    for reason in ("rate_limited", "model_not_allowed", "moderation_level"):
        assert value(samples, "imgproxy_refused_requests_total", key="team-a", reason=reason) == 1


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is installed by scripts/test (Debian's prometheus)")
async def test_promtool_accepts_the_scrape(client, fake_openai):
    await traffic(client, fake_openai)
    text = await (await client.get("/metrics")).text()
    result = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0 and result.stdout.strip() == "" and result.stderr.strip() == "", result.stdout + result.stderr


async def test_separate_metrics_port(make_client, unused_tcp_port):
    port = unused_tcp_port
    client = await make_client(extra=f"metrics: {{port: {port}, host: 127.0.0.1}}")
    assert (await client.get("/metrics")).status == 404
    resp = await client.session.get(f"http://127.0.0.1:{port}/metrics")
    assert resp.status == 200 and "imgproxy_build_info" in await resp.text()
    # The probes are on the operations port too (a sidecar's API listens on localhost only).
    assert (await client.session.get(f"http://127.0.0.1:{port}/healthz")).status == 200
    assert (await client.session.get(f"http://127.0.0.1:{port}/readyz")).status == 200
    assert (await client.session.get(f"http://127.0.0.1:{port}/v1/images/generations")).status == 404


async def test_access_log_line(client, access_lines):
    resp = await client.post(
        URL,
        json={"model": "dall-e-2", "prompt": "a secret prompt", "n": 2, "size": "256x256", "user": "alice"},
        headers={**AUTH, "x-request-id": "req-7", "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"},
    )
    await images_body(resp)
    await client.get("/healthz")
    lines = access_lines()
    assert len(lines) == 1  # probes are not logged
    line = lines[0]
    assert line["logger"] == "imgproxy.access" and line["time"].endswith("Z") and line["message"] == "POST /v1/images/generations 200"
    assert line["request_id"] == "req-7" and line["status"] == 200 and line["key"] == "team-a"
    assert (line["model"], line["provider"], line["n"], line["images"]) == ("dall-e-2", "openai", 2, 2)
    assert line["cost_usd"] == pytest.approx(0.032) and line["bytes"] > 0 and line["upstream_seconds"] > 0 and line["duration_seconds"] > 0
    assert line["traceparent"].startswith("00-4bf92f")
    assert "prompt" not in line and "alice" not in json.dumps(line)


async def test_every_log_line_carries_the_request_id(make_client, config_text, caplog, access_lines):
    client = await make_client(config_text(extra="moderation: {categories: {w: {words: [bazooka], action: {auto: flag}}}}"))
    with caplog.at_level(logging.INFO):
        await images_body(await client.post(URL, json={"model": "placeholder", "prompt": "a bazooka"}, headers={**AUTH, "x-request-id": "req-9"}))
    lines = [json.loads(JsonFormatter().format(r)) for r in caplog.records if r.name.startswith("imgproxy")] + access_lines()
    assert {line["logger"] for line in lines} >= {"imgproxy.moderation", "imgproxy.access"}
    assert all(line.get("request_id") == "req-9" for line in lines)


async def test_health_and_readiness(make_client, tmp_path):
    client = await make_client()
    assert (await client.get("/healthz")).status == 200
    ready = await client.get("/readyz")
    assert ready.status == 200 and (await ready.json())["checks"]["image_store"] is True
    # The image folder is gone (a file stands in its place): not ready, but still alive.
    shutil.rmtree(tmp_path / "images")
    (tmp_path / "images").write_text("not a folder")
    resp = await client.get("/readyz")
    assert resp.status == 503 and (await resp.json())["checks"]["image_store"] is False
    assert (await client.get("/healthz")).status == 200
    (tmp_path / "images").unlink()
    (tmp_path / "images").mkdir()
    assert (await client.get("/readyz")).status == 200
    client.app[RUNTIME].shutting_down = True
    resp = await client.get("/readyz")
    assert resp.status == 503 and (await resp.json())["checks"]["shutting_down"] is True


async def test_config_reload_keeps_the_old_config_on_failure(aiohttp_client, config_text, tmp_path, caplog):
    path = tmp_path / "proxy.yaml"
    path.write_text(config_text())
    runtime = Runtime(await Gateway.load(path, env=None), str(path))
    client = await aiohttp_client(create_app(runtime))
    body = {"model": "house", "prompt": "x", "response_format": "b64_json"}
    await assert_error(await client.post(URL, json=body, headers=AUTH), 404, "model_not_found", "model")

    path.write_text(config_text().replace("models:\n", "models:\n  house: {provider: placeholder, catalog: placeholder}\n"))
    assert await runtime.reload() is True
    await images_body(await client.post(URL, json=body, headers=AUTH))

    path.write_text(config_text().replace("models:\n", "models:\n  house: {provider: nowhere}\n"))
    with caplog.at_level(logging.ERROR):
        assert await runtime.reload() is False
    assert "models.house.provider" in caplog.text and "previous config keeps serving" in caplog.text
    await images_body(await client.post(URL, json=body, headers=AUTH))
    samples = await scrape(client)
    assert value(samples, "imgproxy_config_reloads_total", result="success") == 1
    assert value(samples, "imgproxy_config_reloads_total", result="failure") == 1


async def test_reload_watches_the_file(aiohttp_client, config_text, tmp_path):
    path = tmp_path / "proxy.yaml"
    path.write_text(config_text())
    runtime = Runtime(await Gateway.load(path), str(path), reload_interval=0.05)
    client = await aiohttp_client(create_app(runtime))
    path.write_text(config_text().replace("models:\n", "models:\n  house: {provider: placeholder, catalog: placeholder}\n"))
    for _ in range(100):
        if "house" in runtime.gateway.config.models:
            break
        await asyncio.sleep(0.05)
    await images_body(await client.post(URL, json={"model": "house", "prompt": "x"}, headers=AUTH))


async def test_rate_limits_survive_a_reload(aiohttp_client, config_text, tmp_path):
    path = tmp_path / "proxy.yaml"
    text = config_text().replace(f"key: {CLIENT_KEY}", f"key: {CLIENT_KEY}\n      rate_limit: {{requests_per_minute: 1}}")
    path.write_text(text)
    runtime = Runtime(await Gateway.load(path), str(path))
    client = await aiohttp_client(create_app(runtime))
    body = {"model": "placeholder", "prompt": "x", "response_format": "b64_json"}
    await images_body(await client.post(URL, json=body, headers=AUTH))
    path.write_text(text + "\n# touched\n")
    assert await runtime.reload() is True
    await assert_error(await client.post(URL, json=body, headers=AUTH), 429, "rate_limit_exceeded")


def test_secret_keys_never_reach_the_logs(all_log_output):
    # all_log_output holds every log line of this test session so far, formatted as JSON.
    text = "\n".join(all_log_output)
    assert text, "no log output was captured"
    for secret in (FakeUpstream.key, CLIENT_KEY, "sk-wrong-provider-key-123", "sk-bad-stability-key"):
        assert secret not in text
