"""Attacks on POST /v1/images/edits and /variations, as a hostile client and a misbehaving
upstream would make them: raw multipart bytes on a real socket, fakes that answer off-spec."""

import asyncio
import gzip
import json
import os
import resource
import signal
import socket
import subprocess
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.conftest import CLIENT_KEY, assert_error, images_body, usage_record
from tests.fakes import FAKE_B64, FakeUpstream, tiny_png
from tests.processes import IMGPROXY, REPO, clean_env, free_port, wait_for_port

AUTH = {"Authorization": f"Bearer {CLIENT_KEY}"}
B = "BOUNDARY"


def raw_form(parts: list[tuple[bytes, bytes]], preamble: bytes = b"", epilogue: bytes = b"", boundary: str = B) -> bytes:
    """A multipart body from (header lines, body) pairs, byte for byte as given."""
    out = preamble
    for headers, body in parts:
        out += b"--" + boundary.encode() + b"\r\n" + headers + b"\r\n\r\n" + body + b"\r\n"
    return out + b"--" + boundary.encode() + b"--\r\n" + epilogue


def field(name: str, value: bytes) -> tuple[bytes, bytes]:
    return (f'Content-Disposition: form-data; name="{name}"'.encode(), value)


def image_part(data: bytes, disposition: bytes = b'Content-Disposition: form-data; name="image"; filename="a.png"') -> tuple[bytes, bytes]:
    return (disposition + b"\r\nContent-Type: image/png", data)


def edit_form(*extra: tuple[bytes, bytes], image: bytes | None = None, **kwargs) -> bytes:
    return raw_form([field("model", b"gpt-image-1"), field("prompt", b"p"), *extra, image_part(image or tiny_png())], **kwargs)


def post_raw(client, body, boundary: str = B, headers: dict | None = None):
    headers = {**AUTH, "Content-Type": f"multipart/form-data; boundary={boundary}", **(headers or {})}
    return client.post("/v1/images/edits", headers=headers, data=body)


def chunked(body: bytes):
    """The body as a chunked request: no Content-Length for the gateway to refuse early."""

    async def chunks():
        for start in range(0, len(body), 65536):
            yield body[start : start + 65536]

    return chunks()


# --- hostile part headers: a 400 envelope or a normal answer, never a 500 -------------------

DISPOSITION = b'Content-Disposition: form-data; name="image"'
# (the image part's header lines, the status that is right for them)
HOSTILE_HEADERS = [
    (DISPOSITION + b"; filename*=bogus''%41.png", 200),  # RFC 5987 with an unknown charset: the parameter is ignored
    (DISPOSITION + b"; filename*=utf-8''%FF.png", 200),  # not UTF-8 once unquoted: ignored too
    (b"Content-Disposition: form-data; name*=bogus''%69mage", 400),  # the name itself unreadable: an unnamed part
    (b"Content-Disposition: form-data; name*=utf-8''%FF%FE", 400),
    (DISPOSITION + b'; filename="' + b"a" * 8000 + b'"', 200),  # long, within aiohttp's 8190-byte header line
    (DISPOSITION + b'; filename="' + b"a" * 9000 + b'"', 400),  # beyond it
    (b'Content-Disposition: form-data; name="image"; name="mask"', 400),  # which one? neither
    (b"Content-Disposition: ; ; ;", 400),
    (DISPOSITION + b"\r\n" + b"X-A: b\r\n" * 200, 400),  # more header lines than aiohttp reads
    (DISPOSITION + b"\r\nContent-Type: multipart/mixed; boundary=" + b"x" * 80, 400),  # a nested form
    (DISPOSITION + b"\r\nContent-Length: 3", 200),  # ignored in form-data (RFC 7578 4.8): the boundary ends the part
    (DISPOSITION + b"\r\nContent-Length: -1", 200),
    (DISPOSITION + b"\r\nContent-Encoding: gzip", 400),
]


