"""GET /v1/models and GET /v1/models/{model}: what a key may use, in OpenAI's format."""

from pathlib import Path

import openai
import pytest
import yaml
from jsonschema import Draft202012Validator

from imgproxy.hookspecs import hookimpl
from tests.conftest import AUTH, CLIENT_KEY, assert_error, images_body

# OpenAI's `Model` and `ListModelsResponse` (openai/openai-openapi, openapi.yaml,
# components.schemas), which tests/specs/ does not carry: the images spec has no models API.
OPENAI_MODELS = {
    "Model": {
        "type": "object",
        "properties": {
            "id": {"type": "string"},
            "created": {"type": "integer"},
            "object": {"type": "string", "enum": ["model"]},
            "owned_by": {"type": "string"},
        },
        "required": ["id", "object", "created", "owned_by"],
    },
    "ListModelsResponse": {
        "type": "object",
        "properties": {"object": {"type": "string", "enum": ["list"]}, "data": {"type": "array", "items": {"$ref": "#/$defs/Model"}}},
        "required": ["object", "data"],
    },
}
MODEL, LIST = (Draft202012Validator({"$ref": f"#/$defs/{name}", "$defs": OPENAI_MODELS}) for name in ("Model", "ListModelsResponse"))
# And imgproxy's own description of it, with the extension field (schemas/openapi.yaml).
OPENAPI = yaml.safe_load((Path(__file__).resolve().parents[1] / "schemas" / "openapi.yaml").read_text())
DOCUMENTED_MODEL = Draft202012Validator({"$ref": "#/components/schemas/Model", "components": OPENAPI["components"]})
ALL = ["dall-e-2", "dall-e-3", "gpt-image-1", "stable-diffusion-xl-1024-v1-0", "placeholder"]
# A second key that may use only the OpenAI models whose names start with dall-e, and sdxl by its alias.
NARROW_KEY = "sk-narrow-key-00000001"


def two_keys(config_text) -> str:
    return config_text().replace(
        f"key: {CLIENT_KEY}\n",
        f"key: {CLIENT_KEY}\n    - name: narrow\n      key: {NARROW_KEY}\n      models: ['dall-e-*', sdxl]\n",
    )


@pytest.fixture
async def two_key_client(make_client, config_text):
    return await make_client(two_keys(config_text))


async def test_list_has_every_model_once_in_openai_format(client):
    resp = await client.get("/v1/models", headers=AUTH)
    body = await resp.json()
    assert resp.status == 200 and resp.headers.get("x-request-id")
    assert list(LIST.iter_errors(body)) == [], body
    assert body["object"] == "list"
    # Public names only: the alias sdxl is not an entry of its own.
    assert [model["id"] for model in body["data"]] == ALL
    for model in body["data"]:
        assert list(MODEL.iter_errors(model)) == [], model
        assert list(DOCUMENTED_MODEL.iter_errors(model)) == [], model
        assert model["object"] == "model" and model["created"] == 0


async def test_capabilities_are_those_requests_are_checked_against(client):
    body = await (await client.get("/v1/models", headers=AUTH)).json()
    models = {model["id"]: model for model in body["data"]}
    sdxl = models["stable-diffusion-xl-1024-v1-0"]
    assert sdxl["owned_by"] == "stability"
    assert sdxl["imgproxy"]["provider"] == "stability" and sdxl["imgproxy"]["provider_type"] == "stability"
    assert sdxl["imgproxy"]["aliases"] == ["sdxl"]
    gpt = models["gpt-image-1"]["imgproxy"]
    assert gpt["parameters"] == ["background", "output_format", "output_compression", "stream", "partial_images", "input_fidelity"]
    assert gpt["edits"]["max_images"] == 16 and gpt["variations"] is None and models["dall-e-3"]["imgproxy"]["edits"] is None
    assert gpt["qualities"] == ["auto", "low", "medium", "high"] and gpt["default_response_format"] == "b64_json"
    placeholder = models["placeholder"]["imgproxy"]
    assert placeholder["custom_sizes"] == {"min": 64, "max": 2048, "multiple_of": 8}
    assert models["dall-e-3"]["imgproxy"]["custom_sizes"] is None
    # What the listing says a model takes, a generation accepts, and the next step beyond it is refused.
    dalle3 = models["dall-e-3"]["imgproxy"]
    assert dalle3["max_n"] == 1 and dalle3["styles"] == ["vivid", "natural"]
    for size in dalle3["sizes"]:
        request = {"model": "dall-e-3", "prompt": "x", "size": size, "quality": dalle3["qualities"][-1], "response_format": "b64_json"}
        await images_body(await client.post("/v1/images/generations", json=request, headers=AUTH))
    too_many = {"model": "dall-e-3", "prompt": "x", "n": dalle3["max_n"] + 1}
    await assert_error(await client.post("/v1/images/generations", json=too_many, headers=AUTH), 400, "invalid_n", "n")
    side = placeholder["custom_sizes"]["max"]
    request = {"model": "placeholder", "prompt": "x", "size": f"{side}x{side + placeholder['custom_sizes']['multiple_of']}"}
    await assert_error(await client.post("/v1/images/generations", json=request, headers=AUTH), 400, "invalid_size", "size")


