"""models.X.unsupported_parameters: refuse (default) or drop a parameter the model does not
take, and the x-imgproxy-dropped-params header, access-log field and usage record that name
what was dropped; a fallback's translation reports what it left out the same way."""

from __future__ import annotations

import pytest
import yaml

from imgproxy.config import ConfigError
from imgproxy.gateway import Gateway
from imgproxy.server import create_app
from tests.conftest import AUTH, CLIENT_KEY, assert_error, images_body, usage_record
from tests.fakes import FakeUpstream

URL = "/v1/images/generations"
HEADER = "x-imgproxy-dropped-params"
ERROR_503 = {"error": {"message": "The server is overloaded.", "type": "server_error", "param": None, "code": None}}


def config(fake_openai, tmp_path, models: dict) -> str:
    return yaml.safe_dump({
        "auth": {"keys": [{"name": "team-a", "key": CLIENT_KEY}]},
        "providers": {"openai": {"type": "openai", "base_url": f"{fake_openai.base_url}/v1", "api_key": FakeUpstream.key}},
        "models": models,
        "images": {"directory": str(tmp_path / "images"), "signing_key": "test-signing-key"},
        "cost": {"usage_log": str(tmp_path / "usage.jsonl")},
    })


@pytest.fixture
def gateway(aiohttp_client, fake_openai, tmp_path):
    async def make(**models):
        text = config(fake_openai, tmp_path, {name: {"provider": "openai", **spec} for name, spec in models.items()})
        gw = await Gateway.load(text=text, env={})
        return await aiohttp_client(create_app(gw))

    return make


DROP = {"unsupported_parameters": "drop"}


async def test_drop_leaves_the_parameters_out_upstream_and_names_them(gateway, fake_openai, tmp_path, access_lines):
    client = await gateway(**{"dall-e-2": DROP})
    resp = await client.post(URL, headers=AUTH, json={
        "model": "dall-e-2", "prompt": "a lighthouse", "style": "vivid", "background": "transparent",
        "output_format": "jpeg", "output_compression": 50, "quality": "standard", "response_format": "b64_json",
    })
    body = await images_body(resp)
    assert len(body["data"]) == 1
    [sent] = fake_openai.requests
    # What the upstream got: none of what dall-e-2 does not take; what it takes, as given.
    assert not {"style", "background", "output_format", "output_compression"} & set(sent), sent
    assert sent["quality"] == "standard" and sent["prompt"] == "a lighthouse"
    assert resp.headers[HEADER] == "style, background, output_format, output_compression"
    record = await usage_record(tmp_path / "usage.jsonl", resp.headers["x-request-id"])
    assert record["dropped_params"] == ["style", "background", "output_format", "output_compression"]
    [line] = [line for line in access_lines() if line.get("path") == URL]
    assert line["dropped_params"] == "style,background,output_format,output_compression"


async def test_nothing_dropped_no_header_and_no_record_field(gateway, fake_openai, tmp_path, access_lines):
    client = await gateway(**{"dall-e-3": DROP})
    resp = await client.post(URL, headers=AUTH, json={"model": "dall-e-3", "prompt": "a lighthouse", "style": "natural", "quality": "hd"})
    await images_body(resp)
    assert HEADER not in resp.headers
    assert (fake_openai.requests[0]["style"], fake_openai.requests[0]["quality"]) == ("natural", "hd")
    record = await usage_record(tmp_path / "usage.jsonl", resp.headers["x-request-id"])
    assert "dropped_params" not in record
    assert all("dropped_params" not in line for line in access_lines())


async def test_refuse_is_the_default_and_unchanged(gateway, fake_openai):
    client = await gateway(**{"dall-e-2": {}})
    for param, value in (("style", "vivid"), ("background", "transparent"), ("output_format", "jpeg")):
        resp = await client.post(URL, headers=AUTH, json={"model": "dall-e-2", "prompt": "x", param: value})
        error = await assert_error(resp, 400, "unsupported_parameter", param)
        assert error["message"] == f"'{param}' is not supported by dall-e-2."
        assert HEADER not in resp.headers
    assert fake_openai.requests == []


@pytest.mark.parametrize(
    ("model", "extra", "code", "param"),
    [
        # A client waiting for server-sent events must never get JSON silently.
        ("dall-e-2", {"stream": True, "response_format": "b64_json"}, "unsupported_parameter", "stream"),
        ("dall-e-2", {"stream": False, "style": "vivid", "background": "opaque"}, "unsupported_parameter", "stream"),
        # n is never cut.
        ("dall-e-3", {"n": 2}, "invalid_n", "n"),
        # A value out of range changes what is made and what it costs: refused even in drop mode.
        ("dall-e-2", {"size": "999x999"}, "invalid_size", "size"),
        ("dall-e-3", {"size": "auto"}, "invalid_size", "size"),
        ("dall-e-2", {"quality": "hd"}, "invalid_quality", "quality"),
        ("gpt-image-1", {"quality": "hd"}, "invalid_quality", "quality"),
        ("dall-e-2", {"prompt": "x" * 1001}, "string_above_max_length", "prompt"),
    ],
)
async def test_drop_mode_still_refuses_what_must_not_be_dropped(gateway, fake_openai, model, extra, code, param):
    client = await gateway(**{model: DROP})
    resp = await client.post(URL, headers=AUTH, json={"model": model, "prompt": "x", **extra})
    await assert_error(resp, 400, code, param)
    assert fake_openai.requests == []