@pytest.mark.parametrize(("headers", "status"), HOSTILE_HEADERS, ids=range(len(HOSTILE_HEADERS)))
async def test_hostile_part_headers_get_a_400_envelope_or_an_answer(client, fake_openai, headers, status):
    resp = await post_raw(client, raw_form([field("model", b"gpt-image-1"), field("prompt", b"p"), (headers, tiny_png())]))
    if status == 200:
        assert len((await images_body(resp))["data"]) == 1
        assert [data for _, _, data in fake_openai.uploads[-1]] == [tiny_png()]
    else:
        await assert_error(resp, 400, "invalid_multipart")
        assert fake_openai.requests == []


BROKEN_BODIES = {  # (the body, the error code)
    "lf-only": (edit_form().replace(b"\r\n", b"\n"), "invalid_value"),  # no CRLF boundary: one part to the end, not text
    "folded-header": (raw_form([field("model", b"gpt-image-1"), field("prompt", b"p"), (b'Content-Disposition: form-data;\r\n name="image"', tiny_png())]), "invalid_multipart"),
    "cr-in-name": (raw_form([field("model", b"gpt-image-1"), (b'Content-Disposition: form-data; name="ima\rge"', tiny_png())]), "invalid_multipart"),
    "nul-in-name": (raw_form([field("model", b"gpt-image-1"), (b'Content-Disposition: form-data; name="image\x00"', tiny_png())]), "invalid_multipart"),
    "empty-image": (raw_form([field("model", b"gpt-image-1"), field("prompt", b"p"), image_part(b"")]), "invalid_image_format"),
    "no-final-boundary": (edit_form()[: -len(b"--BOUNDARY--\r\n")], "invalid_multipart"),
    "empty-body": (b"", "invalid_multipart"),
}


@pytest.mark.parametrize("name", list(BROKEN_BODIES))
async def test_crlf_games_and_empty_parts_are_a_400_envelope(client, fake_openai, name):
    body, code = BROKEN_BODIES[name]
    resp = await post_raw(client, body)
    error = await assert_error(resp, 400, code, "image" if code == "invalid_image_format" else ("model" if code == "invalid_value" else None))
    assert "\\x" not in error["message"] and fake_openai.requests == []


@pytest.mark.parametrize("boundary", ["x" * 71, ""])
async def test_a_boundary_aiohttp_refuses_is_a_400(client, fake_openai, boundary):
    resp = await post_raw(client, edit_form(boundary=boundary or "x"), boundary=boundary)
    await assert_error(resp, 400, "invalid_multipart")
    assert fake_openai.requests == []


async def test_a_70_character_boundary_is_accepted(client, fake_openai):
    boundary = "b" * 70
    assert len((await images_body(await post_raw(client, edit_form(boundary=boundary), boundary=boundary)))["data"]) == 1


# --- max_upload_bytes: every byte of the body counts ------------------------------------------


@pytest.mark.parametrize("where", ["preamble", "part-headers", "text-field"])
async def test_bytes_outside_the_parts_count_against_max_upload_bytes(make_client, fake_openai, where):
    """A chunked body has no Content-Length to refuse early: 4 MB of preamble, or 100 KB of
    header lines in one part, must not slip past a 64 KiB limit because they are no part's body."""
    client = await make_client(extra="server: {max_upload_bytes: 65536}")
    if where == "preamble":
        body = edit_form(preamble=(b"x" * 1000 + b"\r\n") * 4000)
    elif where == "part-headers":
        filler = b"".join(f"X-Filler-{i}: {'y' * 1000}\r\n".encode() for i in range(100))
        body = edit_form((b'Content-Disposition: form-data; name="user"\r\n' + filler[:-2], b"u"))
    else:  # the check that held before: a part's own bytes
        body = edit_form(field("user", b"u" * 70_000))
    resp = await post_raw(client, chunked(body))
    await assert_error(resp, 413, "request_too_large")
    assert fake_openai.requests == []


async def test_a_form_just_under_max_upload_bytes_passes_though_chunked(make_client, fake_openai):
    client = await make_client(extra="server: {max_upload_bytes: 65536}")
    image = tiny_png(64, 64)[:33] + os.urandom(60_000)
    body = edit_form(image=image)
    assert len(body) < 65536
    assert len((await images_body(await post_raw(client, chunked(body))))["data"]) == 1
    assert [data for _, _, data in fake_openai.uploads[-1]] == [image]


