"""Images as objects in an S3-compatible bucket (AWS, MinIO, SeaweedFS, R2, GCS interop).

Credentials come only from the standard AWS chain (environment, shared files, web identity):
the config has no place for them. Expiry is the bucket's lifecycle rule (docs/operations.md),
not a listing by every replica; gateway URLs past their expiry are refused by the gateway anyway.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import aiohttp
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

from .base import NAME, ImageStore, StoredImage, StoreUnavailable

log = logging.getLogger("imgproxy.images")

CHUNK = 256 * 1024
READY_TIMEOUT = 3.0
# Retries are ImageStore.put's, bounded by images.store_timeout: botocore makes one attempt.
_CLIENT_CONFIG = dict(retries={"max_attempts": 1, "mode": "standard"}, connect_timeout=3, read_timeout=10)


class S3ImageStore(ImageStore):
    shared = True

    def __init__(self, settings, ttl: int, operations, put_timeout: float = 10) -> None:
        super().__init__(operations, put_timeout)
        self.settings = settings  # imgproxy.config.S3Config
        self.ttl = ttl
        self.bucket = settings.bucket
        self._stack = contextlib.AsyncExitStack()
        self._client = None

    async def start(self) -> None:
        s = self.settings
        # Custom endpoints (MinIO, SeaweedFS, R2 ...) want path-style addressing.
        config = AioConfig(
            **_CLIENT_CONFIG, signature_version="s3v4", s3={"addressing_style": "path" if s.endpoint_url else "auto"}
        )
        self._client = await self._stack.enter_async_context(
            get_session().create_client("s3", region_name=s.region, endpoint_url=s.endpoint_url or None, config=config)
        )

    async def close(self) -> None:
        await self._stack.aclose()
        self._client = None

    def key(self, name: str) -> str:
        return f"{self.settings.prefix}{name}"

    async def _put(self, name: str, data: bytes, content_type: str) -> None:
        async with _failures("put"):
            await self._client.put_object(Bucket=self.bucket, Key=self.key(name), Body=data, ContentType=content_type)

    async def open(self, name: str) -> StoredImage | None:
        if not NAME.match(name):
            self.count("get", False)
            return None
        try:
            async with _failures("get"):
                answer = await self._client.get_object(Bucket=self.bucket, Key=self.key(name))
        except _NotFound:
            self.count("get", False)
            return None
        except StoreUnavailable:
            self.count("get", False)
            raise
        self.count("get", True)
        body = answer["Body"]

        async def chunks():
            async with _failures("get"):
                async for chunk in body.iter_chunks(CHUNK):
                    yield chunk

        async def close():
            body.close()

        return StoredImage(answer.get("ContentLength"), chunks(), close)

    async def url_for(self, name: str, ttl: int) -> str | None:
        if self.settings.urls != "presigned":
            return None
        async with _failures("presign"):
            return await self._client.generate_presigned_url(
                "get_object", Params={"Bucket": self.bucket, "Key": self.key(name)}, ExpiresIn=ttl
            )

    async def ready(self) -> bool:
        try:
            async with asyncio.timeout(READY_TIMEOUT), _failures("ready"):
                await self._client.head_bucket(Bucket=self.bucket)
            return True
        except (TimeoutError, StoreUnavailable, _NotFound) as exc:
            log.warning("image store not ready: bucket %s: %s", self.bucket, getattr(exc, "reason", None) or "no answer")
            return False


class _NotFound(Exception):
    pass


@contextlib.asynccontextmanager
async def _failures(operation: str):
    """botocore's and aiohttp's errors as StoreUnavailable (retryable unless the bucket
    refused for a reason that will repeat), a missing object as _NotFound."""
    try:
        yield
    except ClientError as exc:
        error = exc.response.get("Error", {})
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        if status == 404 or error.get("Code") in ("NoSuchKey", "404", "NotFound"):
            raise _NotFound() from None
        raise StoreUnavailable(f"{operation}: {error.get('Code') or status}", retryable=status >= 500 or status in (408, 429)) from None
    except NoCredentialsError:
        raise StoreUnavailable(f"{operation}: no AWS credentials (environment, shared files or web identity)", retryable=False) from None
    except (BotoCoreError, aiohttp.ClientError, OSError) as exc:
        raise StoreUnavailable(f"{operation}: {type(exc).__name__}: {exc}") from None
