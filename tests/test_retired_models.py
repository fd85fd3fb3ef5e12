"""Models with a shutdown date: served with a Sunset header before it, refused with 404
model_retired (naming the replacement) from its UTC midnight on, without a reload; left out of
GET /v1/models and skipped as a fallback."""

import datetime
from email.utils import parsedate_to_datetime

import pytest

from imgproxy.catalog import ModelEntry
from imgproxy.config import ConfigError
from imgproxy.gateway import Gateway
from imgproxy.hookspecs import hookimpl
from imgproxy.providers.placeholder import PlaceholderProvider
from tests.conftest import AUTH, CLIENT_KEY, assert_error, images_body, run_imgproxy

URL = "/v1/images/generations"
DALLE2 = {"model": "dall-e-2", "prompt": "a lighthouse", "response_format": "b64_json"}
ERROR_500 = {"error": {"message": "The server had an error.", "type": "server_error", "param": None, "code": None}}


def with_models(text: str, **models: str) -> str:
    """The test config with these model lines added (or replacing the one of that name)."""
    lines = [line for line in text.splitlines() if not any(line.startswith(f"  {name}: ") for name in models)]
    at = lines.index("models:") + 1
    return "\n".join(lines[:at] + [f"  {name}: {spec}" for name, spec in models.items()] + lines[at:]) + "\n"


def utc_today() -> datetime.date:
    return datetime.datetime.now(datetime.timezone.utc).date()


async def test_a_model_past_its_shutdown_is_refused_naming_its_replacement(make_client, config_text, fake_openai):
    text = with_models(config_text(), **{"dall-e-2": '{provider: openai, shutdown: "2020-01-01", replacement: gpt-image-1}'})
    client = await make_client(text)
    for model in ("dall-e-2", "openai/dall-e-2"):
        resp = await client.post(URL, json={**DALLE2, "model": model}, headers=AUTH)
        error = await assert_error(resp, 404, "model_retired", "model")
        assert "2020-01-01" in error["message"] and "Use 'gpt-image-1' instead." in error["message"], error
        assert resp.headers["x-should-retry"] == "false"
    assert fake_openai.requests == []  # never called
    # Its neighbours are not affected.
    await images_body(await client.post(URL, json={**DALLE2, "model": "dall-e-3"}, headers=AUTH))


async def test_the_replacement_is_named_as_this_gateway_serves_it_or_not_at_all(make_client, config_text):
    text = with_models(
        config_text(),
        **{
            # Named by its upstream model: the public name that serves it is given.
            "dall-e-2": '{provider: openai, shutdown: "2020-01-01", replacement: gpt-image-1.5}',
            "latest": "{provider: openai, upstream_model: gpt-image-1.5}",
            # A replacement this gateway does not serve is not offered to the client.
            "dall-e-3": '{provider: openai, shutdown: "2020-01-01", replacement: gpt-image-9}',
            # Nor the retired model itself (its upstream name is its replacement's).
            "gpt-image-1": '{provider: openai, shutdown: "2020-01-01", replacement: gpt-image-1}',
        },
    )
    client = await make_client(text)
    error = await assert_error(await client.post(URL, json=DALLE2, headers=AUTH), 404, "model_retired", "model")
    assert error["message"].endswith("Use 'latest' instead."), error
    error = await assert_error(await client.post(URL, json={**DALLE2, "model": "dall-e-3"}, headers=AUTH), 404, "model_retired", "model")
    assert "gpt-image-9" not in error["message"] and "Use" not in error["message"], error
    error = await assert_error(await client.post(URL, json={**DALLE2, "model": "gpt-image-1"}, headers=AUTH), 404, "model_retired", "model")
    assert "Use" not in error["message"], error


