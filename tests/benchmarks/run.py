"""Side-by-side load benchmark: the mock upstream directly, a minimal aiohttp pass-through
proxy (the baseline) and imgproxy with its shipped hook chain, interleaved in one run.

    python -m tests.benchmarks.run                     # every scenario, 3 interleaved rounds
    python -m tests.benchmarks.run --scenarios small-1c,small-64c --rounds 5 --json results.json
    python -m tests.benchmarks.run --before /tmp/venv-old/bin/imgproxy   # a change, before and after, in one run

Needs wrk (Debian's `wrk`) and taskset. The proxies run pinned to CPU 0; wrk and the mock
upstream share CPU 1. Per run it reports requests/s, p50/p99 latency, errors, the proxy's CPU
use and its peak RSS; then, per scenario, medians over the rounds, the latency each proxy adds
over direct and imgproxy's ratios to the baseline.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

KEY = "sk-bench-client-key-0000000"
PROMPT = "A lighthouse on a cliff at dusk, oil painting"

SCENARIOS = {
    "small-1c": dict(mock=["--format", "url"], body={"model": "dall-e-2", "prompt": PROMPT, "size": "256x256"}, conns=1, seconds=5),
    "small-64c": dict(mock=["--format", "url"], body={"model": "dall-e-2", "prompt": PROMPT, "size": "256x256"}, conns=64, seconds=5),
    "b64-1.5MB-1c": dict(mock=["--format", "b64_json", "--image-bytes", "1500000"], body={"model": "dall-e-2", "prompt": PROMPT, "response_format": "b64_json"}, conns=1, seconds=5),
    "b64-1.5MB-16c": dict(mock=["--format", "b64_json", "--image-bytes", "1500000"], body={"model": "dall-e-2", "prompt": PROMPT, "response_format": "b64_json"}, conns=16, seconds=5),
    "n4-b64-6MB-4c": dict(mock=["--format", "b64_json", "--image-bytes", "1500000", "--n", "4"], body={"model": "dall-e-2", "prompt": PROMPT, "n": 4, "response_format": "b64_json"}, conns=4, seconds=5),
    "stream-16c": dict(mock=["--stream", "--partial-images", "2", "--image-bytes", "100000"], body={"model": "gpt-image-1", "prompt": PROMPT, "stream": True, "partial_images": 2}, conns=16, seconds=5),
    "slow-2s-1000c": dict(mock=["--format", "url", "--delay", "2"], body={"model": "dall-e-2", "prompt": PROMPT, "size": "256x256"}, conns=1000, seconds=10, timeout=30),
    "slow-10s-5000c": dict(mock=["--format", "url", "--delay", "10"], body={"model": "dall-e-2", "prompt": PROMPT, "size": "256x256"}, conns=5000, seconds=25, timeout=60),
}
TARGETS = ("direct", "baseline", "imgproxy")

IMGPROXY_CONFIG = """
server: {{host: 127.0.0.1, port: {port}, reload_interval: 0, drain_timeout: 1}}
logging: {{level: info, format: json}}
auth:
  keys:
    - name: bench
      key: {key}
      models: ["dall-e-*", gpt-image-1]
      moderation_levels: [auto]
      rate_limit: {{requests_per_minute: 1000000000, images_per_minute: 1000000000}}
      budget: {{daily_usd: 1000000000, monthly_usd: 1000000000, usd_per_minute: 1000000000}}
moderation:
  categories:
    violence: {{words: [behead, gore, "blood bath"]}}
    weapons: {{words: [bazooka, grenade]}}
providers:
  openai: {{type: openai, base_url: "http://127.0.0.1:{upstream}/v1", api_key: sk-upstream, timeouts: {{connect: 10, total: 120}}}}
models:
  dall-e-2: {{provider: openai}}
  gpt-image-1: {{provider: openai}}
images: {{directory: {images}, upstream_urls: passthrough}}
"""

WRK_SCRIPT = """
wrk.method = "POST"
wrk.body = {body}
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer {key}"
done = function(summary, latency, requests)
  io.write(string.format('RESULT {{"requests": %d, "duration_us": %d, "connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d, "p50_us": %d, "p99_us": %d}}\\n',
    summary.requests, summary.duration, summary.errors.connect, summary.errors.read, summary.errors.write,
    summary.errors.status, summary.errors.timeout, latency:percentile(50), latency:percentile(99)))
end
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def start(cpu: int, args: list[str], port: int, log=subprocess.DEVNULL, wait: float = 30) -> subprocess.Popen:
    proc = subprocess.Popen(["taskset", "-c", str(cpu), *args], stdout=log, stderr=log, preexec_fn=raise_fd_limit)
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(f"{args} exited with {proc.returncode}")
            time.sleep(0.1)
    raise RuntimeError(f"{args} did not listen on {port}")