async def test_a_gzip_body_is_limited_by_what_it_inflates_to(make_client, fake_openai):
    """20 MiB of zeros compress to 20 KB: the limit is on the inflated form, not the wire bytes."""
    client = await make_client(extra="server: {max_upload_bytes: 65536}")
    packed = gzip.compress(edit_form(image=tiny_png(64, 64)[:33] + bytes(20 * 1024 * 1024)))
    assert len(packed) < 65536
    await assert_error(await post_raw(client, packed, headers={"Content-Encoding": "gzip"}), 413, "request_too_large")
    assert fake_openai.requests == []


# --- a misbehaving upstream: what it streams is counted and billed -----------------------------

USAGE = {"total_tokens": 100, "input_tokens": 50, "output_tokens": 50, "input_tokens_details": {"text_tokens": 10, "image_tokens": 40}}


def sse(kind: str, count: int) -> bytes:
    event = {"type": kind, "b64_json": FAKE_B64, "usage": USAGE, "created_at": 1, "size": "1024x1024", "quality": "high", "background": "opaque", "output_format": "png"}
    return f"event: {kind}\ndata: {json.dumps(event)}\n\n".encode() * count


@pytest.mark.parametrize(("operation", "events"), [("edit", "image_generation"), ("generate", "image_edit"), ("edit", "image_edit")])
async def test_a_stream_with_the_other_operations_events_is_cut_at_n_and_billed(gateway, fake_openai, usage_log, operation, events):
    """An OpenAI-compatible host may answer an edit with image_generation.* events (or the
    reverse): its images are still counted, so no more than n are relayed and each is billed."""
    fake_openai.cue(body=sse(f"{events}.completed", 3), content_type="text/event-stream")
    if operation == "edit":
        resp = await post_raw(gateway, edit_form(field("stream", b"true")))
    else:
        resp = await gateway.post("/v1/images/generations", headers=AUTH, json={"model": "gpt-image-1", "prompt": "p", "stream": True})
    text = await resp.text()
    assert resp.status == 200 and text.count(f"event: {events}.completed") == 1, text[:300]
    record = await usage_record(usage_log, resp.headers["x-request-id"])
    # gpt-image-1's token prices: 10 text and 40 image input tokens, 50 output tokens.
    assert record["images"] == 1 and record["cost_usd"] == pytest.approx((10 * 5.0 + 40 * 10.0 + 50 * 40.0) / 1e6), record


# --- memory: a form of many small images is not held whole ------------------------------------


@pytest.fixture
def spool(tmp_path, monkeypatch):
    path = tmp_path / "spool"
    path.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(path))
    return path


async def test_many_images_under_the_spool_threshold_are_not_all_kept_in_memory(client, fake_openai, spool):
    """Each image under 1 MiB stayed in memory, so a form of 16 (or, until refused, 60) such
    images was held whole: 16 MiB of memory per request. At most 1 MiB of a form's images is
    kept in memory; the rest go to temporary files like a large image."""
    images = [tiny_png(64, 64)[:33] + os.urandom(600 * 1024) for _ in range(4)]
    fake_openai.cue(delay=0.5, body={"created": 1, "data": [{"b64_json": FAKE_B64}]})
    body = raw_form([field("model", b"gpt-image-1"), field("prompt", b"p")] + [image_part(i, b'Content-Disposition: form-data; name="image[]"; filename="a.png"') for i in images])
    call = asyncio.ensure_future(post_raw(client, body))
    while not fake_openai.uploads and not call.done():
        await asyncio.sleep(0.02)
    spooled = sorted((spool / name).stat().st_size for name in os.listdir(spool))
    assert sum(map(len, images)) - sum(spooled) <= 1024 * 1024, spooled  # what stayed in memory
    assert len((await images_body(await call))["data"]) == 1
    assert [data for _, _, data in fake_openai.uploads[-1]] == images
    assert os.listdir(spool) == []