async def test_before_its_shutdown_a_model_is_served_with_a_sunset_header(make_client, config_text, fake_openai):
    # Unquoted, YAML reads a date: it is taken as written.
    client = await make_client(with_models(config_text(), **{"dall-e-2": "{provider: openai, shutdown: 2999-01-01}"}))
    resp = await client.post(URL, json=DALLE2, headers=AUTH)
    await images_body(resp)
    assert resp.headers["Sunset"] == "Tue, 01 Jan 2999 00:00:00 GMT"  # RFC 8594: an HTTP-date
    assert parsedate_to_datetime(resp.headers["Sunset"]) == datetime.datetime(2999, 1, 1, tzinfo=datetime.timezone.utc)
    assert len(fake_openai.requests) == 1
    # A model with no shutdown says nothing of the kind.
    resp = await client.post(URL, json={**DALLE2, "model": "dall-e-3"}, headers=AUTH)
    await images_body(resp)
    assert "Sunset" not in resp.headers


async def test_a_running_gateway_stops_serving_at_the_shutdown_midnight_without_a_reload(make_client, config_text, fake_openai):
    client = await make_client(with_models(config_text(), **{"dall-e-2": '{provider: openai, shutdown: "2031-03-01"}'}))
    routing = client.gateway.routing
    # The gateway's clock, as the routing table reads it per request: the last day before, then the day itself.
    routing.today = lambda: datetime.date(2031, 2, 28)
    resp = await client.post(URL, json=DALLE2, headers=AUTH)
    await images_body(resp)
    assert resp.headers["Sunset"] == "Sat, 01 Mar 2031 00:00:00 GMT"
    routing.today = lambda: datetime.date(2031, 3, 1)
    await assert_error(await client.post(URL, json=DALLE2, headers=AUTH), 404, "model_retired", "model")
    assert len(fake_openai.requests) == 1
    assert client.gateway.routing is routing  # the same config throughout


async def test_the_real_clock_is_read_in_utc_and_the_shutdown_day_itself_is_refused(make_client, config_text):
    today = utc_today()
    text = with_models(
        config_text(),
        **{"dall-e-2": f'{{provider: openai, shutdown: "{today}"}}', "dall-e-3": f'{{provider: openai, shutdown: "{today + datetime.timedelta(days=2)}"}}'},
    )
    client = await make_client(text)
    await assert_error(await client.post(URL, json=DALLE2, headers=AUTH), 404, "model_retired", "model")
    await images_body(await client.post(URL, json={**DALLE2, "model": "dall-e-3"}, headers=AUTH))


async def test_a_key_that_may_not_use_the_model_gets_its_usual_refusal(make_client, config_text):
    text = with_models(config_text(), **{"dall-e-2": '{provider: openai, shutdown: "2020-01-01", replacement: dall-e-3}'})
    text = text.replace(f"key: {CLIENT_KEY}\n", f"key: {CLIENT_KEY}\n      models: [gpt-image-1]\n")
    client = await make_client(text)
    error = await assert_error(await client.post(URL, json=DALLE2, headers=AUTH), 403, "model_not_allowed", "model")
    assert "2020-01-01" not in error["message"] and "dall-e-3" not in error["message"]
    await assert_error(await client.get("/v1/models/dall-e-2", headers=AUTH), 404, "model_not_found", "model")


async def test_a_retired_fallback_is_skipped_not_called(make_client, config_text, fake_openai, fake_stability):
    text = with_models(
        config_text(),
        **{
            "dall-e-2": "{provider: openai, fallbacks: [sdxl, placeholder]}",
            "stable-diffusion-xl-1024-v1-0": '{provider: stability, aliases: [sdxl], shutdown: "2020-01-01"}',
        },
    )
    client = await make_client(text)
    fake_openai.cue(status=500, body=ERROR_500)
    resp = await client.post(URL, json=DALLE2, headers=AUTH)
    await images_body(resp)
    assert resp.headers["x-imgproxy-model"] == "placeholder" and resp.headers["x-imgproxy-attempts"] == "2"
    assert fake_stability.requests == []


