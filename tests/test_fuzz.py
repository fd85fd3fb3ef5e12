"""schemathesis fuzzes the API that schemas/openapi.yaml describes, against a gateway on a real
port in front of the fake upstreams: no input may get a 5xx, and every answer must conform
to the document. Then hypothesis makes the fake upstreams answer anything. Bounded: a fixed
seed and a few hundred examples each."""

import asyncio
import threading
from pathlib import Path

import pytest
import requests
import yaml
import schemathesis
from aiohttp import web
from jsonschema import Draft202012Validator
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from imgproxy.gateway import Gateway
from imgproxy.server import create_app
from tests.conftest import AUTH, gateway_config
from tests.fakes import FAKE_B64, Cue, FakeOpenAI, FakeStability

OPENAPI = Path(__file__).resolve().parents[1] / "schemas" / "openapi.yaml"
schema = schemathesis.openapi.from_path(OPENAPI)
COMPONENTS = yaml.safe_load(OPENAPI.read_text())["components"]
IMAGES_RESPONSE, ERROR_RESPONSE = (
    Draft202012Validator({"$ref": f"#/components/schemas/{name}", "components": COMPONENTS}) for name in ("ImagesResponse", "ErrorResponse")
)


class ServedInAThread:
    """The fakes and the gateway on their own event loop: schemathesis calls synchronously."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.runners: list[web.AppRunner] = []

    def run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=60)

    async def serve(self, app: web.Application) -> str:
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        self.runners.append(runner)
        return f"http://127.0.0.1:{runner.addresses[0][1]}"

    def close(self) -> None:
        for runner in reversed(self.runners):
            self.run(runner.cleanup())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    served = ServedInAThread()
    served.openai, served.stability = FakeOpenAI(), FakeStability()
    served.openai.base_url = served.run(served.serve(served.openai.app()))
    served.stability.base_url = served.run(served.serve(served.stability.app()))
    text = gateway_config(served.openai.base_url, served.stability.base_url, str(tmp_path_factory.mktemp("images")))
    gateway = served.run(Gateway.load(text=text, env={}))
    served.url = served.run(served.serve(create_app(gateway)))
    yield served
    served.close()
    # What the gateway sent upstream while being fuzzed was always inside the providers' specs.
    assert served.openai.invalid == [] and served.stability.invalid == []


@schema.parametrize()
@settings(max_examples=150, derandomize=True, deadline=None, database=None, suppress_health_check=list(HealthCheck))
def test_api(case, served):
    # A body the schema accepts may still be one the model cannot do (a documented 400
    # from the capability check), so "schema-valid means 2xx" does not apply here.
    response = case.call_and_validate(
        base_url=served.url, headers=dict(AUTH), timeout=30, excluded_checks=[schemathesis.checks.positive_data_acceptance]
    )
    assert response.status_code < 500, response.text


# The other side: upstreams that answer anything at all. The gateway's answer is then the
# images in OpenAI's shape or an error envelope, and never a 500.
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=8,
)
anything = json_values | st.sampled_from([FAKE_B64, "https://example.com/a.png", "standard", 1713833628, -1, 10**30])


def mostly(good, other=anything):
    """The good value usually, now and then anything else: answers broken in one place."""
    return st.one_of([st.just(good)] * 8 + [other])


def answer_like(fields: dict):
    """Dicts with each of `fields` (key -> strategy) present or left out."""
    return st.one_of([st.fixed_dictionaries(fields)] * 3 + [st.fixed_dictionaries({}, optional=fields)])


USAGE = {"total_tokens": 100, "input_tokens": 50, "output_tokens": 50, "input_tokens_details": {"text_tokens": 10, "image_tokens": 40}}
openai_answers = answer_like(
    {
        "created": mostly(1713833628),
        "data": st.lists(answer_like({"b64_json": mostly(FAKE_B64), "revised_prompt": mostly("a cat")}) | anything, min_size=1, max_size=3) | anything,
        "usage": answer_like({k: mostly(v) for k, v in USAGE.items()}) | anything,
        "output_format": mostly("png"), "quality": mostly("high"), "size": mostly("1024x1024"),
        "error": answer_like({"message": mostly("no"), "type": mostly("invalid_request_error"), "code": mostly("rate_limit_exceeded"), "param": anything}),
    }
)
stability_answers = answer_like(
    {
        "artifacts": st.lists(answer_like({"base64": mostly(FAKE_B64), "finishReason": mostly("SUCCESS", st.sampled_from(["CONTENT_FILTERED", "ERROR"]) | anything), "seed": mostly(1)}) | anything, min_size=1, max_size=3) | anything,
        "name": mostly("invalid_prompts"), "message": mostly("no"), "id": anything,
    }
)
# (model, response_format): read whole, hosted from base64, token-priced, and Stability's.
# A b64_json answer of dall-e-3 is passed through as it arrives, so it is not among them.
REQUESTS = [("dall-e-2", "url"), ("dall-e-3", "url"), ("gpt-image-1", "b64_json"), ("gpt-image-1", "url"), ("sdxl", "url"), ("sdxl", "b64_json")]


@settings(max_examples=150, derandomize=True, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_any_upstream_answer_gets_images_or_an_envelope(served, data):
    model, response_format = data.draw(st.sampled_from(REQUESTS), label="request")
    status = data.draw(st.sampled_from([200] * 6 + [400, 401, 404, 422, 429, 500, 503]), label="status")
    shaped = stability_answers if model == "sdxl" else openai_answers
    answer = data.draw(shaped | shaped | shaped | json_values, label="answer")
    fake = served.stability if model == "sdxl" else served.openai
    fake.cues[:] = [Cue(status=status, body=answer)]
    response = requests.post(
        f"{served.url}/v1/images/generations", json={"model": model, "prompt": "x", "response_format": response_format}, headers=AUTH, timeout=30
    )
    fake.cues.clear()
    body = response.json()
    event(f"{response.status_code} {body.get('error', {}).get('code') if response.status_code != 200 else ''}")
    if response.status_code == 200:
        assert list(IMAGES_RESPONSE.iter_errors(body)) == [], body
    else:
        assert response.status_code in (400, 402, 429, 502, 503, 504), body
        assert list(ERROR_RESPONSE.iter_errors(body)) == [], body
