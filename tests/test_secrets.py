"""No client or provider key in any response or log line, from any path: upstream error
bodies that echo the key in disguise, misshapen error fields, a redirect loop, a moderation
model that misbehaves, config errors about a value from ${VAR} (check-config and a hot reload).

The session-wide scan in conftest.py watches every response and log line besides; the last
tests here show that scan can fail."""

import json
import logging
import re
from urllib.parse import unquote

import pytest
from aiohttp import web
from hypothesis import given, settings, strategies as st

from imgproxy.config import ConfigError
from imgproxy.gateway import Gateway
from imgproxy.hookspecs import hookimpl
from imgproxy.logs import JsonFormatter
from imgproxy.redaction import redact
from imgproxy.runtime import Runtime
from imgproxy.server import create_app
from tests.conftest import (
    _SESSION_LEAKS,
    AUTH,
    ERROR_RESPONSE,
    SECRET_ENV_VALUE,
    assert_error,
    images_body,
    run_imgproxy,
)
from tests.fakes import FAKE_B64, Cue, FakeUpstream

URL = "/v1/images/generations"
DALLE = {"model": "dall-e-3", "prompt": "a lighthouse"}
SDXL = {"model": "stable-diffusion-xl-1024-v1-0", "prompt": "a lighthouse"}
KEY = FakeUpstream.key

# The provider key as upstreams have been seen to echo it, and as an attacker would disguise it.
DISGUISES = {
    "exact": KEY,
    "upper": KEY.upper(),
    "swapped-case": KEY.swapcase(),
    "url-encoded": "".join(f"%{byte:02X}" for byte in KEY.encode()),
    "split": " ".join(KEY[i : i + 5] for i in range(0, len(KEY), 5)),
    "in-a-json-string": json.dumps({"api_key": KEY}),
    "json-escaped": "".join(f"\\u{ord(c):04x}" for c in KEY),
    "partial": KEY[5:17],
    "masked": KEY[:5] + "***" + KEY[-3:],
    "bearer": f"Authorization: Bearer {KEY}",
}


def traces_of_key(text: str, key: str = KEY) -> list[str]:
    """Every piece of `key` of 8 characters found in `text` once it is unescaped,
    lowercased and stripped of whitespace; and the masked echo sk-up***."""
    plain = re.sub(r"\\u([0-9a-fA-F]{4})", lambda m: chr(int(m.group(1), 16)), unquote(text))
    plain = "".join(plain.split()).lower()
    key = key.lower()
    # A piece that is a plain word is left out: the fake's key holds "upstream", as do our codes.
    found = [key[i : i + 8] for i in range(len(key) - 7) if key[i : i + 8] in plain and not key[i : i + 8].isalpha()]
    if key[:5] + "***" in plain:
        found.append(key[:5] + "***")
    return found


async def leak_free(resp) -> str:
    """The response as the client received it (status, headers, body), checked for the key."""
    text = await resp.text()
    whole = f"{resp.status}\n" + "\n".join(f"{k}: {v}" for k, v in resp.headers.items()) + "\n" + text
    assert traces_of_key(whole) == [], whole
    return text


def echoing_error(disguise: str) -> dict:
    """OpenAI's error shape with every field, known and unknown, nested or not, echoing the key."""
    return {
        "error": {
            "message": f"Invalid request ({disguise}).",
            "type": disguise,
            "param": disguise,
            "code": disguise,
            "details": {"api_key": KEY, "seen": [disguise, {"key": KEY}]},
        },
        "request": {"headers": {"Authorization": f"Bearer {KEY}"}},
        "api_key": KEY,
    }


@pytest.mark.parametrize("disguise", DISGUISES.values(), ids=DISGUISES.keys())
@pytest.mark.parametrize("status, code, kind", [(400, None, "invalid_request_error"), (422, None, "invalid_request_error"), (429, "rate_limit_exceeded", "requests")])
async def test_openai_error_body_echoing_the_key_is_rebuilt(client, fake_openai, caplog, disguise, status, code, kind):
    fake_openai.cue(status=status, body=echoing_error(disguise), headers={"Retry-After": KEY, "X-Echo": "none"})
    with caplog.at_level(logging.DEBUG):
        resp = await client.post(URL, json=DALLE, headers=AUTH)
        error = await assert_error(resp, 429 if status == 429 else 400, code)
    await leak_free(resp)
    assert traces_of_key(caplog.text) == []
    assert error["type"] == kind
    assert error["message"].startswith("Invalid request (")  # the message is kept, the key is not
    assert set(error) == {"message", "type", "code", "param"}
    assert "Retry-After" not in resp.headers and "X-Echo" not in resp.headers


