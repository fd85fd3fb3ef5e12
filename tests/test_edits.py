"""POST /v1/images/edits and /v1/images/variations: multipart uploads read as they arrive,
checked against the model, kept aside (large ones on disk) and sent on to the provider."""

import asyncio
import base64
import os
import stat
import tempfile

import pytest

from tests.conftest import CLIENT_KEY, assert_error, images_body, multipart_form, usage_record
from tests.fakes import FAKE_B64, tiny_png

AUTH = {"Authorization": f"Bearer {CLIENT_KEY}"}
JPEG = b"\xff\xd8\xff\xe0" + b"\x00" * 60
WEBP = b"RIFF\x24\x00\x00\x00WEBPVP8 " + b"\x00" * 40


form = multipart_form


def big_png(size: int) -> bytes:
    """A PNG signature and header followed by `size` bytes: enough for the gateway, which
    recognises an image by its first bytes and passes it on as it is."""
    return tiny_png(64, 64)[:33] + os.urandom(size)


# --- what the provider receives ------------------------------------------------------------


async def test_sdk_edit_with_several_images_and_a_mask_reaches_openai_byte_for_byte(gateway, fake_openai, sdk_for, usage_log):
    first, second, mask = tiny_png(32, 32, b"\x01\x02\x03"), tiny_png(32, 32, b"\x04\x05\x06"), tiny_png(32, 32, b"\x00\x00\x00")
    sdk = sdk_for(gateway)
    answer = await sdk.images.with_raw_response.edit(
        model="gpt-image-1", image=[("a.png", first, "image/png"), ("b.png", second, "image/png")],
        mask=("m.png", mask, "image/png"), prompt="add a hat", input_fidelity="high", quality="low", size="1024x1024",
    )
    result = answer.parse()
    assert [item.b64_json for item in result.data] == [FAKE_B64]
    sent = fake_openai.requests[-1]
    assert sent["prompt"] == "add a hat" and sent["model"] == "gpt-image-1" and sent["input_fidelity"] == "high"
    assert "moderation" not in sent  # a parameter of generations only
    files = fake_openai.uploads[-1]
    assert [(name, kind, data) for name, kind, data in files] == [
        ("image[]", "image/png", first), ("image[]", "image/png", second), ("mask", "image/png", mask)
    ]
    record = await usage_record(usage_log, answer.headers["x-request-id"])
    assert record["operation"] == "edit" and record["images"] == 1
    # Token-priced: the fake's usage (10 text, 40 image input, 50 output tokens) at gpt-image-1's rates.
    assert record["cost_usd"] == pytest.approx((10 * 5.0 + 40 * 10.0 + 50 * 40.0) / 1e6)
    assert float(answer.headers["x-imgproxy-cost-usd"]) == record["cost_usd"]


async def test_sdk_variation_of_dall_e_2_returns_n_images(gateway, fake_openai, sdk_for, usage_log):
    image = tiny_png(16, 16)
    answer = await sdk_for(gateway).images.with_raw_response.create_variation(
        model="dall-e-2", image=("x.png", image, "image/png"), n=2, size="256x256", response_format="b64_json"
    )
    assert len(answer.parse().data) == 2
    sent = fake_openai.requests[-1]
    assert "prompt" not in sent and "quality" not in sent and sent["n"] == 2 and sent["response_format"] == "b64_json"
    assert [(name, data) for name, _, data in fake_openai.uploads[-1]] == [("image", image)]
    record = await usage_record(usage_log, answer.headers["x-request-id"])
    assert record["operation"] == "variation" and record["cost_usd"] == pytest.approx(2 * 0.016)


async def test_a_dall_e_2_edit_as_url_is_hosted_by_the_gateway(gateway, fake_openai):
    resp = await gateway.post(
        "/v1/images/edits", headers=AUTH, data=form({"model": "dall-e-2", "prompt": "p", "size": "512x512"}, [("image", tiny_png(8, 8))])
    )
    body = await images_body(resp)
    url = body["data"][0]["url"]
    assert url.startswith(str(gateway.make_url("/v1/images/files/"))), url
    assert fake_openai.requests[-1]["response_format"] == "b64_json"  # asked inline, to host it


async def test_a_streamed_edit_is_relayed_and_billed_for_its_image(gateway, fake_openai, usage_log):
    resp = await gateway.post(
        "/v1/images/edits", headers=AUTH,
        data=form({"model": "gpt-image-1", "prompt": "p", "stream": "true", "partial_images": "1"}, [("image", tiny_png())]),
    )
    text = await resp.text()
    assert resp.status == 200 and resp.content_type == "text/event-stream"
    assert "event: image_edit.partial_image" in text and "event: image_edit.completed" in text
    assert fake_openai.requests[-1]["stream"] is True and fake_openai.requests[-1]["partial_images"] == 1
    record = await usage_record(usage_log, resp.headers["x-request-id"])
    assert record["images"] == 1 and record["cost_usd"] > 0


