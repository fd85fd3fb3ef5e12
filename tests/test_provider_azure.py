"""Azure OpenAI (`type: azure_openai`) over real sockets against a fake Azure resource that
speaks Azure's published wire format: the provider conformance cases."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import openai
import pytest
import yaml

from imgproxy.config import ConfigError
from imgproxy.gateway import Gateway
from imgproxy.server import create_app
from tests.conftest import AUTH, CLIENT_KEY, assert_error, download, images_body, serve_fake
from tests.fake_azure import FakeAzureOpenAI
from tests.fakes import FAKE_PNG, FakeUpstream, tiny_png
from tests.conftest import usage_records as records

URL = "/v1/images/generations"


@pytest.fixture
async def fake_azure(aiohttp_server):
    async for fake in serve_fake(aiohttp_server, FakeAzureOpenAI()):
        yield fake


def config(azure_url: str, tmp_path: Path, *, provider: dict | None = None, images: dict | None = None, models: dict | None = None) -> str:
    base = {"type": "azure_openai", "base_url": azure_url, "api_key": FakeUpstream.key, "timeouts": {"connect": 2, "total": 1}}
    raw = {
        "auth": {"keys": [{"name": "team-a", "key": CLIENT_KEY, "moderation_levels": ["auto", "low"]}]},
        "providers": {
            "azure": {**base, "options": {"api_version": "2024-10-21"}, **(provider or {})},
            "azure-preview": {**base, "options": {"api_version": "2025-04-01-preview"}},
            "azure-entra": {**base, "options": {"api_version": "2025-04-01-preview", "auth": "bearer"}},
        },
        "models": {
            "azure-dall-e-3": {"provider": "azure", "upstream_model": "my-dalle3", "catalog": "dall-e-3"},
            "azure-gpt-image-1": {"provider": "azure-preview", "upstream_model": "team gpt/image", "catalog": "gpt-image-1"},
            "entra-gpt-image-2": {"provider": "azure-entra", "upstream_model": "gpt2-deploy", "catalog": "gpt-image-2"},
            "azure-missing": {"provider": "azure", "upstream_model": "no-such-deployment", "catalog": "dall-e-3"},
            **(models or {}),
        },
        "images": {"directory": str(tmp_path / "images"), "signing_key": "test-signing-key", **(images or {})},
        "cost": {"usage_log": str(tmp_path / "usage.jsonl")},
    }
    return yaml.safe_dump(raw)


@pytest.fixture
def gateway(aiohttp_client, fake_azure, tmp_path):
    async def make(**kwargs):
        gw = await Gateway.load(text=config(fake_azure.base_url, tmp_path, **kwargs), env={})
        client = await aiohttp_client(create_app(gw))
        client.gateway = gw
        return client

    return make


@pytest.fixture
async def client(gateway):
    return await gateway()


async def post(client, body: dict):
    return await client.post(URL, json=body, headers=AUTH)




# --- the reference's basic example ------------------------------------------------------------

async def test_basic_example_as_url_goes_to_the_deployment_with_the_api_key_header(client, fake_azure):
    body = await images_body(await post(client, {"model": "azure-dall-e-3", "prompt": "A cute baby sea otter", "n": 1, "size": "1024x1024"}))
    assert fake_azure.paths == ["/openai/deployments/my-dalle3/images/generations?api-version=2024-10-21"]
    sent, headers = fake_azure.requests[-1], fake_azure.headers[-1]
    assert headers["api-key"] == FakeUpstream.key and "Authorization" not in headers
    assert "model" not in sent and (sent["n"], sent["size"], sent["quality"], sent["style"]) == (1, "1024x1024", "standard", "vivid")
    (item,) = body["data"]
    assert item["revised_prompt"] == "Revised: A cute baby sea otter"
    assert set(item) == {"url", "revised_prompt"}  # Azure's filter annotations stay behind
    image = await download(client, item["url"])
    assert image.status == 200 and await image.read() == FAKE_PNG


async def test_basic_example_as_b64_json(client, fake_azure):
    body = await images_body(await post(client, {"model": "azure-dall-e-3", "prompt": "otter", "n": 1, "size": "1024x1024", "response_format": "b64_json"}))
    assert base64.b64decode(body["data"][0]["b64_json"]) == FAKE_PNG
    assert "content_filter_results" not in body["data"][0] and fake_azure.requests[-1]["response_format"] == "b64_json"


async def test_passthrough_urls_are_azures_own(gateway, fake_azure):
    client = await gateway(images={"upstream_urls": "passthrough"})
    body = await images_body(await post(client, {"model": "azure-dall-e-3", "prompt": "otter"}))
    assert body["data"][0]["url"].startswith(f"{fake_azure.base_url}/files/generated_00.png")
    assert set(body["data"][0]) == {"url", "revised_prompt"}


async def test_gpt_image_deployment_n_images_in_both_formats_and_the_name_is_one_path_segment(client, fake_azure):
    body = await images_body(await post(client, {"model": "azure-gpt-image-1", "prompt": "a logo", "n": 2, "size": "1536x1024", "quality": "high"}))
    assert [base64.b64decode(item["b64_json"]) for item in body["data"]] == [FAKE_PNG, FAKE_PNG]
    assert body["usage"]["output_tokens"] == 4160
    assert fake_azure.paths[-1] == "/openai/deployments/team%20gpt%2Fimage/images/generations?api-version=2025-04-01-preview"
    body = await images_body(await post(client, {"model": "azure-gpt-image-1", "prompt": "a logo", "n": 2, "response_format": "url"}))
    assert len(body["data"]) == 2
    assert [await (await download(client, item["url"])).read() for item in body["data"]] == [FAKE_PNG, FAKE_PNG]
    assert all("response_format" not in sent and "model" not in sent for sent in fake_azure.requests)


async def test_bearer_auth_sends_the_token_as_authorization(client, fake_azure):
    await images_body(await post(client, {"model": "entra-gpt-image-2", "prompt": "a logo", "size": "1920x1088"}))
    headers = fake_azure.headers[-1]
    assert headers["Authorization"] == f"Bearer {FakeUpstream.key}" and "api-key" not in headers
    assert fake_azure.requests[-1]["size"] == "1920x1088"  # a free size of the newest model


async def test_the_official_sdk_as_client(client, sdk_for, fake_azure):
    sdk = sdk_for(client)
    result = await sdk.images.generate(model="azure-dall-e-3", prompt="A serene lake", size="1792x1024", quality="hd", style="natural", response_format="b64_json")
    assert base64.b64decode(result.data[0].b64_json) == FAKE_PNG and result.data[0].revised_prompt == "Revised: A serene lake"
    with pytest.raises(openai.BadRequestError) as refused:
        await sdk.images.generate(model="azure-dall-e-3", prompt="forbidden thing")
    assert refused.value.status_code == 400 and refused.value.code == "content_policy_violation"


async def test_a_gpt_image_deployment_streams_events_and_is_billed_by_their_usage(client, fake_azure, tmp_path):
    from tests.test_streaming import read_event

    resp = await post(client, {"model": "azure-gpt-image-1", "prompt": "p", "stream": True, "partial_images": 1, "quality": "high", "size": "1024x1024"})
    assert resp.status == 200 and resp.content_type == "text/event-stream"
    assert (await read_event(resp))[0] == "image_generation.partial_image"
    kind, event = await read_event(resp)
    assert kind == "image_generation.completed" and base64.b64decode(event["b64_json"]) == FAKE_PNG
    sent = fake_azure.requests[-1]
    assert (sent["stream"], sent["partial_images"]) == (True, 1) and "model" not in sent
    (record,) = await records(tmp_path / "usage.jsonl")
    assert record["cost_usd"] == pytest.approx(100 * 5 / 1e6 + 4160 * 40 / 1e6)  # the completed event's usage


async def test_a_gpt_image_deployment_edits_with_the_sdk(client, sdk_for, fake_azure, tmp_path):
    image = tiny_png(8, 8)
    result = await sdk_for(client).images.edit(model="azure-gpt-image-1", image=[("a.png", image, "image/png")] * 2, prompt="p", n=2)
    assert [base64.b64decode(item.b64_json) for item in result.data] == [FAKE_PNG, FAKE_PNG]
    assert fake_azure.paths[-1] == "/openai/deployments/team%20gpt%2Fimage/images/edits?api-version=2025-04-01-preview"
    assert [(name, data) for name, _, data in fake_azure.uploads[-1]] == [("image[]", image), ("image[]", image)]
    assert fake_azure.requests[-1]["n"] == 2 and "model" not in fake_azure.requests[-1]
    (record,) = await records(tmp_path / "usage.jsonl")
    assert record["operation"] == "edit" and record["cost_usd"] == pytest.approx((100 * 5 + 240 * 10 + 4160 * 40) / 1e6)


# --- parameters: passed, translated, refused --------------------------------------------------

async def test_parameters_passed(client, fake_azure):
    await images_body(await post(client, {"model": "azure-dall-e-3", "prompt": "p", "size": "1024x1792", "quality": "hd", "style": "natural", "user": "u-42"}))
    sent = fake_azure.requests[-1]
    assert {k: sent[k] for k in ("size", "quality", "style", "user")} == {"size": "1024x1792", "quality": "hd", "style": "natural", "user": "u-42"}
    gpt = {"background": "transparent", "output_format": "webp", "output_compression": 80, "quality": "low", "size": "1024x1536"}
    await images_body(await post(client, {"model": "azure-gpt-image-1", "prompt": "p", **gpt}))
    assert {k: fake_azure.requests[-1][k] for k in gpt} == gpt


@pytest.mark.parametrize(
    "model, extra, param, code",
    [
        ("azure-dall-e-3", {"n": 2}, "n", "invalid_n"),
        ("azure-dall-e-3", {"size": "512x512"}, "size", "invalid_size"),
        ("azure-dall-e-3", {"quality": "high"}, "quality", "invalid_quality"),
        ("azure-dall-e-3", {"background": "transparent"}, "background", "unsupported_parameter"),
        ("azure-gpt-image-1", {"style": "vivid"}, "style", "unsupported_parameter"),
        ("azure-gpt-image-1", {"size": "1920x1088"}, "size", "invalid_size"),
        ("azure-gpt-image-1", {"moderation": "low"}, "moderation", "unsupported_parameter"),
        ("entra-gpt-image-2", {"size": "1000x1000"}, "size", "invalid_size"),  # not a multiple of 16
    ],
)
async def test_parameters_refused_with_a_clear_400(client, fake_azure, model, extra, param, code):
    error = await assert_error(await post(client, {"model": model, "prompt": "p", **extra}), 400, code, param)
    assert param in error["message"]
    assert fake_azure.requests == []  # refused before any paid call


# --- refusals and failures --------------------------------------------------------------------

async def test_content_filter_refusal_keeps_the_categories(client, fake_azure):
    error = await assert_error(await post(client, {"model": "azure-dall-e-3", "prompt": "forbidden thing"}), 400, "content_policy_violation")
    assert error["message"].startswith("Your request was rejected as a result of our safety system.")
    assert "hate (medium)" in error["message"] and "violence (high)" in error["message"] and "jailbreak" in error["message"]
    assert "sexual" not in error["message"]  # not filtered


async def test_only_known_filter_words_reach_the_message(client, fake_azure):
    results = {"violence": {"filtered": True, "severity": FakeUpstream.key}, "hate": {"filtered": "yes", "severity": "high"}, "made_up <b>": {"filtered": True}}
    fake_azure.cue(status=400, body={"error": {"code": "contentFilter", "message": None, "inner_error": {"code": "ResponsibleAIPolicyViolation", "content_filter_results": results}}})
    error = await assert_error(await post(client, {"model": "azure-dall-e-3", "prompt": "p"}), 400, "content_policy_violation")
    assert error["message"] == "The provider 'azure' refused the request with HTTP 400. Filtered categories: violence."


async def test_an_image_withheld_by_the_output_filter(client, fake_azure, tmp_path):
    error = await assert_error(await post(client, {"model": "azure-dall-e-3", "prompt": "withheld"}), 400, "content_policy_violation")
    assert "sexual (medium)" in error["message"]
    body = await images_body(await post(client, {"model": "azure-gpt-image-1", "prompt": "withheld", "n": 2, "quality": "low", "size": "1024x1024"}))
    assert len(body["data"]) == 1  # the other one was withheld: neither delivered nor billed
    refused, delivered = await records(tmp_path / "usage.jsonl", 2)
    assert refused["cost_usd"] == 0
    # The usage covers two images; the bill is capped at one low 1024x1024 image and the prompt's tokens.
    assert delivered["images"] == 1 and delivered["cost_usd"] == pytest.approx(0.011 + len("withheld") / 2 * 5 / 1e6)


async def test_credentials_rejected_is_502_upstream_auth_failed(gateway, fake_azure):
    client = await gateway(provider={"api_key": "azure-wrong-key-0000"})
    error = await assert_error(await post(client, {"model": "azure-dall-e-3", "prompt": "p"}), 502, "upstream_auth_failed")
    assert "Access denied" not in error["message"]


async def test_rate_limit_is_429_with_retry_after(client, fake_azure):
    fake_azure.cue(status=429, headers={"Retry-After": "20", "retry-after-ms": "20000"}, body={"error": {"code": "429", "message": "Requests to the Images_Generations_Create Operation have exceeded call rate limit. Please retry after 20 seconds."}})
    resp = await post(client, {"model": "azure-dall-e-3", "prompt": "p"})
    error = await assert_error(resp, 429, "rate_limit_exceeded")
    assert resp.headers["Retry-After"] == "20" and "exceeded call rate limit" in error["message"]


async def test_deployment_not_found_is_502(client, fake_azure):
    await assert_error(await post(client, {"model": "azure-missing", "prompt": "p"}), 502, "upstream_model_not_found")


@pytest.mark.parametrize(
    "cue, status, code",
    [
        ({"status": 500, "body": {"error": {"code": "InternalServerError", "message": f"boom {FakeUpstream.key}"}}}, 502, "upstream_error"),
        ({"status": 503, "body": b"<html>Service Unavailable</html>", "content_type": "text/html"}, 502, "upstream_error"),
        ({"delay": 1.5, "body": {"created": 1, "data": []}}, 504, "upstream_timeout"),
        ({"cut": True}, 502, None),
        ({"body": b"\x00garbage{", "content_type": "application/json"}, 502, "upstream_bad_response"),
        ({"body": {"created": 1, "data": [{"content_filter_results": {}}]}}, 502, "upstream_bad_response"),
    ],
    ids=["500", "503-html", "timeout", "cut", "garbage", "image-without-data"],
)
async def test_upstream_failures(client, fake_azure, tmp_path, cue, status, code):
    fake_azure.cue(**cue)
    resp = await post(client, {"model": "azure-dall-e-3", "prompt": "p", "response_format": "b64_json"})
    body = await resp.json()
    assert resp.status == status, body
    if code is not None:
        assert body["error"]["code"] == code
    assert FakeUpstream.key not in json.dumps(body)
    (record,) = await records(tmp_path / "usage.jsonl")
    assert record["cost_usd"] == 0


async def test_an_error_message_that_echoes_the_key_is_redacted(client, fake_azure):
    fake_azure.cue(status=400, body={"error": {"code": "BadRequest", "message": f"bad header api-key: {FakeUpstream.key}", "param": "prompt"}})
    error = await assert_error(await post(client, {"model": "azure-dall-e-3", "prompt": "p"}), 400, None, "prompt")  # a code that is not a plain lowercase word is dropped
    assert FakeUpstream.key not in error["message"] and FakeUpstream.key[-12:] not in error["message"]


# --- cost ------------------------------------------------------------------------------------

async def test_usage_record_costs_what_was_delivered(client, fake_azure, tmp_path):
    await images_body(await post(client, {"model": "azure-dall-e-3", "prompt": "p", "size": "1792x1024", "quality": "hd"}))
    resp = await post(client, {"model": "azure-gpt-image-1", "prompt": "p", "n": 2, "quality": "high"})
    await images_body(resp)
    hd, tokens = await records(tmp_path / "usage.jsonl", 2)
    assert (hd["provider"], hd["cost_usd"]) == ("azure", 0.12)  # dall-e-3 hd landscape
    # gpt-image-1 by its token usage: 100 text tokens at $5/M and 4160 output tokens at $40/M
    assert tokens["cost_usd"] == pytest.approx(100 * 5 / 1e6 + 4160 * 40 / 1e6)
    assert float(resp.headers["x-imgproxy-cost-usd"]) == pytest.approx(tokens["cost_usd"])


# --- config ----------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "options, where",
    [({"auth": "oauth"}, "options.auth"), ({"api_version": "latest"}, "options.api_version"), ({"apiversion": "2024-10-21"}, "options.apiversion")],
)
async def test_bad_options_are_config_errors_naming_the_file(tmp_path, options, where):
    path = tmp_path / "proxy.yaml"
    path.write_text(config("http://127.0.0.1:9", tmp_path, provider={"options": options}))
    with pytest.raises(ConfigError) as refused:
        await Gateway.load(path, env={})
    assert refused.value.path == f"providers.azure.{where}" and str(refused.value).startswith(f"{path}: providers.azure.")


def test_the_spec_copy_is_the_shared_one():
    shared = Path(__file__).resolve().parents[2] / "shared" / "specs" / "azure-openai-images.yaml"
    if not shared.exists():
        pytest.skip("no shared/specs beside this checkout")
    assert (Path(__file__).parent / "specs" / "azure-openai-images.yaml").read_bytes() == shared.read_bytes()


async def test_a_dall_e_3_deployment_allowed_n_2_makes_two_calls(gateway, fake_azure, tmp_path):
    # DALL-E 3 takes n=1 per call (max_n_per_call from its catalog entry): a model allowed 2 fans out.
    two = {"azure-dall-e-3-x2": {"provider": "azure", "upstream_model": "my-dalle3", "catalog": "dall-e-3", "capabilities": {"max_n": 2}}}
    client = await gateway(models=two)
    body = await images_body(await post(client, {"model": "azure-dall-e-3-x2", "prompt": "a fox", "n": 2, "response_format": "b64_json"}))
    assert len(body["data"]) == 2 and [r["n"] for r in fake_azure.requests] == [1, 1]
    assert all("/openai/deployments/my-dalle3/images/generations" in path for path in fake_azure.paths)
    # Every call's image withheld by the output filter: refused, at no cost.
    error = await assert_error(await post(client, {"model": "azure-dall-e-3-x2", "prompt": "withheld", "n": 2}), 400, "content_policy_violation")
    assert "sexual (medium)" in error["message"] and len(fake_azure.requests) == 4
    delivered, refused = await records(tmp_path / "usage.jsonl", 2)
    assert (delivered["images"], delivered["cost_usd"]) == (2, pytest.approx(2 * 0.04))
    assert (refused["images"], refused["cost_usd"]) == (0, 0)
