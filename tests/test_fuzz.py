"""schemathesis fuzzes the API that schemas/openapi.yaml describes, against a gateway on a real
port in front of the fake upstreams: no input may get a 5xx, and every answer must conform
to the document. Bounded: a fixed seed and a few hundred examples."""

import asyncio
import threading
from pathlib import Path

import pytest
import schemathesis
from aiohttp import web
from hypothesis import HealthCheck, settings

from imgproxy.gateway import Gateway
from imgproxy.server import create_app
from tests.conftest import AUTH, gateway_config
from tests.fakes import FakeOpenAI, FakeStability

OPENAPI = Path(__file__).resolve().parents[1] / "schemas" / "openapi.yaml"
schema = schemathesis.openapi.from_path(OPENAPI)


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
