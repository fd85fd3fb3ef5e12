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


def test_a_request_cut_while_the_moderation_model_answers_is_not_billed(tmp_path):
    # The moderation model is asked before the provider. A request cut during that check (a
    # slow moderation model, then the drain timeout) never reached the provider: it was billed
    # at the worst case as "cut" because the check had set `upstream_called`.
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    seen: list[str] = []

    class Upstream(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            seen.append(self.path)
            self.rfile.read(int(self.headers["Content-Length"]))
            time.sleep(20 if self.path.endswith("/moderations") else 0)
            self.send_response(500)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    upstream = ThreadingHTTPServer(("127.0.0.1", 0), Upstream)
    upstream.daemon_threads = True
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    port, ops = free_port(), free_port()
    usage = tmp_path / "usage.jsonl"
    config = tmp_path / "proxy.yaml"
    config.write_text(f"""
server: {{host: 127.0.0.1, port: {port}, drain_timeout: 0.5}}
metrics: {{host: 127.0.0.1, port: {ops}}}
auth: {{api_keys: {KEY}}}
providers:
  openai: {{type: openai, base_url: "http://127.0.0.1:{upstream.server_address[1]}/v1", api_key: sk-upstream-drain-0000}}
models:
  dall-e-2: {{provider: openai}}
moderation:
  upstream: {{provider: openai, timeout: 15}}
images: {{directory: {tmp_path / "images"}, signing_key: drain-test-signing-key}}
cost: {{usage_log: {usage}}}
""")
    proc = subprocess.Popen([IMGPROXY, "serve", "--config", str(config)], cwd=REPO, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_port(port, proc)
        client = threading.Thread(target=lambda: _ignore_oserror(http, "POST", f"http://127.0.0.1:{port}/v1/images/generations", {"model": "dall-e-2", "prompt": "x"}, KEY))
        client.start()
        deadline = time.monotonic() + 10
        while not seen:
            assert time.monotonic() < deadline, "the request never reached the moderation model"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)
        client.join(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=10)
        upstream.shutdown()
    assert seen == ["/v1/moderations"]  # the provider was never asked for an image
    [record] = [json.loads(line) for line in usage.read_text().splitlines()]
    assert (record["status"], record["cost_usd"], record.get("cut")) == (499, 0.0, None), record


def _ignore_oserror(call, *args) -> None:
    try:
        call(*args)
    except OSError:
        pass
