"""The image store interface: what hosting needs from wherever images are kept."""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
from dataclasses import dataclass
from typing import AsyncIterator, Awaitable, Callable

log = logging.getLogger("imgproxy.images")

EXTENSIONS = {"image/png": "png", "image/jpeg": "jpg", "image/webp": "webp"}
CONTENT_TYPES = {ext: ctype for ctype, ext in EXTENSIONS.items()}
# Names are random tokens made here: anything else (paths, links, dot files) is never looked up.
NAME = re.compile(r"^[A-Za-z0-9_-]{16,64}\.(png|jpg|webp)$")


def new_name(content_type: str) -> str:
    return f"{secrets.token_urlsafe(18)}.{EXTENSIONS.get(content_type, 'png')}"


def content_type_of(name: str) -> str:
    return CONTENT_TYPES.get(name.rsplit(".", 1)[-1], "application/octet-stream")


class StoreUnavailable(Exception):
    """The store could not do what was asked. `retryable`: trying again may help (a timeout,
    a 5xx); not for a refusal that will repeat (read-only folder, access denied, too large)."""

    def __init__(self, reason: str, *, retryable: bool = True) -> None:
        super().__init__(reason)
        self.reason, self.retryable = reason, retryable


class UnsafeStore(Exception):
    """A store that must not be used at all (start-up refuses it); names the config key."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(problem)
        self.key, self.problem = key, problem


@dataclass
class StoredImage:
    """An image being read: its chunks, streamed, and `close()` once done (or abandoned)."""

    size: int | None
    chunks: AsyncIterator[bytes]
    close: Callable[[], Awaitable[None]]


class ImageStore:
    """Where hosted images live. Subclasses implement `_put`, `open` and `ready`; `put`
    retries within `put_timeout` so a short outage never loses a paid-for image."""

    # Replicas (or processes) all read it: image URLs must verify on every one of them.
    shared = False

    def __init__(self, operations, put_timeout: float) -> None:
        self.operations = operations  # a Prometheus counter labelled by operation and result
        self.put_timeout = put_timeout

    def count(self, operation: str, ok: bool) -> None:
        self.operations.labels(operation, "ok" if ok else "error").inc()

    def check(self) -> None:
        """Called once at load (blocking is fine): raise UnsafeStore if it must not be used."""

    async def start(self) -> None:
        """Open connections, start background expiry."""

    async def close(self) -> None:
        """Stop what start() began."""

    async def put(self, data: bytes, content_type: str) -> str:
        """Store an image under a new random name and return the name. Retries (under the
        same name, so a retry overwrites rather than duplicates) until `put_timeout`; raises
        StoreUnavailable when it gives up."""
        loop = asyncio.get_running_loop()
        name = new_name(content_type)
        deadline = loop.time() + self.put_timeout
        delay = 0.05
        while True:
            try:
                async with asyncio.timeout_at(deadline):
                    await self._put(name, data, content_type)
                self.count("put", True)
                return name
            except TimeoutError:
                error = StoreUnavailable(f"no answer within {self.put_timeout:g} s")
            except StoreUnavailable as exc:
                error = exc
            self.count("put", False)
            if not error.retryable or loop.time() + delay >= deadline:
                log.error("cannot store an image (%s): %s", type(self).__name__, error.reason)
                raise error
            log.warning("storing an image failed, retrying: %s", error.reason)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)

    async def _put(self, name: str, data: bytes, content_type: str) -> None:
        raise NotImplementedError

    async def open(self, name: str) -> StoredImage | None:
        """The image stored under `name`, or None if there is none (or it is not servable).
        Raises StoreUnavailable if the store cannot answer."""
        raise NotImplementedError

    async def url_for(self, name: str, ttl: int) -> str | None:
        """A URL the store itself serves the image from, valid `ttl` seconds; None: the
        gateway signs and serves its own URL."""
        return None

    async def ready(self) -> bool:
        """Whether images can be stored right now (readiness)."""
        raise NotImplementedError
