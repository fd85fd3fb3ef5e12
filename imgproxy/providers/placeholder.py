"""A development provider: real PNGs made locally from the prompt, size and image index.

No network and no key: for trying imgproxy out, demos and CI. The picture is a grid of
coloured tiles, derived from a SHA-256 of (prompt, size, index), so the same
request always yields the same bytes. It generates nothing the prompt describes.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import struct
import time
import zlib

from ..catalog import load_models
from ..messages import GeneratedImage, ImageRequest, ImagesResult
from .base import Provider

GRID = 8


class PlaceholderProvider(Provider):
    type = "placeholder"
    needs_key = False
    models = load_models(__name__, "placeholder.yaml")

    async def generate(self, request: ImageRequest, target, plan, call) -> ImagesResult:
        return await self.draw(request, request.prompt)

    async def edit(self, request: ImageRequest, target, plan, call) -> ImagesResult:
        # Another picture for other input images: the seed covers their bytes too.
        return await self.draw(request, "\0".join([request.prompt, *(image.digest for image in request.form.images)]))

    vary = edit

    async def draw(self, request: ImageRequest, seed: str) -> ImagesResult:
        width, _, height = request.size.replace("auto", "1024x1024").partition("x")
        pngs = await asyncio.to_thread(lambda: [placeholder_png(seed, int(width), int(height), index) for index in range(request.n)])
        images = [GeneratedImage(b64_json=base64.b64encode(png).decode(), content_type="image/png") for png in pngs]
        return ImagesResult(created=int(time.time()), images=images)


def placeholder_png(prompt: str, width: int, height: int, seed: int = 0) -> bytes:
    digest = hashlib.sha256(f"{prompt}\0{width}x{height}\0{seed}".encode()).digest()
    palette = [digest[i : i + 3] for i in range(0, 30, 3)]
    # Tile colours chosen by the digest's bits; each grid row of tiles is one repeated scanline.
    bits = int.from_bytes(hashlib.sha256(digest).digest(), "big")
    rows = bytearray()
    for tile_row in range(GRID):
        line = bytearray()
        for tile_col in range(GRID):
            colour = palette[(bits >> ((tile_row * GRID + tile_col) * 3)) % len(palette)]
            span = (tile_col + 1) * width // GRID - tile_col * width // GRID
            line += colour * span
        tile_height = (tile_row + 1) * height // GRID - tile_row * height // GRID
        rows += (b"\x00" + bytes(line)) * tile_height
    return _png(width, height, zlib.compress(bytes(rows), 6))


def _png(width: int, height: int, idat: bytes) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