@pytest.mark.parametrize("path", ["/v1/models", "/v1/models/dall-e-3", "/v1/models/no-such-model"])
@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer sk-not-a-client-key"}, {"Authorization": "Basic x"}])
async def test_authentication_as_for_generations(client, path, headers):
    # Anonymous callers learn nothing, not even whether a model exists.
    await assert_error(await client.get(path, headers=headers), 401, "invalid_api_key")


async def test_a_disabled_key_lists_nothing(make_client, config_text):
    client = await make_client(config_text().replace(f"key: {CLIENT_KEY}\n", f"key: {CLIENT_KEY}\n      disabled: true\n"))
    await assert_error(await client.get("/v1/models", headers=AUTH), 401, "api_key_disabled")


async def test_each_key_sees_only_what_its_allow_list_permits(two_key_client):
    narrow = {"Authorization": f"Bearer {NARROW_KEY}"}
    body = await (await two_key_client.get("/v1/models", headers=narrow)).json()
    # The glob matches names, the alias sdxl admits its model, which is listed by its name.
    assert [model["id"] for model in body["data"]] == ["dall-e-2", "dall-e-3", "stable-diffusion-xl-1024-v1-0"]
    full = await (await two_key_client.get("/v1/models", headers=AUTH)).json()
    assert [model["id"] for model in full["data"]] == ALL
    # The listing and generation agree, model by model.
    for model in ALL:
        request = {"model": model, "prompt": "x", "response_format": "b64_json"}
        resp = await two_key_client.post("/v1/images/generations", json=request, headers=narrow)
        listed = model in [m["id"] for m in body["data"]]
        if listed:
            await images_body(resp)
        else:
            await assert_error(resp, 403, "model_not_allowed", "model")


@pytest.mark.parametrize("name", ["dall-e-3", "sdxl", "openai/dall-e-3", "stability/stable-diffusion-xl-1024-v1-0"])
async def test_retrieve_takes_names_aliases_and_provider_paths(two_key_client, name):
    resp = await two_key_client.get(f"/v1/models/{name}", headers=AUTH)
    body = await resp.json()
    assert resp.status == 200, body
    assert list(MODEL.iter_errors(body)) == [], body
    assert body["id"] == ("dall-e-3" if "dall-e-3" in name else "stable-diffusion-xl-1024-v1-0")


async def test_a_model_the_key_may_not_use_is_indistinguishable_from_none(two_key_client):
    narrow = {"Authorization": f"Bearer {NARROW_KEY}"}
    answers = {}
    for name in ("gpt-image-1", "openai/gpt-image-1", "no-such-model", "openai/no-such-model"):
        resp = await two_key_client.get(f"/v1/models/{name}", headers=narrow)
        error = await assert_error(resp, 404, "model_not_found", "model")
        answers[name] = (error["message"].replace(name, "NAME"), error["type"], tuple(sorted(k for k in resp.headers if k.lower() not in ("x-request-id", "date"))))
    assert len(set(answers.values())) == 1, answers
    # The other key does see it.
    body = await (await two_key_client.get("/v1/models/gpt-image-1", headers=AUTH)).json()
    assert body["id"] == "gpt-image-1"


async def test_a_slash_encoded_by_a_client_names_the_provider(two_key_client):
    # The SDK percent-encodes the path segment: openai%2Fdall-e-3.
    resp = await two_key_client.get("/v1/models/openai%2Fdall-e-3", headers=AUTH)
    assert (await resp.json())["id"] == "dall-e-3"


