"""Provider failures survived without paying twice: retries, fallbacks, circuit breakers, the
deadline, retry advice to clients, and a client that hangs up mid-generation.

Two FakeOpenAI instances (`openai` and `azure`, both serving dall-e-3) and FakeStability
(`sdxl`) fail on cue; what each fake received is what is counted, never what imgproxy says.
"""

import asyncio
import json
import socket
import struct
import time
from pathlib import Path

import aiohttp
import pytest
import yaml
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imgproxy.config import ConfigError
from imgproxy.gateway import Gateway
from imgproxy.hookspecs import hookimpl
from imgproxy.plugins.cost import spend_periods
from imgproxy.server import create_app
from tests.conftest import AUTH, CLIENT_KEY, assert_error
from tests.fakes import Cue, FakeOpenAI, FakeStability, FakeUpstream
from tests.conftest import usage_records as records

URL = "/v1/images/generations"
DALLE3 = {"model": "dall-e-3", "prompt": "a lighthouse", "response_format": "b64_json"}  # $0.04 an image
PRICE = 0.04
ERROR_500 = {"error": {"message": "The server had an error.", "type": "server_error", "param": None, "code": None}}
ERROR_429 = {"error": {"message": "Rate limit reached.", "type": "requests", "param": None, "code": "rate_limit_exceeded"}}
POLICY_400 = {"error": {"message": "Rejected by the safety system.", "type": "invalid_request_error", "param": None, "code": "content_policy_violation"}}


