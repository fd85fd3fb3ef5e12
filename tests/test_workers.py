"""`imgproxy serve --workers N`: N processes on one port, a crashed worker replaced, signals
passed to every worker, and one scrape showing the whole group."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from tests.processes import IMGPROXY, REPO, clean_env, free_port, http, metric, wait_for_port

KEY = "sk-workers-test-key-000"


def config_text(port: int, ops: int, tmp_path: Path, state: str = "{backend: memory, per_process: true}", signing: str = "workers-signing-key", models: str = "") -> str:
    return f"""
server: {{host: 127.0.0.1, port: {port}, drain_timeout: 2, reload_interval: 0}}
metrics: {{host: 127.0.0.1, port: {ops}}}
auth: {{api_keys: {KEY}}}
state: {state}
providers:
  placeholder: {{type: placeholder}}
models:
  placeholder: {{provider: placeholder}}
{models}
images: {{directory: {tmp_path / "images"}, signing_key: "{signing}"}}
"""


def workers_of(pid: int) -> set[int]:
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return {int(child) for child in children}


def start_two_workers(config: Path, port: int) -> subprocess.Popen:
    """`imgproxy serve --workers 2`, once it listens and both workers run."""
    proc = subprocess.Popen([IMGPROXY, "serve", "--config", str(config), "--workers", "2"], cwd=REPO, env=clean_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_port(port, proc)
        deadline = time.monotonic() + 20
        while len(workers_of(proc.pid)) < 2:
            assert time.monotonic() < deadline, "two workers did not start"
            time.sleep(0.1)
    except BaseException:
        proc.terminate()  # its workers follow it (PR_SET_PDEATHSIG)
        proc.communicate(timeout=20)
        raise
    return proc


def generate(port: int, model: str = "placeholder") -> int:
    for _ in range(20):  # a connection refused while a worker is being replaced is retried
        try:
            return http("POST", f"http://127.0.0.1:{port}/v1/images/generations", {"model": model, "prompt": "w", "size": "64x64"}, KEY)[0]
        except OSError:
            time.sleep(0.1)
    raise AssertionError("the gateway stayed unreachable")


@pytest.fixture
def group(tmp_path):
    port, ops = free_port(), free_port()
    config = tmp_path / "proxy.yaml"
    config.write_text(config_text(port, ops, tmp_path))
    proc = start_two_workers(config, port)
    try:
        wait_for_port(ops, proc)
        yield proc, port, ops, config
    finally:
        if proc.poll() is None:
            proc.terminate()
        proc.communicate(timeout=20)


def test_workers_share_the_port_and_one_scrape_counts_them_all(group):
    proc, port, ops, config = group
    assert [generate(port) for _ in range(30)] == [200] * 30
    # Each request came on a new connection, spread over both workers by the kernel; the
    # scrape is answered by one of them and still counts every request of the group.
    scrape = http("GET", f"http://127.0.0.1:{ops}/metrics")[1]["raw"]
    assert metric(scrape, "imgproxy_requests_total") == 30
    assert metric(scrape, "imgproxy_in_flight_requests") == 0


def test_a_killed_worker_is_replaced_and_signals_reach_every_worker(group, tmp_path):
    proc, port, ops, config = group
    first = workers_of(proc.pid)
    victim = min(first)
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 15
    while True:
        current = workers_of(proc.pid)
        if len(current) == 2 and victim not in current:
            break
        assert time.monotonic() < deadline, f"the killed worker was not replaced: {current}"
        time.sleep(0.1)
    assert generate(port) == 200

    # SIGHUP to the supervisor reloads every worker: a new model is served whichever worker answers.
    config.write_text(config_text(port, ops, tmp_path, models="  placeholder-2: {provider: placeholder, upstream_model: placeholder, catalog: placeholder}"))
    proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 15
    while True:
        statuses = [generate(port, "placeholder-2") for _ in range(20)]
        if statuses == [200] * 20:
            break
        assert time.monotonic() < deadline, statuses
        time.sleep(0.2)

    workers = workers_of(proc.pid)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 0
    for worker in workers:
        assert not Path(f"/proc/{worker}").exists() or "zombie" in Path(f"/proc/{worker}/status").read_text()


@pytest.mark.parametrize(
    "state, signing, refusal",
    [
        ("{backend: memory}", "k" * 32, "state.per_process: true"),
        ("{backend: memory, per_process: true}", "${IMGPROXY_SIGNING_KEY:-}", "$IMGPROXY_SIGNING_KEY"),
    ],
)
def test_workers_refuse_configs_that_break_across_processes(tmp_path, state, signing, refusal):
    config = tmp_path / "proxy.yaml"
    config.write_text(config_text(free_port(), free_port(), tmp_path, state=state, signing=signing))
    result = subprocess.run([IMGPROXY, "serve", "--config", str(config), "--workers", "2"], env=clean_env(), capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and refusal in result.stderr, result.stderr


def test_two_workers_on_one_redis_and_one_bucket(redis_server, s3_env, tmp_path):
    """Limits admitted exactly across the workers, and every image URL served by whichever
    worker a new connection reaches."""
    from tests.s3server import BUCKET

    endpoint, _ = s3_env
    port, ops = free_port(), free_port()
    config = tmp_path / "proxy.yaml"
    config.write_text(f"""
server: {{host: 127.0.0.1, port: {port}, drain_timeout: 2, reload_interval: 0}}
metrics: {{host: 127.0.0.1, port: {ops}}}
auth:
  keys:
    - {{name: limited, key: {KEY}, rate_limit: {{requests_per_minute: 10}}}}
state: {{backend: redis, url: "{redis_server.url}", key_prefix: "workers-{os.getpid()}:"}}
providers:
  placeholder: {{type: placeholder}}
models:
  placeholder: {{provider: placeholder}}
images:
  signing_key: workers-share-this-signing-key
  store: s3
  s3: {{bucket: {BUCKET}, prefix: workers/, endpoint_url: "{endpoint}", region: us-east-1, urls: gateway}}
""")
    proc = start_two_workers(config, port)
    try:
        answers = [
            http("POST", f"http://127.0.0.1:{port}/v1/images/generations", {"model": "placeholder", "prompt": f"w{i}", "size": "64x64", "response_format": "url"}, KEY)
            for i in range(20)
        ]
        assert sorted(status for status, _, _ in answers) == [200] * 10 + [429] * 10
        urls = [body["data"][0]["url"] for status, body, _ in answers if status == 200]
        for url in urls:
            images = set()
            for _ in range(3):  # each on a new connection: the kernel picks the worker
                with urllib.request.urlopen(url, timeout=10) as resp:
                    assert resp.status == 200 and resp.headers["Content-Type"] == "image/png"
                    images.add(resp.read())
            assert len(images) == 1 and next(iter(images)).startswith(b"\x89PNG")
    finally:
        proc.terminate()
        proc.communicate(timeout=20)
