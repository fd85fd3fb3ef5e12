"""Inputs built to break the gateway get a documented error envelope, never a 500: request
bodies, headers, paths and query strings from clients, and answers from upstreams."""

import asyncio
import gzip
import hashlib
import hmac
import json
import time
import zlib

import pytest

from tests.conftest import AUTH, CLIENT_KEY, assert_error, download, images_body
from tests.fakes import FAKE_B64

URL = "/v1/images/generations"
JSON = {**AUTH, "Content-Type": "application/json"}
SIGNING_KEY = b"test-signing-key"  # as in tests/conftest.py's config
DEEP = 100_000


def sign(name: str, expires: str) -> str:
    return hmac.new(SIGNING_KEY, f"{name}\n{expires}".encode(), hashlib.sha256).hexdigest()


@pytest.mark.parametrize(
    "raw, words",
    [
        (b'{"prompt": "x", "user": ' + b"[" * DEEP + b"]" * DEEP + b"}", "nested"),
        (b'{"prompt": "x", "user": ' + b"[" * 65 + b"]" * 65 + b"}", "nested"),  # parses, but deeper than 64
        (b'{"prompt": "x", "n": ' + b"9" * 5000 + b"}", "integer"),  # over Python's 4300-digit limit
        (b'{"prompt": "x", "n": ' + b"9" * 4000 + b"}", "64-bit"),  # under it
        (b'{"prompt": "x", "n": -9223372036854775809}', "64-bit"),
        (b'{"prompt": "x", "n": 1e999}', "too large"),
        (b'{"prompt": "x", "n": NaN}', "NaN"),
        (b'{"prompt": "x", "n": -Infinity}', "Infinity"),
        (b'{"prompt": "\\ud800 a lone surrogate", "model": "placeholder"}', "surrogate"),
        (b'{"prompt": "x", "user": "\\udfff"}', "surrogate"),
        (b'{"prompt": "x", "\\ud800": 1}', "surrogate"),
        (b'{"prompt": "\xff\xfe"}', "utf-8"),
        ('{"prompt": "x"}'.encode("utf-16"), "utf-8"),
        (b"\xef\xbb\xbf{}", "expecting value"),  # a byte order mark
    ],
)
async def test_bodies_the_parser_refuses_are_400(client, fake_openai, raw, words):
    resp = await client.post(URL, data=raw, headers=JSON)
    error = await assert_error(resp, 400, "invalid_json")
    assert words.lower() in error["message"].lower()
    assert fake_openai.requests == []


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
async def test_compressed_bodies_are_decoded_counted_and_checked(make_client, fake_openai, encoding):
    client = await make_client(extra="server: {max_body_bytes: 2048}")
    compress = gzip.compress if encoding == "gzip" else zlib.compress
    good = compress(json.dumps({"model": "dall-e-3", "prompt": "a lighthouse"}).encode())
    await images_body(await client.post(URL, data=good, headers={**JSON, "Content-Encoding": encoding}))
    # Under the limit as sent, 50 times over it once inflated: counted as it is decoded.
    bomb = compress(b'{"model": "dall-e-3", "prompt": "' + b"x" * 100_000 + b'"}')
    assert len(bomb) < 2048
    await assert_error(await client.post(URL, data=bomb, headers={**JSON, "Content-Encoding": encoding}), 413, "request_too_large")
    resp = await client.post(URL, data=b"0123456789", headers={**JSON, "Content-Encoding": encoding})
    error = await assert_error(resp, 400, "invalid_content_encoding")
    assert encoding in error["message"] or "decod" in error["message"]
    assert len(fake_openai.requests) == 1


async def test_escaped_surrogate_pairs_are_text(client, fake_openai):
    # What json.dumps writes for an emoji by default: a pair, which is one character.
    raw = json.dumps({"model": "dall-e-3", "prompt": "a cat \U0001f431", "user": "\U0001f431"}).encode()
    assert b"\\ud83d\\udc31" in raw
    await images_body(await client.post(URL, data=raw, headers=JSON))
    assert fake_openai.requests[-1]["prompt"] == "a cat \U0001f431"


async def test_nesting_up_to_the_bound_reaches_the_schema(client):
    raw = b'{"prompt": "x", "user": ' + b"[" * 63 + b"]" * 63 + b"}"  # 64 levels with the body's own
    await assert_error(await client.post(URL, data=raw, headers=JSON), 400, "invalid_value", "user")


