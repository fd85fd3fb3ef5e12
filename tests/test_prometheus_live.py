"""A real Prometheus scrapes a running imgproxy while traffic flows through fake upstreams;
then every PromQL expression of the dashboard and the alert rules is run through its HTTP API."""

import asyncio
import json
import socket
import subprocess
import time

import aiohttp
import pytest

from tests.conftest import AUTH, CLIENT_KEY
from tests.test_deploy import DEPLOY, tool

URL = "/v1/images/generations"
LIMITED = {"Authorization": "Bearer sk-limited-key-0000000"}
EXTRA_KEYS = """
    - name: limited
      key: sk-limited-key-0000000
      rate_limit: {requests_per_minute: 3}
      budget: {daily_usd: 0.05}
moderation:
  categories:
    weapons: {words: [bazooka]}
"""
# Grafana's variables, as Grafana would expand them with "All" selected.
VARIABLES = {"$key": ".*", "$model": ".*", "$__rate_interval": "30s", "$__range": "5m"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def prometheus(tmp_path):
    binary = tool("prometheus")
    procs = []

    def start(target_port: int) -> str:
        port = free_port()
        config = tmp_path / "prometheus.yml"
        config.write_text(
            "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
            f"rule_files: [{DEPLOY / 'prometheus' / 'rules.yaml'}]\n"
            "scrape_configs:\n"
            f"  - job_name: imgproxy\n    static_configs: [{{targets: ['127.0.0.1:{target_port}']}}]\n"
        )
        proc = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        procs.append(proc)
        return f"http://127.0.0.1:{port}"

    yield start
    for proc in procs:
        proc.terminate()
        proc.wait(timeout=30)


async def query(session: aiohttp.ClientSession, base: str, expr: str) -> list:
    async with session.get(f"{base}/api/v1/query", params={"query": expr}) as resp:
        body = await resp.json()
    assert body["status"] == "success", (expr, body)
    return body["data"]["result"]


async def wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = await condition()
        if result:
            return result
        await asyncio.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}")


async def send_traffic(client, fake_openai, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    for _ in range(200):  # bounded in count as well as in time
        if time.monotonic() > deadline:
            break
        await client.post(URL, json={"model": "dall-e-3", "prompt": "x"}, headers=AUTH)
        await client.post(URL, json={"model": "dall-e-2", "prompt": "x", "n": 2, "size": "256x256", "response_format": "b64_json"}, headers=AUTH)
        await client.post(URL, json={"model": "placeholder", "prompt": "a bazooka"}, headers=AUTH)
        await client.post(URL, json={"model": "dall-e-3", "prompt": "x"}, headers=LIMITED)
        fake_openai.cue(status=500, body={})
        await client.post(URL, json={"model": "dall-e-2", "prompt": "x"}, headers=AUTH)
        await asyncio.sleep(0.2)


async def test_dashboard_and_rules_against_a_live_prometheus(make_client, config_text, fake_openai, prometheus):
    text = config_text().replace(f"key: {CLIENT_KEY}\n", f"key: {CLIENT_KEY}\n{EXTRA_KEYS}", 1)
    client = await make_client(text)
    base = prometheus(client.server.port)
    async with aiohttp.ClientSession() as session:
        await wait_for(lambda: query_ok(session, base, "imgproxy_build_info"), 30, "the first scrape")
        await send_traffic(client, fake_openai, seconds=6)
        await wait_for(lambda: query_ok(session, base, 'imgproxy_refused_requests_total{reason="budget"}'), 15, "a scrape after the traffic")

        dashboard = json.loads((DEPLOY / "grafana" / "imgproxy.json").read_text())
        empty = []
        for panel in dashboard["panels"]:
            for target in panel["targets"]:
                expr = target["expr"]
                for name, value in VARIABLES.items():
                    expr = expr.replace(name, value)
                if not await query(session, base, expr):
                    empty.append(panel["title"])
        assert empty == [], f"dashboard panels without data: {empty}"

        async with session.get(f"{base}/api/v1/rules") as resp:
            groups = (await resp.json())["data"]["groups"]
        rules = [rule for group in groups for rule in group["rules"]]
        assert len(rules) == 10
        for rule in rules:
            assert rule["health"] == "ok", rule
            await query(session, base, rule["query"])  # parses and runs


async def query_ok(session, base, expr):
    try:
        return await query(session, base, expr)
    except aiohttp.ClientError:
        return []