@pytest.mark.parametrize("disguise", DISGUISES.values(), ids=DISGUISES.keys())
async def test_openai_policy_refusal_echoing_the_key(client, fake_openai, disguise):
    body = {"error": {"message": f"Rejected by the safety system; key {disguise}", "type": "image_generation_user_error", "param": None, "code": "moderation_blocked"}}
    fake_openai.cue(status=400, body=body)
    resp = await client.post(URL, json=DALLE, headers=AUTH)
    error = await assert_error(resp, 400, "moderation_blocked")
    await leak_free(resp)
    assert error["type"] == "image_generation_user_error" and "safety system" in error["message"]


@pytest.mark.parametrize("disguise", DISGUISES.values(), ids=DISGUISES.keys())
@pytest.mark.parametrize("status, code", [(400, None), (429, "rate_limit_exceeded"), (500, "upstream_error")])
async def test_stability_error_body_echoing_the_key_is_rebuilt(client, fake_stability, caplog, disguise, status, code):
    body = {"id": KEY, "name": disguise, "message": f"Bad request {disguise}", "details": {"key": KEY}}
    fake_stability.cue(status=status, body=body)
    with caplog.at_level(logging.DEBUG):
        resp = await client.post(URL, json=SDXL, headers=AUTH)
        await assert_error(resp, 502 if status == 500 else status, code)
    await leak_free(resp)
    assert traces_of_key(caplog.text) == []


MISSHAPEN = [7, 1.5, True, ["invalid_prompt"], {"code": "x", "key": KEY}, "", "Has Spaces And Capitals", "x" * 65, "ünïcode"]


@pytest.mark.parametrize("value", MISSHAPEN, ids=[type(v).__name__ + str(i) for i, v in enumerate(MISSHAPEN)])
@pytest.mark.parametrize("status, code", [(400, None), (429, "rate_limit_exceeded"), (503, "upstream_error")])
async def test_misshapen_type_code_and_param_keep_the_error_schema(client, fake_openai, value, status, code):
    fake_openai.cue(status=status, body={"error": {"message": value, "type": value, "param": value, "code": value}})
    resp = await client.post(URL, json=DALLE, headers=AUTH)
    error = await assert_error(resp, 502 if status == 503 else status, code)  # validates the OpenAI error schema
    assert isinstance(error["type"], str) and error["type"] != value
    await leak_free(resp)


@pytest.mark.parametrize("value", MISSHAPEN[:5], ids=[type(v).__name__ for v in MISSHAPEN[:5]])
async def test_misshapen_stability_name_and_message(client, fake_stability, value):
    fake_stability.cue(status=400, body={"id": value, "name": value, "message": value})
    resp = await client.post(URL, json=SDXL, headers=AUTH)
    await assert_error(resp, 400, None)


@pytest.mark.parametrize("param, shown", [("prompt", "prompt"), ("size", "size"), ("organization", None), ("messages[0].content", None), (KEY, None)])
async def test_param_only_when_it_names_a_request_parameter(client, fake_openai, param, shown):
    fake_openai.cue(status=400, body={"error": {"message": "Invalid value.", "type": "invalid_request_error", "param": param, "code": "invalid_value"}})
    await assert_error(await client.post(URL, json=DALLE, headers=AUTH), 400, "invalid_value", shown)


async def test_error_body_that_is_not_json_or_has_no_error_object(client, fake_openai):
    fake_openai.cue(status=400, body=f"key={KEY}".encode(), content_type="text/plain")
    resp = await client.post(URL, json=DALLE, headers=AUTH)
    await assert_error(resp, 400, None)
    await leak_free(resp)
    fake_openai.cue(status=400, body={"error": KEY, "message": KEY})
    resp = await client.post(URL, json=DALLE, headers=AUTH)
    await assert_error(resp, 400, None)
    await leak_free(resp)


def redirecting_upstream() -> web.Application:
    """An upstream that answers every request with a redirect to itself, the key in the body
    and in the Location's fragment (never sent back here, so this server's own access log
    stays clean, but part of the URL the gateway's client then holds)."""

    async def loop(request: web.Request) -> web.Response:
        return web.json_response({"error": {"message": f"moved; key {KEY}"}}, status=302, headers={"Location": f"{request.path}#key={KEY}"})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", loop)
    return app