@pytest.mark.parametrize("size", ["64x64\n", "auto\n", "1024x1024\n", " 64x64", "٦٤x٦٤", "064x64", "64x64\x00"])
async def test_size_strings_are_exact(client, fake_openai, size):
    resp = await client.post(URL, json={"model": "placeholder", "prompt": "x", "size": size}, headers=AUTH)
    await assert_error(resp, 400, "invalid_value", "size")


async def test_size_check_of_the_catalog_is_exact_too():
    # The schema already refuses these; the model's own check must not rely on it.
    from imgproxy.catalog import capabilities_for

    caps = capabilities_for("placeholder", None)
    assert caps.allows_size("64x64") and caps.allows_size("1024x1792")
    for size in ["64x64\n", "64x64 ", "٦٤x٦٤", "+64x64", "64x+64", "6_4x64", "64x", "x64", "64X64", "auto"]:
        assert not caps.allows_size(size), size


@pytest.mark.parametrize(
    "query",
    [
        "expires={future}&signature=\u00e9" + "a" * 63,  # non-ASCII: compare_digest raised TypeError
        "expires={future}&signature=%F0%9F%90%B1",
        "expires={future}&signature=%ED%A0%80",  # not UTF-8
        "expires={future}&signature={sig_upper}",
        "expires=" + "9" * 5000 + "&signature={sig}",
        "expires=-1&signature={sig}",
        "expires=%20{future}&signature={sig_future}",  # int() would take it
        "expires=0{future}&signature={sig_future}",
        "expires=\u0661\u0667&signature={sig}",
        "expires={future}",
        "signature={sig_future}",
        "",
    ],
)
async def test_image_urls_that_are_not_signed_are_403(client, query):
    name = "A" * 24 + ".png"
    future = str(int(time.time()) + 3600)
    query = query.format(future=future, sig=sign(name, "1"), sig_future=sign(name, future), sig_upper=sign(name, future).upper())
    resp = await client.get(f"/v1/images/files/{name}?{query}")
    await assert_error(resp, 403, "invalid_signature")


@pytest.mark.parametrize("name", ["%00.png", "A%00" + "A" * 20 + ".png", "%ED%A0%80", "%FF", "..%2F..%2Fetc%2Fpasswd", "A" * 24 + ".png%0A", "\u00e9" * 20 + ".png"])
async def test_image_names_that_are_not_ours(client, name):
    expires = str(int(time.time()) + 3600)
    resp = await client.get(f"/v1/images/files/{name}?expires={expires}&signature={'0' * 64}")
    await assert_error(resp, 403, "invalid_signature")
    # Even signed (only the gateway can), the store never serves a name it did not make.
    decoded = {"%00": "\x00", "%2F": "/", "%0A": "\n"}
    plain = name
    for code, char in decoded.items():
        plain = plain.replace(code, char)
    resp = await client.get(f"/v1/images/files/{name}?expires={expires}&signature={sign(plain, expires)}")
    await assert_error(resp, 410, "image_gone") if plain.isascii() else await assert_error(resp, 403, "invalid_signature")


async def test_correctly_signed_urls_expire_and_vanish(client):
    name = "B" * 24 + ".png"
    past = str(int(time.time()) - 5)
    await assert_error(await client.get(f"/v1/images/files/{name}?expires={past}&signature={sign(name, past)}"), 410, "url_expired")
    future = "999999999999"  # the largest expiry accepted: signed, far away, and never stored
    await assert_error(await client.get(f"/v1/images/files/{name}?expires={future}&signature={sign(name, future)}"), 410, "image_gone")


async def test_a_very_long_path_is_404(client):
    await assert_error(await client.get("/v1/" + "a" * 8000, headers=AUTH), 404, "not_found")
    resp = await client.get("/v1/images/files/" + "a" * 8000 + "?expires=1&signature=x")
    await assert_error(resp, 403, "invalid_signature")


async def raw_request(client, head: bytes, body: bytes = b"") -> tuple[int, dict]:
    """Send bytes no HTTP client library would: the status and the JSON body that came back."""
    reader, writer = await asyncio.open_connection(client.server.host, client.server.port)
    writer.write(head + b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body)
    await writer.drain()
    answer = await reader.read()
    writer.close()
    head_part, _, payload = answer.partition(b"\r\n\r\n")
    return int(head_part.split(b" ", 2)[1]), json.loads(payload)