async def test_the_sdk_lists_and_retrieves_with_two_keys(two_key_client, sdk_for):
    full, narrow = sdk_for(two_key_client), sdk_for(two_key_client, NARROW_KEY)
    assert [model.id async for model in full.models.list()] == ALL
    listed = [model async for model in narrow.models.list()]
    assert [model.id for model in listed] == ["dall-e-2", "dall-e-3", "stable-diffusion-xl-1024-v1-0"]
    assert listed[0].owned_by == "openai" and listed[0].object == "model" and listed[0].created == 0
    # The extension field reaches the SDK's object as an extra attribute.
    assert listed[2].model_extra["imgproxy"]["aliases"] == ["sdxl"]
    retrieved = await narrow.models.retrieve("sdxl")
    assert retrieved.id == "stable-diffusion-xl-1024-v1-0" and retrieved.owned_by == "stability"
    assert (await narrow.models.retrieve("openai/dall-e-2")).id == "dall-e-2"
    assert (await full.models.retrieve("gpt-image-1")).model_extra["imgproxy"]["max_n"] == 10
    with pytest.raises(openai.NotFoundError) as caught:
        await narrow.models.retrieve("gpt-image-1")
    assert caught.value.code == "model_not_found"
    with pytest.raises(openai.AuthenticationError):
        await sdk_for(two_key_client, "sk-not-a-client-key-0").models.list()


async def test_a_third_party_plugin_hides_a_model_from_the_list_and_from_generation(make_client, sdk_for):
    from imgproxy.errors import GatewayError

    seen = []

    class NoStability:
        @hookimpl
        async def imgproxy_authorize_model(self, identity, model):
            seen.append((identity.name, model.name))
            if model.provider == "stability":
                raise GatewayError(403, "Not this one.", type="permission_error", code="provider_blocked")

    client = await make_client(plugins=[NoStability])
    body = await (await client.get("/v1/models", headers=AUTH)).json()
    assert "stable-diffusion-xl-1024-v1-0" not in [model["id"] for model in body["data"]]
    assert len(body["data"]) == len(ALL) - 1 and ("team-a", "placeholder") in seen
    await assert_error(await client.get("/v1/models/sdxl", headers=AUTH), 404, "model_not_found", "model")
    request = {"model": "sdxl", "prompt": "x", "response_format": "b64_json"}
    await assert_error(await client.post("/v1/images/generations", json=request, headers=AUTH), 403, "provider_blocked")


async def test_the_allow_list_decision_is_remembered_per_key_and_model(two_key_client):
    # The auth plugin memoises each (key, model) decision: the cached path must give the same answer.
    narrow = {"Authorization": f"Bearer {NARROW_KEY}"}
    first = [m["id"] for m in (await (await two_key_client.get("/v1/models", headers=narrow)).json())["data"]]
    again = [m["id"] for m in (await (await two_key_client.get("/v1/models", headers=narrow)).json())["data"]]
    assert first == again == ["dall-e-2", "dall-e-3", "stable-diffusion-xl-1024-v1-0"]
    await assert_error(await two_key_client.get("/v1/models/gpt-image-1", headers=narrow), 404, "model_not_found", "model")
    request = {"model": "gpt-image-1", "prompt": "x"}
    await assert_error(await two_key_client.post("/v1/images/generations", json=request, headers=narrow), 403, "model_not_allowed", "model")


async def test_a_listing_is_not_a_generation(make_client, config_text, fake_openai, access_lines):
    # Not rate limited, not counted as a request of the key, no upstream call.
    client = await make_client(config_text().replace(f"key: {CLIENT_KEY}", f"key: {CLIENT_KEY}\n      rate_limit: {{requests_per_minute: 1}}"))
    for _ in range(3):
        assert (await client.get("/v1/models", headers=AUTH)).status == 200
        assert (await client.get("/v1/models/dall-e-3", headers=AUTH)).status == 200
    await images_body(await client.post("/v1/images/generations", json={"model": "placeholder", "prompt": "x", "response_format": "b64_json"}, headers=AUTH))
    assert fake_openai.requests == []
    metrics = await (await client.get("/metrics")).text()
    requests = [line for line in metrics.splitlines() if line.startswith("imgproxy_requests_total{")]
    assert len(requests) == 1 and 'model="placeholder"' in requests[0], requests
    logged = [(line["path"], line["status"]) for line in access_lines()]
    assert logged.count(("/v1/models", 200)) == 3 and logged.count(("/v1/models/dall-e-3", 200)) == 3
