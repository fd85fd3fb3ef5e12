"""Answers streamed through: GPT image server-sent events (stream=true) one by one as they
arrive, and large base64 answers read by read."""

import asyncio
import base64
import json
import os

from imgproxy.hookspecs import hookimpl
from tests.conftest import AUTH, assert_error
from tests.fakes import openai_validator

URL = "/v1/images/generations"
PARTIAL = openai_validator("ImageGenPartialImageEvent")
COMPLETED = openai_validator("ImageGenCompletedEvent")


async def read_event(resp) -> tuple[str, dict]:
    lines = []
    while True:
        line = (await resp.content.readline()).decode()
        if line == "\n":
            break
        assert line, "stream ended before the event did"
        lines.append(line.rstrip("\n"))
    fields = dict(line.split(": ", 1) for line in lines)
    return fields["event"], json.loads(fields["data"])


async def test_events_arrive_before_the_upstream_finishes(client, fake_openai):
    fake_openai.hold = asyncio.Event()
    resp = await client.post(URL, json={"model": "gpt-image-1", "prompt": "x", "stream": True, "partial_images": 2}, headers=AUTH)
    assert resp.status == 200 and resp.content_type == "text/event-stream"
    # The upstream is paused after its first event: the client must already have it.
    kind, event = await asyncio.wait_for(read_event(resp), timeout=3)
    assert kind == "image_generation.partial_image" and list(PARTIAL.iter_errors(event)) == []
    fake_openai.hold.set()
    kind, event = await read_event(resp)
    assert kind == "image_generation.partial_image" and event["partial_image_index"] == 1
    kind, event = await read_event(resp)
    assert kind == "image_generation.completed" and list(COMPLETED.iter_errors(event)) == []
    assert event["usage"]["total_tokens"] == 100
    assert await resp.content.read() == b""
    sent = fake_openai.requests[-1]
    assert sent["stream"] is True and sent["partial_images"] == 2


async def test_upstream_error_before_the_stream_is_an_envelope(client):
    resp = await client.post(URL, json={"model": "gpt-image-1", "prompt": "forbidden", "stream": True}, headers=AUTH)
    await assert_error(resp, 400, "moderation_blocked")


async def test_upstream_answering_json_to_a_stream_request_is_502(client, fake_openai):
    fake_openai.cue(body={"created": 1, "data": []})
    resp = await client.post(URL, json={"model": "gpt-image-1", "prompt": "x", "stream": True}, headers=AUTH)
    await assert_error(resp, 502, "upstream_bad_response")


async def test_stream_cut_midway_ends_with_an_error_event(client, fake_openai):
    fake_openai.cue(cut=True, content_type="text/event-stream")
    resp = await client.post(URL, json={"model": "gpt-image-1", "prompt": "x", "stream": True}, headers=AUTH)
    assert resp.status == 200
    text = (await resp.read()).decode()
    assert "event: error" in text
    error = json.loads(text.split("event: error\ndata: ", 1)[1])
    assert error["error"]["code"] == "upstream_bad_response"


async def test_client_going_away_mid_stream_is_accounted_not_an_error(make_client, fake_openai, caplog):
    outcomes = []

    class Recorder:
        @hookimpl
        def imgproxy_record_usage(self, ctx, outcome):
            outcomes.append(outcome)

    client = await make_client(plugins=[Recorder()])
    fake_openai.hold = asyncio.Event()
    resp = await client.post(URL, json={"model": "gpt-image-1", "prompt": "x", "stream": True, "partial_images": 2}, headers=AUTH)
    await asyncio.wait_for(read_event(resp), timeout=3)
    resp.connection.transport.close()  # the client hangs up after the first event
    fake_openai.hold.set()
    for _ in range(50):
        if outcomes:
            break
        await asyncio.sleep(0.05)
    assert outcomes and outcomes[0].error_code == "client_closed_request"
    assert "unhandled error" not in caplog.text


async def test_large_base64_answer_passes_through_in_pieces(client, fake_openai, access_lines):
    # 2 x 1.5 MB of base64 arrives in many reads: forwarded as it comes, counted on the way.
    fake_openai.image_b64 = base64.b64encode(os.urandom(1_100_000)).decode()
    resp = await client.post(URL, json={"model": "dall-e-2", "prompt": "x", "n": 2, "response_format": "b64_json"}, headers=AUTH)
    raw = await resp.read()
    assert resp.status == 200 and resp.content_length == len(raw) > 2_900_000
    body = json.loads(raw)
    assert [item["b64_json"] for item in body["data"]] == [fake_openai.image_b64] * 2
    (line,) = access_lines()
    assert (line["images"], line["bytes"]) == (2, len(raw))


async def test_a_stream_that_stalls_past_the_timeout_ends_with_a_timeout_event_at_no_cost(make_client, fake_openai, tmp_path):
    log = tmp_path / "usage.jsonl"
    client = await make_client(extra=f"cost: {{usage_log: {log}}}", total_timeout=1)
    fake_openai.hold = asyncio.Event()  # after its first event the upstream sends nothing more
    resp = await client.post(URL, json={"model": "gpt-image-1", "prompt": "p", "stream": True, "partial_images": 2}, headers=AUTH)
    assert (await read_event(resp))[0] == "image_generation.partial_image"
    kind, event = await read_event(resp)
    assert kind == "error" and event["error"]["code"] == "upstream_timeout" and event["error"]["type"] == "server_error"
    fake_openai.hold.set()
    await client.close()
    (record,) = [json.loads(line) for line in log.read_text().splitlines()]
    assert (record["error"], record["images"], record["cost_usd"]) == ("upstream_timeout", 0, 0.0)