async def test_a_retry_sends_the_same_bytes_again_from_disk_and_nothing_is_left_there(make_client, config_text, fake_openai, tmp_path, monkeypatch):
    spool = tmp_path / "spool"
    spool.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spool))
    text = config_text().replace("total: 5}", "total: 5}\n    retries: {attempts: 2, backoff: 0.01}")
    client = await make_client(text)
    image = big_png(3 * 1024 * 1024)  # above the in-memory limit: kept in a temporary file
    fake_openai.cue(status=500, body={"error": {"message": "overloaded", "type": "server_error", "param": None, "code": None}})
    fake_openai.cue(delay=0.5)  # the second call waits, so the file can be looked at meanwhile
    fake_openai.cues[-1].status, fake_openai.cues[-1].body = 200, {"created": 1, "data": [{"b64_json": FAKE_B64}]}
    call = asyncio.ensure_future(
        client.post("/v1/images/edits", headers=AUTH, data=form({"model": "gpt-image-1", "prompt": "p"}, [("image", image)]))
    )
    while len(fake_openai.uploads) < 2 and not call.done():
        await asyncio.sleep(0.02)
    spooled = [spool / name for name in os.listdir(spool) if name.startswith("imgproxy-upload-")]
    assert not call.done(), await (await call).text()
    assert len(spooled) == 1 and stat.S_IMODE(spooled[0].stat().st_mode) == 0o600
    body = await images_body(await call)
    assert body["data"][0]["b64_json"] == FAKE_B64, body
    assert [data for _, _, data in fake_openai.uploads[0]] == [image] == [data for _, _, data in fake_openai.uploads[1]]
    assert os.listdir(spool) == []


async def test_a_refused_upload_leaves_nothing_on_disk(make_client, tmp_path, monkeypatch, fake_openai):
    spool = tmp_path / "spool"
    spool.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spool))
    client = await make_client()
    resp = await client.post(
        "/v1/images/edits", headers=AUTH, data=form({"model": "no-such-model", "prompt": "p"}, [("image", big_png(2 * 1024 * 1024))])
    )
    await assert_error(resp, 404, "model_not_found", "model")
    assert os.listdir(spool) == [] and fake_openai.requests == []


async def test_the_placeholder_edits_offline_and_the_picture_depends_on_the_input(make_client):
    client = await make_client()

    async def edit(image: bytes) -> str:
        resp = await client.post(
            "/v1/images/edits", headers=AUTH,
            data=form({"model": "placeholder", "prompt": "p", "response_format": "b64_json", "size": "64x64"}, [("image", image)]),
        )
        return (await images_body(resp))["data"][0]["b64_json"]

    one, other = await edit(tiny_png(4, 4, b"\x01\x01\x01")), await edit(tiny_png(4, 4, b"\x02\x02\x02"))
    assert one != other and one == await edit(tiny_png(4, 4, b"\x01\x01\x01"))
    assert base64.b64decode(one).startswith(b"\x89PNG")


# --- refusals: before any upstream call --------------------------------------------------