async def test_the_text_fields_share_one_256_kib_allowance(client, fake_openai):
    """Each text field could be 256 KiB and a form has up to 64 parts: 60 unknown fields of
    250 KiB were all held (16 MiB) before the schema refused them. Together they may be
    256 KiB (a 32,000-character prompt is at most 128,000 bytes of UTF-8), refused as the
    second of two 200 KiB fields arrives."""
    resp = await post_raw(client, edit_form(field("x1", b"t" * 200 * 1024), field("x2", b"t" * 200 * 1024)))
    error = await assert_error(resp, 400, "invalid_value", "x2")
    assert "256 KiB" in error["message"]
    assert fake_openai.requests == []


async def test_a_32000_character_prompt_of_4_byte_characters_passes(client, fake_openai):
    prompt = "\U0001F600" * 32000
    body = raw_form([field("model", b"gpt-image-1"), field("prompt", prompt.encode()), field("user", b"u" * 256), image_part(tiny_png())])
    assert len((await images_body(await post_raw(client, body)))["data"]) == 1
    assert fake_openai.requests[-1]["prompt"] == prompt


# --- idempotency: a replay only for the same images in the same roles --------------------------

RED, BLUE = tiny_png(8, 8, b"\xff\x00\x00"), tiny_png(8, 8, b"\x00\x00\xff")
NAMED = {
    "image[]": b'Content-Disposition: form-data; name="image[]"; filename="a.png"',
    "image": b'Content-Disposition: form-data; name="image"; filename="a.png"',
    "mask": b'Content-Disposition: form-data; name="mask"; filename="m.png"',
}


def files_form(files: list[tuple[str, bytes]], operation: str = "edit") -> bytes:
    fields = [field("model", b"dall-e-2" if operation == "variation" else b"gpt-image-1")]
    fields += [field("prompt", b"p")] if operation == "edit" else []
    return raw_form(fields + [image_part(data, NAMED[name]) for name, data in files])


@pytest.mark.parametrize(("first", "again"), [
    ([("image[]", RED), ("image[]", BLUE)], [("image[]", BLUE), ("image[]", RED)]),  # the same images in another order
    ([("image", RED), ("mask", BLUE)], [("image", BLUE), ("mask", RED)]),  # image and mask swapped
], ids=["order", "mask-swapped"])
async def test_the_same_key_with_the_images_in_other_roles_is_a_409(client, fake_openai, first, again):
    headers = {**AUTH, "Idempotency-Key": "k-1", "Content-Type": f"multipart/form-data; boundary={B}"}
    await images_body(await client.post("/v1/images/edits", headers=headers, data=files_form(first)))
    resp = await client.post("/v1/images/edits", headers=headers, data=files_form(again))
    await assert_error(resp, 409, "idempotency_key_reused")
    assert len(fake_openai.requests) == 1


async def test_an_edit_and_a_variation_with_the_same_key_are_not_one_request(client, fake_openai):
    headers = {**AUTH, "Idempotency-Key": "k-2", "Content-Type": f"multipart/form-data; boundary={B}"}
    await images_body(await client.post("/v1/images/edits", headers=headers, data=files_form([("image", RED)])))
    resp = await client.post("/v1/images/variations", headers=headers, data=files_form([("image", RED)], "variation"))
    await assert_error(resp, 409, "idempotency_key_reused")
    assert len(fake_openai.requests) == 1


# --- temporary files: none left behind, however the request ends --------------------------------


async def _spool_empties(spool, seconds: float = 5.0) -> list[str]:
    for _ in range(int(seconds / 0.05)):
        if not os.listdir(spool):
            return []
        await asyncio.sleep(0.05)
    return os.listdir(spool)


