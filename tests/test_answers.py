"""Answers: a 200 is always a valid ImagesResponse in the format asked for, and never more than
was paid for; the cost header says what the usage record says.

Each upstream here misbehaves on cue with raw bytes. The client either gets an answer that
passes OpenAI's ImagesResponse schema, or a failed response: an error envelope, or a body
broken off before its end that neither aiohttp nor the official SDK reads as complete.
"""

import base64
import gzip
import json
import os
import zlib

import aiohttp
import brotli
import openai
import pytest

from tests.conftest import AUTH, CLIENT_KEY, IMAGES_RESPONSE, assert_error, images_body
from tests.conftest import usage_record as record

URL = "/v1/images/generations"
DALLE2 = {"model": "dall-e-2", "prompt": "x", "size": "256x256"}  # $0.016 an image
IMAGE = os.urandom(1_500_000)
IMAGE_B64 = base64.b64encode(IMAGE).decode()  # 2 MB: read from the upstream in many pieces


def answer(*items: dict, **fields) -> bytes:
    return json.dumps({"created": 1713833628, "data": list(items), **fields}).encode()




async def post(client, body: dict, request_id: str):
    return await client.post(URL, json=body, headers={**AUTH, "x-request-id": request_id})


async def broken_off(resp) -> None:
    """The status line went out, but the body never completes."""
    assert resp.status == 200
    with pytest.raises(aiohttp.ClientPayloadError):
        await resp.read()


async def valid_answer(resp, want: str) -> dict:
    body = await images_body(resp)  # 200, and OpenAI's ImagesResponse schema
    assert body["data"] and all(set(item) & {"url", "b64_json"} == {want} for item in body["data"]), body
    return body


# -- Seen: b64_json answers streamed through after checking only their first byte ----------


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b"{this is not json}", id="not-json"),
        pytest.param(b'{"created": 1, "images": []}', id="no-data"),
        pytest.param(b'{"created": 1, "data": {"b64_json": "aGk="}}', id="data-not-a-list"),
        pytest.param(answer({"b64_json": "aGVs$bG8="}), id="broken-base64"),
        pytest.param(answer({"b64_json": "aGk=aGk="}), id="base64-after-padding"),
        pytest.param(answer({"b64_json": ""}), id="empty-image"),
        pytest.param(answer({"url": "https://cdn.example/1.png"}), id="url-for-b64_json"),
        pytest.param(answer({"b64_json": "aGk=", "url": "https://cdn.example/1.png"}), id="both-formats"),
        pytest.param(answer({"b64_json": "aGk="}) + b' {"more": 1}', id="text-after-the-object"),
        pytest.param(answer({"b64_json": "aGk="})[:-1], id="unfinished-object"),
        pytest.param(answer({"b64_json": "aGk="}, usage={"total_tokens": "many"}), id="bad-usage"),
        pytest.param(answer({"b64_json": "aGk="}, quality="ultra"), id="quality-outside-the-schema"),
        pytest.param(json.dumps({"data": [{"b64_json": "aGk="}]}).encode(), id="no-created"),
        pytest.param(answer({"b64_json": "aGk="}, extra={"b64_json": "aGk="}), id="image-outside-data"),
    ],
)
async def test_a_small_bad_answer_is_refused_before_the_status(gateway, fake_openai, usage_log, raw):
    fake_openai.cue(body=raw)
    resp = await post(gateway, {**DALLE2, "response_format": "b64_json"}, "small-bad")
    await assert_error(resp, 502, "upstream_bad_response")
    rec = await record(usage_log, "small-bad")
    assert (rec["status"], rec["error"], rec["images"], rec["cost_usd"]) == (502, "upstream_bad_response", 0, 0.0)
    assert resp.headers["x-imgproxy-cost-usd"] == "0.000000"


