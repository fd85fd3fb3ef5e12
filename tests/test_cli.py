"""The command line as a user runs it: `imgproxy serve` and `imgproxy check-config`."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import quote

import pytest

from tests.conftest import run_imgproxy
from tests.processes import clean_env, free_port

REPO = Path(__file__).resolve().parents[1]
# The installed console script, as users run it (`python -m` from the checkout would import the source tree).
IMGPROXY = [str(Path(sys.executable).parent / "imgproxy")]


def post(port: int, body: dict, key: str) -> tuple[int, dict]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/images/generations",
        data=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@pytest.fixture
def serve(tmp_path):
    procs = []

    def start(*args: str, port: int | None = None, **env) -> tuple[subprocess.Popen, int]:
        if port is None:
            port = free_port()
            env.setdefault("IMGPROXY_PORT", str(port))
        env.setdefault("IMGPROXY_IMAGE_DIR", str(tmp_path / "images"))
        proc = subprocess.Popen(
            [*IMGPROXY, "serve", *args], cwd=REPO, env=clean_env(**env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        procs.append(proc)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                return proc, port
            except OSError:
                assert proc.poll() is None, proc.communicate()[1]
                time.sleep(0.1)
        raise AssertionError("imgproxy serve did not start listening")

    yield start
    for proc in procs:
        proc.terminate()
        proc.wait(timeout=30)


def test_serve_on_the_shipped_config(serve):
    proc, port = serve(IMGPROXY_API_KEYS="sk-cli-test-key-000")
    status, body = post(port, {"model": "placeholder", "prompt": "a red bicycle", "response_format": "b64_json"}, "sk-cli-test-key-000")
    assert status == 200 and body["data"][0]["b64_json"]
    status, body = post(port, {"model": "dall-e-3", "prompt": "x"}, "sk-cli-test-key-000")
    assert status == 503 and "OPENAI_API_KEY" in body["error"]["message"]
    status, body = post(port, {"model": "sdxl", "prompt": "x"}, "sk-cli-test-key-000")
    assert status == 503 and "STABILITY_API_KEY" in body["error"]["message"]
    proc.terminate()
    assert proc.wait(timeout=30) == 0
    assert "sk-cli-test-key-000" not in proc.stderr.read()


def test_serve_generates_a_key_when_none_is_configured(serve):
    proc, port = serve()
    proc.terminate()
    proc.wait(timeout=30)
    err = proc.stderr.read()
    assert "no client keys are configured" in err and err.count("sk-imgproxy-") == 1


def test_serve_flags_and_environment(serve, tmp_path):
    config = tmp_path / "gateway.yaml"
    config.write_text((REPO / "proxy.yaml").read_text().replace("port: 8080", "port: 1"))
    port = free_port()
    # --port wins over IMGPROXY_PORT, which wins over the config's port.
    serve("--host", "127.0.0.1", "--port", str(port), port=port, IMGPROXY_PORT="1", IMGPROXY_CONFIG=str(config), IMGPROXY_API_KEYS="sk-flags-key-0000000")
    status, _ = post(port, {"model": "placeholder", "prompt": "x", "response_format": "b64_json"}, "sk-flags-key-0000000")
    assert status == 200


def test_serve_refuses_a_bad_config(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("providers: {}\nmodels: {}\n")
    result = run_imgproxy("serve", "--config", str(config), env=clean_env())
    assert result.returncode == 2
    assert f"{config}: providers: " in result.stderr


def test_check_config_prints_the_model_table():
    result = run_imgproxy("check-config", "proxy.yaml", cwd=REPO, env=clean_env(OPENAI_API_KEY="sk-set"))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "proxy.yaml: valid, 5 models"
    table = {line.split()[0]: line for line in lines[2:]}
    assert "openai (openai)" in table["dall-e-3"] and table["dall-e-3"].endswith("set")
    assert "sdxl" in table["stable-diffusion-xl-1024-v1-0"] and "MISSING: STABILITY_API_KEY" in table["stable-diffusion-xl-1024-v1-0"]
    assert table["placeholder"].endswith("not needed")
    assert "sk-set" not in result.stdout + result.stderr
    assert "sk-imgproxy-" not in result.stdout + result.stderr  # nothing is started


def test_check_config_names_file_and_key_path(tmp_path):
    config = tmp_path / "proxy.yaml"
    config.write_text((REPO / "proxy.yaml").read_text().replace("url_ttl: 3600", "url_ttl: soon"))
    result = run_imgproxy("check-config", str(config), env=clean_env())
    assert result.returncode == 1
    assert f"{config}: images.url_ttl: must be of type integer, not string" in result.stderr


def test_plugins_folder_is_only_importable_as_imgproxy_plugins(tmp_path):
    code = "import importlib.util as u, imgproxy.plugins.auth; print(u.find_spec('plugins') is None)"
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=clean_env(), capture_output=True, text=True, timeout=30)
    assert result.stdout.strip() == "True", result.stderr



def test_hash_key_makes_a_key_the_config_accepts():
    result = subprocess.run([*IMGPROXY, "hash-key"], capture_output=True, text=True, timeout=30)
    lines = dict(line.split(":", 1) for line in result.stdout.splitlines())
    key, digest = lines["key"].strip(), lines["sha256"].strip()
    assert key.startswith("sk-imgproxy-") and len(key) > 30
    import hashlib

    assert hashlib.sha256(key.encode()).hexdigest() == digest
    again = subprocess.run([*IMGPROXY, "hash-key", "--stdin"], input=key + "\n", capture_output=True, text=True, timeout=30)
    assert again.stdout.strip() == f"sha256: {digest}"


def test_sigterm_lets_in_flight_requests_finish(serve, tmp_path):
    """Kubernetes sends SIGTERM after the preStop pause: a request already being served must
    still get its answer, and new connections must be refused."""
    import threading

    upstream_port = free_port()
    mock = subprocess.Popen(
        [sys.executable, "-m", "tests.benchmarks.mock_upstream", "--port", str(upstream_port), "--format", "b64_json", "--image-bytes", "1000", "--delay", "1.5"],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", upstream_port), timeout=0.2).close()
                break
            except OSError:
                assert mock.poll() is None and time.monotonic() < deadline, "the slow upstream did not start"
                time.sleep(0.05)
        proc, port = serve(
            IMGPROXY_API_KEYS="sk-drain-test-key-000", OPENAI_API_KEY="sk-upstream", OPENAI_BASE_URL=f"http://127.0.0.1:{upstream_port}/v1"
        )
        answers = []
        request = threading.Thread(target=lambda: answers.append(post(port, {"model": "dall-e-2", "prompt": "x", "response_format": "b64_json"}, "sk-drain-test-key-000")))
        request.start()
        time.sleep(0.5)  # the request is now waiting on the slow upstream
        proc.terminate()
        request.join(timeout=20)
        assert answers and answers[0][0] == 200, answers
        assert proc.wait(timeout=30) == 0
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
    finally:
        mock.terminate()
        mock.wait(timeout=10)


def test_serve_on_a_port_in_use_says_so_in_one_line(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [*IMGPROXY, "serve", "--port", str(port)], cwd=REPO, capture_output=True, text=True, timeout=30,
            env=clean_env(IMGPROXY_API_KEYS="sk-port-test-key-00000", IMGPROXY_IMAGE_DIR=str(tmp_path / "images")),
        )
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1] == f"imgproxy: cannot listen on 127.0.0.1:{port}: the address is already in use (another imgproxy, or another server, listens there)"
    assert "Traceback" not in result.stderr + result.stdout
    assert "serving" not in result.stdout  # no success line before the failure


def start_up_warnings(proc) -> list[str]:
    proc.terminate()
    proc.wait(timeout=30)
    lines = [json.loads(line) for line in proc.stdout.read().splitlines()]
    serving = next(i for i, line in enumerate(lines) if "serving" in line["message"])
    assert all(line["level"] == "warning" for line in lines[:serving] if "key" in line["message"])
    return [line["message"] for line in lines[:serving] if line["level"] == "warning"]


def test_serve_warns_about_missing_provider_keys_and_a_random_signing_key(serve):
    warnings = start_up_warnings(serve(IMGPROXY_API_KEYS="sk-warn-test-key-00000")[0])
    assert any("provider openai has no API key: set OPENAI_API_KEY" in w and "dall-e-3" in w for w in warnings), warnings
    assert any("provider stability has no API key: set STABILITY_API_KEY" in w for w in warnings), warnings
    assert any("signing_key is not set" in w and "break on restart" in w for w in warnings), warnings
    # Only what is really missing is named.
    warnings = start_up_warnings(serve(IMGPROXY_API_KEYS="sk-warn-test-key-00000", OPENAI_API_KEY="sk-set", IMGPROXY_SIGNING_KEY="a-long-signing-key")[0])
    assert [w for w in warnings if "openai" in w or "signing_key" in w] == []
    assert any("STABILITY_API_KEY" in w for w in warnings)
    assert "sk-set" not in " ".join(warnings)


def test_check_config_reads_the_same_file_as_serve(tmp_path):
    result = subprocess.run([*IMGPROXY, "check-config"], cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == "proxy.yaml: valid, 5 models"
    config = tmp_path / "gateway.yaml"
    config.write_text((REPO / "proxy.yaml").read_text().replace("  placeholder: {provider: placeholder}\n", ""))
    result = subprocess.run([*IMGPROXY, "check-config"], cwd=REPO, env=clean_env(IMGPROXY_CONFIG=str(config)), capture_output=True, text=True, timeout=30)
    assert result.stdout.splitlines()[0] == f"{config}: valid, 4 models"


def test_check_config_into_a_closed_pipe_stops_quietly():
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader (`| head -1`) is already gone
    try:
        result = subprocess.run([*IMGPROXY, "check-config"], cwd=REPO, env=clean_env(), stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=30)
    finally:
        os.close(write_end)
    assert "Traceback" not in result.stderr and "BrokenPipeError" not in result.stderr, result.stderr
    assert result.returncode == 1


def test_every_subcommand_has_a_description():
    top = subprocess.run([*IMGPROXY, "--help"], capture_output=True, text=True, timeout=30).stdout
    for command, words in (("serve", "Serve the OpenAI Images API"), ("check-config", "Validate a config file"), ("hash-key", "Print a new random client key")):
        assert command in top
        result = subprocess.run([*IMGPROXY, command, "--help"], capture_output=True, text=True, timeout=30)
        assert result.returncode == 0 and words in result.stdout, result.stdout


def test_text_logs_have_one_timestamp_format_and_no_empty_fields(serve, tmp_path):
    import re

    config = tmp_path / "text-logs.yaml"
    config.write_text((REPO / "proxy.yaml").read_text() + "\nlogging: {format: text}\n")
    proc, port = serve("--config", str(config), IMGPROXY_API_KEYS="sk-text-log-key-00000")
    assert post(port, {"model": "placeholder", "prompt": "x", "response_format": "b64_json"}, "sk-text-log-key-00000")[0] == 200
    assert post(port, {"model": "dall-e-3", "prompt": "x"}, "sk-text-log-key-00000")[0] == 503
    proc.terminate()
    proc.wait(timeout=30)
    lines = proc.stdout.read().splitlines()
    assert any("WARNING imgproxy: provider openai has no API key" in line for line in lines)  # a logging line
    access = [line for line in lines if "imgproxy.access" in line]
    assert len(access) == 2 and "error=provider_not_configured" in access[1]  # access lines
    for line in lines:
        assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (DEBUG|INFO|WARNING|ERROR) ", line), line
        assert "=None" not in line, line


def test_the_hook_chain_benchmark_runs_from_the_checkout_as_the_readme_says():
    assert ".venv/bin/python -m tests.benchmarks.hook_chain" in " ".join((REPO / "README.md").read_text().split())
    result = subprocess.run(
        [sys.executable, "-m", "tests.benchmarks.hook_chain", "--requests", "200", "--rounds", "1"],
        cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "full built-in chain:" in result.stdout and "ratio" in result.stdout


def test_text_logs_cannot_be_forged_by_a_path(serve, tmp_path):
    # aiohttp decodes the path: a %0A in it reached the text access line as a line break, and a
    # client could append lines of its choosing (an access line of another key, say).
    import re

    config = tmp_path / "text-logs.yaml"
    forged = "2026-01-01T00:00:00.000Z INFO imgproxy.access: POST /v1/images/generations 200 key=someone-else cost_usd=99"
    config.write_text((REPO / "proxy.yaml").read_text() + "\nlogging: {format: text}\n")
    key = "sk-text-log-key-00000"
    proc, port = serve("--config", str(config), IMGPROXY_API_KEYS=key)
    breaks = ["%0A", "%0D", "%0D%0A", "%C2%85", "%E2%80%A8", "%0B%0C%1C"]  # what str.splitlines() also splits on
    for brk in breaks:
        for path in (f"/v1/models/x{brk}{quote(forged)}", f"/nothing{brk}{quote(forged)}"):
            request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers={"Authorization": f"Bearer {key}"})
            with pytest.raises(urllib.error.HTTPError) as answer:
                urllib.request.urlopen(request, timeout=10)
            assert answer.value.code == 404
    proc.terminate()
    proc.wait(timeout=30)
    lines = proc.stdout.read().splitlines()
    access = [line for line in lines if "imgproxy.access" in line]
    assert len(access) == 2 * len(breaks), access  # one line per request, however its path reads
    for line in lines:
        assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (DEBUG|INFO|WARNING|ERROR) ", line), line
        assert not line.startswith("2026-01-01T"), line


def test_a_failed_start_names_what_failed_not_the_api_port(tmp_path):
    # Every OSError at start was reported as the API port's: a taken operations port, or a
    # usage log in a folder that does not exist, read "cannot listen on <API host:port>".
    api, ops = free_port(), free_port()
    base = f"""
