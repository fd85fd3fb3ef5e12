"""Memory of `imgproxy serve` while it takes edit uploads and streams them on to an upstream:
the growth of peak RSS (VmHWM, reset before each case) for one 40 MiB image, for 8 of them at
once, for one form of 16 images of 1 MiB each (each under the 1 MiB spool threshold), and for
forms that are refused only once read: 60 images, 60 text fields, a gzip bomb.

    python -m tests.benchmarks.upload_memory [--mib 40] [--concurrent 8]

The upstream is a sink in another process (`upload_memory sink`) that reads each form part by
part, throws the bytes away and answers like OpenAI. Bounded: a handful of requests, loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import signal
import sys
import tempfile
import zlib
from pathlib import Path

import aiohttp
from aiohttp import web

from tests.benchmarks.run import KEY, free_port, start

PNG = bytes.fromhex("89504e470d0a1a0a0000000d49484452000000400000004008020000002512")  # a 64x64 PNG's head
CONFIG = """
server: {{host: 127.0.0.1, port: {port}, reload_interval: 0, drain_timeout: 1}}
auth: {{keys: [{{name: bench, key: {key}}}]}}
providers:
  openai: {{type: openai, base_url: "http://127.0.0.1:{upstream}/v1", api_key: sk-upstream, timeouts: {{connect: 10, total: 120}}}}
models:
  gpt-image-1: {{provider: openai}}
images: {{directory: {images}}}
"""


async def sink(port: int) -> None:
    answer = {"created": 1, "data": [{"b64_json": base64.b64encode(PNG).decode()}], "usage": {"total_tokens": 3, "input_tokens": 2, "output_tokens": 1}}

    async def edits(request: web.Request) -> web.Response:
        received = 0
        async for part in await request.multipart():
            while chunk := await part.read_chunk(1 << 16):
                received += len(chunk)
        await asyncio.sleep(1)  # so that concurrent uploads are all in flight together
        return web.json_response({**answer, "received": received})

    app = web.Application()
    app.router.add_post("/v1/images/edits", edits)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    await asyncio.Event().wait()


def rss(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(field)


async def edit(session: aiohttp.ClientSession, url: str, images: list[bytes]) -> int:
    form = aiohttp.FormData()
    form.add_field("model", "gpt-image-1")
    form.add_field("prompt", "p")
    texts = [image for image in images if not image.startswith(PNG)]
    for index, text in enumerate(texts):  # text fields (the schema refuses them, once all are read)
        form.add_field(f"field{index}", text.decode())
    images = [image for image in images if image.startswith(PNG)] or [PNG]
    for index, image in enumerate(images):
        form.add_field("image[]" if len(images) > 1 else "image", image, filename=f"{index}.png", content_type="image/png")
    async with session.post(url, data=form, headers={"Authorization": f"Bearer {KEY}"}) as resp:
        await resp.read()
        return resp.status


def gzip_bomb(inflated_mib: int) -> bytes:
    """A form whose image is `inflated_mib` MiB of zeros, gzip-compressed (about 1,000:1)."""
    head = (f"--B\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\ngpt-image-1\r\n--B\r\n"
            "Content-Disposition: form-data; name=\"prompt\"\r\n\r\np\r\n--B\r\n"
            "Content-Disposition: form-data; name=\"image\"; filename=\"a.png\"\r\n\r\n").encode() + PNG
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)
    out = [packer.compress(head)] + [packer.compress(bytes(2**20)) for _ in range(inflated_mib)]
    return b"".join([*out, packer.compress(b"\r\n--B--\r\n"), packer.flush()])


async def bomb(session: aiohttp.ClientSession, url: str, body: bytes) -> int:
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "multipart/form-data; boundary=B", "Content-Encoding": "gzip"}
    async with session.post(url, data=body, headers=headers) as resp:
        await resp.read()
        return resp.status


async def measure(pid: int, url: str, label: str, forms: list[list[bytes]] | bytes) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # peak RSS := current RSS
    before = rss(pid, "VmRSS")
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        if isinstance(forms, bytes):
            statuses = [await bomb(session, url, forms)]
        else:
            statuses = await asyncio.gather(*(edit(session, url, images) for images in forms))
    peak = rss(pid, "VmHWM")
    sent = len(forms) if isinstance(forms, bytes) else sum(map(len, forms[0])) * len(forms)
    print(f"{label}: statuses {sorted(set(statuses))}, {sent / 2**20:.0f} MiB uploaded, "
          f"RSS before {before / 2**20:.0f} MiB, peak growth {(peak - before) / 2**20:.1f} MiB")


async def client(args: argparse.Namespace) -> None:
    big = PNG + os.urandom(args.mib * 2**20 - len(PNG))
    small = PNG + os.urandom(2**20 - len(PNG) - 1024)
    cases = [
        (f"one {args.mib} MiB image", [[big]]),
        (f"{args.concurrent} x {args.mib} MiB at once", [[big]] * args.concurrent),
        ("one form of 16 images of 1 MiB", [[small] * 16]),
        ("one form of 60 images of 1 MiB (refused: too many)", [[small] * 60]),
        ("one form of 60 text fields of 250 KiB (refused: unknown)", [[b"t" * 250 * 1024] * 60]),
        ("a gzip body inflating to 1 GiB (refused at max_upload_bytes)", gzip_bomb(1024)),
    ]
    with tempfile.TemporaryDirectory() as workdir:
        work = Path(workdir)
        upstream = free_port()
        mock = start(1, [sys.executable, "-m", "tests.benchmarks.upload_memory", "sink", "--port", str(upstream)], upstream)
        try:
            for label, forms in cases:  # each in a fresh process: a heap grown by one case hides the next
                port = free_port()
                config = work / "proxy.yaml"
                config.write_text(CONFIG.format(port=port, key=KEY, upstream=upstream, images=work / "images"))
                imgproxy = start(0, [str(Path(sys.executable).parent / "imgproxy"), "serve", "--config", str(config)], port)
                url = f"http://127.0.0.1:{port}/v1/images/edits"
                try:
                    await measure(imgproxy.pid, url, "  warm-up, one 1 KiB image", [[PNG + bytes(1024)]])
                    await measure(imgproxy.pid, url, label, forms)
                finally:
                    imgproxy.send_signal(signal.SIGINT)
                    imgproxy.wait(timeout=20)
        finally:
            mock.send_signal(signal.SIGINT)
            mock.wait(timeout=20)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("role", nargs="?", choices=["client", "sink"], default="client")
    parser.add_argument("--port", type=int)
    parser.add_argument("--mib", type=int, default=40)
    parser.add_argument("--concurrent", type=int, default=8)
    args = parser.parse_args()
    asyncio.run(sink(args.port) if args.role == "sink" else client(args))


if __name__ == "__main__":
    main()
