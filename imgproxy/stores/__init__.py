"""Where hosted images live: the interface and the store `images.store` chooses."""

from __future__ import annotations

from .base import ImageStore, StoredImage, StoreUnavailable, UnsafeStore, content_type_of
from .signing import UrlSigner

__all__ = ["ImageStore", "StoredImage", "StoreUnavailable", "UnsafeStore", "UrlSigner", "build_store", "content_type_of"]


def build_store(images, operations) -> ImageStore:
    """The store for an `ImagesConfig` (imported here only when chosen: S3 needs aiobotocore)."""
    if images.store == "s3":
        from .s3 import S3ImageStore

        return S3ImageStore(images.s3, images.url_ttl, operations, put_timeout=images.store_timeout)
    from .filesystem import FilesystemImageStore

    return FilesystemImageStore(
        images.directory, images.url_ttl, operations, private=images.private_directory, max_bytes=images.max_bytes,
        sweep_interval=images.sweep_interval, put_timeout=images.store_timeout,
    )
