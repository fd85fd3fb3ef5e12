"""Hosting generated images: a filesystem store, HMAC-signed expiring URLs, and the sweep."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import re
import secrets
import time
from pathlib import Path

from .errors import GatewayError

log = logging.getLogger("imgproxy.images")

EXTENSIONS = {"image/png": "png", "image/jpeg": "jpg", "image/webp": "webp"}
CONTENT_TYPES = {ext: ctype for ctype, ext in EXTENSIONS.items()}
NAME = re.compile(r"^[A-Za-z0-9_-]{16,64}\.(png|jpg|webp)$")


class UrlSigner:
    """Signs `name` + expiry with HMAC-SHA256; verification is constant-time."""

    def __init__(self, key: bytes) -> None:
        self._key = key

    def signature(self, name: str, expires: int) -> str:
        return hmac.new(self._key, f"{name}\n{expires}".encode(), hashlib.sha256).hexdigest()

    def verify(self, name: str, expires: int, signature: str) -> bool:
        return hmac.compare_digest(self.signature(name, expires), signature)


class FilesystemImageStore:
    """Images as files named by a random token; a file's age decides its expiry."""

    def __init__(self, directory: str, ttl: int, operations) -> None:
        self.directory = Path(directory)
        self.ttl = ttl
        self.operations = operations  # a Prometheus counter labelled by operation and result

    def count(self, operation: str, ok: bool) -> None:
        self.operations.labels(operation, "ok" if ok else "error").inc()

    def prepare(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)

    async def put(self, data: bytes, content_type: str) -> str:
        name = f"{secrets.token_urlsafe(18)}.{EXTENSIONS.get(content_type, 'png')}"
        try:
            await asyncio.to_thread(self._write, name, data)
        except OSError as exc:
            self.count("put", False)
            log.error("cannot store an image in %s: %s", self.directory, exc.strerror or exc)
            raise GatewayError(500, "The gateway could not store the image.", type="server_error", code="image_store_failed") from None
        self.count("put", True)
        return name

    def _write(self, name: str, data: bytes) -> None:
        tmp = self.directory / f".{name}.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, self.directory / name)  # readers never see half a file

    def path(self, name: str) -> Path | None:
        """The file for a valid, existing image name, else None."""
        if not NAME.match(name):
            return None
        path = self.directory / name
        return path if path.is_file() else None

    def sweep(self, now: float | None = None) -> int:
        """Delete images older than the URL lifetime; returns how many."""
        cutoff = (now or time.time()) - self.ttl
        deleted = 0
        for entry in os.scandir(self.directory):
            try:
                if entry.is_file() and entry.stat().st_mtime < cutoff:
                    os.unlink(entry.path)
                    deleted += 1
            except FileNotFoundError:
                pass
        return deleted

    async def sweep_forever(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                deleted = await asyncio.to_thread(self.sweep)
            except OSError as exc:
                self.count("sweep", False)
                log.error("image sweep failed: %s", exc)
                continue
            self.count("sweep", True)
            if deleted:
                log.info("deleted %d expired images", deleted)

    def writable(self) -> bool:
        return self.directory.is_dir() and os.access(self.directory, os.W_OK | os.X_OK)


def content_type_of(name: str) -> str:
    return CONTENT_TYPES.get(name.rsplit(".", 1)[-1], "application/octet-stream")