@pytest.mark.parametrize(
    "header",
    [
        "x-request-id: \u00e9\u00e9\u00e9".encode("utf-8"),
        b"x-request-id: \xff\xfe",
        b"x-request-id: " + b"a" * 8000,
        "traceparent: 00-\u00e9-00".encode("utf-8"),
        b"traceparent: \xff\xfe\x80",
        b"traceparent: 00-" + b"0" * 8000,
    ],
)
async def test_odd_header_bytes_are_not_a_500(client, fake_openai, header):
    body = json.dumps({"model": "dall-e-3", "prompt": "x"}).encode()
    head = b"POST " + URL.encode() + b" HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + CLIENT_KEY.encode() + b"\r\nContent-Type: application/json\r\n" + header
    status, answer = await raw_request(client, head, body)
    assert status == 200, answer
    assert "data" in answer
    # What reaches the upstream is well formed: a traceparent only as W3C Trace Context writes it.
    sent = fake_openai.headers[-1]
    assert all(value.isascii() and value.isprintable() for value in sent.values()), sent
    assert "traceparent" not in sent


@pytest.mark.parametrize("token", [b"\xff\xfe", "\u00e9".encode(), b"\xed\xa0\x80", CLIENT_KEY.encode() + b"\xff"])
async def test_api_keys_that_are_not_utf8_are_401(client, fake_openai, token):
    body = json.dumps({"model": "dall-e-3", "prompt": "x"}).encode()
    head = b"POST " + URL.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nAuthorization: Bearer " + token
    status, answer = await raw_request(client, head, body)
    assert (status, answer["error"]["code"]) == (401, "invalid_api_key"), answer
    assert fake_openai.requests == []


@pytest.mark.parametrize(
    "head",
    [
        b"GET /healthz HTTP/1.1\r\nHost: x\r\ntraceparent: \x01\x7f",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nx-request-id: a\x00b",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nx-request-id: " + b"a" * 9000,
        b"GET /v1/images/files/\xff\xfe.png?expires=1&signature=2 HTTP/1.1\r\nHost: x",
        b"GET /healthz?\xff=\xff HTTP/1.1\r\nHost: x",
        b"GET /\x00 HTTP/1.1\r\nHost: x",
        b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x",
    ],
)
async def test_what_the_http_parser_refuses_is_400(client, head):
    # Refused by aiohttp's HTTP parser before any gateway code runs: never a 500. (This
    # in-process server answers aiohttp's plain 400; `imgproxy serve`'s listener answers an
    # envelope that quotes nothing: tests/test_exhaustion.py.)
    reader, writer = await asyncio.open_connection(client.server.host, client.server.port)
    writer.write(head + b"\r\nConnection: close\r\n\r\n")
    answer = await reader.read()
    writer.close()
    assert answer.split(b" ", 2)[1] == b"400", answer[:200]


async def test_a_valid_traceparent_is_still_forwarded(client, fake_openai):
    traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    await images_body(await client.post(URL, json={"model": "dall-e-3", "prompt": "x"}, headers={**AUTH, "traceparent": traceparent}))
    assert fake_openai.headers[-1]["traceparent"] == traceparent


# An upstream that answers 200 with JSON the gateway cannot take is a 502 on each path that
# parses it: read whole (Stability), decoded as it arrives (dall-e-3 with its b64 images hosted).
UPSTREAM_BODIES = [
    b'{"created": 1, "artifacts": ' + b"[" * DEEP + b"]" * DEEP + b"}",
    b'{"created": 1, "artifacts": ' + b"[" * 70 + b"]" * 70 + b"}",
    b'{"created": ' + b"1" * 5000 + b', "artifacts": []}',
    b'{"created": ' + b"1" * 4000 + b', "artifacts": []}',
    b'{"created": NaN, "artifacts": []}',
    b'{"created": 1e400, "artifacts": []}',
    b'{"created": 1, "artifacts": [{"base64": "\xff\xfe"}]}',
]


