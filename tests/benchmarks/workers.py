"""What `imgproxy serve --workers N` gives over one worker, on the small-64c scenario.

    python -m tests.benchmarks.workers [--workers 2] [--rounds 5] [--seconds 5]

One worker and N workers run side by side on the same mock upstream and are measured in
alternation (1, N, 1, N, ...); medians are reported. The proxies may use every CPU (no
pinning: N workers need N cores), and wrk and the mock upstream run on CPU 1 as in run.py, so
on a 2-core machine the load generator competes with the second worker: read the figure as
what a second core gives when the machine has no more to spare.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.benchmarks.run import IMGPROXY_CONFIG, KEY, SCENARIOS, WRK_SCRIPT, free_port, start, wrk

# Several workers with the memory backend need this said (each keeps its own limits), and one
# signing key for all.
WORKERS_CONFIG = IMGPROXY_CONFIG + "state: {{backend: memory, per_process: true}}\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=5)
    args = parser.parse_args()
    spec = SCENARIOS["small-64c"]
    cpus = ",".join(str(cpu) for cpu in range(os.cpu_count() or 1))
    imgproxy = str(Path(sys.executable).parent / "imgproxy")
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        upstream = free_port()
        mock = start(1, [sys.executable, "-m", "tests.benchmarks.mock_upstream", "--port", str(upstream), *spec["mock"]], upstream)
        script = workdir / "small.lua"
        script.write_text(WRK_SCRIPT.format(body=json.dumps(json.dumps(spec["body"])), key=KEY))
        procs, ports = {}, {}
        try:
            for count in (1, args.workers):
                ports[count] = port = free_port()
                config = workdir / f"workers-{count}.yaml"
                text = WORKERS_CONFIG.format(port=port, key=KEY, upstream=upstream, images=workdir / f"images-{count}")
                config.write_text(text.replace("upstream_urls: passthrough}", "upstream_urls: passthrough, signing_key: bench-signing-key}"))
                procs[count] = start(cpus, [imgproxy, "serve", "--config", str(config), "--workers", str(count)], port)
            rps: dict[int, list[float]] = {count: [] for count in ports}
            for count, port in ports.items():  # warm-up
                wrk(f"http://127.0.0.1:{port}/v1/images/generations", script, 16, 1, 10)
            for _ in range(args.rounds):
                for count, port in ports.items():
                    result = wrk(f"http://127.0.0.1:{port}/v1/images/generations", script, spec["conns"], args.seconds, 10)
                    rps[count].append(result["requests"] / (result["duration_us"] / 1e6))
        finally:
            for proc in (*procs.values(), mock):
                proc.send_signal(signal.SIGTERM)
            for proc in (*procs.values(), mock):
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
    medians = {count: statistics.median(values) for count, values in rps.items()}
    for count, median in medians.items():
        print(f"{count} worker(s): {median:,.0f} req/s (median of {args.rounds}: {', '.join(f'{v:.0f}' for v in rps[count])})")
    print(f"{args.workers} workers / 1 worker: {medians[args.workers] / medians[1]:.2f}x")


if __name__ == "__main__":
    main()
