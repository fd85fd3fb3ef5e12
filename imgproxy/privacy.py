"""End-user ids (`user`) never appear in logs or records as given: only as a keyed hash."""

from __future__ import annotations

import hashlib
import hmac


def hash_user(user: str | None, key: bytes) -> str | None:
    if user is None:
        return None
    if key:
        return hmac.new(key, user.encode(), hashlib.sha256).hexdigest()[:24]
    return hashlib.sha256(user.encode()).hexdigest()[:24]
