"""The multipart/form-data bodies of /v1/images/edits and /v1/images/variations.

Read part by part as they arrive (aiohttp's MultipartReader), bounded, with each uploaded
image recognised by its bytes (not by the name or type the client gave it) and kept where it
can be sent again: small ones in memory, the rest in a private temporary file. So a large
upload is never held whole, and a retry or a fallback sends the same bytes once more.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field

from aiohttp import BodyPartReader, MultipartReader, web
from aiohttp.http_exceptions import HttpProcessingError

from .errors import GatewayError, invalid_request
from .limits import RETRY_AFTER

log = logging.getLogger("imgproxy.uploads")

FILE_FIELDS = ("image", "image[]", "mask")
# The form's text fields together: the longest is a prompt of 32,000 characters (at most
# 128,000 bytes of UTF-8), the others are short.
MAX_TEXT_BYTES = 256 * 1024
MAX_PARTS = 64  # 16 images, a mask and every parameter fit many times over
IN_MEMORY_BYTES = 1024 * 1024  # a form's uploads together; beyond that they go to temporary files
WRITE_BYTES = 1024 * 1024  # written to that file a mebibyte at a time, off the event loop
CHUNK = 64 * 1024
TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
_TRANSFER_ENCODINGS = {"", "binary", "8bit", "7bit"}
_INTEGER = re.compile(r"[0-9]{1,9}")
_FIELD_NAME = re.compile(r"[\x21-\x7e]{1,64}")


@dataclass
class Upload:
    """One uploaded image: its kind (png, jpeg, webp) read from its first bytes, its size and
    SHA-256, and its PNG dimensions when it is a PNG."""

    field: str  # image or mask
    kind: str
    size: int = 0
    digest: str = ""
    width: int | None = None
    height: int | None = None
    _data: bytes | None = None
    _path: str | None = None

    @property
    def content_type(self) -> str:
        return TYPES[self.kind]

    def payload(self):
        """The bytes for one upstream request: a new file object each time (aiohttp closes it
        once sent), so every attempt sends the whole image."""
        return self._data if self._path is None else open(self._path, "rb")  # noqa: SIM115 (closed by aiohttp)

    def read(self) -> bytes:
        if self._path is None:
            return self._data
        with open(self._path, "rb") as file:
            return file.read()

    def discard(self) -> None:
        if self._path is not None:
            os.unlink(self._path)
            self._path = None


@dataclass
class Form:
    fields: dict[str, str] = field(default_factory=dict)
    images: list[Upload] = field(default_factory=list)
    mask: Upload | None = None
    # Called once when the form is discarded (the slot it took: imgproxy.limits.UploadSlots).
    release: Callable[[], None] | None = None

    def discard(self) -> None:
        for upload in (*self.images, self.mask):
            if upload is not None:
                upload.discard()
        release, self.release = self.release, None
        if release is not None:
            release()


async def read_form(http: web.Request, max_bytes: int, release: Callable[[], None] | None = None) -> Form:
    """The request's form, or a clear 400/413/415. On any error nothing is left on disk (and
    `release` has been called); otherwise the form's `discard` calls it."""
    form, budget = Form(release=release), _Budget(max_bytes)
    try:
        if http.content_type != "multipart/form-data":
            raise GatewayError(
                415,
                f"Expected a multipart/form-data body (the image as a file upload), got '{http.content_type or 'none'}'.",
                code="unsupported_media_type",
            )
        if http.content_length is not None and http.content_length > max_bytes:
            raise _too_large(max_bytes)
        # Over a stream that counts every byte of the body, not only the parts' contents.
        reader = MultipartReader(http.headers, _CountedBody(http.content, max_bytes))
        for _ in range(MAX_PARTS + 1):
            part = await reader.next()
            if part is None:
                return form
            await _read_part(part, form, budget)
        raise invalid_request(f"The form has more than {MAX_PARTS} parts.", code="invalid_multipart")
    except GatewayError:
        form.discard()
        raise
    except (ValueError, AssertionError, RuntimeError, HttpProcessingError, web.RequestPayloadError) as exc:
        # The multipart parser's own complaints (a missing boundary, a broken body): the
        # class name only, since its message may quote the client's bytes back.
        form.discard()
        raise invalid_request(
            f"The request body is not a valid multipart/form-data body ({type(exc).__name__}).", code="invalid_multipart"
        ) from None
    except BaseException:
        form.discard()
        raise


