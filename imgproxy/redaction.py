"""Credentials out of text that came from an upstream, before it reaches a client or a log line.

One function, `redact`, used wherever upstream text may leave the gateway. It removes the
keys it is given in any disguise seen in error bodies (case changed, whitespace inserted,
percent- or JSON-escaped, only a part of 8 characters or more), and anything shaped like a
credential even when no key is given: `sk-…`, `Bearer …`, long base64 or hex tokens.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

REDACTED = "[redacted]"
MIN_PART = 8  # a run this long taken from a key counts as the key
MAX_INPUT = 8000  # upstream text looked at; more is cut before the work starts
MAX_OUTPUT = 1000

# One character of the text as an upstream may disguise it: %XX, \u00XX, or itself.
_ESCAPED = re.compile(r"%([0-9A-Fa-f]{2})|\\u00([0-9A-Fa-f]{2})|(.)", re.DOTALL)
_SHAPES = (
    re.compile(r"\b(?:bearer|basic)\s+[^\s\"',;]{6,}", re.IGNORECASE),
    re.compile(r"\b(?:sk|pk|rk)[-_][A-Za-z0-9_*.\-]*[A-Za-z0-9_*]", re.IGNORECASE),
    # A token ≥ 20 characters with a digit in it: base64, hex, JWT parts (a JWT's dots end it).
    re.compile(r"(?<![A-Za-z0-9+/=_\-])(?=[A-Za-z0-9+/=_\-]*[0-9])[A-Za-z0-9+/=_\-]{20,}"),
)
_LONG_RUN = re.compile(r"[A-Za-z0-9+/=]{20,}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")


def redact(text: str, keys: Iterable[str] = (), limit: int = MAX_OUTPUT) -> str:
    """`text` with every trace of `keys` and every credential-shaped token replaced by
    [redacted], control characters made spaces, at most `limit` characters long."""
    text = _CONTROL.sub(" ", str(text)[: max(MAX_INPUT, 2 * limit)])
    for key in keys:
        if key and len(key) >= MIN_PART:
            text = _remove_key(text, key)
    for shape in _SHAPES[:2]:
        text = shape.sub(REDACTED, text)
    text = _SHAPES[2].sub(_token, text)
    return text[:limit]


def _token(match: re.Match) -> str:
    """A long run with a digit is a credential unless it is only words joined by - and _
    (model names such as stable-diffusion-xl-1024-v1-0 stay readable)."""
    run = match.group()
    parts = re.split(r"[-_]", run)
    if any(_LONG_RUN.fullmatch(part) for part in parts) or re.fullmatch(r"[0-9a-fA-F\-]{20,}", run):
        return REDACTED
    return run


def _remove_key(text: str, key: str) -> str:
    """Remove every run of the text that, once unescaped, lowercased and stripped of
    whitespace, is a piece of `key` at least MIN_PART long."""
    # The text decoded character by character, each with the span it came from.
    plain, spans = [], []
    for match in _ESCAPED.finditer(text):
        char = match.group(3)
        if char is None:
            char = chr(int(match.group(1) or match.group(2), 16))
        if char.isspace():
            continue
        plain.append(char.lower())
        spans.append(match.span())
    plain_text = "".join(plain)
    key = "".join(key.split()).lower()
    pieces = {key[i : i + MIN_PART] for i in range(len(key) - MIN_PART + 1)}
    hit = [False] * len(plain_text)
    for i in range(len(plain_text) - MIN_PART + 1):
        if plain_text[i : i + MIN_PART] in pieces:
            hit[i : i + MIN_PART] = [True] * MIN_PART
    if not any(hit):
        return text
    out, at, i = [], 0, 0
    while i < len(hit):
        if not hit[i]:
            i += 1
            continue
        j = i
        while j + 1 < len(hit) and hit[j + 1]:
            j += 1
        start, end = spans[i][0], spans[j][1]
        out.append(text[at:start])
        out.append(REDACTED)
        at, i = end, j + 1
    out.append(text[at:])
    return "".join(out)