async def _raw_request(client, body: bytes, send: int):
    url = client.make_url("/v1/images/edits")
    reader, writer = await asyncio.open_connection(url.host, url.port)
    head = (f"POST /v1/images/edits HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {CLIENT_KEY}\r\n"
            f"Content-Type: multipart/form-data; boundary={B}\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    writer.write(head + body[:send])
    await writer.drain()
    return writer


async def test_a_client_that_leaves_mid_upload_leaves_nothing_on_disk(client, fake_openai, spool):
    body = edit_form(image=tiny_png(64, 64)[:33] + os.urandom(3 * 1024 * 1024))
    writer = await _raw_request(client, body, 2 * 1024 * 1024)
    for _ in range(200):
        if os.listdir(spool):
            break
        await asyncio.sleep(0.02)
    assert os.listdir(spool), "the upload never reached the disk"
    writer.close()
    assert await _spool_empties(spool) == []
    assert fake_openai.requests == []


async def test_a_client_that_leaves_during_the_upstream_call_leaves_nothing_on_disk(client, fake_openai, spool):
    fake_openai.cue(delay=3.0, body={"created": 1, "data": [{"b64_json": FAKE_B64}]})
    body = edit_form(image=tiny_png(64, 64)[:33] + os.urandom(3 * 1024 * 1024))
    writer = await _raw_request(client, body, len(body))
    for _ in range(250):
        if fake_openai.requests:
            break
        await asyncio.sleep(0.02)
    assert fake_openai.requests and os.listdir(spool)
    writer.close()  # the handler is cancelled with the upstream call in flight
    assert await _spool_empties(spool, 2.5) == []


async def test_a_refusal_by_the_models_capabilities_leaves_nothing_on_disk(client, fake_openai, spool):
    big = tiny_png(64, 64)[:33] + os.urandom(5 * 1024 * 1024)  # dall-e-2 takes 4 MB
    body = raw_form([field("model", b"dall-e-2"), field("prompt", b"p"), image_part(big), image_part(tiny_png(64, 64), NAMED["mask"])])
    await assert_error(await post_raw(client, body), 400, "image_too_large", "image")
    assert os.listdir(spool) == [] and fake_openai.requests == []


# --- the spool full or missing: a 503 to retry, nothing left behind ----------------------------

@pytest.fixture
def file_size_limit():
    """Writes beyond `limit` bytes of one file fail (EFBIG), as on a full $TMPDIR."""
    old_handler, (soft, hard) = signal.signal(signal.SIGXFSZ, signal.SIG_IGN), resource.getrlimit(resource.RLIMIT_FSIZE)

    def limit(size: int) -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, hard))

    yield limit
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    signal.signal(signal.SIGXFSZ, old_handler)


@pytest.mark.parametrize("fails", ["tmpdir-missing", "first-write", "last-write"])
async def test_a_spool_that_cannot_be_written_is_a_503_and_leaves_nothing(client, fake_openai, spool, file_size_limit, monkeypatch, fails):
    size = 3 * 1024 * 1024 + 3000  # written as 1 MiB blocks and a last 3000 bytes
    if fails == "tmpdir-missing":
        monkeypatch.setattr(tempfile, "tempdir", str(spool / "gone"))
    else:
        file_size_limit(size - 1000 if fails == "last-write" else 512 * 1024)
    resp = await post_raw(client, edit_form(image=tiny_png(64, 64)[:33] + os.urandom(size - 33)))
    file_size_limit(resource.RLIM_INFINITY)
    error = await assert_error(resp, 503, "server_overloaded")
    assert "temporary" in error["message"] and resp.headers["Retry-After"]
    assert os.listdir(spool) == [] and fake_openai.requests == []


# --- a misbehaving upstream, and money: what held -----------------------------------------------


async def test_an_edit_answered_with_more_images_than_n_delivers_and_bills_n(gateway, fake_openai, usage_log):
    fake_openai.cue(body={"created": 1, "data": [{"b64_json": FAKE_B64}] * 3, "usage": USAGE})
    resp = await post_raw(gateway, edit_form())
    assert len((await images_body(resp))["data"]) == 1
    record = await usage_record(usage_log, resp.headers["x-request-id"])
    assert record["images"] == 1 and float(resp.headers["x-imgproxy-cost-usd"]) == record["cost_usd"] > 0


@pytest.mark.parametrize("status", [400, 401, 500])
async def test_an_upstream_error_on_an_edit_that_echoes_the_key_never_reaches_the_client(gateway, fake_openai, status):
    key = FakeUpstream.key
    fake_openai.cue(status=status, body={"error": {"message": f"Incorrect API key provided: {key} (Bearer {key})", "type": "invalid_request_error", "param": None, "code": "invalid_api_key"}})
    resp = await post_raw(gateway, edit_form())
    text = await resp.text()
    assert resp.status in (400, 502) and key not in text and key[-10:] not in text, text