REFUSALS = [
    ("edit", {"model": "dall-e-3", "prompt": "p"}, [("image", tiny_png())], "unsupported_operation", "model"),
    ("variation", {"model": "gpt-image-1"}, [("image", tiny_png())], "unsupported_operation", "model"),
    ("edit", {"model": "gpt-image-1", "prompt": "p"}, [("image", b"GIF89a" + b"\x00" * 40)], "invalid_image_format", "image"),
    ("edit", {"model": "gpt-image-1", "prompt": "p"}, [("image", b"hello")], "invalid_image_format", "image"),
    ("edit", {"model": "dall-e-2", "prompt": "p"}, [("image", JPEG)], "invalid_image_format", "image"),
    ("edit", {"model": "dall-e-2", "prompt": "p"}, [("image", tiny_png(8, 4))], "invalid_image_dimensions", "image"),
    ("edit", {"model": "dall-e-2", "prompt": "p"}, [("image", tiny_png()), ("image[]", tiny_png())], "too_many_images", "image"),
    ("edit", {"model": "dall-e-2", "prompt": "p"}, [("image", big_png(4 * 1024 * 1024))], "image_too_large", "image"),
    ("edit", {"model": "gpt-image-1", "prompt": "p"}, [("image[]", tiny_png())] * 17, "too_many_images", "image"),
    ("edit", {"model": "gpt-image-1", "prompt": "p"}, [("image", tiny_png(8, 8)), ("mask", tiny_png(4, 4))], "invalid_image_dimensions", "mask"),
    ("edit", {"model": "gpt-image-1", "prompt": "p"}, [("image", tiny_png()), ("mask", WEBP)], "invalid_image_format", "mask"),
    ("edit", {"model": "gpt-image-1", "prompt": "p"}, [("image", tiny_png()), ("mask", tiny_png()), ("mask", tiny_png())], "invalid_multipart", "mask"),
    ("variation", {"model": "dall-e-2"}, [("image", tiny_png()), ("mask", tiny_png())], "unsupported_parameter", "mask"),
    ("edit", {"model": "gpt-image-1", "prompt": "p"}, [], "missing_required_parameter", "image"),
    ("edit", {"model": "gpt-image-1"}, [("image", tiny_png())], "missing_required_parameter", "prompt"),
    ("edit", {"model": "gpt-image-1", "prompt": "p", "style": "vivid"}, [("image", tiny_png())], "unknown_parameter", "style"),
    ("edit", {"model": "gpt-image-1", "prompt": "p", "n": "two"}, [("image", tiny_png())], "invalid_value", "n"),
    ("edit", {"model": "gpt-image-1", "prompt": "p", "n": "11"}, [("image", tiny_png())], "invalid_value", "n"),
    ("edit", {"model": "gpt-image-1", "prompt": "p", "stream": "yes"}, [("image", tiny_png())], "invalid_value", "stream"),
    ("edit", {"model": "dall-e-2", "prompt": "p", "input_fidelity": "high"}, [("image", tiny_png())], "unsupported_parameter", "input_fidelity"),
    ("variation", {"model": "dall-e-2", "prompt": "p"}, [("image", tiny_png())], "unknown_parameter", "prompt"),
    ("variation", {"model": "dall-e-2", "size": "1024x1536"}, [("image", tiny_png())], "invalid_size", "size"),
]


@pytest.mark.parametrize(("operation", "fields", "files", "code", "param"), REFUSALS, ids=[f"{r[0]}-{r[3]}-{i}" for i, r in enumerate(REFUSALS)])
async def test_what_the_model_cannot_take_is_refused_before_any_upstream_call(client, fake_openai, operation, fields, files, code, param):
    path = "/v1/images/edits" if operation == "edit" else "/v1/images/variations"
    resp = await client.post(path, headers=AUTH, data=form(fields, files))
    await assert_error(resp, 400, code, param)
    assert fake_openai.requests == []


async def test_a_json_body_is_refused_with_415(client):
    resp = await client.post("/v1/images/edits", headers=AUTH, json={"model": "gpt-image-1", "prompt": "p"})
    await assert_error(resp, 415, "unsupported_media_type")


async def test_no_key_is_refused_before_the_upload_is_read(client):
    resp = await client.post("/v1/images/edits", data=form({"model": "gpt-image-1", "prompt": "p"}, [("image", tiny_png())]))
    await assert_error(resp, 401, "invalid_api_key")


async def test_an_upload_over_the_limit_is_refused_with_or_without_a_content_length(make_client, fake_openai):
    client = await make_client(extra="server: {max_upload_bytes: 65536}")
    image = big_png(70_000)
    resp = await client.post("/v1/images/edits", headers=AUTH, data=form({"model": "gpt-image-1", "prompt": "p"}, [("image", image)]))
    await assert_error(resp, 413, "request_too_large")

    payload = form({"model": "gpt-image-1", "prompt": "p"}, [("image", image)])()
    resp = await client.post("/v1/images/edits", headers={**AUTH, "Content-Type": payload.content_type}, data=_chunks(payload))
    await assert_error(resp, 413, "request_too_large")
    assert fake_openai.requests == []


async def _chunks(payload):
    """The form's bytes as a chunked body: no Content-Length to refuse early."""
    chunks = []

    class Sink:
        async def write(self, data):
            chunks.append(bytes(data))

    await payload.write(Sink())
    data = b"".join(chunks)
    for start in range(0, len(data), 8192):
        yield data[start : start + 8192]


BROKEN = [
    b"no boundary at all",
    b"--BOUNDARY\r\nContent-Disposition: form-data; name=\"prompt\"\r\n\r\np",  # never ends
    b"--BOUNDARY\r\nContent-Disposition: form-data\r\n\r\nunnamed\r\n--BOUNDARY--\r\n",
    b"--BOUNDARY\r\nContent-Disposition: form-data; name=\"prompt\"\r\nContent-Transfer-Encoding: base64\r\n\r\ncA==\r\n--BOUNDARY--\r\n",
    b"--BOUNDARY\r\nContent-Disposition: form-data; name=\"prompt\"\r\n\r\n\xff\xfe\r\n--BOUNDARY--\r\n",
]


