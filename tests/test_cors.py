"""CORS for browser clients (server.cors_origins), over real sockets: preflights, and the
headers on every kind of answer a page may read."""

import pytest

from imgproxy.config import ConfigError
from imgproxy.gateway import Gateway
from imgproxy.hookspecs import hookimpl
from imgproxy.runtime import Runtime
from imgproxy.server import create_app
from tests.conftest import AUTH, CLIENT_KEY, assert_error, images_body

APP = "https://app.example.com"
URL = "/v1/images/generations"
BODY = {"model": "placeholder", "prompt": "x", "size": "256x256", "response_format": "b64_json"}
CORS = f"server:\n  cors_origins: [{APP}, 'http://localhost:5173']\n"
# What the official JavaScript SDK asks to send from a browser (dangerouslyAllowBrowser).
SDK_HEADERS = "authorization, content-type, x-stainless-lang, x-stainless-package-version, x-stainless-os, x-stainless-arch, x-stainless-runtime, x-stainless-runtime-version, x-stainless-retry-count, x-stainless-timeout"


def preflight(origin: str = APP, method: str = "POST", headers: str = SDK_HEADERS) -> dict:
    asked = {"Origin": origin, "Access-Control-Request-Method": method}
    if headers:
        asked["Access-Control-Request-Headers"] = headers
    return asked


def listed(value: str | None) -> list[str]:
    return [part.strip().lower() for part in (value or "").split(",") if part.strip()]


def no_cors(resp) -> None:
    assert not [name for name in resp.headers if name.lower().startswith("access-control-")], dict(resp.headers)


@pytest.fixture
async def cors_client(make_client, config_text):
    limited = config_text(CORS).replace(f"key: {CLIENT_KEY}", f"key: {CLIENT_KEY}\n      rate_limit: {{requests_per_minute: 2}}")
    return await make_client(limited)


async def test_preflight_from_an_allowed_origin(cors_client, fake_openai):
    resp = await cors_client.options(URL, headers=preflight(headers=SDK_HEADERS + ", x-not-allowed, x-stainless-<b>"))
    assert resp.status == 204, await resp.text()
    assert resp.headers["Access-Control-Allow-Origin"] == APP
    assert listed(resp.headers["Access-Control-Allow-Methods"]) == ["post"]
    allowed = listed(resp.headers["Access-Control-Allow-Headers"])
    # Everything the SDK sends, and nothing outside the allow list, however it is spelt.
    assert set(listed(SDK_HEADERS)) <= set(allowed)
    assert {"idempotency-key", "x-request-id"} <= set(allowed)
    assert "x-not-allowed" not in allowed and not [name for name in allowed if "<" in name]
    assert int(resp.headers["Access-Control-Max-Age"]) > 0
    assert "origin" in listed(resp.headers["Vary"])
    assert "Access-Control-Allow-Credentials" not in resp.headers
    # Not a generation: nothing went upstream, no key was asked for.
    assert fake_openai.requests == []


async def test_preflight_names_the_methods_of_the_path(cors_client):
    files = await cors_client.options("/v1/images/files/abc.png", headers=preflight(method="GET", headers=""))
    assert files.status == 204 and set(listed(files.headers["Access-Control-Allow-Methods"])) == {"get", "head"}
    models = await cors_client.options("/v1/models/openai/dall-e-3", headers=preflight(method="GET"))
    assert models.status == 204 and "post" not in listed(models.headers["Access-Control-Allow-Methods"])
    generations = await cors_client.options(URL, headers=preflight(method="GET"))
    assert listed(generations.headers["Access-Control-Allow-Methods"]) == ["post"]


@pytest.mark.parametrize(
    "origin",
    [
        "https://evil.example.com",
        "https://app.example.com.evil.com",  # the allowed origin as a prefix
        "https://evilapp.example.com",  # ... as a suffix
        "http://app.example.com",  # another scheme
        "https://app.example.com:8443",  # another port
        "https://app.example.com/",  # not an origin's form
        "null",  # sandboxed frames and file: pages
        "",
    ],
)
async def test_preflight_from_another_origin_is_refused_without_cors_headers(cors_client, origin):
    resp = await cors_client.options(URL, headers=preflight(origin=origin))
    await assert_error(resp, 403, "cors_origin_not_allowed")
    no_cors(resp)
    # The same for the request itself: served (CORS is the browser's to enforce), but no page may read it.
    actual = await cors_client.post(URL, json=BODY, headers={**AUTH, "Origin": origin})
    await images_body(actual)
    no_cors(actual)
    assert "origin" in listed(actual.headers.get("Vary"))