async def test_redirect_loop_is_a_502_and_logs_no_key(make_client, config_text, fake_openai, aiohttp_server, caplog):
    """Holds whether the gateway follows redirects (and gives up) or refuses them outright."""
    server = await aiohttp_server(redirecting_upstream())
    upstream_url = str(server.make_url("")).rstrip("/")
    client = await make_client(config_text().replace(fake_openai.base_url, upstream_url))
    with caplog.at_level(logging.DEBUG):
        resp = await client.post(URL, json=DALLE, headers=AUTH)
        body = json.loads(await leak_free(resp))
    assert resp.status == 502, body
    assert list(ERROR_RESPONSE.iter_errors(body)) == [], body
    assert body["error"]["type"] == "server_error"
    assert caplog.records, "the operator is told"
    assert traces_of_key(caplog.text) == [], caplog.text
    assert "ClientRequest" not in caplog.text and "RequestInfo" not in caplog.text and "CIMultiDict" not in caplog.text


MODEL_CHECK = """
moderation:
  upstream: {provider: openai, model: omni-moderation-latest, timeout: 2}
"""


@pytest.mark.parametrize(
    "cue",
    [
        Cue(status=401, body={"error": {"message": f"Incorrect API key provided: {KEY}", "code": KEY}}),
        Cue(status=500, body={"error": {"message": KEY}}),
        Cue(body={"results": [{"categories": KEY}], "key": KEY}),
        Cue(body={"results": {KEY: KEY}}),
        Cue(body=f"<html>{KEY}</html>".encode(), content_type="text/html"),
    ],
    ids=["401", "500", "categories-not-a-map", "results-not-a-list", "html"],
)
async def test_moderation_model_errors_log_no_key(make_client, config_text, fake_openai, caplog, cue):
    client = await make_client(config_text(extra=MODEL_CHECK))
    fake_openai.moderation_cues.append(cue)
    with caplog.at_level(logging.DEBUG):
        resp = await client.post(URL, json={"model": "placeholder", "prompt": "x"}, headers=AUTH)
        await assert_error(resp, 503, "moderation_unavailable")
    await leak_free(resp)
    assert "moderation model unavailable" in caplog.text
    assert traces_of_key(caplog.text) == [], caplog.text


async def test_moderation_model_behind_a_redirect_loop(make_client, config_text, fake_openai, aiohttp_server, caplog):
    server = await aiohttp_server(redirecting_upstream())
    text = config_text(extra=MODEL_CHECK).replace(
        "  placeholder:\n    type: placeholder\n",
        f"  placeholder:\n    type: placeholder\n  looping:\n    type: openai\n    base_url: {str(server.make_url('')).rstrip('/')}\n    api_key: {KEY}\n",
    ).replace("provider: openai, model: omni", "provider: looping, model: omni")
    client = await make_client(text)
    with caplog.at_level(logging.DEBUG):
        resp = await client.post(URL, json={"model": "placeholder", "prompt": "x"}, headers=AUTH)
        await assert_error(resp, 503, "moderation_unavailable")
    assert traces_of_key(caplog.text) == [], caplog.text


# Config errors about a value that came from ${TEAM_KEY}: where it came from, never the value.
TEAM = """
auth:
  keys:
    - name: team
      key: {key}
providers:
  local: {{type: placeholder}}
  openai: {{type: openai, base_url: "https://api.openai.com/v1", api_key: {provider_key}}}
models:
  placeholder: {{provider: local}}
"""
LONG_ENOUGH = "a-client-key-long-enough"