@pytest.mark.parametrize("raw", BROKEN, ids=["no-boundary", "unterminated", "unnamed", "base64-part", "not-utf8"])
async def test_a_broken_form_is_a_400_envelope(client, fake_openai, raw):
    resp = await client.post(
        "/v1/images/edits", headers={**AUTH, "Content-Type": "multipart/form-data; boundary=BOUNDARY"}, data=raw
    )
    body = await resp.json()
    assert resp.status == 400 and body["error"]["code"] in ("invalid_multipart", "invalid_value"), body
    assert fake_openai.requests == []


# --- the same hook chain as generations ---------------------------------------------------


async def test_an_idempotent_retry_replays_only_for_the_same_image_bytes(gateway, fake_openai):
    headers = {**AUTH, "Idempotency-Key": "edit-1"}
    fields = {"model": "gpt-image-1", "prompt": "p"}
    first = await gateway.post("/v1/images/edits", headers=headers, data=form(fields, [("image", tiny_png(4, 4, b"\x01\x01\x01"))]))
    await images_body(first)
    again = await gateway.post("/v1/images/edits", headers=headers, data=form(fields, [("image", tiny_png(4, 4, b"\x01\x01\x01"))]))
    await images_body(again)
    assert again.headers["x-imgproxy-idempotent-replay"] == "true" and len(fake_openai.requests) == 1
    other = await gateway.post("/v1/images/edits", headers=headers, data=form(fields, [("image", tiny_png(4, 4, b"\x02\x02\x02"))]))
    await assert_error(other, 409, "idempotency_key_reused")
    assert len(fake_openai.requests) == 1


# --- what one process holds -----------------------------------------------------------------


async def test_forms_held_at_once_are_bounded_and_their_slots_come_back(make_client, fake_openai):
    client = await make_client(extra="server: {max_uploads: 1}")
    fields = {"model": "gpt-image-1", "prompt": "p"}
    fake_openai.cue(delay=0.5, body={"created": 1, "data": [{"b64_json": FAKE_B64}]})
    first = asyncio.ensure_future(client.post("/v1/images/edits", headers=AUTH, data=form(fields, [("image", tiny_png())])))
    while not fake_openai.requests:
        await asyncio.sleep(0.02)
    busy = await client.post("/v1/images/edits", headers=AUTH, data=form(fields, [("image", tiny_png())]))
    await assert_error(busy, 503, "server_overloaded")
    assert busy.headers["Retry-After"]
    await images_body(await first)
    refused = await client.post("/v1/images/edits", headers=AUTH, data=form(fields, [("image", b"not an image")]))
    await assert_error(refused, 400, "invalid_image_format", "image")
    await images_body(await client.post("/v1/images/edits", headers=AUTH, data=form(fields, [("image", tiny_png())])))


@pytest.mark.parametrize("path", ["/v1/images/edits", "/v1/images/generations"])
async def test_a_body_that_drips_in_gets_408_and_leaves_nothing_on_disk(make_client, tmp_path, monkeypatch, path):
    spool = tmp_path / "spool"
    spool.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spool))
    client = await make_client(extra="server: {body_timeout: 0.5}")
    if path.endswith("edits"):
        head = (
            b'--B\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\nContent-Type: image/png\r\n\r\n'
            + big_png(2 * 1024 * 1024)
        )
        content_type = "multipart/form-data; boundary=B"
    else:
        head, content_type = b'{"model": "dall-e-3", "prompt": "a', "application/json"
    reader, writer = await asyncio.open_connection(client.server.host, client.server.port)
    writer.write(
        f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {CLIENT_KEY}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(head) + 1000}\r\n\r\n".encode() + head
    )
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)  # and then nothing more is sent
    assert head.startswith(b"HTTP/1.1 408"), head
    length = int(next(line for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")).split(b":")[1])
    assert b'"request_timeout"' in await reader.readexactly(length)
    writer.close()
    assert os.listdir(spool) == []


async def test_a_field_name_that_is_not_printable_ascii_is_refused_without_echoing_it(client, fake_openai):
    raw = b'--B\r\nContent-Disposition: form-data; name="pr\xc3\xb6mpt"\r\n\r\nx\r\n--B--\r\n'
    resp = await client.post("/v1/images/edits", headers={**AUTH, "Content-Type": "multipart/form-data; boundary=B"}, data=raw)
    error = await assert_error(resp, 400, "invalid_multipart")
    assert "\u00f6" not in error["message"]
    assert fake_openai.requests == []
