"""The tap that counts images and finds usage in answers streamed through, whatever the chunking."""

import json
import random

import pytest

from imgproxy.relay import StreamTap

BODY = json.dumps({
    "created": 1,
    "data": [{"b64_json": "A" * 5000}, {"b64_json": "B" * 3000}, {"b64_json": "C"}],
    "usage": {"total_tokens": 100, "input_tokens": 50, "output_tokens": 50, "input_tokens_details": {"text_tokens": 10, "image_tokens": 40}},
}).encode()
EVENTS = b"".join(
    f"event: {kind}\ndata: {json.dumps({'type': kind, 'b64_json': 'x' * 700, **extra})}\n\n".encode()
    for kind, extra in [
        ("image_generation.partial_image", {}),
        ("image_generation.completed", {"usage": {"total_tokens": 7}}),
        ("image_generation.completed", {"usage": {"total_tokens": 9}}),
    ]
)

# An edit's events, and one of a generation's among them (an upstream off the spec): both count.
MIXED = EVENTS.replace(b"image_generation", b"image_edit", 4)


@pytest.mark.parametrize("seed", range(25))
@pytest.mark.parametrize("body, sse, images, total_tokens", [(BODY, False, 3, 100), (EVENTS, True, 2, 9), (MIXED, True, 2, 9)])
def test_any_chunking(seed, body, sse, images, total_tokens):
    rng = random.Random(seed)
    tap = StreamTap(sse=sse)
    at = 0
    while at < len(body):
        size = rng.choice([1, 2, 3, 7, 64, 1000, 100000])
        tap.feed(body[at : at + size])
        at += size
    tap.finish()
    assert tap.images == images
    assert tap.usage["total_tokens"] == total_tokens