async def test_the_model_list_leaves_out_retired_models_and_shows_shutdown_dates(make_client, config_text):
    text = with_models(
        config_text(),
        **{
            "dall-e-2": '{provider: openai, shutdown: "2020-01-01", replacement: gpt-image-1}',
            "dall-e-3": '{provider: openai, shutdown: "2999-01-01", replacement: gpt-image-1}',
        },
    )
    client = await make_client(text)
    body = await (await client.get("/v1/models", headers=AUTH)).json()
    models = {model["id"]: model["imgproxy"] for model in body["data"]}
    assert "dall-e-2" not in models
    assert (models["dall-e-3"]["shutdown"], models["dall-e-3"]["replacement"]) == ("2999-01-01", "gpt-image-1")
    assert (models["gpt-image-1"]["shutdown"], models["gpt-image-1"]["replacement"]) == (None, None)
    error = await assert_error(await client.get("/v1/models/dall-e-2", headers=AUTH), 404, "model_retired", "model")
    assert "gpt-image-1" in error["message"]
    resp = await client.get("/v1/models/dall-e-3", headers=AUTH)
    assert resp.status == 200 and resp.headers["Sunset"] == "Tue, 01 Jan 2999 00:00:00 GMT"


class Retiring(PlaceholderProvider):
    """A provider package whose catalog says its model shut down."""

    type = "retiring"
    models = {
        "old-model": ModelEntry(
            PlaceholderProvider.models["placeholder"].capabilities, {"per_image": {"*": {"*": 0.01}}},
            {"capabilities": ("test", "2026-11-25"), "price": ("test", "2026-11-25"), "lifecycle": ("test", "2026-11-25")},
            {"shutdown": "2020-01-01", "replacement": "placeholder"},
        )
    }


class RegisterRetiring:
    @hookimpl
    def imgproxy_register_providers(self, register):
        register(Retiring.type, Retiring)


async def test_a_catalog_shutdown_applies_to_its_own_provider_type_and_the_file_overrides_it(make_client, config_text):
    text = config_text().replace("providers:\n", "providers:\n  old: {type: retiring}\n")
    text = with_models(
        text,
        **{
            "old-model": "{provider: old}",
            "kept": "{provider: old, upstream_model: old-model, shutdown: null}",  # the operator's provider still serves it
            "elsewhere": "{provider: placeholder, catalog: old-model}",  # another provider type's copy
        },
    )
    client = await make_client(text, plugins=[RegisterRetiring()])
    body = {"prompt": "x", "response_format": "b64_json"}
    error = await assert_error(await client.post(URL, json={**body, "model": "old-model"}, headers=AUTH), 404, "model_retired", "model")
    assert error["message"] == "The model 'old-model' was shut down on 2020-01-01 and is no longer served. Use 'placeholder' instead."
    for model in ("kept", "elsewhere"):
        resp = await client.post(URL, json={**body, "model": model}, headers=AUTH)
        await images_body(resp)
        assert "Sunset" not in resp.headers


@pytest.mark.parametrize("value", ['"2026-02-30"', '"May 12"', '"2026-05-12T00:00:00"', "2026-05-12 10:00:00", "20260512"])
async def test_a_shutdown_that_is_not_a_date_is_a_config_error(config_text, value):
    text = with_models(config_text(), **{"dall-e-2": f"{{provider: openai, shutdown: {value}}}"})
    with pytest.raises(ConfigError) as caught:
        await Gateway.load(text=text, env={})
    assert caught.value.path == "models.dall-e-2.shutdown", caught.value


def test_check_config_warns_about_models_shutting_down_within_30_days(tmp_path, config_text):
    today = utc_today()
    soon, later = today + datetime.timedelta(days=10), today + datetime.timedelta(days=40)
    text = with_models(
        config_text(),
        **{
            "dall-e-2": f'{{provider: openai, shutdown: "{soon}", replacement: gpt-image-1}}',
            "dall-e-3": f'{{provider: openai, shutdown: "{later}"}}',
            "gpt-image-1": '{provider: openai, shutdown: "2020-01-01"}',
        },
    )
    path = tmp_path / "proxy.yaml"
    path.write_text(text)
    result = run_imgproxy("check-config", str(path))
    assert result.returncode == 0, result.stderr
    output = result.stdout + result.stderr
    assert f"model dall-e-2 shuts down on {soon} (in 10 days)" in output and "use 'gpt-image-1' instead" in output
    assert "model gpt-image-1 was shut down on 2020-01-01" in output
    assert "dall-e-3 shuts down" not in output