BIG_BAD = {
    # A fault only the end (or the middle) of a 2 MB answer shows, after the status line is out.
    "broken-base64": answer({"b64_json": IMAGE_B64[:1_000_000] + "$$$$" + IMAGE_B64[1_000_004:]}),
    "no-data": json.dumps({"created": 1, "images": [{"b64_json": IMAGE_B64}]}).encode(),
    "second-image-as-url": answer({"b64_json": IMAGE_B64}, {"url": "https://cdn.example/2.png"}),
    "text-after-the-object": answer({"b64_json": IMAGE_B64}) + b"\n<html>oops</html>",
    "unfinished-object": answer({"b64_json": IMAGE_B64})[:-2],
    "no-created": json.dumps({"data": [{"b64_json": IMAGE_B64}]}).encode(),
    "huge-revised-prompt": answer({"b64_json": IMAGE_B64, "revised_prompt": "x" * 2_000_000}),
}


@pytest.mark.parametrize("name", list(BIG_BAD))
async def test_a_large_bad_answer_is_broken_off(gateway, fake_openai, usage_log, name):
    fake_openai.cue(body=BIG_BAD[name])
    resp = await post(gateway, {**DALLE2, "n": 2, "response_format": "b64_json"}, f"big-{name}")
    await broken_off(resp)
    assert "x-imgproxy-cost-usd" not in resp.headers  # the headers went out before the cost was known
    rec = await record(usage_log, f"big-{name}")
    assert (rec["status"], rec["error"], rec["cost_usd"]) == (200, "upstream_bad_response", 0.0)
    assert rec["images"] <= 1


async def test_a_broken_off_answer_is_an_error_for_the_official_sdk(gateway, fake_openai, sdk_for):
    fake_openai.cue(body=BIG_BAD["unfinished-object"])
    with pytest.raises(openai.APIConnectionError):
        await sdk_for(gateway).images.generate(model="dall-e-2", prompt="x", size="256x256", response_format="b64_json")


async def test_a_large_good_answer_still_passes_through(gateway, fake_openai, usage_log):
    fake_openai.cue(body=answer({"b64_json": IMAGE_B64}, {"b64_json": IMAGE_B64}) + b"\n")
    resp = await post(gateway, {**DALLE2, "n": 2, "response_format": "b64_json"}, "big-good")
    body = await valid_answer(resp, "b64_json")
    assert [base64.b64decode(item["b64_json"]) for item in body["data"]] == [IMAGE, IMAGE]
    rec = await record(usage_log, "big-good")
    assert (rec["status"], rec["error"], rec["images"], rec["cost_usd"]) == (200, None, 2, 0.032)


def _deflate(raw: bytes) -> bytes:
    return zlib.compress(raw)


@pytest.mark.parametrize("encoding, compress", [("gzip", gzip.compress), ("deflate", _deflate), ("br", brotli.compress)])
@pytest.mark.parametrize("image_b64", [IMAGE_B64, "aGk="], ids=["large", "small"])
async def test_an_encoded_answer_is_decoded_with_its_true_length(gateway, fake_openai, usage_log, encoding, compress, image_b64):
    # The upstream ignores Accept-Encoding: identity; its Content-Length is the encoded length.
    fake_openai.cue(body=compress(answer({"b64_json": image_b64})), headers={"Content-Encoding": encoding})
    resp = await post(gateway, {**DALLE2, "response_format": "b64_json"}, f"enc-{encoding}")
    raw = await resp.read()
    assert resp.status == 200 and "Content-Encoding" not in resp.headers
    assert resp.content_length in (None, len(raw))
    body = json.loads(raw)
    assert list(IMAGES_RESPONSE.iter_errors(body)) == [] and body["data"] == [{"b64_json": image_b64}]
    rec = await record(usage_log, f"enc-{encoding}")
    assert (rec["images"], rec["cost_usd"]) == (1, 0.016)


@pytest.mark.parametrize("response_format", ["url", "b64_json"])
async def test_an_encoded_answer_that_is_parsed_is_decoded_too(gateway, fake_openai, response_format):
    # Hosting (url) reads the answer in the gateway; gpt-image-1 (token priced) does too.
    model = {**DALLE2, "response_format": response_format} if response_format == "url" else {"model": "gpt-image-1", "prompt": "x"}
    fake_openai.cue(body=gzip.compress(answer({"b64_json": IMAGE_B64})), headers={"Content-Encoding": "gzip"})
    await valid_answer(await post(gateway, model, "parsed-gzip"), response_format)


# -- Seen: more images than n delivered and billed ------------------------------------------


def hundred(image_b64: str) -> bytes:
    return answer(*[{"b64_json": image_b64}] * 100)