@pytest.mark.parametrize("cue", [{"reset": True}, {"cut": True}, {"status": 502, "body": b"<html>bad gateway</html>", "content_type": "text/html"}], ids=["reset", "cut", "502-html"])
async def test_an_ambiguous_failure_of_an_edit_is_neither_retried_nor_sent_to_a_fallback(make_client, config_text, fake_openai, usage_log, cue):
    """The provider may have made (and billed) the edit: another call could bill it twice."""
    text = config_text(f"cost: {{usage_log: {usage_log}}}").replace("total: 5}", "total: 5}\n    retries: {attempts: 3, backoff: 0.01}")
    client = await make_client(text.replace("gpt-image-1: {provider: openai}", "gpt-image-1: {provider: openai, fallbacks: [placeholder]}"))
    fake_openai.cue(**cue)
    resp = await post_raw(client, edit_form())
    assert resp.status == 502
    record = await usage_record(usage_log, resp.headers["x-request-id"])
    assert len(fake_openai.requests) == 1 and record["model"] == "gpt-image-1" and record["attempts"] == 1


# --- a real `imgproxy serve`: SIGTERM with an edit in flight ------------------------------------


def test_an_edit_cut_by_the_drain_timeout_leaves_nothing_on_disk_and_is_billed(tmp_path):
    """The upstream has the whole upload and is still working when SIGTERM's drain timeout
    cancels the request: the temporary file is removed, and the edit is recorded as cut at the
    worst case reserved for it (the provider bills it), input images included."""
    received: list[int] = []

    class Upstream(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            received.append(len(self.rfile.read(int(self.headers["Content-Length"]))))
            time.sleep(20)

        def log_message(self, *args) -> None:
            pass

    upstream = ThreadingHTTPServer(("127.0.0.1", 0), Upstream)
    upstream.daemon_threads = True
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    spool, usage, port = tmp_path / "spool", tmp_path / "usage.jsonl", free_port()
    spool.mkdir()
    config = tmp_path / "proxy.yaml"
    config.write_text(f"""
server: {{host: 127.0.0.1, port: {port}, drain_timeout: 0.5}}
auth: {{keys: [{{name: team-a, key: {CLIENT_KEY}}}]}}
providers:
  openai: {{type: openai, base_url: "http://127.0.0.1:{upstream.server_address[1]}/v1", api_key: sk-upstream-drain-0000}}
models:
  gpt-image-1: {{provider: openai}}
images: {{directory: {tmp_path / "images"}}}
cost: {{usage_log: {usage}}}
""")
    proc = subprocess.Popen([IMGPROXY, "serve", "--config", str(config)], cwd=REPO, env=clean_env(TMPDIR=str(spool)),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    body = edit_form(image=tiny_png(64, 64)[:33] + os.urandom(3 * 1024 * 1024))
    try:
        wait_for_port(port, proc)
        client = socket.create_connection(("127.0.0.1", port))
        client.sendall((f"POST /v1/images/edits HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {CLIENT_KEY}\r\n"
                        f"Content-Type: multipart/form-data; boundary={B}\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body)
        deadline = time.monotonic() + 15
        while not received:
            assert time.monotonic() < deadline, "the edit never reached the upstream"
            time.sleep(0.05)
        assert received[0] > 3 * 1024 * 1024 and len(os.listdir(spool)) == 1
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=15)
        client.close()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=10)
        upstream.shutdown()
    assert os.listdir(spool) == []
    [record] = [json.loads(line) for line in usage.read_text().splitlines()]
    # gpt-image-1's worst case: one image at its highest price ($0.25), the prompt's tokens (one
    # character: half a token at $5 per million) and one input image of INPUT_IMAGE_TOKENS_MAX
    # (8192) tokens at $10 per million.
    assert record["cut"] is True and record["operation"] == "edit" and record["status"] == 499, record
    assert record["cost_usd"] == pytest.approx(0.25 + 0.5 * 5.0 / 1e6 + 8192 * 10.0 / 1e6, abs=1e-6), record
