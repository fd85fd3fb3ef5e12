"""SIGTERM with requests longer than the drain timeout: readiness drops at once, new
connections are refused, the process exits within drain_timeout + 1 s, and the requests cut
short are recorded at the worst case reserved for them (the provider was already called)."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import threading
import time

import pytest

from tests.processes import IMGPROXY, REPO, clean_env, free_port, http, metric, mock_upstream, wait_for_port

KEY = "sk-drain-test-key-0000"
DRAIN = 2.0


@pytest.fixture
def slow_gateway(tmp_path):
    upstream, upstream_port = mock_upstream("--format", "b64_json", "--delay", "30")
    port, ops = free_port(), free_port()
    usage = tmp_path / "usage.jsonl"
    config = tmp_path / "proxy.yaml"
    config.write_text(f"""
server: {{host: 127.0.0.1, port: {port}, drain_timeout: {DRAIN}}}
metrics: {{host: 127.0.0.1, port: {ops}}}
auth: {{api_keys: {KEY}}}
providers:
  openai: {{type: openai, base_url: "http://127.0.0.1:{upstream_port}/v1", api_key: sk-upstream-drain-0000}}
models:
  dall-e-2: {{provider: openai}}
images: {{directory: {tmp_path / "images"}, signing_key: drain-test-signing-key}}
cost: {{usage_log: {usage}}}
""")
    proc = subprocess.Popen([IMGPROXY, "serve", "--config", str(config)], cwd=REPO, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_port(port, proc)
        yield proc, port, ops, usage
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=10)
        upstream.terminate()
        upstream.wait(timeout=10)


def test_sigterm_drains_within_the_timeout_and_bills_cut_requests(slow_gateway):
    proc, port, ops, usage = slow_gateway
    outcomes: list = []

    def generate() -> None:
        try:
            outcomes.append(http("POST", f"http://127.0.0.1:{port}/v1/images/generations", {"model": "dall-e-2", "prompt": "slow", "response_format": "b64_json"}, KEY)[0])
        except OSError as exc:
            outcomes.append(type(exc).__name__)

    clients = [threading.Thread(target=generate) for _ in range(3)]
    for client in clients:
        client.start()
    deadline = time.monotonic() + 10
    while metric(http("GET", f"http://127.0.0.1:{ops}/metrics")[1].get("raw", ""), "imgproxy_in_flight_requests") < 3:
        assert time.monotonic() < deadline, "the requests never reached the slow upstream"
        time.sleep(0.05)

    proc.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    status, body, _ = http("GET", f"http://127.0.0.1:{ops}/readyz")
    assert status == 503 and body["checks"]["shutting_down"] is True, body
    time.sleep(0.2)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    proc.wait(timeout=DRAIN + 10)
    exited = time.monotonic() - sent
    assert exited < DRAIN + 1, f"exited {exited:.2f}s after SIGTERM (drain_timeout {DRAIN}s)"
    assert proc.returncode == 0
    for client in clients:
        client.join(timeout=10)
    assert len(outcomes) == 3 and 200 not in outcomes, outcomes

    records = [json.loads(line) for line in usage.read_text().splitlines()]
    assert len(records) == 3, records
    for record in records:
        # dall-e-2 at its default 1024x1024: $0.020, the worst case reserved before the call.
        assert record["cut"] is True and record["cost_usd"] == pytest.approx(0.02) and record["status"] == 499, record
