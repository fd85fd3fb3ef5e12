"""Reading an OpenAI images answer whose images will be hosted, without holding it whole.

A `b64_json` answer is ~1.33x the size of its images. Parsed as a whole, the raw body, the
parsed text and the decoded image all live at once (2.5-3x the image per request). Here the
base64 values are decoded as their bytes arrive and the rest of the body (created, usage,
revised prompts…) is kept as a small JSON skeleton in which each `b64_json` value is "".
"""

from __future__ import annotations

import binascii

from . import untrusted_json

KEY = b'"b64_json"'
_WHITESPACE = b" \t\r\n"


class InlineImageError(ValueError):
    """The answer is not the JSON object with base64 images it claims to be."""


class InlineImageReader:
    """Feed it the body's chunks in order; `finish()` returns the skeleton and the images."""

    def __init__(self) -> None:
        self.images: list[bytearray] = []
        self._skeleton = bytearray()
        self._pending = b""  # bytes not yet decided on: a key, or base64 short of 4 characters
        self._in_value = False

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
            self._skeleton += data[at : len(data) - keep]
            self._pending = data[len(data) - keep :]
            return -1 if keep else len(data)
        end = found + len(KEY)
        # After the key: whitespace, a colon, whitespace, the opening quote.
        colon_seen = False
        while end < len(data) and (data[end] in _WHITESPACE or (data[end] == 0x3A and not colon_seen)):
            colon_seen = colon_seen or data[end] == 0x3A
            end += 1
        if end == len(data):
            self._skeleton += data[at:found]
            self._pending = data[found:]
            return -1
        if not colon_seen or data[end] != 0x22:  # not a key with a string value: ordinary text
            self._skeleton += data[at:end]
            return end
        self._skeleton += data[at : end + 1] + b'"'  # the value becomes ""
        self.images.append(bytearray())
        self._in_value = True
        return end + 1

    def _value(self, data: bytes, at: int) -> int:
        close = data.find(b'"', at)
        stop = len(data) if close < 0 else close
        text = data[at:stop]
        if b"\\" in text:
            text = text.replace(b"\\/", b"/")  # the one escape base64 can need
            if b"\\" in text:
                if close < 0 and text.endswith(b"\\"):  # an escape cut in two
                    self._pending = data[at:stop]
                    return -1
                raise InlineImageError("an image's base64 holds an escape sequence")
        if close < 0:
            whole = len(text) - len(text) % 4
            self._decode(text[:whole])
            self._pending = text[whole:]
            return -1
        if len(text) % 4:
            raise InlineImageError("an image's base64 is cut short")
        self._decode(text)
        self._in_value = False
        return close + 1

    def _decode(self, text: bytes) -> None:
        if not text:
            return
        try:
            self.images[-1] += binascii.a2b_base64(text, strict_mode=True)
        except binascii.Error:
            raise InlineImageError("an image is not valid base64") from None

    def finish(self) -> tuple[dict, list[bytearray]]:
        if self._in_value:
            raise InlineImageError("the answer ends inside an image")
        self._skeleton += self._pending
        try:
            body = untrusted_json.loads(self._skeleton)
        except ValueError:  # UnicodeDecodeError and untrusted_json's bounds included
            raise InlineImageError("the answer is not JSON") from None
        if not isinstance(body, dict):
            raise InlineImageError("the answer is not a JSON object")
        return body, self.images
