"""A mock OpenAI images upstream cheap enough not to be the bottleneck: a bare asyncio
protocol that answers every POST with a precomputed OpenAI-shaped response.

    python -m tests.benchmarks.mock_upstream --port 9000 --format b64_json --image-bytes 1500000 --n 1 --delay 0
    python -m tests.benchmarks.mock_upstream --port 9000 --stream --partial-images 2 --image-bytes 100000
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import time


def image_b64(size: int) -> str:
    return base64.b64encode(os.urandom(size * 3 // 4)).decode()[:size]


def json_body(fmt: str, image_bytes: int, n: int) -> bytes:
    if fmt == "url":
        data = [{"url": f"https://oaidalleapiprodscus.blob.core.windows.net/private/img-{i}.png?se=2026&sig=abc"} for i in range(n)]
    else:
        data = [{"b64_json": image_b64(image_bytes)} for _ in range(n)]
    return json.dumps({"created": int(time.time()), "data": data}).encode()


def sse_events(partial_images: int, image_bytes: int) -> list[bytes]:
    common = {"created_at": int(time.time()), "size": "1024x1024", "quality": "high", "background": "opaque", "output_format": "png"}
    events = []
    for i in range(partial_images):
        event = {"type": "image_generation.partial_image", "b64_json": image_b64(image_bytes), "partial_image_index": i, **common}
        events.append(f"event: image_generation.partial_image\ndata: {json.dumps(event)}\n\n".encode())
    usage = {"total_tokens": 4210, "input_tokens": 50, "output_tokens": 4160, "input_tokens_details": {"text_tokens": 50, "image_tokens": 0}}
    final = {"type": "image_generation.completed", "b64_json": image_b64(image_bytes), "usage": usage, **common}
    events.append(f"event: image_generation.completed\ndata: {json.dumps(final)}\n\n".encode())
    return events


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


class Upstream(asyncio.Protocol):
    def __init__(self, settings: argparse.Namespace, response: bytes, events: list[bytes]) -> None:
        self.settings, self.response, self.events = settings, response, events
        self.buffer = b""
        self.transport = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            head_end = self.buffer.find(b"\r\n\r\n")
            if head_end < 0:
                return
            length = 0
            for line in self.buffer[:head_end].split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            if len(self.buffer) < head_end + 4 + length:
                return
            self.buffer = self.buffer[head_end + 4 + length :]
            loop = asyncio.get_running_loop()
            if self.settings.stream:
                loop.call_later(self.settings.delay, lambda: asyncio.ensure_future(self.stream()))
            elif self.settings.delay:
                loop.call_later(self.settings.delay, self.send)
            else:
                self.send()

    def send(self) -> None:
        if not self.transport.is_closing():
            self.transport.write(self.response)

    async def stream(self) -> None:
        head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
        self.transport.write(head)
        for event in self.events:
            await asyncio.sleep(self.settings.event_gap)
            if self.transport.is_closing():
                return
            self.transport.write(chunk(event))
        self.transport.write(b"0\r\n\r\n")


async def main(settings: argparse.Namespace) -> None:
    body = json_body(settings.format, settings.image_bytes, settings.n)
    response = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    events = sse_events(settings.partial_images, settings.image_bytes) if settings.stream else []
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Upstream(settings, response, events), "127.0.0.1", settings.port, backlog=8192)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--format", choices=["url", "b64_json"], default="url")
    parser.add_argument("--image-bytes", type=int, default=1000)
    parser.add_argument("--n", type=int, default=1)
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--stream", action="store_true")
    parser.add_argument("--partial-images", type=int, default=2)
    parser.add_argument("--event-gap", type=float, default=0.01, help="seconds between streamed events")
    asyncio.run(main(parser.parse_args()))
