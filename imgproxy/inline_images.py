"""Reading an OpenAI images answer as it arrives, without holding it whole: to host its images
(decoded on the way), or to check an answer that is relayed to the client byte for byte.

A `b64_json` answer is ~1.33x the size of its images. Parsed as a whole, the raw body, the
parsed text and the decoded image all live at once (2.5-3x the image per request). Here the
base64 values are decoded as their bytes arrive and the rest of the body (created, usage,
revised prompts…) is kept as a small JSON skeleton in which each `b64_json` value is "".
"""

from __future__ import annotations

import binascii
import re

from . import untrusted_json

KEY = b'"b64_json"'
_WHITESPACE = b" \t\r\n"
# Everything but the images: created, usage, revised prompts (at most 4,000 characters each).
MAX_SKELETON = 1024 * 1024
_BASE64 = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_FRAMING = re.compile(rb'["\\{}\[\]]')  # the bytes that open or close strings, objects and arrays


class InlineImageError(ValueError):
    """The answer is not the JSON object with base64 images it claims to be."""


class InlineImageReader:
    """Feed it the body's chunks in order; `finish()` returns the skeleton and the images.

    Only the first `keep` images are kept (None for the others, which are still checked), so
    an upstream that sends more images than were asked for cannot make the gateway hold them.
    """

    def __init__(self, keep: int | None = None) -> None:
        self.images: list[bytearray | None] = []
        self.keep = keep
        self._skeleton = bytearray()
        self._pending = b""  # bytes not yet decided on: a key, or base64 short of 4 characters
        self._in_value = False
        self._size = 0  # decoded bytes of the current image
        self._padded = False  # the current image's base64 has ended with "=": nothing may follow
        self._chars = self._padding = 0  # base64 characters and "=" of an image only checked
        # Where the skeleton stands in the JSON text: nesting depth, inside a string, a byte
        # escaped at the start of the next piece, and whether the top-level object has ended.
        self._depth = 0
        self._in_string = self._escaped = self.ended = False

    @property
    def complete(self) -> int:
        """Images whose base64 has been read to its closing quote."""
        return len(self.images) - self._in_value

    def feed(self, chunk: bytes) -> None:
        data = self._pending + chunk if self._pending else chunk
        self._pending = b""
        at = 0
        while at < len(data):
            at = self._value(data, at) if self._in_value else self._outside(data, at)
            if at < 0:  # wait for more bytes
                return

    def _outside(self, data: bytes, at: int) -> int:
        found = data.find(KEY, at)
        if found < 0:
            keep = min(len(data) - at, len(KEY) - 1)  # a key may straddle two chunks
            while keep and not KEY.startswith(data[len(data) - keep :]):
                keep -= 1  # only what could begin one: the rest (an object's end) is seen now
            self._add_skeleton(data[at : len(data) - keep])
            self._pending = data[len(data) - keep :]
            return -1 if keep else len(data)
        end = found + len(KEY)
        # After the key: whitespace, a colon, whitespace, the opening quote.
        colon_seen = False
        while end < len(data) and (data[end] in _WHITESPACE or (data[end] == 0x3A and not colon_seen)):
            colon_seen = colon_seen or data[end] == 0x3A
            end += 1
        if end == len(data):
            self._add_skeleton(data[at:found])
            self._pending = data[found:]
            return -1
        if not colon_seen or data[end] != 0x22:  # not a key with a string value: ordinary text
            self._add_skeleton(data[at:end])
            return end
        self._add_skeleton(data[at : end + 1] + b'"')  # the value becomes ""
        self.images.append(bytearray() if self.keep is None or len(self.images) < self.keep else None)
        self._in_value, self._size, self._padded = True, 0, False
        self._chars = self._padding = 0  # base64 characters and "=" of an image only checked
        return end + 1

    def _add_skeleton(self, text: bytes) -> None:
        if text:
            self._frame(text)
        self._skeleton += text
        if len(self._skeleton) > MAX_SKELETON:
            raise InlineImageError(f"the answer holds more than {MAX_SKELETON} bytes besides its images")

    def _value(self, data: bytes, at: int) -> int:
        close = data.find(b'"', at)
        stop = len(data) if close < 0 else close
        text = data if at == 0 and stop == len(data) else data[at:stop]
        if b"\\" in text:
            text = text.replace(b"\\/", b"/")  # the one escape base64 can need
            if b"\\" in text:
                if close < 0 and text.endswith(b"\\"):  # an escape cut in two
                    self._pending = data[at:stop]
                    return -1
                raise InlineImageError("an image's base64 holds an escape sequence")
        if self.images[-1] is None:
            self._check(text)  # checked in any pieces: nothing waits for a group of four
            if close < 0:
                return -1
            if self._chars % 4:
                raise InlineImageError("an image's base64 is cut short")
            self._size = self._chars // 4 * 3 - self._padding
        elif close < 0:
            whole = len(text) - len(text) % 4
            self._decode(text[:whole])
            self._pending = text[whole:]
            return -1
        elif len(text) % 4:
            raise InlineImageError("an image's base64 is cut short")
        else:
            self._decode(text)
        if not self._size:
            raise InlineImageError("an image is empty")
        self._in_value = False
        return close + 1

    def _check(self, text: bytes) -> None:
        """Base64 that is checked, not kept: deleting the alphabet is ~6x faster than
        decoding, and needs no copy of a read that lies inside the value."""
        if self._padding and text.strip(b"="):
            raise InlineImageError("an image's base64 goes on after its padding")
        rest = text.translate(None, _BASE64)
        if rest:
            padding = len(text) - len(text.rstrip(b"="))
            if rest.strip(b"=") or len(rest) != padding:
                raise InlineImageError("an image is not valid base64")
            self._padding += padding
            if self._padding > 2:
                raise InlineImageError("an image is not valid base64")
        self._chars += len(text)

    def _frame(self, text: bytes) -> None:
        """Follow the skeleton's nesting, so that bytes that cannot begin a JSON object, or any
        after its end, are refused when they arrive rather than when the answer is over."""
        skip = 0 if self._escaped else -1  # the byte after a backslash inside a string
        self._escaped = False
        start = 0
        if self._depth == 0:
            rest = text.lstrip(_WHITESPACE)
            if not rest:
                return
            if self.ended or rest[0] != 0x7B:
                raise InlineImageError("the answer is not one JSON object")
            start = len(text) - len(rest)
        for match in _FRAMING.finditer(text, start):
            at = match.start()
            byte = text[at]
            if at == skip:
                continue
            if self._in_string:
                if byte == 0x5C:
                    skip = at + 1
                    self._escaped = skip == len(text)
                elif byte == 0x22:
                    self._in_string = False
            elif byte == 0x22:
                self._in_string = True
            elif byte in b"{[":
                self._depth += 1
            elif byte in b"}]":
                self._depth -= 1
                if self._depth == 0:
                    self.ended = True
                    if text[at + 1 :].strip(_WHITESPACE):
                        raise InlineImageError("the answer goes on after its JSON object")
                    return

    def _decode(self, text: bytes) -> None:
        if not text:
            return
        if self._padded:  # "=" ended an earlier piece: each piece alone would pass strict mode
            raise InlineImageError("an image's base64 goes on after its padding")
        try:
            decoded = binascii.a2b_base64(text, strict_mode=True)
        except binascii.Error:
            raise InlineImageError("an image is not valid base64") from None
        self._size += len(decoded)
        self._padded = text.endswith(b"=")
        self.images[-1] += decoded

    def finish(self) -> tuple[dict, list[bytearray]]:
        if self._in_value:
            raise InlineImageError("the answer ends inside an image")
        self._add_skeleton(self._pending)
        self._pending = b""
        try:
            body = untrusted_json.loads(self._skeleton)
        except ValueError:  # UnicodeDecodeError and untrusted_json's bounds included
            raise InlineImageError("the answer is not JSON") from None
        if not isinstance(body, dict):
            raise InlineImageError("the answer is not a JSON object")
        return body, self.images