def closed_port() -> int:
    """A local port nothing listens on: connecting is refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def config(openai_url, azure_url, stability_url, tmp_path, *, retries=None, breaker=None, model=None, providers=None, extra=None) -> str:
    provider = {"type": "openai", "api_key": FakeUpstream.key, "timeouts": {"connect": 2, "total": 5}}
    raw = {
        "auth": {"keys": [{"name": "team-a", "key": CLIENT_KEY}]},
        "providers": {
            "openai": {**provider, "base_url": f"{openai_url}/v1", **({"retries": retries} if retries else {}),
                       **({"circuit_breaker": breaker} if breaker else {})},
            "azure": {**provider, "base_url": f"{azure_url}/v1"},
            "stability": {"type": "stability", "base_url": stability_url, "api_key": FakeUpstream.key},
            **(providers or {}),
        },
        "models": {
            "dall-e-3": {"provider": "openai", "fallbacks": ["azure-dall-e-3", "sdxl"], **(model or {})},
            "azure-dall-e-3": {"provider": "azure", "upstream_model": "dall-e-3"},
            "stable-diffusion-xl-1024-v1-0": {"provider": "stability", "aliases": ["sdxl"]},
        },
        "images": {"directory": str(tmp_path / "images"), "signing_key": "test-signing-key"},
        "cost": {"usage_log": str(tmp_path / "usage.jsonl")},
        **(extra or {}),
    }
    return yaml.safe_dump(raw)


@pytest.fixture
async def fake_azure(aiohttp_server):
    fake = FakeOpenAI()
    server = await aiohttp_server(fake.app())
    fake.base_url = str(server.make_url("")).rstrip("/")
    yield fake
    assert fake.invalid == []


@pytest.fixture
def gateway(aiohttp_client, fake_openai, fake_azure, fake_stability, tmp_path):
    async def make(*, openai_url=None, plugins=(), **kwargs):
        text = config(openai_url or fake_openai.base_url, fake_azure.base_url, fake_stability.base_url, tmp_path, **kwargs)
        gw = await Gateway.load(text=text, env={}, extra_plugins=plugins)
        client = await aiohttp_client(create_app(gw))
        client.gateway = gw
        return client

    return make




async def scrape(client, name: str, **labels) -> float | None:
    text = await (await client.get("/metrics")).text()
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith(f"{name}{{{want}}} ") or (not labels and line.startswith(f"{name} ")):
            return float(line.rsplit(" ", 1)[1])
    return None


# --- retries -------------------------------------------------------------------------------

async def test_a_429_is_retried_after_its_retry_after_and_billed_once(gateway, fake_openai, fake_azure, tmp_path):
    client = await gateway(retries={"attempts": 2, "backoff": 0.01})
    fake_openai.cue(status=429, body=ERROR_429, headers={"Retry-After": "1"})
    resp = await client.post(URL, json=DALLE3, headers=AUTH)
    assert resp.status == 200, await resp.text()
    assert len(fake_openai.requests) == 2 and fake_azure.requests == []
    assert (resp.headers["x-imgproxy-provider"], resp.headers["x-imgproxy-model"], resp.headers["x-imgproxy-attempts"]) == ("openai", "dall-e-3", "2")
    [record] = await records(tmp_path / "usage.jsonl")
    assert (record["attempts"], record["provider"], record["cost_usd"]) == (2, "openai", PRICE)
    assert await scrape(client, "imgproxy_upstream_attempts_total", provider="openai", outcome="failure") == 1
    assert await scrape(client, "imgproxy_upstream_attempts_total", provider="openai", outcome="success") == 1


async def test_a_5xx_with_an_error_body_is_retried(gateway, fake_openai):
    client = await gateway(retries={"attempts": 3, "backoff": 0.01})
    fake_openai.cue(status=500, body=ERROR_500)
    fake_openai.cue(status=503, body=ERROR_500)
    resp = await client.post(URL, json=DALLE3, headers=AUTH)
    assert resp.status == 200 and resp.headers["x-imgproxy-attempts"] == "3"
    assert len(fake_openai.requests) == 3


@pytest.mark.parametrize("cue", [
    Cue(status=502, body=b"<html>Bad Gateway</html>", content_type="text/html"),  # a proxy's page: did it generate?
    Cue(delay=2),  # a timeout after the request was sent
    Cue(cut=True),  # an answer cut off
    Cue(reset=True),  # the connection dropped after the request was read
], ids=["502-without-error-body", "timeout", "cut", "reset-after-sent"])
async def test_an_ambiguous_failure_is_neither_retried_nor_passed_to_a_fallback(gateway, fake_openai, fake_azure, fake_stability, tmp_path, cue):
    # The deadline leaves room for more attempts: only the policy can stop them.
    client = await gateway(retries={"attempts": 3, "backoff": 0.01}, model={"timeout": 1, "deadline": 20})
    fake_openai.cues.append(cue)
    resp = await client.post(URL, json=DALLE3, headers=AUTH)
    assert resp.status in (502, 504) or resp.status == 200  # a cut after the status: the body breaks off
    if resp.status != 200:
        assert resp.headers["x-should-retry"] == "false"
    else:
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()
    # One generation the provider may have billed: never a second one anywhere.
    assert len(fake_openai.requests) == 1 and fake_azure.requests == [] and fake_stability.requests == []
    [record] = await records(tmp_path / "usage.jsonl")
    assert record["cost_usd"] == 0 and record["attempts"] == 1


async def test_a_connection_reset_as_soon_as_it_is_made_counts_as_ambiguous(gateway, fake_azure, tmp_path):
    """Whether the provider read the request before the reset cannot be known from here: the
    failure is treated as one that may have generated (not retried, no fallback)."""

    async def reset(reader, writer):
        writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.close()

    server = await asyncio.start_server(reset, "127.0.0.1", 0)
    try:
        port = server.sockets[0].getsockname()[1]
        client = await gateway(openai_url=f"http://127.0.0.1:{port}", retries={"attempts": 3, "backoff": 0.01}, model={"deadline": 10})
        resp = await client.post(URL, json=DALLE3, headers=AUTH)
        await assert_error(resp, 502, "upstream_bad_response")
        assert resp.headers["x-should-retry"] == "false" and resp.headers["x-imgproxy-attempts"] == "1"
        assert fake_azure.requests == []
    finally:
        server.close()


async def test_retry_ambiguous_retries_a_timeout(gateway, fake_openai):
    client = await gateway(retries={"attempts": 2, "backoff": 0.01, "retry_ambiguous": True}, model={"timeout": 1, "deadline": 10})
    fake_openai.cue(delay=2)
    resp = await client.post(URL, json=DALLE3, headers=AUTH)
    assert resp.status == 200
    assert len(fake_openai.requests) == 2


async def test_a_content_policy_refusal_is_never_retried_nor_passed_on(gateway, fake_openai, fake_azure, fake_stability):
    client = await gateway(retries={"attempts": 3, "backoff": 0.01})
    fake_openai.cue(status=400, body=POLICY_400)
    error = await assert_error(await client.post(URL, json=DALLE3, headers=AUTH), 400, "content_policy_violation")
    assert error["message"] == "Rejected by the safety system."
    assert len(fake_openai.requests) == 1 and fake_azure.requests == [] and fake_stability.requests == []


async def test_a_retry_after_beyond_the_deadline_is_not_waited_for(gateway, fake_openai, fake_azure):
    client = await gateway(retries={"attempts": 3, "backoff": 0.01}, model={"deadline": 3})
    fake_openai.cue(status=429, body=ERROR_429, headers={"Retry-After": "60"})
    resp = await client.post(URL, json=DALLE3, headers=AUTH)
    # Not retried where it asked not to be called for a minute: the fallback serves at once.
    assert resp.status == 200 and resp.headers["x-imgproxy-provider"] == "azure"
    assert len(fake_openai.requests) == 1 and len(fake_azure.requests) == 1


async def test_each_attempt_gets_only_what_is_left_of_the_deadline(gateway, fake_openai, fake_azure):
    client = await gateway(retries={"attempts": 5, "backoff": 0.01}, model={"deadline": 1, "timeout": 30, "fallbacks": []})
    fake_openai.cue(delay=5)
    error = await assert_error(await client.post(URL, json=DALLE3, headers=AUTH), 504, "upstream_timeout")
    waited = float(error["message"].split("within ")[1].split(" ")[0])
    assert waited <= 1  # the deadline's second, not the model's 30
    assert len(fake_openai.requests) == 1


# --- fallbacks -----------------------------------------------------------------------------

async def test_a_refused_connection_falls_back_and_the_answer_says_who_served(gateway, fake_azure, tmp_path):
    client = await gateway(openai_url=f"http://127.0.0.1:{closed_port()}")
    resp = await client.post(URL, json=DALLE3, headers=AUTH)
    assert resp.status == 200, await resp.text()
    assert (resp.headers["x-imgproxy-provider"], resp.headers["x-imgproxy-model"], resp.headers["x-imgproxy-attempts"]) == ("azure", "azure-dall-e-3", "2")
    assert [r["model"] for r in fake_azure.requests] == ["dall-e-3"]
    [record] = await records(tmp_path / "usage.jsonl")
    assert (record["model"], record["provider"], record["requested_model"], record["attempts"]) == ("azure-dall-e-3", "azure", "dall-e-3", 2)
    assert record["cost_usd"] == PRICE
    assert await scrape(client, "imgproxy_fallbacks_total", from_model="dall-e-3", to_model="azure-dall-e-3") == 1
    assert await scrape(client, "imgproxy_upstream_errors_total", provider="openai", kind="connect") == 1


async def test_a_fallback_gets_the_request_translated_to_what_it_takes(gateway, fake_openai, fake_stability, tmp_path):
    client = await gateway(model={"fallbacks": ["sdxl"]})
    fake_openai.cue(status=500, body=ERROR_500)
    body = {**DALLE3, "size": "1792x1024", "quality": "hd", "style": "natural"}
    resp = await client.post(URL, json=body, headers=AUTH)
    assert resp.status == 200 and resp.headers["x-imgproxy-model"] == "stable-diffusion-xl-1024-v1-0"
    [sent] = fake_stability.requests
    # 1792x1024 is landscape 1.75:1; SDXL's nearest landscape size is 1344x768 (1.75:1).
    assert (sent["width"], sent["height"], sent["steps"], sent["style_preset"]) == (1344, 768, 50, "photographic")
    [record] = await records(tmp_path / "usage.jsonl")
    assert (record["size"], record["quality"]) == ("1344x768", "hd")
    assert record["cost_usd"] == pytest.approx(0.33 * 0.01)  # SDXL's price for what it delivered


async def test_with_strictness_skip_a_fallback_that_cannot_honour_the_request_is_not_called(gateway, fake_openai, fake_stability):
    client = await gateway(model={"fallbacks": ["sdxl"], "fallback_strictness": "skip"})
    fake_openai.cue(status=500, body=ERROR_500)
    resp = await client.post(URL, json={**DALLE3, "size": "1792x1024"}, headers=AUTH)
    assert resp.status == 502 and fake_stability.requests == []
    fake_openai.cue(status=500, body=ERROR_500)
    resp = await client.post(URL, json={**DALLE3, "size": "1024x1024"}, headers=AUTH)
    assert resp.status == 200 and len(fake_stability.requests) == 1  # a size it has: called


async def test_the_budget_follows_the_target_called(gateway, fake_openai, fake_azure, tmp_path):
    moves = []

    class Watch:
        @hookimpl
        def imgproxy_change_target(self, ctx, previous):
            moves.append((previous.model.name, ctx.target.model.name))

    extra = {
        "cost": {"usage_log": str(tmp_path / "usage.jsonl"), "prices": {"azure-dall-e-3": {"per_image": {"*": {"*": 1.0}}}}},
        "auth": {"keys": [{"name": "team-a", "key": CLIENT_KEY, "budget": {"daily_usd": 0.5}}]},
    }
    client = await gateway(plugins=[Watch()], extra=extra, model={"fallbacks": ["azure-dall-e-3"]})

    async def spent() -> float:
        return await client.gateway.state.get(spend_periods("team-a", int(time.time() // 60))[0][1]) or 0.0

    fake_openai.cue(status=500, body=ERROR_500)
    # The fallback's worst case ($1) does not fit the $0.50 budget: refused, and not called.
    await assert_error(await client.post(URL, json=DALLE3, headers=AUTH), 429, "insufficient_quota")
    assert fake_azure.requests == [] and moves == [("dall-e-3", "azure-dall-e-3")]
    assert await spent() == 0  # the first target's reservation was released
    resp = await client.post(URL, json=DALLE3, headers=AUTH)
    assert resp.status == 200 and await spent() == pytest.approx(PRICE)


async def test_fallbacks_must_be_image_models_of_the_config(fake_openai, fake_azure, fake_stability, tmp_path):
    for fallbacks, problem in ((["dall-e-9"], "no image model"), (["dall-e-3"], "its own fallback")):
        text = config(fake_openai.base_url, fake_azure.base_url, fake_stability.base_url, tmp_path, model={"fallbacks": fallbacks})
        with pytest.raises(ConfigError, match=problem) as caught:
            await Gateway.load(text=text, env={})
        assert caught.value.path == "models.dall-e-3.fallbacks[0]" or caught.value.path.startswith("models.dall-e-3.fallbacks")


# --- circuit breakers ----------------------------------------------------------------------

BREAKER = {"failure_rate": 0.5, "min_calls": 2, "window": 60, "cooldown": 1}


async def test_an_open_circuit_is_not_called_and_says_when_to_come_back(gateway, fake_openai):
    client = await gateway(breaker=BREAKER, model={"fallbacks": []})
    for _ in range(2):
        fake_openai.cue(status=500, body=ERROR_500)
        await assert_error(await client.post(URL, json=DALLE3, headers=AUTH), 502, "upstream_error")
    assert await scrape(client, "imgproxy_provider_circuit_state", provider="openai") == 1
    resp = await client.post(URL, json=DALLE3, headers=AUTH)
    await assert_error(resp, 503, "provider_unavailable")
    assert int(resp.headers["Retry-After"]) >= 1 and resp.headers["x-should-retry"] == "true"
    assert len(fake_openai.requests) == 2  # not called while open
    ready = await client.get("/readyz?verbose")
    assert ready.status == 200 and (await ready.json())["circuits"] == {"openai": "open"}
    await asyncio.sleep(1.1)
    resp = await client.post(URL, json=DALLE3, headers=AUTH)  # the probe
    assert resp.status == 200 and len(fake_openai.requests) == 3
    assert await scrape(client, "imgproxy_provider_circuit_state", provider="openai") == 0


async def test_half_open_lets_exactly_one_probe_through(gateway, fake_openai, fake_azure):
    client = await gateway(breaker=BREAKER, model={"fallbacks": ["azure-dall-e-3"]})
    for _ in range(2):
        fake_openai.cue(status=500, body=ERROR_500)
        assert (await client.post(URL, json=DALLE3, headers=AUTH)).headers["x-imgproxy-provider"] == "azure"
    resp = await client.post(URL, json=DALLE3, headers=AUTH)
    assert resp.headers["x-imgproxy-provider"] == "azure" and len(fake_openai.requests) == 2  # open: straight to the fallback
    await asyncio.sleep(1.1)
    fake_openai.cue(delay=0.5)  # the probe takes a while; the others must not join it
    answers = await asyncio.gather(*(client.post(URL, json=DALLE3, headers=AUTH) for _ in range(3)))
    served = sorted(a.headers["x-imgproxy-provider"] for a in answers)
    assert served == ["azure", "azure", "openai"] and len(fake_openai.requests) == 3


# --- what clients are told -----------------------------------------------------------------

async def test_should_retry_says_whether_the_same_request_can_succeed(fake_openai, fake_stability, tmp_path):
    text = config(fake_openai.base_url, fake_openai.base_url, fake_stability.base_url, tmp_path, model={"fallbacks": []},
                  providers={"nokey": {"type": "openai", "base_url": "https://api.example.com/v1"}})
    raw = yaml.safe_load(text)
    raw["models"]["unkeyed"] = {"provider": "nokey", "catalog": "dall-e-3"}
    raw["auth"]["keys"].append({"name": "narrow", "key": "sk-client-narrow-0001", "models": ["sdxl"], "budget": {"daily_usd": 0.01}})
    gw = await Gateway.load(text=yaml.safe_dump(raw), env={})
    async with TestClient(TestServer(create_app(gw))) as c:
        cases = [
            ({**DALLE3, "model": "unkeyed"}, AUTH, 503, "provider_not_configured", "false"),
            (DALLE3, {"Authorization": "Bearer sk-client-narrow-0001"}, 403, "model_not_allowed", "false"),
            ({**DALLE3, "model": "sdxl", "n": 10}, {"Authorization": "Bearer sk-client-narrow-0001"}, 429, "insufficient_quota", "false"),
            ({**DALLE3, "size": "9x9"}, AUTH, 400, "invalid_size", "false"),
        ]
        for body, headers, status, code, advice in cases:
            resp = await c.post(URL, json=body, headers=headers)
            found = (await resp.json())["error"]["code"]
            assert (resp.status, found, resp.headers.get("x-should-retry")) == (status, code, advice), (code, await resp.text())
        fake_openai.cue(status=429, body=ERROR_429, headers={"Retry-After": "3"})
        resp = await c.post(URL, json=DALLE3, headers=AUTH)
        assert (resp.status, resp.headers["x-should-retry"], resp.headers["Retry-After"]) == (429, "true", "3")


async def test_metrics_with_labels_known_in_advance_exist_at_zero(gateway):
    client = await gateway(breaker=BREAKER)
    assert await scrape(client, "imgproxy_upstream_errors_total", provider="openai", kind="timeout") == 0
    assert await scrape(client, "imgproxy_upstream_errors_total", provider="stability", kind="rate_limited") == 0
    assert await scrape(client, "imgproxy_upstream_attempts_total", provider="azure", outcome="circuit_open") == 0
    assert await scrape(client, "imgproxy_fallbacks_total", from_model="dall-e-3", to_model="stable-diffusion-xl-1024-v1-0") == 0
    assert await scrape(client, "imgproxy_provider_circuit_state", provider="openai") == 0


# --- a client that hangs up ----------------------------------------------------------------

class ServeLikeServer(TestServer):
    """As `imgproxy serve` runs: aiohttp's default handler_cancellation=False (the test
    server turns it on), so a client hanging up does not cancel the handler."""

    async def _make_runner(self, **kwargs):
        return await super()._make_runner(**{**kwargs, "handler_cancellation": False})


async def test_a_client_that_hangs_up_is_recorded_as_499_at_the_real_cost_and_its_retry_gets_the_image(fake_openai, fake_azure, fake_stability, tmp_path):
    text = config(fake_openai.base_url, fake_azure.base_url, fake_stability.base_url, tmp_path)
    client = TestClient(ServeLikeServer(create_app(await Gateway.load(text=text, env={}))))
    await client.start_server()
    fake_openai.delay = 0.6
    headers = {**AUTH, "Idempotency-Key": "hang-up-1"}
    with pytest.raises(asyncio.TimeoutError):
        await client.post(URL, json=DALLE3, headers=headers, timeout=aiohttp.ClientTimeout(total=0.2))
    [record] = await records(tmp_path / "usage.jsonl")
    assert (record["status"], record["error"], record["images"], record["cost_usd"]) == (499, "client_closed_request", 1, PRICE)
    fake_openai.delay = 0
    resp = await client.post(URL, json=DALLE3, headers=headers)
    assert resp.status == 200 and resp.headers.get("x-imgproxy-idempotent-replay") == "true"
    assert len((await resp.json())["data"]) == 1 and len(fake_openai.requests) == 1  # generated once, delivered on the retry
    await client.close()


# --- the property: never two billable generations for one request --------------------------

FAULTS = {
    "ok": None,
    "429": Cue(status=429, body=ERROR_429, headers={"Retry-After": "0"}),
    "500": Cue(status=500, body=ERROR_500),
    "502-html": Cue(status=502, body=b"<html>Bad Gateway</html>", content_type="text/html"),
    "timeout": Cue(delay=1.5),
    "cut": Cue(cut=True),
    "reset": Cue(reset=True),
    "policy": Cue(status=400, body=POLICY_400),
}
# What a provider may have generated and billed: all but its explicit "I did not".
BILLABLE = {"ok", "502-html", "timeout", "cut", "reset"}
faults = st.lists(st.sampled_from(sorted(FAULTS)), max_size=4)


async def run_scenario(tmp_path: Path, primary: list[str], fallback: list[str]) -> None:
    fakes = [FakeOpenAI(), FakeOpenAI(), FakeStability()]
    servers = [TestServer(fake.app()) for fake in fakes]
    for fake, server in zip(fakes, servers):
        await server.start_server()
        fake.base_url = str(server.make_url("")).rstrip("/")
    for fake, names in ((fakes[0], primary), (fakes[1], fallback)):
        fake.cues = [FAULTS[name] or Cue(body={"created": 1, "data": [{"b64_json": fake.image_b64}]}) for name in names]
    usage = tmp_path / "usage.jsonl"
    usage.unlink(missing_ok=True)
    text = config(fakes[0].base_url, fakes[1].base_url, fakes[2].base_url, tmp_path,
                  retries={"attempts": 3, "backoff": 0.01, "max_backoff": 0.02}, model={"timeout": 0.7, "deadline": 30, "fallbacks": ["azure-dall-e-3"]})
    gw = await Gateway.load(text=text, env={})
    try:
        async with TestClient(TestServer(create_app(gw))) as client:
            resp = await client.post(URL, json=DALLE3, headers=AUTH)
            delivered = 0
            try:
                body = await resp.read()
                if resp.status == 200:
                    delivered = len(json.loads(body)["data"])
            except (aiohttp.ClientPayloadError, ValueError):
                delivered = 0
            [record] = await records(usage)
    finally:
        for server in servers:
            await server.close()
    seen = [(primary + ["ok"] * 10)[: len(fakes[0].requests)], (fallback + ["ok"] * 10)[: len(fakes[1].requests)]]
    billable = sum(name in BILLABLE for calls in seen for name in calls)
    assert billable <= 1, (primary, fallback, seen)
    assert record["cost_usd"] == pytest.approx(PRICE * delivered), (primary, fallback, seen, record)
    assert fakes[2].requests == []


@settings(max_examples=25, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(primary=faults, fallback=faults)
def test_no_fault_sequence_makes_two_billable_generations_or_bills_more_than_delivered(tmp_path, primary, fallback):
    asyncio.run(run_scenario(tmp_path, primary, fallback))


# --- the translation table (docs/operations.md#fallbacks) ------------------------------------

def test_translation_follows_the_documented_table():
    from imgproxy.catalog import Capabilities, builtin_catalog
    from imgproxy.messages import ImageRequest
    from imgproxy.resilience import translate

    caps = {name: Capabilities.from_dict(entry.capabilities) for name, entry in builtin_catalog().items()}
    sdxl, gpt, dalle3 = caps["stable-diffusion-xl-1024-v1-0"], caps["gpt-image-1"], caps["dall-e-3"]

    def ask(**fields):
        return ImageRequest(**{"prompt": "x", "model": "dall-e-3", "n": 1, "size": "1024x1024", "response_format": "url", **fields})

    portrait = translate(ask(size="1024x1792", quality="hd", style="vivid"), "sdxl", sdxl, "translate")
    assert (portrait.model, portrait.size, portrait.quality, portrait.style) == ("sdxl", "768x1344", "hd", "vivid")
    to_gpt = translate(ask(size="1792x1024", quality="hd", style="natural"), "gpt-image-1", gpt, "translate")
    assert (to_gpt.size, to_gpt.quality, to_gpt.style) == ("1536x1024", "high", None)
    for asked, got in (("medium", "standard"), ("low", "standard"), ("high", "hd"), ("auto", "standard")):
        assert translate(ask(model="gpt-image-1", quality=asked), "dall-e-3", dalle3, "translate").quality == got, asked
    assert translate(ask(model="gpt-image-1", size="auto", quality="auto"), "dall-e-3", dalle3, "translate").size == "1024x1024"
    assert translate(ask(n=2), "dall-e-3", dalle3, "translate") is None  # n is never cut
    assert translate(ask(size="1792x1024"), "sdxl", sdxl, "skip") is None
    assert translate(ask(quality="hd"), "gpt-image-1", gpt, "skip") is None
    assert translate(ask(quality="hd", style="vivid"), "sdxl", sdxl, "skip").size == "1024x1024"  # all honoured as given


def test_a_per_model_circuit_opens_for_that_model_only():
    from imgproxy.resilience import BreakerConfig, Circuits
    from imgproxy.routing import Target

    class Provider:
        name, circuit_breaker = "openai", BreakerConfig(failure_rate=0.5, min_calls=2, cooldown=60, per_model=True)

    class Model:
        def __init__(self, name):
            self.name = name

    seen = []
    circuits = Circuits(lambda provider, state: seen.append((provider, state)))
    a, b = Target(Model("dall-e-2"), Provider()), Target(Model("dall-e-3"), Provider())
    for _ in range(2):
        assert circuits.for_target(a).allow()
        circuits.for_target(a).record(True)
    assert not circuits.for_target(a).allow() and circuits.for_target(b).allow()
    assert seen == [("openai", "open")] and circuits.states() == {"openai/dall-e-2": "open", "openai/dall-e-3": "closed"}
