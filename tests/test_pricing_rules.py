"""A model without a price is a config error (at start-up, check-config and reload), unless it
is priced under cost.prices or marked free: never metered at $0 unnoticed."""

import logging
from pathlib import Path

import pytest

from imgproxy.config import ConfigError
from imgproxy.gateway import Gateway
from imgproxy.runtime import Runtime
from imgproxy.server import create_app
from tests.conftest import AUTH, CLIENT_KEY, SECRET_ENV_VALUE, images_body, run_imgproxy, usage_record
from tests.fakes import FakeUpstream

REPO = Path(__file__).resolve().parents[1]
URL = "/v1/images/generations"
# A self-hosted model no catalog knows: the placeholder adapter stands in for its server.
HOUSE = '  house: {provider: placeholder, upstream_model: "${HOUSE_MODEL}"}\n'
ENV = {"HOUSE_MODEL": f"house-{SECRET_ENV_VALUE}"}
BODY = {"model": "house", "prompt": "a lighthouse", "response_format": "b64_json"}


def with_house(text: str, spec: str = HOUSE) -> str:
    return text.replace("models:\n", "models:\n" + spec, 1)


async def test_a_model_without_a_price_is_a_config_error_that_says_how_to_fix_it(config_text):
    text = with_house(config_text()).replace(f"api_key: {FakeUpstream.key}", "api_key: ${OPENAI_KEY}", 1)
    with pytest.raises(ConfigError) as caught:
        await Gateway.load(text=text, env={**ENV, "OPENAI_KEY": SECRET_ENV_VALUE})
    error = caught.value
    assert error.path == "models.house", error
    assert "no price for model 'house'" in error.problem
    assert "cost.prices.house" in error.problem and "models.house.free: true" in error.problem
    assert SECRET_ENV_VALUE not in str(error)  # neither the key nor a value from the environment


@pytest.mark.parametrize("priced_as", ["house", "house-v1", "house-catalog"])
async def test_a_price_is_found_by_public_name_upstream_model_or_catalog(make_client, config_text, priced_as):
    spec = "  house: {provider: placeholder, upstream_model: house-v1, catalog: house-catalog}\n"
    text = with_house(config_text(extra=f'cost:\n  prices:\n    {priced_as}: {{per_image: {{"*": {{"*": 0.25}}}}}}\n'), spec)
    client = await make_client(text)
    resp = await client.post(URL, json=BODY, headers=AUTH)
    await images_body(resp)
    assert resp.headers["x-imgproxy-cost-usd"] == "0.250000"


async def test_a_free_model_is_metered_at_zero_and_its_records_say_so(make_client, config_text, tmp_path):
    usage = tmp_path / "usage.jsonl"
    spec = '  house: {provider: placeholder, upstream_model: "${HOUSE_MODEL}", free: true}\n'
    client = await make_client(with_house(config_text(extra=f"cost:\n  usage_log: {usage}\n"), spec), env=ENV)
    resp = await client.post(URL, json=BODY, headers=AUTH)
    await images_body(resp)
    assert resp.headers["x-imgproxy-cost-usd"] == "0.000000"
    record = await usage_record(usage, resp.headers["x-request-id"])
    assert (record["model"], record["cost_usd"], record["price"]) == ("house", 0, "free")
    # A priced model's record has no such mark.
    resp = await client.post(URL, json={**BODY, "model": "dall-e-2"}, headers=AUTH)
    await images_body(resp)
    record = await usage_record(usage, resp.headers["x-request-id"])
    assert record["cost_usd"] == 0.02 and "price" not in record


async def test_the_shipped_config_serves_the_free_placeholder(aiohttp_client, tmp_path):
    usage = tmp_path / "usage.jsonl"
    env = {"IMGPROXY_API_KEYS": CLIENT_KEY, "IMGPROXY_USAGE_LOG": str(usage), "IMGPROXY_IMAGE_DIR": str(tmp_path / "images")}
    gateway = await Gateway.load(REPO / "proxy.yaml", env=env)
    client = await aiohttp_client(create_app(gateway))
    resp = await client.post(URL, json={**BODY, "model": "placeholder"}, headers=AUTH)
    await images_body(resp)
    record = await usage_record(usage, resp.headers["x-request-id"])
    assert (record["cost_usd"], record["price"]) == (0, "free")


async def test_free_and_priced_at_once_is_a_config_error(config_text):
    spec = "  house: {provider: placeholder, free: true}\n"
    text = with_house(config_text(extra='cost:\n  prices:\n    house: {per_image: {"*": {"*": 0.1}}}\n'), spec)
    with pytest.raises(ConfigError) as caught:
        await Gateway.load(text=text, env={})
    assert caught.value.path == "models.house.free" and "cost.prices" in caught.value.problem


async def test_an_empty_price_is_no_price(config_text):
    text = with_house(config_text(extra="cost:\n  prices:\n    house: {}\n"), "  house: {provider: placeholder}\n")
    with pytest.raises(ConfigError) as caught:
        await Gateway.load(text=text, env={})
    assert caught.value.path.startswith("cost.prices.house"), caught.value


async def test_with_the_cost_plugin_disabled_no_price_is_needed(make_client, config_text):
    client = await make_client(with_house(config_text(extra="plugins: {disable: [cost]}\n")), env=ENV)
    resp = await client.post(URL, json=BODY, headers=AUTH)
    await images_body(resp)
    assert "x-imgproxy-cost-usd" not in resp.headers  # nothing is metered


def test_check_config_and_serve_refuse_an_unpriced_model(tmp_path, config_text):
    path = tmp_path / "proxy.yaml"
    path.write_text(with_house(config_text(), "  house: {provider: placeholder}\n"))
    result = run_imgproxy("check-config", str(path))
    assert result.returncode == 1
    assert f"{path}: models.house: no price for model 'house'" in result.stderr and "models.house.free: true" in result.stderr
    result = run_imgproxy("serve", "--config", str(path), "--port", "0")
    assert result.returncode == 2 and "models.house: no price" in result.stderr


async def test_a_reload_that_adds_an_unpriced_model_is_refused_and_the_old_config_serves(aiohttp_client, config_text, tmp_path, caplog):
    path = tmp_path / "proxy.yaml"
    path.write_text(config_text())
    runtime = Runtime(await Gateway.load(path, env={}), str(path))
    client = await aiohttp_client(create_app(runtime))
    path.write_text(with_house(config_text(), "  house: {provider: placeholder}\n"))
    with caplog.at_level(logging.ERROR):
        assert await runtime.reload() is False
    assert "models.house: no price for model 'house'" in caplog.text and "previous config keeps serving" in caplog.text
    assert "house" not in runtime.gateway.config.models
    await images_body(await client.post(URL, json={**BODY, "model": "placeholder"}, headers=AUTH))
    # Priced, the same model is taken.
    path.write_text(with_house(config_text(), "  house: {provider: placeholder, free: true}\n"))
    assert await runtime.reload() is True
    await images_body(await client.post(URL, json=BODY, headers=AUTH))


def test_every_model_of_the_builtin_catalogs_has_a_price_with_its_source():
    from imgproxy.catalog import builtin_catalog

    for name, entry in builtin_catalog().items():
        assert entry.price, f"{name} has no price in its provider's data file"
        assert entry.sources["price"][0] and entry.sources["price"][1], name
    assert builtin_catalog()["placeholder"].price == {"free": True}