async def test_a_hundred_small_images_for_n_1_streamed_through(make_client, config_text, fake_openai, usage_log):
    # A per-minute budget far smaller than 100 images: at most one image may ever be charged.
    text = config_text(extra=f"cost: {{usage_log: {usage_log}}}").replace(f"key: {CLIENT_KEY}", f"key: {CLIENT_KEY}\n      budget: {{usd_per_minute: 0.05}}")
    client = await make_client(text)
    fake_openai.cue(body=hundred("aGk="))
    resp = await post(client, {**DALLE2, "n": 1, "response_format": "b64_json"}, "hundred-small")
    await assert_error(resp, 502, "upstream_bad_response")
    rec = await record(usage_log, "hundred-small")
    assert (rec["images"], rec["cost_usd"]) == (0, 0.0)
    # Nothing was spent: three more single images ($0.048) still fit the $0.05 minute.
    for _ in range(3):
        await valid_answer(await post(client, {**DALLE2, "response_format": "b64_json"}, "after"), "b64_json")


async def test_a_hundred_large_images_for_n_1_streamed_through(gateway, fake_openai, usage_log, access_lines):
    fake_openai.cue(body=hundred(IMAGE_B64[:400_000]))
    resp = await post(gateway, {**DALLE2, "n": 1, "response_format": "b64_json"}, "hundred-large")
    await broken_off(resp)
    rec = await record(usage_log, "hundred-large")
    assert rec["images"] <= 1 and rec["cost_usd"] == 0.0 and rec["error"] == "upstream_bad_response"
    # Relaying stopped at the second image: not much more than one of the hundred went out.
    (line,) = access_lines()
    assert line["bytes"] < 2 * 400_000


@pytest.mark.parametrize(
    "body, want",
    [
        ({**DALLE2, "n": 1}, "url"),  # hosted: base64 decoded by the gateway
        ({"model": "gpt-image-1", "prompt": "x", "quality": "low", "size": "1024x1024"}, "b64_json"),  # read whole
    ],
)
async def test_a_hundred_images_for_n_1_are_cut_to_one_when_parsed(gateway, fake_openai, usage_log, body, want):
    fake_openai.cue(body=hundred(IMAGE_B64[:40_000]))
    resp = await post(gateway, body, "hundred-parsed")
    answer_body = await valid_answer(resp, want)
    assert len(answer_body["data"]) == 1
    rec = await record(usage_log, "hundred-parsed")
    assert rec["images"] == 1 and resp.headers["x-imgproxy-cost-usd"] == f"{rec['cost_usd']:.6f}"
    assert rec["cost_usd"] <= 0.016 if want == "url" else rec["cost_usd"] <= 0.0110025


# -- Seen: a quality field in the answer changed the price ----------------------------------


async def test_the_answers_quality_and_size_do_not_change_the_price(gateway, fake_openai, usage_log):
    # dall-e-3 standard 1024x1024 is $0.04; "high" at 1536x1024 would have priced at $0.12.
    fake_openai.cue(body=answer({"url": f"{fake_openai.base_url}/files/a.png"}, quality="high", size="1536x1024"))
    resp = await post(gateway, {"model": "dall-e-3", "prompt": "x"}, "quality")
    await valid_answer(resp, "url")
    rec = await record(usage_log, "quality")
    assert (resp.headers["x-imgproxy-cost-usd"], rec["cost_usd"]) == ("0.040000", 0.04)


async def test_token_usage_is_bounded_by_the_worst_case(gateway, fake_openai, usage_log):
    usage = {"total_tokens": 10**9, "input_tokens": 10, "output_tokens": 10**9, "input_tokens_details": {"text_tokens": 10, "image_tokens": 0}}
    fake_openai.cue(body=answer({"b64_json": "aGk="}, usage=usage))
    resp = await post(gateway, {"model": "gpt-image-1", "prompt": "xy", "quality": "low", "size": "1024x1024"}, "tokens")
    await valid_answer(resp, "b64_json")
    rec = await record(usage_log, "tokens")
    # One low 1024x1024 image ($0.011) plus the prompt's tokens at worst (1 token at $5/M).
    assert rec["cost_usd"] == pytest.approx(0.011005, abs=1e-6)
    assert resp.headers["x-imgproxy-cost-usd"] == f"{rec['cost_usd']:.6f}"


