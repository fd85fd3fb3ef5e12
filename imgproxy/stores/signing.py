"""Gateway image URLs: HMAC-SHA256 over name and expiry; the signed URL is the credential."""

from __future__ import annotations

import hashlib
import hmac


class UrlSigner:
    """Signs `name` + expiry with HMAC-SHA256; verification is constant-time."""

    def __init__(self, key: bytes) -> None:
        self._key = key

    def signature(self, name: str, expires: int) -> str:
        return hmac.new(self._key, f"{name}\n{expires}".encode(), hashlib.sha256).hexdigest()

    def verify(self, name: str, expires: int, signature: str) -> bool:
        return hmac.compare_digest(self.signature(name, expires), signature)
