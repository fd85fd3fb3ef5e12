"""JSON from outside the gateway (client bodies, provider answers), parsed within bounds.

The standard parser accepts things that later turn into 500s: nesting deep enough for a
RecursionError, integers of thousands of digits (slow to convert, and OverflowError once
multiplied by a float price), NaN and Infinity (not JSON), and `\\ud800`-style escapes of
lone surrogates (not text: `.encode()` fails on them). Here every one of those is a
`ValueError`, which callers already map to 400 (client) or 502 (provider).
"""

from __future__ import annotations

import json
import math

MAX_DEPTH = 64  # a request body is flat; OpenAI's and Stability's answers nest 4 deep
MAX_INT = 2**63  # integers must fit in a signed 64-bit word, as in every JSON library


class UntrustedJsonError(ValueError):
    """The input is JSON the gateway does not accept."""


def _int(text: str) -> int:
    # Length first: converting a 4,000-digit string is the slow part.
    if len(text) > 20 or not -MAX_INT <= (value := int(text)) < MAX_INT:
        raise UntrustedJsonError(f"an integer is outside the 64-bit range ({text[:24]}…)")
    return value


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise UntrustedJsonError(f"a number is too large ({text[:24]})")
    return value


def _constant(name: str):
    raise UntrustedJsonError(f"{name} is not JSON")


_DECODER = json.JSONDecoder(parse_int=_int, parse_float=_float, parse_constant=_constant)
# What JSONDecoder.decode does, without its two Python calls (a third of a small parse).
_SCAN = _DECODER.scan_once
_SPACE = json.decoder.WHITESPACE.match


def loads(raw: bytes | str, *, text_only: bool = False, max_depth: int = MAX_DEPTH) -> object:
    """Parse `raw` (UTF-8) or raise ValueError. `text_only` also refuses lone surrogates."""
    try:
        text = raw.decode("utf-8") if isinstance(raw, (bytes, bytearray)) else raw
        try:
            value, end = _SCAN(text, _SPACE(text, 0).end())
            whole = end == len(text) or _SPACE(text, end).end() == len(text)
        except StopIteration:
            whole = False
        if not whole:
            value = _DECODER.decode(text)  # not JSON: the decoder's own error says why
    except RecursionError:
        raise UntrustedJsonError(f"it is nested more than {max_depth} levels deep") from None
    # Cheap tests in C first: few brackets cannot nest deeply, no backslash-u means no surrogate.
    deep = text.count("[") + text.count("{") > max_depth
    escaped = text_only and "\\u" in text
    if deep or escaped:
        _walk(value, max_depth if deep else None, escaped)
    return value


def raw_decode(text: str, at: int = 0) -> tuple[object, int]:
    """Like json.JSONDecoder.raw_decode, within the same bounds (for a value inside other text)."""
    try:
        return _DECODER.raw_decode(text, at)
    except RecursionError:
        raise UntrustedJsonError("it is nested too deeply") from None


def _walk(value: object, max_depth: int | None, check_text: bool) -> None:
    stack = [(value, 0)]  # iterative: the point is not to recurse
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if max_depth is not None and depth >= max_depth:
                raise UntrustedJsonError(f"it is nested more than {max_depth} levels deep")
            if isinstance(item, dict):
                if check_text:
                    for key in item:
                        _check_text(key)
                item = item.values()
            stack.extend((child, depth + 1) for child in item)
        elif check_text and isinstance(item, str):
            _check_text(item)


def _check_text(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise UntrustedJsonError("a string holds a lone surrogate (an escape like \\ud800 that is not a character)") from None