async def _read_part(part, form: Form, budget: "_Budget") -> None:
    if not isinstance(part, BodyPartReader) or not part.name:
        raise invalid_request("Every part of the form must be a named field (no nested multipart).", code="invalid_multipart")
    name = part.name
    if not _FIELD_NAME.fullmatch(name):  # it may be quoted back (unknown_parameter): printable ASCII only
        raise invalid_request(f"The form field '{_shown(name)}' has a name that is not 1 to 64 printable ASCII characters.", code="invalid_multipart")
    if part.headers.get("Content-Transfer-Encoding", "").lower() not in _TRANSFER_ENCODINGS or "Content-Encoding" in part.headers:
        raise invalid_request(f"The form field '{_shown(name)}' is encoded; send it as plain bytes.", code="invalid_multipart")
    if name in FILE_FIELDS:
        upload = await _read_upload(part, "mask" if name == "mask" else "image", budget)
        if name == "mask":
            if form.mask is not None:
                upload.discard()
                raise invalid_request("The form has more than one 'mask'.", param="mask", code="invalid_multipart")
            form.mask = upload
        else:
            form.images.append(upload)
        return
    if name in form.fields:
        raise invalid_request(f"The form field '{_shown(name)}' is given twice.", param=_shown(name), code="invalid_multipart")
    raw = bytearray()
    while chunk := await part.read_chunk(CHUNK):
        budget.take(len(chunk))
        raw += chunk
        budget.text -= len(chunk)
        if budget.text < 0:
            raise invalid_request(
                f"The form's text fields are longer than {MAX_TEXT_BYTES // 1024} KiB together (at the field '{_shown(name)}').",
                param=_shown(name), code="invalid_value",
            )
    try:
        form.fields[name] = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise invalid_request(f"The form field '{_shown(name)}' is not UTF-8 text.", param=_shown(name), code="invalid_value") from None


async def _read_upload(part, kind_of_field: str, budget: "_Budget") -> Upload:
    """Recognise the image by its first bytes, then keep it (memory or file) and hash it."""
    head = bytearray()
    while len(head) < 32 and (chunk := await part.read_chunk(CHUNK)):
        head += chunk
    kind = image_kind(bytes(head))
    if kind is None:
        raise invalid_request(
            f"The uploaded '{kind_of_field}' is not a PNG, JPEG or WebP image.", param=kind_of_field, code="invalid_image_format"
        )
    upload = Upload(kind_of_field, kind)
    upload.width, upload.height = png_dimensions(bytes(head)) if kind == "png" else (None, None)
    digest, pending, file = hashlib.sha256(), bytearray(), None
    chunk = bytes(head)
    try:
        while chunk:
            budget.take(len(chunk))
            digest.update(chunk)
            upload.size += len(chunk)
            pending += chunk
            if file is None and len(pending) > budget.memory:
                file = _spool_file(upload)
            if file is not None and len(pending) >= WRITE_BYTES:
                await _spool_write(file, pending)
                pending.clear()
            chunk = await part.read_chunk(CHUNK)
        if file is None:
            upload._data = bytes(pending)
            budget.memory -= upload.size
        else:
            await _spool_write(file, pending, last=True)
    except BaseException:
        upload.discard()
        raise
    finally:
        if file is not None:
            with contextlib.suppress(OSError):  # after a failed write: the file is removed already
                file.close()
    upload.digest = digest.hexdigest()
    return upload


