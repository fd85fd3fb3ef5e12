"""Memory per in-flight request when imgproxy hosts base64 answers as URLs (it must hold the
answer to store it): peak RSS under load minus idle RSS, per concurrent request, against the
size of the image.

    python -m tests.benchmarks.hosting_memory [--connections 16] [--image-bytes 1500000] [--seconds 5]
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
import time
from pathlib import Path

from tests.benchmarks.run import IMGPROXY_CONFIG, KEY, PROMPT, WRK_SCRIPT, Sampler, free_port, start, wrk


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--image-bytes", type=int, default=1_500_000, help="size of the base64 text of one image")
    parser.add_argument("--seconds", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        work = Path(workdir)
        mock_port, port = free_port(), free_port()
        mock = start(1, [sys.executable, "-m", "tests.benchmarks.mock_upstream", "--port", str(mock_port), "--format", "b64_json", "--image-bytes", str(args.image_bytes)], mock_port)
        config = work / "hosting.yaml"
        config.write_text(IMGPROXY_CONFIG.format(port=port, key=KEY, upstream=mock_port, images=work / "images").replace("upstream_urls: passthrough", "upstream_urls: rehost"))
        imgproxy = start(0, [str(Path(sys.executable).parent / "imgproxy"), "serve", "--config", str(config)], port)
        script = work / "hosting.lua"
        script.write_text(WRK_SCRIPT.format(body=json.dumps(json.dumps({"model": "dall-e-2", "prompt": PROMPT, "response_format": "url"})), key=KEY))
        url = f"http://127.0.0.1:{port}/v1/images/generations"
        try:
            wrk(url, script, 2, 1, 10)  # warm-up
            time.sleep(1)
            idle = Sampler(imgproxy.pid).rss()
            sampler = Sampler(imgproxy.pid)
            sampler.start()
            result = wrk(url, script, args.connections, args.seconds, 30)
            sampler.stop()
        finally:
            for proc in (imgproxy, mock):
                proc.send_signal(signal.SIGINT)
                proc.wait(timeout=20)
    image = args.image_bytes * 3 / 4  # decoded bytes
    per_request = (sampler.peak_rss - idle) / args.connections
    errors = sum(result[k] for k in ("connect", "read", "write", "status", "timeout"))
    print(f"requests {result['requests']}, errors {errors}, idle RSS {idle / 2**20:.0f} MB, peak RSS {sampler.peak_rss / 2**20:.0f} MB")
    print(f"per in-flight request: {per_request / 2**20:.2f} MB = {per_request / image:.2f}x the {image / 2**20:.2f} MB image")


if __name__ == "__main__":
    main()