async def test_without_cors_origins_nothing_changes(client):
    resp = await client.options(URL, headers=preflight())
    await assert_error(resp, 403, "cors_origin_not_allowed")
    no_cors(resp)
    actual = await client.post(URL, json=BODY, headers={**AUTH, "Origin": APP})
    await images_body(actual)
    no_cors(actual)
    assert "Vary" not in actual.headers


async def test_an_answer_exposes_the_headers_a_page_needs(cors_client):
    resp = await cors_client.post(URL, json=BODY, headers={**AUTH, "Origin": "http://localhost:5173"})
    await images_body(resp)
    assert resp.headers["Access-Control-Allow-Origin"] == "http://localhost:5173"
    assert "origin" in listed(resp.headers["Vary"])
    exposed = set(listed(resp.headers["Access-Control-Expose-Headers"]))
    meant = {name.lower() for name in resp.headers if name.lower().startswith(("x-ratelimit-", "x-imgproxy-")) or name.lower() == "x-request-id"}
    assert {"x-request-id", "x-imgproxy-cost-usd", "x-ratelimit-remaining-requests"} <= meant
    assert meant <= exposed


async def test_error_envelopes_carry_the_cors_headers(cors_client):
    origin = {"Origin": APP}
    unauthenticated = await cors_client.post(URL, json=BODY, headers=origin)
    await assert_error(unauthenticated, 401, "invalid_api_key")
    assert unauthenticated.headers["Access-Control-Allow-Origin"] == APP
    assert "x-request-id" in listed(unauthenticated.headers["Access-Control-Expose-Headers"])
    for _ in range(2):
        await images_body(await cors_client.post(URL, json=BODY, headers={**AUTH, **origin}))
    limited = await cors_client.post(URL, json=BODY, headers={**AUTH, **origin})
    await assert_error(limited, 429, "rate_limit_exceeded")
    assert limited.headers["Access-Control-Allow-Origin"] == APP
    # A page must be able to read how long to wait.
    assert {"retry-after", "x-ratelimit-remaining-requests"} <= set(listed(limited.headers["Access-Control-Expose-Headers"]))
    invalid = await cors_client.post(URL, json={**BODY, "size": "3x3"}, headers={**AUTH, **origin})
    await assert_error(invalid, 400, "invalid_size", "size")
    assert invalid.headers["Access-Control-Allow-Origin"] == APP
    missing = await cors_client.get("/v1/no-such-route", headers=origin)
    await assert_error(missing, 404, "not_found")
    assert missing.headers["Access-Control-Allow-Origin"] == APP


async def test_streamed_answers_carry_the_cors_headers(make_client, config_text):
    client = await make_client(config_text(CORS))
    events = await client.post(URL, json={"model": "gpt-image-1", "prompt": "x", "stream": True}, headers={**AUTH, "Origin": APP})
    assert events.status == 200 and events.content_type == "text/event-stream"
    assert events.headers["Access-Control-Allow-Origin"] == APP and "origin" in listed(events.headers["Vary"])
    assert b"image_generation.completed" in await events.read()
    # dall-e-3 in b64_json: the upstream's body streamed through as it arrives.
    passed = await client.post(URL, json={"model": "dall-e-3", "prompt": "x", "response_format": "b64_json"}, headers={**AUTH, "Origin": APP})
    await images_body(passed)
    assert passed.headers["Access-Control-Allow-Origin"] == APP


async def test_image_files_and_models_are_readable_by_the_page(make_client, config_text):
    client = await make_client(config_text(CORS))
    body = await images_body(await client.post(URL, json={**BODY, "response_format": "url"}, headers=AUTH))
    image = await client.session.get(body["data"][0]["url"], headers={"Origin": APP})
    assert image.status == 200 and image.content_type == "image/png"
    assert image.headers["Access-Control-Allow-Origin"] == APP
    forged = await client.get("/v1/images/files/abc.png?expires=1&signature=" + "0" * 64, headers={"Origin": APP})
    await assert_error(forged, 403, "invalid_signature")
    assert forged.headers["Access-Control-Allow-Origin"] == APP
    models = await client.get("/v1/models", headers={**AUTH, "Origin": APP})
    assert models.status == 200 and models.headers["Access-Control-Allow-Origin"] == APP