async def test_usage_that_is_not_a_usage_object_is_not_sent_nor_priced(gateway, fake_openai, usage_log):
    fake_openai.cue(body=answer({"b64_json": "aGk="}, usage={"output_tokens": "lots"}))
    resp = await post(gateway, {"model": "gpt-image-1", "prompt": "x", "quality": "low", "size": "1024x1024"}, "bad-usage")
    body = await valid_answer(resp, "b64_json")
    assert "usage" not in body
    rec = await record(usage_log, "bad-usage")  # the record is not lost to a TypeError
    assert (rec["images"], rec["cost_usd"]) == (1, 0.011)


# -- Cost header: the same number as the usage record ---------------------------------------


async def test_the_cost_header_is_the_usage_records_cost(make_client, config_text, fake_openai, usage_log):
    text = config_text(extra=f"cost: {{usage_log: {usage_log}}}").replace(
        "  placeholder:\n    type: placeholder\n", "  placeholder:\n    type: placeholder\n  nokey:\n    type: openai\n    base_url: http://127.0.0.1:9/v1\n"
    ).replace("models:\n", "models:\n  unkeyed: {provider: nokey, upstream_model: dall-e-2}\n")
    client = await make_client(text)
    cases = {
        "ok": ({**DALLE2, "n": 2}, 200, "0.032000"),
        "ok-b64": ({**DALLE2, "response_format": "b64_json"}, 200, "0.016000"),  # small: checked whole, then sent
        "no-key": ({**DALLE2, "model": "unkeyed"}, 503, "0.000000"),
        "policy": ({**DALLE2, "prompt": "forbidden"}, 400, "0.000000"),
        "5xx": ({**DALLE2, "n": 3}, 502, "0.000000"),
    }
    for request_id, (body, status, cost) in cases.items():
        if request_id == "5xx":
            fake_openai.cue(status=500, body={"error": {"message": "boom", "type": "server_error", "param": None, "code": None}})
        resp = await post(client, body, request_id)
        await resp.read()
        assert resp.status == status, request_id
        rec = await record(usage_log, request_id)
        assert resp.headers["x-imgproxy-cost-usd"] == f"{rec['cost_usd']:.6f}" == cost, request_id


async def test_streamed_answers_carry_no_cost_header(gateway, fake_openai, usage_log):
    # n=2 asked, one image came: the record says one, and no header claims the full price.
    resp = await post(gateway, {"model": "gpt-image-1", "prompt": "x", "n": 2, "stream": True}, "sse")
    await resp.read()
    assert resp.status == 200 and "x-imgproxy-cost-usd" not in resp.headers
    rec = await record(usage_log, "sse")
    assert (rec["images"], rec["cost_usd"]) == (1, 0.00245)
    fake_openai.cue(body=answer({"b64_json": IMAGE_B64}))
    resp = await post(gateway, {**DALLE2, "n": 2, "response_format": "b64_json"}, "large")
    await valid_answer(resp, "b64_json")
    assert "x-imgproxy-cost-usd" not in resp.headers
    rec = await record(usage_log, "large")
    assert (rec["images"], rec["cost_usd"]) == (1, 0.016)


async def test_a_stream_with_more_images_than_n_ends_after_the_nth(gateway, fake_openai, usage_log):
    usage = {"total_tokens": 100, "input_tokens": 50, "output_tokens": 50, "input_tokens_details": {"text_tokens": 10, "image_tokens": 40}}
    common = {"created_at": 1, "size": "1024x1024", "quality": "high", "background": "opaque", "output_format": "png", "usage": usage}
    events = b"".join(
        f"event: image_generation.completed\ndata: {json.dumps({'type': 'image_generation.completed', 'b64_json': 'aGk=', **common})}\n\n".encode()
        for _ in range(3)
    )
    fake_openai.cue(body=events, content_type="text/event-stream")
    resp = await post(gateway, {"model": "gpt-image-1", "prompt": "x", "stream": True}, "sse-extra")
    text = (await resp.read()).decode()
    assert resp.status == 200
    assert text.count("event: image_generation.completed") == 1 and text.endswith("\n\n")
    rec = await record(usage_log, "sse-extra")
    assert (rec["images"], rec["cost_usd"]) == (1, 0.00245)