@pytest.mark.parametrize("raw", UPSTREAM_BODIES)
@pytest.mark.parametrize("model", ["sdxl", "dall-e-3"])
async def test_upstream_bodies_that_cannot_be_parsed_are_502(client, fake_openai, fake_stability, raw, model):
    fake = fake_stability if model == "sdxl" else fake_openai
    fake.cue(body=raw.replace(b"artifacts", b"data") if model == "dall-e-3" else raw)
    resp = await client.post(URL, json={"model": model, "prompt": "x", "response_format": "url"}, headers=AUTH)
    await assert_error(resp, 502, "upstream_bad_response")
    assert len(fake.requests) == 1


@pytest.mark.parametrize("raw", UPSTREAM_BODIES[:3])
async def test_upstream_error_bodies_that_cannot_be_parsed_are_502(client, fake_openai, raw):
    fake_openai.cue(status=400, body=raw)
    resp = await client.post(URL, json={"model": "dall-e-3", "prompt": "x"}, headers=AUTH)
    await assert_error(resp, 502, "upstream_bad_response")


async def test_a_streamed_answer_with_a_deep_usage_is_a_502_not_a_500(client, fake_openai):
    # Checked as it is passed through (dall-e-3, b64_json): a usage that is not OpenAI's
    # usage object makes the answer invalid, whatever its depth.
    usage = b'"usage": {"total_tokens": ' + b"[" * 1500 + b"]" * 1500 + b"}"
    raw = b'{"created": 1, "data": [{"b64_json": "aGk="}], ' + usage + b"}"
    fake_openai.cue(body=raw)
    resp = await client.post(URL, json={"model": "dall-e-3", "prompt": "x", "response_format": "b64_json"}, headers=AUTH)
    await assert_error(resp, 502, "upstream_bad_response")


# Found by tests/test_fuzz.py's upstream fuzzing: fields of the right name and the wrong type.
async def test_usage_whose_counts_are_not_counts_is_dropped_not_billed_from(client, fake_openai):
    for usage in [{"output_tokens": "many"}, {"input_tokens_details": "x"}, {"input_tokens": -5}, {"total_tokens": True}, "100"]:
        fake_openai.cue(body={"created": 1, "data": [{"b64_json": FAKE_B64}], "usage": usage})
        body = await images_body(await client.post(URL, json={"model": "gpt-image-1", "prompt": "x"}, headers=AUTH))
        assert "usage" not in body and body["data"][0]["b64_json"] == FAKE_B64


async def test_an_output_format_that_is_not_text_is_ignored(client, fake_openai):
    fake_openai.cue(body={"created": 1, "data": [{"b64_json": FAKE_B64}], "output_format": {"png": 1}})
    body = await images_body(await client.post(URL, json={"model": "dall-e-2", "prompt": "x"}, headers=AUTH))
    assert (await download(client, body["data"][0]["url"])).headers["Content-Type"] == "image/png"


async def test_an_upstream_error_type_that_is_not_text_is_not_relayed(client, fake_openai):
    fake_openai.cue(status=400, body={"error": {"message": "no", "type": True, "code": None}})
    error = await assert_error(await client.post(URL, json={"model": "dall-e-3", "prompt": "x"}, headers=AUTH), 400, None)
    assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize("expect", ["something-else", "100-continue, x", "x" * 300])
async def test_an_expectation_other_than_100_continue_gets_the_ordinary_envelope(client, expect):
    # aiohttp's own answer would be a plain-text 417 quoting the header, before any middleware.
    resp = await client.post(URL, json={"model": "dall-e-3", "prompt": "x"}, headers={"Expect": expect})
    await assert_error(resp, 401, "invalid_api_key")


async def test_100_continue_still_lets_an_upload_through(client, fake_openai):
    host, port = client.server.host, client.server.port
    body = json.dumps({"model": "dall-e-3", "prompt": "a cat", "response_format": "b64_json"}).encode()
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(
        f"POST {URL} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {CLIENT_KEY}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nExpect: 100-continue\r\n\r\n".encode()
    )
    await writer.drain()
    assert await asyncio.wait_for(reader.readline(), 5) == b"HTTP/1.1 100 Continue\r\n"
    writer.write(body)
    await writer.drain()
    await reader.readline()  # the blank line after the 100
    assert (await asyncio.wait_for(reader.readline(), 5)).startswith(b"HTTP/1.1 200")
    writer.close()