@pytest.mark.parametrize(
    "text, path",
    [
        (TEAM.format(key="${TEAM_KEY}", provider_key="k"), "auth.keys.0.key"),  # too short: minLength
        (TEAM.format(key=LONG_ENOUGH, provider_key="k").replace(f"key: {LONG_ENOUGH}", "sha256: ${TEAM_KEY}0000"), "auth.keys.0"),  # partly: pattern
        (TEAM.format(key=LONG_ENOUGH, provider_key="k") + "default_model: ${TEAM_KEY}\n", "default_model"),
        (TEAM.format(key=LONG_ENOUGH, provider_key="k").replace("{type: placeholder}", "{type: '${TEAM_KEY}'}"), "providers.local.type"),
        (TEAM.format(key=LONG_ENOUGH, provider_key="k").replace("{provider: local}", "{provider: 'x-${TEAM_KEY}'}"), "models.placeholder.provider"),
        (TEAM.format(key=LONG_ENOUGH, provider_key="k").replace('base_url: "https://api.openai.com/v1"', "base_url: '${TEAM_KEY}'"), "providers.openai.base_url"),
        (TEAM.format(key=LONG_ENOUGH, provider_key="k") + "server: {port: '${TEAM_KEY}'}\n", "server.port"),
        (TEAM.format(key=LONG_ENOUGH, provider_key="k") + "images: {upstream_urls: '${TEAM_KEY}'}\n", "images.upstream_urls"),
        (TEAM.format(key=LONG_ENOUGH, provider_key="k") + "moderation: {upstream: {provider: '${TEAM_KEY}'}}\n", "moderation.upstream.provider"),  # a plugin's own check
    ],
    ids=["minLength", "pattern", "default_model", "provider-type", "model-provider", "base_url", "type", "enum", "plugin"],
)
async def test_config_errors_name_the_variable_not_its_value(text, path):
    with pytest.raises(ConfigError) as caught:
        await Gateway.load(text=text, env={"TEAM_KEY": SECRET_ENV_VALUE})
    error = caught.value
    assert error.path.startswith(path), str(error)
    assert "$TEAM_KEY" in error.problem, str(error)
    assert SECRET_ENV_VALUE not in str(error) and SECRET_ENV_VALUE[:8] not in str(error), str(error)


async def test_literal_config_strings_are_not_quoted_in_schema_errors():
    """A key written into the file itself is not printed either (the error is logged on reload)."""
    with pytest.raises(ConfigError) as caught:
        await Gateway.load(text=TEAM.format(key=SECRET_ENV_VALUE, provider_key="k"), env={})
    assert caught.value.path == "auth.keys.0.key" and "at least 8 characters" in caught.value.problem
    assert SECRET_ENV_VALUE not in str(caught.value)


def test_check_config_names_the_variable_not_its_value(tmp_path):
    config = tmp_path / "proxy.yaml"
    config.write_text(TEAM.format(key="${TEAM_KEY}", provider_key="k"))
    result = run_imgproxy("check-config", str(config), env={"TEAM_KEY": SECRET_ENV_VALUE, "PATH": "/usr/bin:/bin"})
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"{config}: auth.keys.0.key: must be at least 8 characters long (value from $TEAM_KEY)" in result.stderr
    assert SECRET_ENV_VALUE not in result.stdout + result.stderr


async def test_hot_reload_error_log_names_the_variable_not_its_value(aiohttp_client, tmp_path, monkeypatch, caplog):
    path = tmp_path / "proxy.yaml"
    path.write_text(TEAM.format(key=LONG_ENOUGH, provider_key="k"))
    monkeypatch.setenv("TEAM_KEY", SECRET_ENV_VALUE)
    runtime = Runtime(await Gateway.load(path), str(path))
    client = await aiohttp_client(create_app(runtime))
    path.write_text(TEAM.format(key="${TEAM_KEY}", provider_key="k"))
    with caplog.at_level(logging.ERROR):
        assert await runtime.reload() is False
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any("auth.keys.0.key" in line and "(value from $TEAM_KEY)" in line for line in errors), errors
    assert SECRET_ENV_VALUE not in caplog.text
    body = {"model": "placeholder", "prompt": "x", "response_format": "b64_json"}
    await images_body(await client.post(URL, json=body, headers={"Authorization": f"Bearer {LONG_ENOUGH}"}))