async def test_an_encoding_the_gateway_cannot_decode_is_a_502(gateway, fake_openai):
    fake_openai.cue(body=b"(\xb5/\xfd not really zstd", headers={"Content-Encoding": "zstd"})
    resp = await post(gateway, {**DALLE2, "response_format": "b64_json"}, "zstd")
    await assert_error(resp, 502, "upstream_bad_response")


async def test_an_encoded_answer_corrupt_midway_is_broken_off(gateway, fake_openai, usage_log):
    packed = bytearray(gzip.compress(answer({"b64_json": IMAGE_B64})))
    packed[len(packed) // 2 : len(packed) // 2 + 64] = os.urandom(64)
    fake_openai.cue(body=bytes(packed), headers={"Content-Encoding": "gzip"})
    resp = await post(gateway, {**DALLE2, "response_format": "b64_json"}, "gzip-corrupt")
    await broken_off(resp)
    rec = await record(usage_log, "gzip-corrupt")
    assert (rec["status"], rec["error"], rec["images"], rec["cost_usd"]) == (200, "upstream_bad_response", 0, 0.0)


@pytest.mark.parametrize("value", ["aGVs$bG8=", "aGk=aGk=", "", "aGVsbG8"])
async def test_a_parsed_answer_with_broken_base64_is_a_502_whichever_provider(gateway, fake_openai, fake_stability, value):
    # gpt-image-1 is read whole (token priced); Stability is always parsed.
    fake_openai.cue(body=answer({"b64_json": value}))
    await assert_error(await post(gateway, {"model": "gpt-image-1", "prompt": "x"}, "b64-gpt"), 502, "upstream_bad_response")
    fake_stability.cue(body={"artifacts": [{"base64": value, "finishReason": "SUCCESS", "seed": 1}]})
    await assert_error(await post(gateway, {"model": "sdxl", "prompt": "x", "response_format": "b64_json"}, "b64-sdxl"), 502, "upstream_bad_response")


BAD_OUTPUT_DETAILS = [{"image_tokens": "many", "text_tokens": 0}, {}, {"image_tokens": 1.5, "text_tokens": 0}, "x", None]


@pytest.mark.parametrize("details", BAD_OUTPUT_DETAILS)
async def test_usage_with_misshapen_output_details_never_reaches_a_client_in_a_200(gateway, fake_openai, usage_log, details):
    # `output_tokens_details` is optional in ImageGenUsage, but when present its two counts are
    # required integers: a relayed answer carrying anything else is not an ImagesResponse.
    usage = {"total_tokens": 100, "input_tokens": 50, "output_tokens": 50, "input_tokens_details": {"text_tokens": 10, "image_tokens": 40}}
    fake_openai.cue(body=answer({"b64_json": "aGk="}, usage={**usage, "output_tokens_details": details}))
    resp = await post(gateway, {**DALLE2, "response_format": "b64_json"}, "relayed-details")
    await assert_error(resp, 502, "upstream_bad_response")  # relayed: refused before the status
    fake_openai.cue(body=answer({"b64_json": "aGk="}, usage={**usage, "output_tokens_details": details}))
    resp = await post(gateway, {"model": "gpt-image-1", "prompt": "x", "quality": "low", "size": "1024x1024"}, "parsed-details")
    body = await valid_answer(resp, "b64_json")  # parsed: usage dropped, the image priced as an image
    assert "usage" not in body
    rec = await record(usage_log, "parsed-details")
    assert (rec["images"], rec["cost_usd"]) == (1, 0.011)


async def test_usage_with_well_formed_output_details_still_passes(gateway, fake_openai):
    usage = {
        "total_tokens": 100, "input_tokens": 50, "output_tokens": 50,
        "input_tokens_details": {"text_tokens": 10, "image_tokens": 40}, "output_tokens_details": {"text_tokens": 0, "image_tokens": 50},
    }
    fake_openai.cue(body=answer({"b64_json": "aGk="}, usage=usage))
    body = await valid_answer(await post(gateway, {**DALLE2, "response_format": "b64_json"}, "good-details"), "b64_json")
    assert body["usage"] == usage