def _spool_file(upload: Upload):
    try:
        fd, upload._path = tempfile.mkstemp(prefix="imgproxy-upload-")  # mode 0600
        return os.fdopen(fd, "wb")
    except OSError as exc:
        raise _spool_failed(exc) from None


async def _spool_write(file, data: bytearray, last: bool = False) -> None:
    """`last`: also close the file here, where a failure still removes it: the last bytes are
    buffered and written only when it closes (a full disk fails there)."""
    try:
        await asyncio.to_thread(file.write, bytes(data))
        if last:
            file.close()
    except OSError as exc:
        raise _spool_failed(exc) from None


def _spool_failed(exc: OSError) -> GatewayError:
    # $TMPDIR full (a small memory-backed emptyDir fills fast) or missing: the operator's to
    # fix, the client's to retry; not a 500.
    log.error("cannot write an upload to a temporary file in %s: %s", tempfile.gettempdir(), exc.strerror or type(exc).__name__)
    return GatewayError(
        503, "The gateway's temporary space for uploads is full or cannot be written; retry shortly.",
        type="server_error", code="server_overloaded", headers={"Retry-After": str(RETRY_AFTER)},
    )


def image_kind(head: bytes) -> str | None:
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    return None


def png_dimensions(head: bytes) -> tuple[int | None, int | None]:
    """Width and height from a PNG's IHDR chunk (bytes 16 to 24), if the head holds it."""
    if len(head) < 24 or head[12:16] != b"IHDR":
        return None, None
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


def typed_fields(fields: dict[str, str], integers: tuple[str, ...], booleans: tuple[str, ...]) -> dict:
    """Form text as the JSON values the request schema checks: digits become integers and
    true/false booleans; anything else stays text, for the schema to refuse clearly."""
    typed: dict = dict(fields)
    for name in integers:
        if name in typed and _INTEGER.fullmatch(typed[name]):
            typed[name] = int(typed[name])
    for name in booleans:
        if name in typed and typed[name] in ("true", "false"):
            typed[name] = typed[name] == "true"
    return typed


class _Budget:
    """The bytes of the whole form, counted as they are read (a chunked or compressed body has
    no Content-Length to refuse early)."""

    def __init__(self, limit: int) -> None:
        self.left = limit
        self.limit = limit
        # What the form's uploads may still keep in memory, together: each small image in
        # memory would hold a form of 60 images of 1 MiB whole.
        self.memory = IN_MEMORY_BYTES
        self.text = MAX_TEXT_BYTES  # and its text fields, together

    def take(self, count: int) -> None:
        self.left -= count
        if self.left < 0:
            raise _too_large(self.limit)


class _CountedBody:
    """The request body as the multipart reader reads it, refused once more than `limit` bytes
    arrived: a preamble, boundaries and part headers are read inside aiohttp's reader, where
    _Budget never sees them, and would otherwise let a chunked body run on without end."""

    def __init__(self, stream, limit: int) -> None:
        self._stream, self._limit = stream, limit

    def __getattr__(self, name: str):
        return getattr(self._stream, name)

    async def read(self, n: int = -1) -> bytes:
        return self._counted(await self._stream.read(n))

    async def readline(self, **kwargs) -> bytes:
        return self._counted(await self._stream.readline(**kwargs))

    def _counted(self, data: bytes) -> bytes:
        # total_bytes: all the body received so far (decoded, for a compressed one).
        if self._stream.total_bytes > self._limit:
            raise _too_large(self._limit)
        return data


def _too_large(max_bytes: int) -> GatewayError:
    return GatewayError(413, f"The uploaded form is larger than the {max_bytes} bytes this gateway accepts.", code="request_too_large")


def _shown(name: str) -> str:
    """A field name fit to quote back: printable ASCII, bounded."""
    return re.sub(r"[^A-Za-z0-9_\[\]-]", "?", name[:64])