async def test_probes_and_metrics_are_not_cross_origin(cors_client):
    for path in ("/healthz", "/readyz", "/metrics"):
        resp = await cors_client.get(path, headers={"Origin": APP})
        assert resp.status == 200
        no_cors(resp)
    # A preflight for a path outside the API is not answered as one.
    resp = await cors_client.options("/healthz", headers=preflight(method="GET"))
    await assert_error(resp, 405, "method_not_allowed")
    no_cors(resp)


async def test_an_options_request_that_is_no_preflight_is_routed_as_before(cors_client):
    no_method = await cors_client.options(URL, headers={"Origin": APP})
    await assert_error(no_method, 405, "method_not_allowed")
    assert no_method.headers["Allow"] == "POST"
    unknown = await cors_client.options("/v1/nowhere", headers=preflight())
    await assert_error(unknown, 404, "not_found")


async def test_preflights_are_neither_authenticated_nor_counted_nor_limited(cors_client, fake_openai, access_lines):
    # The key may make 2 requests a minute; preflights before them use none of that.
    for _ in range(5):
        assert (await cors_client.options(URL, headers=preflight())).status == 204
    for _ in range(2):
        await images_body(await cors_client.post(URL, json=BODY, headers={**AUTH, "Origin": APP}))
    metrics = await (await cors_client.get("/metrics")).text()
    counted = [line for line in metrics.splitlines() if line.startswith("imgproxy_requests_total{")]
    assert len(counted) == 1 and counted[0].endswith(" 2.0"), counted
    logged = [(line["method"], line["status"]) for line in access_lines()]
    assert logged.count(("OPTIONS", 204)) == 5 and logged.count(("POST", 200)) == 2


async def test_any_origin_is_answered_with_a_star_and_never_with_credentials(make_client, config_text):
    client = await make_client(config_text("server:\n  cors_origins: ['*']\n"))
    resp = await client.options(URL, headers=preflight(origin="https://anyone.example.org"))
    assert resp.status == 204 and resp.headers["Access-Control-Allow-Origin"] == "*"
    actual = await client.post(URL, json=BODY, headers={**AUTH, "Origin": "https://anyone.example.org"})
    await images_body(actual)
    assert actual.headers["Access-Control-Allow-Origin"] == "*"
    assert "Access-Control-Allow-Credentials" not in resp.headers and "Access-Control-Allow-Credentials" not in actual.headers


async def test_a_reload_changes_the_origins(aiohttp_client, config_text, tmp_path):
    path = tmp_path / "proxy.yaml"
    path.write_text(config_text(CORS))
    runtime = Runtime(await Gateway.load(path, env={}), str(path))
    client = await aiohttp_client(create_app(runtime))
    assert (await client.options(URL, headers=preflight())).status == 204
    path.write_text(config_text("server:\n  cors_origins: ['https://other.example.com']\n"))
    assert await runtime.reload() is True
    await assert_error(await client.options(URL, headers=preflight()), 403, "cors_origin_not_allowed")
    resp = await client.options(URL, headers=preflight(origin="https://other.example.com"))
    assert resp.status == 204 and resp.headers["Access-Control-Allow-Origin"] == "https://other.example.com"


@pytest.mark.parametrize(
    "origin", ["https://app.example.com/", "https://app.example.com/path", "https://App.example.com", "app.example.com", "null", "https://*.example.com", ""]
)
async def test_an_origin_not_in_the_form_browsers_send_is_a_config_error(config_text, origin):
    with pytest.raises(ConfigError) as caught:
        await Gateway.load(text=config_text(f"server:\n  cors_origins: ['{origin}']\n"), env={})
    assert caught.value.path == "server.cors_origins.0"


async def test_only_the_configured_origins_are_granted_whoever_sets_the_headers(make_client, config_text):
    # A plugin (or, some day, a header copied from an upstream) that grants every origin.
    class Careless:
        @hookimpl
        def imgproxy_authorize_request(self, ctx):
            ctx.response_headers.update({"Access-Control-Allow-Origin": "*", "Access-Control-Allow-Credentials": "true"})

    client = await make_client(config_text(CORS), plugins=[Careless])
    other = await client.post(URL, json=BODY, headers={**AUTH, "Origin": "https://evil.example.com"})
    await images_body(other)
    no_cors(other)
    listed_origin = await client.post(URL, json=BODY, headers={**AUTH, "Origin": APP})
    await images_body(listed_origin)
    assert listed_origin.headers.getall("Access-Control-Allow-Origin") == [APP]
    assert "Access-Control-Allow-Credentials" not in listed_origin.headers
