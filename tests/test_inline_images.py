"""The reader that decodes base64 images as an answer arrives (for hosting them as URLs)."""

import base64
import binascii
import json
import os
import random

import pytest

from imgproxy.inline_images import InlineImageError, InlineImageReader


def read(raw: bytes, splits: list[int]) -> tuple[dict, list[bytes]]:
    reader = InlineImageReader()
    last = 0
    for cut in [*splits, len(raw)]:
        reader.feed(raw[last:cut])
        last = cut
    body, images = reader.finish()
    return body, [bytes(image) for image in images]


IMAGES = [os.urandom(3000), os.urandom(2999), os.urandom(1)]  # each padding length
ANSWER = {
    "created": 1713833628,
    "data": [{"b64_json": base64.b64encode(image).decode(), "revised_prompt": 'say "b64_json": "x"'} for image in IMAGES],
    "usage": {"total_tokens": 100},
}


@pytest.mark.parametrize("separators", [(",", ":"), (", ", ": "), (",\n  ", " :\t ")])
def test_images_and_the_rest_survive_any_split(separators):
    raw = json.dumps(ANSWER, separators=separators).encode().replace(b"/", b"\\/")  # JSON may escape "/"
    expected = {**ANSWER, "data": [{**item, "b64_json": ""} for item in ANSWER["data"]]}
    rng = random.Random(7)
    for _ in range(200):
        splits = sorted(rng.sample(range(1, len(raw)), rng.randint(1, 40)))
        assert read(raw, splits) == (expected, IMAGES)
    assert read(raw, list(range(1, len(raw)))) == (expected, IMAGES)  # one byte at a time


@pytest.mark.parametrize(
    "raw",
    [
        b'{"data": [{"b64_json": "aGVsbG8"}]}',  # cut short of a whole group
        b'{"data": [{"b64_json": "aGV$bG8="}]}',  # not base64
        b'{"data": [{"b64_json": "aGVs\\nbG8="}]}',  # an escape base64 never needs
        b'{"data": [{"b64_json": "aGVsbG8=',  # truncated inside the image
        b'{"data": [{"b64_json": "aGVsbG8="}',  # truncated after it
        b"<html>502 Bad Gateway</html>",
        b'["b64_json"]',
    ],
)
def test_broken_answers_are_refused(raw):
    reader = InlineImageReader()
    with pytest.raises(InlineImageError):
        for byte in range(len(raw)):
            reader.feed(raw[byte : byte + 1])
        reader.finish()


def test_a_b64_json_key_without_a_string_value_is_ordinary_json():
    raw = b'{"data": [{"b64_json": null, "url": "https://x/1.png"}, {"b64_json" : "aGk="}], "b64_json": 3}'
    body, images = read(raw, [13, 14, 15, 16, 40])
    assert body == {"data": [{"b64_json": None, "url": "https://x/1.png"}, {"b64_json": ""}], "b64_json": 3}
    assert images == [b"hi"]


# AnswerCheck: an answer relayed as it arrives, checked without holding its images.
from imgproxy.inline_images import AnswerCheck  # noqa: E402

USAGE = {"total_tokens": 100, "input_tokens": 50, "output_tokens": 50, "input_tokens_details": {"text_tokens": 10, "image_tokens": 40}}
TRICKY = {  # braces, brackets, quotes and escapes inside strings must not end the object early
    "created": 1713833628,
    "data": [{"b64_json": base64.b64encode(image).decode(), "revised_prompt": 'a "}]} \\ \\"{ b64_json"'} for image in IMAGES],
    "usage": USAGE,
    "quality": "high",
}


def check_in_pieces(raw: bytes, splits: list[int], n: int = 3, want: str = "b64_json") -> AnswerCheck:
    check = AnswerCheck(n, want)
    last = 0
    for cut in [*splits, len(raw)]:
        check.feed(raw[last:cut])
        assert not check.ended or not raw[cut:].strip(), "ended before the object did"
        last = cut
    check.finish()
    return check


def test_a_valid_answer_passes_in_any_pieces():
    raw = json.dumps(TRICKY).encode() + b"\n"
    end = raw.rindex(b"}")
    rng = random.Random(3)
    for splits in [*(sorted(rng.sample(range(1, len(raw)), rng.randint(1, 40))) for _ in range(200)), list(range(1, len(raw)))]:
        check = check_in_pieces(raw, splits)
        assert (check.images, check.usage, check.complete, check.ended) == (3, USAGE, 3, True)
    # The end is seen with the byte that closes the object, not before.
    check = AnswerCheck(3, "b64_json")
    check.feed(raw[:end])
    assert not check.ended
    check.feed(raw[end:])
    assert check.ended


@pytest.mark.parametrize(
    "raw, n",
    [
        (json.dumps(TRICKY).encode(), 2),  # more images than asked for
        (json.dumps(TRICKY).encode() + b"x", 3),  # something after the object
        (b" [" + json.dumps(TRICKY).encode() + b"]", 3),  # not an object
        (json.dumps({**TRICKY, "usage": {"total_tokens": 1}}).encode(), 3),
        (json.dumps({**TRICKY, "data": [{"url": "https://x/1.png"}]}).encode(), 3),
    ],
)
def test_a_bad_answer_fails_in_any_pieces(raw, n):
    rng = random.Random(5)
    for splits in [sorted(rng.sample(range(1, len(raw)), 10)) for _ in range(50)]:
        with pytest.raises(InlineImageError):
            check_in_pieces(raw, splits, n=n)


def test_a_url_answer_holds_no_base64():
    check_in_pieces(json.dumps({"created": 1, "data": [{"url": "https://x/1.png"}]}).encode(), [5], n=1, want="url")
    with pytest.raises(InlineImageError):
        check_in_pieces(json.dumps({"created": 1, "data": [{"url": "https://x/1.png", "b64_json": "aGk="}]}).encode(), [5], n=1, want="url")


def test_base64_that_is_only_checked_is_judged_as_strictly_as_decoded_base64():
    # Pass-through checks base64 without decoding it; it must refuse exactly what decoding does.
    rng = random.Random(11)
    alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=$ "
    for _ in range(20000):
        value = bytes(rng.choice(alphabet) for _ in range(rng.choice([1, 3, 4, 5, 8, 12])))
        try:
            expected = len(value) % 4 == 0 and bool(binascii.a2b_base64(value, strict_mode=True))
        except binascii.Error:
            expected = False
        raw = b'{"created": 1, "data": [{"b64_json": "' + value + b'"}]}'
        for keep in (0, None):
            reader = InlineImageReader(keep=keep)
            splits = sorted(rng.sample(range(1, len(raw)), 3))
            try:
                for start, end in zip([0, *splits], [*splits, len(raw)]):
                    reader.feed(raw[start:end])
                reader.finish()
                accepted = True
            except InlineImageError:
                accepted = False
            assert accepted == expected, (value, keep)