# ImagesResponse fields with a fixed set of values.
RESPONSE_ENUMS = {
    "background": ("transparent", "opaque"),
    "output_format": ("png", "webp", "jpeg"),
    "size": ("1024x1024", "1024x1536", "1536x1024"),
    "quality": ("low", "medium", "high"),
}
_IMAGE_FIELDS = ("b64_json", "url", "revised_prompt")


def valid_usage(usage) -> bool:
    """Whether `usage` is an ImagesResponse usage object: whole, non-negative token counts."""
    if not isinstance(usage, dict) or not isinstance(usage.get("input_tokens_details"), dict):
        return False
    details = usage["input_tokens_details"]
    counts = [usage.get(k) for k in ("total_tokens", "input_tokens", "output_tokens")]
    counts += [details.get("text_tokens"), details.get("image_tokens")]
    if "output_tokens_details" in usage:  # optional, but when sent the schema requires its counts
        output = usage["output_tokens_details"]
        if not isinstance(output, dict):
            return False
        counts += [output.get("text_tokens"), output.get("image_tokens")]
    return all(type(count) is int and count >= 0 for count in counts)


def valid_base64(text: str | bytes) -> bool:
    """Whether `text` is whole, non-empty, strictly padded base64 (checked, not decoded)."""
    if isinstance(text, str):
        if not text.isascii():
            return False
        text = text.encode("ascii")
    if not text or len(text) % 4:
        return False
    rest = text.translate(None, _BASE64)
    padding = len(text) - len(text.rstrip(b"="))
    return not rest.strip(b"=") and len(rest) == padding <= 2