# redact() itself, attacked with generated keys, disguises and surroundings.
KEY_TEXT = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_", min_size=16, max_size=64)
AROUND = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=40)
DISGUISE = st.sampled_from(
    [
        lambda k: k,
        str.upper,
        str.swapcase,
        lambda k: "".join(f"%{b:02x}" for b in k.encode()),
        lambda k: "\n".join(k[i : i + 3] for i in range(0, len(k), 3)),
        lambda k: json.dumps({"key": k}),
        lambda k: "".join(f"\\u{ord(c):04X}" for c in k),
        lambda k: k[len(k) // 3 : len(k) // 3 + 8],
    ]
)


@settings(max_examples=300, deadline=None)
@given(key=KEY_TEXT, before=AROUND, after=AROUND, disguise=DISGUISE)
def test_redact_leaves_no_piece_of_the_key(key, before, after, disguise):
    out = redact(before + disguise(key) + after, [key])
    assert traces_of_key(out, key) == []
    assert len(out) <= 1000 and not re.search(r"[\x00-\x1f]", out)


@pytest.mark.parametrize(
    "text",
    ["Incorrect API key provided: sk-ab***xyz.", "Authorization: Bearer abc.def.ghi-jkl", "token dGhpcyBpcyBhIHNlY3JldCB0b2tlbjE=", "id 0123456789abcdef0123456789abcdef", "use sk_live_51Habc please"],
)
def test_redact_removes_credential_shapes_without_knowing_the_key(text):
    out = redact(text)
    assert out != text and "[redacted]" in out
    assert not re.search(r"sk[-_]|abc\.def|dGhpcy|0123456789abcdef", out), out


@pytest.mark.parametrize(
    "text",
    ["The specified engine (ID stable-diffusion-xl-1024-v1-0) was not found.", "Invalid prompt: too vague", "Rate limit reached for gpt-image-1 in organization org on images per min: 5."],
)
def test_redact_keeps_ordinary_provider_words(text):
    assert redact(text) == text


# The session-wide scan (conftest.py) can fail: it sees a key however a test reads a response.
async def test_the_session_scan_sees_keys_in_streamed_bodies_and_headers(aiohttp_client, sdk_for):
    async def leaky(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        if request.method == "GET":  # not to the SDK, whose client logs headers at DEBUG
            resp.headers["X-Leak"] = KEY.upper()
        await resp.prepare(request)
        await resp.write(b'{"created": 1, "data": [], "echo": "' + KEY[:10].encode())  # the key split across two chunks
        await resp.write(KEY[10:].encode() + b'"}')
        return resp

    app = web.Application()
    app.router.add_route("*", "/v1/images/generations", leaky)
    client = await aiohttp_client(app)
    before = len(_SESSION_LEAKS)
    resp = await client.get("/v1/images/generations")
    async for _ in resp.content.iter_any():
        pass
    by_aiohttp = _SESSION_LEAKS[before:]
    await sdk_for(client).images.generate(model="dall-e-2", prompt="x")
    by_sdk = _SESSION_LEAKS[before + len(by_aiohttp):]
    del _SESSION_LEAKS[before:]  # this test's own leaks are the point, not a failure
    assert {label for _, label in by_aiohttp} == {"FakeUpstream.key"} and len(by_aiohttp) >= 2, by_aiohttp  # headers and body
    assert {label for _, label in by_sdk} == {"FakeUpstream.key"}, by_sdk


class _Failing:
    """A plugin with a bug: its exception quotes an upstream's answer, key included."""

    @hookimpl
    def imgproxy_check_limits(self, ctx):
        raise RuntimeError(f"unexpected answer {{'api_key': '{KEY}', 'auth': 'Bearer {KEY}'}}")


async def test_tracebacks_in_log_lines_carry_no_credential(make_client, caplog):
    client = await make_client(plugins=[_Failing()])
    with caplog.at_level(logging.ERROR):
        resp = await client.post(URL, json={"model": "placeholder", "prompt": "x"}, headers=AUTH)
        await assert_error(resp, 500, "internal_error")
    lines = [JsonFormatter().format(record) for record in caplog.records if record.exc_info]
    assert lines and all("Traceback" in line and "RuntimeError" in line for line in lines), lines
    assert traces_of_key("\n".join(lines)) == [], lines


async def test_a_parsed_answer_passes_on_usage_numbers_and_plain_extras_only(client, fake_openai):
    """An answer the gateway rebuilds (here: images it hosts) carries no upstream text but the images'."""
    usage = {"total_tokens": 100, "input_tokens": 50, "output_tokens": 50, "note": KEY, "input_tokens_details": {"text_tokens": 10, "image_tokens": 40, "echo": [KEY]}}
    fake_openai.cue(body={"created": 1, "data": [{"b64_json": FAKE_B64}], "usage": usage, "background": KEY, "quality": f"high {KEY}", "output_format": "png", "size": "1024x1024"})
    resp = await client.post(URL, json={"model": "gpt-image-1", "prompt": "x", "response_format": "url"}, headers=AUTH)
    body = await images_body(resp)
    await leak_free(resp)
    assert body["usage"] == {"total_tokens": 100, "input_tokens": 50, "output_tokens": 50, "input_tokens_details": {"text_tokens": 10, "image_tokens": 40}}
    assert (body.get("output_format"), body.get("size")) == ("png", "1024x1024")
    assert "background" not in body and "quality" not in body
