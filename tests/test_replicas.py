"""Two `imgproxy serve` processes on one Redis, as replicas run: limits and budgets admitted
exactly as configured under concurrent load and after a restart; an idempotent retry on the
other replica; a replica killed (-9) with paid calls in flight, settled by the survivor."""

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from tests.fakes import FakeUpstream
from tests.processes import free_port

REPO = Path(__file__).resolve().parents[1]
IMGPROXY = str(Path(sys.executable).parent / "imgproxy")
LIMITED_KEY = "sk-replica-limited-0001"
BUDGET_KEY = "sk-replica-budget-00001"


def replica_config(upstream: str, redis_url: str, images: Path, prefix: str) -> str:
    return f"""
auth:
  keys:
    - {{name: limited, key: {LIMITED_KEY}, rate_limit: {{requests_per_minute: 3}}}}
    - {{name: budget, key: {BUDGET_KEY}, budget: {{daily_usd: 0.1}}}}
providers:
  openai: {{type: openai, base_url: "{upstream}/v1", api_key: {FakeUpstream.key}, timeouts: {{connect: 2, total: 3}}}}
  placeholder: {{type: placeholder}}
models:
  dall-e-2: {{provider: openai}}
  placeholder: {{provider: placeholder}}
images: {{directory: {images}, signing_key: replicas-share-this-key}}
state: {{backend: redis, url: "{redis_url}", key_prefix: "{prefix}", recovery_interval: 0.3, recovery_margin: 0}}
cost: {{usage_log: "${{USAGE_LOG}}"}}
server: {{reload_interval: 0, drain_timeout: 1}}
"""


class Replica:
    def __init__(self, config: Path, usage_log: Path) -> None:
        self.config, self.usage_log, self.port = config, usage_log, free_port()
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Replica":
        env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "STABILITY_", "IMGPROXY_"))}
        env["USAGE_LOG"] = str(self.usage_log)
        self.proc = subprocess.Popen(
            [IMGPROXY, "serve", "--config", str(self.config), "--port", str(self.port)],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        return self

    async def ready(self) -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                assert self.proc.poll() is None, self.proc.communicate()[1]
                await asyncio.sleep(0.1)
        raise AssertionError("imgproxy serve did not start listening")

    def stop(self, sig=signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=30)
        self.proc = None

    def records(self) -> list[dict]:
        return [json.loads(line) for line in self.usage_log.read_text().splitlines()] if self.usage_log.exists() else []


@pytest.fixture
async def replicas(tmp_path, fake_openai, redis_server):
    config = tmp_path / "proxy.yaml"
    config.write_text(replica_config(fake_openai.base_url, redis_server.url, tmp_path / "images", f"rep-{os.urandom(4).hex()}:"))
    pair = [Replica(config, tmp_path / f"usage-{name}.jsonl").start() for name in ("a", "b")]
    for replica in pair:
        await replica.ready()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        yield pair, session
    for replica in pair:
        replica.stop()


async def post(session, replica: Replica, key: str, body: dict, **headers) -> tuple[int, dict, dict]:
    async with session.post(
        f"http://127.0.0.1:{replica.port}/v1/images/generations", json=body, headers={"Authorization": f"Bearer {key}", **headers}
    ) as resp:
        return resp.status, await resp.json(), dict(resp.headers)


async def round_robin(session, pair, key: str, body: dict, count: int) -> list[int]:
    replies = await asyncio.gather(*[post(session, pair[i % 2], key, body) for i in range(count)])
    return sorted(status for status, _, _ in replies)


PLACEHOLDER = {"model": "placeholder", "prompt": "x", "size": "256x256", "response_format": "b64_json"}
DALLE = {"model": "dall-e-2", "prompt": "x", "size": "256x256"}  # $0.016 each: $0.10 admits 6


async def test_limits_and_budgets_hold_across_replicas_and_a_restart(replicas, fake_openai):
    pair, session = replicas
    # 3 a minute: one comes back every 20 s, far more than the restart below takes.
    assert await round_robin(session, pair, LIMITED_KEY, PLACEHOLDER, 16) == [200] * 3 + [429] * 13
    assert await round_robin(session, pair, BUDGET_KEY, DALLE, 12) == [200] * 6 + [429] * 6
    assert len(fake_openai.requests) == 6
    # A restarted replica still sees what was spent and used.
    pair[0].stop()
    pair[0].start()
    await pair[0].ready()
    assert await round_robin(session, pair, LIMITED_KEY, PLACEHOLDER, 4) == [429] * 4
    assert await round_robin(session, pair, BUDGET_KEY, DALLE, 4) == [429] * 4
    assert len(fake_openai.requests) == 6


async def test_an_idempotent_retry_on_the_other_replica_reaches_the_upstream_once(replicas, fake_openai):
    pair, session = replicas
    status, first, _ = await post(session, pair[0], BUDGET_KEY, DALLE, **{"Idempotency-Key": "job-77"})
    assert status == 200
    status, again, headers = await post(session, pair[1], BUDGET_KEY, DALLE, **{"Idempotency-Key": "job-77"})
    assert status == 200 and again == first and headers["x-imgproxy-idempotent-replay"] == "true"
    async with session.get(first["data"][0]["url"]) as image:  # the URL is the same, and valid
        assert image.status == 200
    assert len(fake_openai.requests) == 1


async def test_a_replica_killed_mid_call_is_settled_by_the_other(replicas, fake_openai):
    pair, session = replicas
    status, _, _ = await post(session, pair[0], BUDGET_KEY, PLACEHOLDER, **{"x-request-id": "done-before"})
    assert status == 200
    fake_openai.delay = 20  # the upstream holds the calls until the replica is gone
    in_flight = [
        asyncio.ensure_future(post(session, pair[0], BUDGET_KEY, DALLE, **{"x-request-id": f"doomed-{i}"})) for i in range(3)
    ]
    while len(fake_openai.requests) < 3:
        await asyncio.sleep(0.05)
    pair[0].stop(signal.SIGKILL)
    for call in in_flight:
        with pytest.raises(aiohttp.ClientError):
            await call
    # The survivor claims them after the model's timeout (3 s here) and writes them at their worst case.
    deadline = time.monotonic() + 30
    while len([r for r in pair[1].records() if r.get("settled_by") == "recovery"]) < 3 and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    recovered = [r for r in pair[1].records() if r.get("settled_by") == "recovery"]
    assert sorted(r["request_id"] for r in recovered) == ["doomed-0", "doomed-1", "doomed-2"]
    assert all(r["key"] == "budget" and r["model"] == "dall-e-2" and r["cost_usd"] == 0.016 for r in recovered)
    # The killed replica's usage log has what it finished (each record is flushed as written), nothing else.
    assert [r["request_id"] for r in pair[0].records()] == ["done-before"]
    # Their worst case stays spent: $0.048 of $0.10, so three more fit, not six.
    fake_openai.delay = 0
    assert await round_robin(session, [pair[1], pair[1]], BUDGET_KEY, DALLE, 6) == [200] * 3 + [429] * 3
    # Claimed once: later sweeps find nothing more.
    await asyncio.sleep(1)
    assert len([r for r in pair[1].records() if r.get("settled_by") == "recovery"]) == 3
