"""CPU instructions per request, counted by valgrind: a figure the machine's noise does not move.

    python -m tests.benchmarks.instructions [--seconds 30] [--targets baseline,imgproxy] [--python OTHER_VENV/bin/python]

Needs valgrind (Debian's `valgrind`) and wrk. Each proxy runs under callgrind with
instrumentation off while it starts and warms up; it is switched on for a run of small `url`
answers at 64 connections (the small-64c scenario of `run.py`, same config and mock upstream),
and the instructions executed are divided by the requests served. Under valgrind a proxy is
~30x slower, so a run serves a few hundred to a few thousand requests; requests in flight when
counting starts and stops roughly cancel out.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.benchmarks.run import (
    IMGPROXY_CONFIG,
    KEY,
    SCENARIOS,
    WRK_SCRIPT,
    free_port,
    start,
    wrk,
)


PYTHONS: dict[str, str] = {}


def count(target: str, upstream: int, workdir: Path, script: Path, seconds: float) -> dict:
    port = free_port()
    if target == "baseline":
        args = ["-m", "tests.benchmarks.baseline_proxy", "--port", str(port), "--upstream", f"http://127.0.0.1:{upstream}"]
    else:
        config = workdir / "imgproxy.yaml"
        config.write_text(IMGPROXY_CONFIG.format(port=port, key=KEY, upstream=upstream, images=workdir / "images"))
        # -P: the installed imgproxy, not the checkout this runs from.
        args = ["-P", "-m", "imgproxy", "serve", "--config", str(config)]
    log = workdir / f"{target}.callgrind.log"
    # A venv's python (a link to the interpreter, so valgrind runs the interpreter itself, and
    # Python still finds the venv from the path it was started by); `before` is another venv's.
    python = os.path.abspath(PYTHONS.get(target, sys.executable))
    command = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={workdir / target}.out", python, *args]
    with log.open("w") as out:
        proc = start(0, command, port, log=out, wait=300)  # start-up under valgrind is slow
    try:
        url = f"http://127.0.0.1:{port}/v1/images/generations"
        wrk(url, script, 16, 3, 20)  # warm-up, not counted
        subprocess.run(["callgrind_control", "-i", "on", str(proc.pid)], check=True, capture_output=True)
        result = wrk(url, script, 64, seconds, 30)
        subprocess.run(["callgrind_control", "-i", "off", str(proc.pid)], check=True, capture_output=True)
    finally:
        proc.send_signal(2)
        proc.wait(timeout=120)
    collected = re.search(r"Collected : (\d+)", log.read_text())
    if collected is None:
        raise RuntimeError(f"no instruction count in {log}")
    return {"requests": result["requests"], "instructions": int(collected.group(1)), "per_request": int(collected.group(1)) // result["requests"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--targets", default="baseline,imgproxy")
    parser.add_argument("--python", help="the Python of another venv with imgproxy installed (the code before a change): adds a target `before`")
    args = parser.parse_args()
    if args.python:
        PYTHONS["before"] = args.python
        args.targets += ",before"
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        upstream = free_port()
        mock = start(1, [sys.executable, "-m", "tests.benchmarks.mock_upstream", "--port", str(upstream), "--format", "url"], upstream)
        script = workdir / "small.lua"
        script.write_text(WRK_SCRIPT.format(body=json.dumps(json.dumps(SCENARIOS["small-64c"]["body"])), key=KEY))
        try:
            results = {target: count(target, upstream, workdir, script, args.seconds) for target in args.targets.split(",")}
        finally:
            mock.terminate()
            mock.wait(timeout=10)
    for target, result in results.items():
        print(f"{target:9} {result['per_request']:>10,} instructions per request ({result['requests']} requests)")
    if {"baseline", "imgproxy"} <= results.keys():
        print(f"imgproxy / baseline: {results['imgproxy']['per_request'] / results['baseline']['per_request']:.2f}x")
    if {"before", "imgproxy"} <= results.keys():
        print(f"imgproxy / before: {results['imgproxy']['per_request'] / results['before']['per_request']:.3f}x")


if __name__ == "__main__":
    main()