class Sampler(threading.Thread):
    """Peak RSS and CPU seconds of one process while a run lasts."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.peak_rss, self.running = pid, 0, True
        self.cpu_start = self.cpu()

    def cpu(self) -> float:
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def rss(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    def run(self) -> None:
        while self.running:
            self.peak_rss = max(self.peak_rss, self.rss())
            time.sleep(0.05)

    def stop(self) -> float:
        self.running = False
        self.join()
        return self.cpu() - self.cpu_start


def wrk(url: str, script: Path, conns: int, seconds: float, timeout: float) -> dict:
    threads = 1 if conns == 1 else 2
    result = subprocess.run(
        ["taskset", "-c", "1", "wrk", f"-t{threads}", f"-c{conns}", f"-d{int(seconds)}s", f"--timeout={int(timeout)}s", "-s", str(script), url],
        capture_output=True, text=True, preexec_fn=raise_fd_limit, timeout=seconds + timeout + 60,
    )
    line = next((l for l in result.stdout.splitlines() if l.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"wrk failed: {result.stdout} {result.stderr}")
    return json.loads(line[len("RESULT "):])


def run_scenario(name: str, spec: dict, rounds: int, workdir: Path, before: str | None = None) -> dict:
    targets = TARGETS + ("before",) if before else TARGETS
    ports = {target: free_port() for target in targets}
    mock = start(1, [sys.executable, "-m", "tests.benchmarks.mock_upstream", "--port", str(ports["direct"]), *spec["mock"]], ports["direct"])
    baseline = start(0, [sys.executable, "-m", "tests.benchmarks.baseline_proxy", "--port", str(ports["baseline"]), "--upstream", f"http://127.0.0.1:{ports['direct']}"], ports["baseline"])
    # This Python's imgproxy (the venv's), and with --before another installed copy of it.
    binaries = {"imgproxy": str(Path(sys.executable).parent / "imgproxy"), "before": before}
    proxies = {}
    for target in targets[len(TARGETS) - 1 :]:
        config = workdir / f"{name}-{target}.yaml"
        config.write_text(IMGPROXY_CONFIG.format(port=ports[target], key=KEY, upstream=ports["direct"], images=workdir / f"images-{target}"))
        proxies[target] = start(0, [binaries[target], "serve", "--config", str(config)], ports[target])
    pids = {"direct": mock.pid, "baseline": baseline.pid, **{target: proc.pid for target, proc in proxies.items()}}
    script = workdir / f"{name}.lua"
    script.write_text(WRK_SCRIPT.format(body=json.dumps(json.dumps(spec["body"])), key=KEY))
    runs = {target: [] for target in targets}
    try:
        for target in targets:  # warm-up, not counted
            wrk(f"http://127.0.0.1:{ports[target]}/v1/images/generations", script, min(spec["conns"], 16), 1, 10)
        for _ in range(rounds):
            for target in targets:
                sampler = Sampler(pids[target])
                sampler.start()
                result = wrk(f"http://127.0.0.1:{ports[target]}/v1/images/generations", script, spec["conns"], spec["seconds"], spec.get("timeout", 10))
                cpu = sampler.stop()
                seconds = result["duration_us"] / 1e6
                runs[target].append({
                    "rps": result["requests"] / seconds,
                    "p50_ms": result["p50_us"] / 1000,
                    "p99_ms": result["p99_us"] / 1000,
                    "errors": sum(result[k] for k in ("connect", "read", "write", "status", "timeout")),
                    "cpu": cpu / seconds,
                    "peak_rss_mb": sampler.peak_rss / 2**20,
                })
                time.sleep(0.5)
    finally:
        for proc in (*proxies.values(), baseline, mock):
            proc.send_signal(signal.SIGINT)
        for proc in (*proxies.values(), baseline, mock):
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
    return runs


def summarize(runs: dict) -> dict:
    med = {t: {k: statistics.median(r[k] for r in runs[t]) for k in runs[t][0]} for t in runs}
    added = {t: med[t]["p50_ms"] - med["direct"]["p50_ms"] for t in ("baseline", "imgproxy")}
    return {
        "median": med,
        "added_p50_ms": added,
        "added_p50_ratio": added["imgproxy"] / added["baseline"] if added["baseline"] > 0 else None,
        "rps_ratio": med["imgproxy"]["rps"] / med["baseline"]["rps"],
        "rss_ratio": med["imgproxy"]["peak_rss_mb"] / med["baseline"]["peak_rss_mb"],
        **({"rps_ratio_to_before": med["imgproxy"]["rps"] / med["before"]["rps"]} if "before" in med else {}),
    }


def print_table(name: str, summary: dict, runs: dict) -> None:
    print(f"\n### {name}   (rounds: {len(runs['direct'])})")
    print("| target | req/s | p50 ms | p99 ms | added p50 ms | errors | CPU (cores) | peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|")
    for target in runs:
        m = summary["median"][target]
        added = summary["added_p50_ms"].get(target)
        print(f"| {target} | {m['rps']:.0f} | {m['p50_ms']:.2f} | {m['p99_ms']:.2f} | {'' if added is None else f'{added:.2f}'} | {m['errors']:.0f} | {m['cpu']:.2f} | {m['peak_rss_mb']:.0f} |")
    ratio = summary["added_p50_ratio"]
    print(f"imgproxy / baseline: req/s {summary['rps_ratio']:.2f}x, added p50 {'n/a' if ratio is None else f'{ratio:.2f}x'}, peak RSS {summary['rss_ratio']:.2f}x")
    if "rps_ratio_to_before" in summary:
        print(f"imgproxy / before: req/s {summary['rps_ratio_to_before']:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated, from: " + ", ".join(SCENARIOS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, help="override every scenario's run length")
    parser.add_argument("--json", help="also write all runs and summaries to this file")
    parser.add_argument("--before", help="the `imgproxy` command of another install (the code before a change), run as a fourth target")
    args = parser.parse_args()
    for needed in ("wrk", "taskset"):
        if shutil.which(needed) is None:
            sys.exit(f"{needed} is needed: apt-get install -y wrk util-linux")
    results = {}
    with tempfile.TemporaryDirectory() as workdir:
        for name in args.scenarios.split(","):
            spec = dict(SCENARIOS[name])
            if args.seconds:
                spec["seconds"] = args.seconds
            runs = run_scenario(name, spec, args.rounds, Path(workdir), args.before)
            results[name] = {"runs": runs, "summary": summarize(runs)}
            print_table(name, results[name]["summary"], runs)
            sys.stdout.flush()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