server: {{host: 127.0.0.1, port: {api}}}
auth: {{api_keys: sk-start-failure-key-0000}}
providers:
  placeholder: {{type: placeholder}}
models:
  placeholder: {{provider: placeholder}}
images: {{directory: {tmp_path / "images"}, signing_key: start-failure-signing-key}}
"""
    config = tmp_path / "proxy.yaml"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", ops))
        taken.listen()
        config.write_text(base + f"metrics: {{host: 127.0.0.1, port: {ops}}}\n")
        result = subprocess.run([*IMGPROXY, "serve", "--config", str(config)], cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=30)
    assert result.returncode == 2, result.stderr
    assert f"cannot listen on 127.0.0.1:{ops}: the address is already in use" in result.stderr, result.stderr
    assert f":{api}" not in result.stderr, result.stderr
    config.write_text(base + f"cost: {{usage_log: {tmp_path / 'no-such-folder' / 'usage.jsonl'}}}\n")
    assert run_imgproxy("check-config", str(config)).returncode == 0  # valid, as far as a file can say
    result = subprocess.run([*IMGPROXY, "serve", "--config", str(config)], cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=30)
    assert result.returncode == 2, result.stderr
    assert "cannot listen" not in result.stderr and f"{tmp_path / 'no-such-folder' / 'usage.jsonl'}" in result.stderr, result.stderr
    assert "Unclosed" not in result.stdout + result.stderr  # what had started was stopped again