async def test_a_fallback_reports_what_its_translation_left_out(gateway, fake_openai):
    client = await gateway(**{"dall-e-3": {"fallbacks": ["dall-e-2"]}, "dall-e-2": {}})
    fake_openai.cue(status=503, body=ERROR_503)  # dall-e-3 fails without producing anything
    resp = await client.post(URL, headers=AUTH, json={"model": "dall-e-3", "prompt": "x", "style": "natural", "quality": "hd"})
    await images_body(resp)
    first, second = fake_openai.requests
    assert (first["model"], first["style"]) == ("dall-e-3", "natural")
    assert second["model"] == "dall-e-2" and "style" not in second and second["quality"] == "standard"  # hd translated
    assert resp.headers["x-imgproxy-model"] == "dall-e-2"
    assert resp.headers[HEADER] == "style"


async def test_a_fallback_reports_nothing_for_a_default_the_client_never_gave(gateway, fake_openai):
    # dall-e-3 fills in style vivid by default; dall-e-2 takes none: nothing the client asked for is lost.
    client = await gateway(**{"dall-e-3": {"fallbacks": ["dall-e-2"]}, "dall-e-2": {}})
    fake_openai.cue(status=503, body=ERROR_503)
    resp = await client.post(URL, headers=AUTH, json={"model": "dall-e-3", "prompt": "x"})
    await images_body(resp)
    assert "style" not in fake_openai.requests[1]
    assert HEADER not in resp.headers


async def test_the_header_names_what_the_serving_fallback_left_out_not_an_earlier_one(gateway, fake_openai):
    # dall-e-3 fails, dall-e-2 (no styles: leaves style out) fails, a second dall-e-3 keeps the style and serves.
    client = await gateway(**{"dall-e-3": {"fallbacks": ["dall-e-2", "dall-e-3-again"]}, "dall-e-2": {}, "dall-e-3-again": {"upstream_model": "dall-e-3"}})
    fake_openai.cue(status=503, body=ERROR_503)
    fake_openai.cue(status=503, body=ERROR_503)
    resp = await client.post(URL, headers=AUTH, json={"model": "dall-e-3", "prompt": "x", "style": "natural"})
    await images_body(resp)
    assert [(r["model"], r.get("style")) for r in fake_openai.requests] == [("dall-e-3", "natural"), ("dall-e-2", None), ("dall-e-3", "natural")]
    assert resp.headers["x-imgproxy-model"] == "dall-e-3-again"
    assert HEADER not in resp.headers


@pytest.mark.parametrize("mode", ["refuse", "drop"])
async def test_an_option_a_fallback_lacks_is_dropped_only_in_drop_mode(gateway, fake_openai, tmp_path, mode):
    client = await gateway(**{"gpt-image-1": {"fallbacks": ["dall-e-2"], "unsupported_parameters": mode}, "dall-e-2": {}})
    fake_openai.cue(status=503, body=ERROR_503)
    resp = await client.post(URL, headers=AUTH, json={"model": "gpt-image-1", "prompt": "x", "background": "transparent"})
    if mode == "refuse":
        await assert_error(resp, 502, "upstream_error")  # dall-e-2 cannot take it: skipped, never called
        assert [r["model"] for r in fake_openai.requests] == ["gpt-image-1"]
        return
    await images_body(resp)
    assert fake_openai.requests[0]["background"] == "transparent"
    assert fake_openai.requests[1]["model"] == "dall-e-2" and "background" not in fake_openai.requests[1]
    assert resp.headers[HEADER] == "background"
    record = await usage_record(tmp_path / "usage.jsonl", resp.headers["x-request-id"])
    assert record["model"] == "dall-e-2" and record["dropped_params"] == ["background"]


async def test_dropped_params_are_named_on_an_error_answer_too(gateway, fake_openai):
    client = await gateway(**{"dall-e-2": DROP})
    fake_openai.cue(status=503, body=ERROR_503)
    resp = await client.post(URL, headers=AUTH, json={"model": "dall-e-2", "prompt": "x", "style": "vivid"})
    await assert_error(resp, 502, "upstream_error")
    assert resp.headers[HEADER] == "style"
    assert "style" not in fake_openai.requests[0]


async def test_the_setting_is_checked_at_load(fake_openai, tmp_path):
    text = config(fake_openai, tmp_path, {"dall-e-2": {"provider": "openai", "unsupported_parameters": "ignore"}})
    with pytest.raises(ConfigError) as caught:
        await Gateway.load(text=text, env={})
    assert caught.value.path == "models.dall-e-2.unsupported_parameters"
    for spec, want in (({"unsupported_parameters": "drop"}, "drop"), ({}, "refuse")):
        gw = await Gateway.load(text=config(fake_openai, tmp_path, {"dall-e-2": {"provider": "openai", **spec}}), env={})
        assert gw.config.models["dall-e-2"].unsupported_parameters == want