def check_answer(body: dict, want: str, n: int) -> list:
    """The image list of an answer that may reach the client as it is: an ImagesResponse with
    at most `n` images, each in the format `want` and in no other. InlineImageError if not."""
    if type(body.get("created")) is not int:
        raise InlineImageError("the answer has no creation time")
    data = body.get("data")
    if not isinstance(data, list):
        raise InlineImageError("the answer has no image list")
    if len(data) > n:
        raise InlineImageError(f"the answer holds {len(data)} images where {n} were asked for")
    other = "url" if want == "b64_json" else "b64_json"
    for item in data:
        if not isinstance(item, dict) or not isinstance(item.get(want), str) or item.get(other) is not None:
            raise InlineImageError(f"an image is not in the format asked for ({want})")
        if any(key in item and not isinstance(item[key], str) for key in _IMAGE_FIELDS):
            raise InlineImageError("an image has a field that is not a string")
    for key, allowed in RESPONSE_ENUMS.items():
        if key in body and body[key] not in allowed:
            raise InlineImageError(f"the answer's {key} is not one of {allowed}")
    if "usage" in body and not valid_usage(body["usage"]):
        raise InlineImageError("the answer's usage is not a usage object")
    return data


class AnswerCheck:
    """Checks an images answer that is relayed to the client as it arrives, holding only its
    skeleton: `feed` raises InlineImageError at the first fault a prefix shows (not JSON, broken
    base64, more images than `n`, base64 where URLs were asked for), `finish` at the rest.
    Then `images` and `usage` are the answer's."""

    sse = False

    def __init__(self, n: int, want: str) -> None:
        self.n, self.want = n, want
        self.images = 0
        self.usage: dict | None = None
        self._most = n if want == "b64_json" else 0
        self._whole: dict | None = None  # the answer, when its first read held all of it
        self._reader: InlineImageReader | None = None  # else made to read it piece by piece
        self._size = -1  # bytes read, once the first read was looked at

    @property
    def complete(self) -> int:
        """Images read whole so far."""
        return self._reader.complete if self._reader is not None else 0

    @property
    def ended(self) -> bool:
        """Whether the answer's JSON object has been read to its end."""
        return self._whole is not None or (self._reader is not None and self._reader.ended)

    def feed(self, chunk: bytes) -> None:
        if self._size < 0:
            self._size = len(chunk)
            if self._check_whole(chunk):
                return
        elif self._whole is not None:
            self._size += len(chunk)
            if chunk.strip(_WHITESPACE):
                raise InlineImageError("the answer goes on after its JSON object")
            if self._size > MAX_SKELETON:
                raise InlineImageError(f"the answer holds more than {MAX_SKELETON} bytes besides its images")
            return
        if self._reader is None:
            self._reader = InlineImageReader(keep=0)
        self._reader.feed(chunk)
        if len(self._reader.images) > self._most:
            raise InlineImageError(f"the answer holds more base64 images than the {self._most} expected")

    def _check_whole(self, chunk: bytes) -> bool:
        """The common small answer: all of it in the first read, and no base64 in it. Then the
        answer is its own skeleton, and one bounded parse and `check_answer` decide what the
        piece-by-piece reading would, at a third of the cost. False: read it piece by piece."""
        if KEY in chunk or len(chunk) > MAX_SKELETON or not chunk.rstrip(_WHITESPACE).endswith(b"}"):
            return False
        try:
            body = untrusted_json.loads(chunk)
        except untrusted_json.UntrustedJsonError:  # beyond the bounds whatever follows
            raise InlineImageError("the answer is not JSON this gateway accepts") from None
        except ValueError:  # the answer goes on in the next read, or is not JSON: the reader says which
            return False
        if not isinstance(body, dict):
            return False
        data = check_answer(body, self.want, self.n)
        if self.want == "b64_json" and data:  # its images would be "b64_json" values
            raise InlineImageError("the answer holds base64 images outside its image list")
        self._whole = body
        return True

    def finish(self) -> None:
        if self._whole is not None:
            self.images, self.usage = len(self._whole["data"]), self._whole.get("usage")
            return
        body, values = (self._reader or InlineImageReader(keep=0)).finish()
        data = check_answer(body, self.want, self.n)
        if len(values) != (len(data) if self.want == "b64_json" else 0):
            raise InlineImageError("the answer holds base64 images outside its image list")
        self.images, self.usage = len(data), body.get("usage")
