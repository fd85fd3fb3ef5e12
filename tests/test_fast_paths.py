"""The request path's shortcuts for the common case decide exactly what the general path decides.

Each shortcut is compared with the general path it stands in for, on the inputs an upstream or
a client could send to tell them apart (hostile ones included), and shown to be taken at all.
"""

from __future__ import annotations

import asyncio
import gc
import json
import time
import weakref
from datetime import datetime, timezone

import pytest
from hypothesis import HealthCheck, example, given, settings
from aiohttp import web
from hypothesis import strategies as st

from imgproxy import limits, untrusted_json
from imgproxy.config import ServerConfig
from imgproxy.hookspecs import hookimpl
from imgproxy.inline_images import MAX_SKELETON, AnswerCheck, InlineImageError
from imgproxy.limits import UpstreamBuffer
from imgproxy.listener import GuardedRunner, Listener
from imgproxy.metrics import Metrics
from imgproxy.pluginmanager import DEFAULT_PLUGINS, Hooks, build_plugin_manager
from imgproxy.plugins.cost import spend_periods
from tests.conftest import AUTH, images_body

SETTINGS = settings(max_examples=600, derandomize=True, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
USAGE = {"total_tokens": 3, "input_tokens": 1, "output_tokens": 2, "input_tokens_details": {"text_tokens": 1, "image_tokens": 0}}

# -- AnswerCheck: an answer whole in its first read is checked in one parse ------------------

scalars = st.none() | st.booleans() | st.integers() | st.sampled_from([2**63, -(2**63) - 1, 10**40, 1.5, 1e308]) | st.text(max_size=6)
items = st.fixed_dictionaries(
    {},
    optional={
        "url": st.sampled_from(["https://cdn.example/1.png", 7, None]),
        "b64_json": st.sampled_from(["aGk=", "", "aGk", None, 1]),
        "revised_prompt": st.sampled_from(['a "}]} \\ \\"{ b64_json"', "\ud800", 3]) | st.text(max_size=8),
    },
)
answers = st.fixed_dictionaries(
    {},
    optional={
        "created": st.just(1713833628) | st.integers(-(2**64), 2**64) | st.sampled_from(["1", 1.0]),
        "data": st.lists(items, max_size=4) | scalars,
        "usage": st.sampled_from([USAGE, {**USAGE, "total_tokens": -1}, {"total_tokens": 1}, [USAGE]]),
        "quality": st.sampled_from(["high", "ultra", 1]),
        "size": st.sampled_from(["1024x1024", "7x7"]),
        "extra": scalars | st.sampled_from([{"b64_json": "aGk="}, {"b64_json": None}]),
    },
)
# Ways the bytes can differ from the plain dump: what json.dumps cannot write, and framing.
MANGLE = {
    "none": lambda raw: raw,
    "pretty": lambda raw: json.dumps(json.loads(raw), indent=1).encode() + b"\n",
    "escaped-key": lambda raw: raw.replace(b'"b64_json"', b'"b64\\u005fjson"'),
    "nan": lambda raw: raw.replace(b'"created": ', b'"created": NaN, "c": ', 1),
    "infinity": lambda raw: raw.replace(b'"created": ', b'"created": 1e999, "c": ', 1),
    "deep": lambda raw: raw[:-1] + b', "deep": ' + b"[" * 70 + b"]" * 70 + b"}",
    "lone-surrogate": lambda raw: raw[:-1] + b', "s": "\\ud800"}',
    "after": lambda raw: raw + b' {"more": 1}',
    "array": lambda raw: b"[" + raw + b"]",
    "cut": lambda raw: raw[:-2],
    "bad-utf8": lambda raw: raw[:-1] + b', "s": "\xff"}',
    "duplicate-data": lambda raw: raw[:-1] + b', "data": []}',
}


def verdict(pieces: list[bytes], n: int, want: str):
    """What AnswerCheck says of an answer read in these pieces: the fault, or what it counts."""
    check = AnswerCheck(n, want)
    try:
        for piece in pieces:
            check.feed(piece)
        check.finish()
    except InlineImageError:
        return "refused"
    return check.images, check.usage


@SETTINGS
@given(answer=answers, mangle=st.sampled_from(sorted(MANGLE)), n=st.integers(1, 3), want=st.sampled_from(["url", "b64_json"]))
@example(answer={"created": 1, "data": [{"url": "https://cdn.example/1.png"}]}, mangle="escaped-key", n=1, want="url")
@example(answer={"created": 1, "data": [{"b64_json": "aGk="}]}, mangle="escaped-key", n=1, want="b64_json")
@example(answer={"created": 1, "data": [{"url": "https://cdn.example/1.png"}], "extra": {"b64_json": None}}, mangle="none", n=1, want="url")
@example(answer={"created": 1, "data": [{"b64_json": "aGk="}]}, mangle="none", n=1, want="b64_json")
@example(answer={"created": 1, "data": [{"b64_json": "aGk"}]}, mangle="none", n=1, want="b64_json")
@example(answer={"created": 1, "data": [{"b64_json": "aGk="}], "extra": {"b64_json": "aGk="}}, mangle="none", n=2, want="b64_json")
def test_an_answer_in_one_read_is_judged_as_when_read_in_pieces(answer, mangle, n, want):
    raw = MANGLE[mangle](json.dumps(answer).encode())
    # The first piece of one byte is never a whole answer: the piece-by-piece reader decides.
    assert verdict([raw], n, want) == verdict([raw[:1], raw[1:]], n, want)
    assert verdict([raw, b" \n"], n, want) == verdict([raw[:1], raw[1:], b" \n"], n, want)


def test_a_small_url_answer_takes_the_shortcut_and_is_still_checked():
    good = json.dumps({"created": 1, "data": [{"url": "https://cdn.example/1.png"}], "usage": USAGE}).encode() + b"\n"
    check = AnswerCheck(1, "url")
    check.feed(good)
    assert check.ended and check._whole is not None  # decided by the one parse, not the reader
    check.feed(b"  \r\n")  # whitespace after the object is still JSON
    check.finish()
    assert (check.images, check.usage) == (1, USAGE)
    # Its faults are seen in that first read, before a status goes out.
    for bad, n in [
        (json.dumps({"created": 1, "data": [{"url": "https://a/1.png"}, {"url": "https://a/2.png"}]}).encode(), 1),
        (json.dumps({"created": 2**63, "data": []}).encode(), 1),
        (json.dumps({"created": 1, "data": [{"url": "https://a/1.png", "b64\\u005fjson": "aGk="}]}).encode().replace(b"\\\\", b"\\"), 1),
        (json.dumps({"created": 1, "data": [], "usage": {"total_tokens": 1}}).encode(), 1),
    ]:
        with pytest.raises(InlineImageError):
            AnswerCheck(n, "url").feed(bad)


def test_what_follows_a_whole_first_read_is_still_checked():
    good = json.dumps({"created": 1, "data": [{"url": "https://cdn.example/1.png"}]}).encode()
    check = AnswerCheck(1, "url")
    check.feed(good)
    with pytest.raises(InlineImageError):
        check.feed(b' {"data": []}')
    # Endless whitespace is held to the skeleton's bound, as when read piece by piece.
    check = AnswerCheck(1, "url")
    check.feed(good)
    with pytest.raises(InlineImageError):
        for _ in range(MAX_SKELETON // 65536 + 1):
            check.feed(b" " * 65536)


def test_a_whole_first_read_is_held_to_the_skeletons_bound():
    raw = json.dumps({"created": 1, "data": [{"url": "https://cdn.example/1.png", "revised_prompt": "x" * MAX_SKELETON}]}).encode()
    assert verdict([raw], 1, "url") == verdict([raw[:1], raw[1:]], 1, "url") == "refused"


# -- Pending records: the memory backend makes one only when a sweep claims it --------------


@pytest.mark.parametrize("logged", [True, False])
async def test_a_memory_reservation_claimed_by_a_sweep_has_the_requests_record(make_client, fake_openai, tmp_path, logged):
    usage = tmp_path / "usage.jsonl"
    client = await make_client(extra=f"cost: {{usage_log: {usage}}}" if logged else "")
    day = spend_periods("team-a", int(time.time() // 60))[0][1]
    state = client.gateway.state
    fake_openai.delay = 0.5
    body = {"model": "dall-e-2", "prompt": "x", "size": "256x256", "n": 2, "user": "end-user-1"}
    before = datetime.now(timezone.utc)
    call = asyncio.ensure_future(client.post("/v1/images/generations", json=body, headers={**AUTH, "x-request-id": "slow-1"}))
    while not fake_openai.requests:
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.2)
    claimed_at = datetime.now(timezone.utc)
    state.clock = lambda: time.time() + 10_000  # past every deadline: as if the call had hung
    [record] = await state.claim_expired()
    assert record.pop("user") not in (None, "end-user-1")  # hashed, as in every record
    assert before <= datetime.fromisoformat(record.pop("time")) <= claimed_at  # when it was reserved, not claimed
    assert record == {
        "request_id": "slow-1", "key": "team-a", "model": "dall-e-2", "provider": "openai", "n": 2, "size": "256x256",
        "quality": "standard", "cost_usd": 0.032,
    }
    await images_body(await call)
    # Billed once: by the claim, at its worst case; the request's own record (if records are
    # written at all) says so.
    assert await state.get(day) == pytest.approx(0.032)
    if logged:
        [line] = usage.read_text().splitlines()
        assert json.loads(line)["recovered_already"] is True
    else:
        assert not usage.exists()
    assert await state.claim_expired() == []


# -- The listener: a request whose headers come whole in one read starts no timer ------------

LIMIT = 512  # few enough short header lines for aiohttp to parse them (it allows 128)


@pytest.fixture
async def guarded():
    """A guarded port in this process (max_header_bytes LIMIT, header_timeout 0.5 s) serving
    GET /ok; yields its listener and port."""
    app = web.Application()
    async def ok(request):
        return web.Response(text="ok")

    app.router.add_get("/ok", ok)
    listener = Listener("api", 100, ServerConfig(max_header_bytes=LIMIT, header_timeout=0.5), Metrics())
    runner = GuardedRunner(app, listener, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield listener, runner.addresses[0][1]
    await runner.cleanup()


def head(size: int, shape: str) -> bytes:
    """A GET whose request line and headers are about `size` bytes: one long header, or as many
    of the shortest header lines as fit (each 4 bytes, estimated 5)."""
    start = "GET /ok HTTP/1.1\r\nHost: g\r\n"
    if shape == "long":
        return (start + f"X-Fill: {'v' * max(0, size - len(start) - 10)}\r\n\r\n").encode()
    return (start + "a:\r\n" * max(0, (size - len(start)) // 4) + "\r\n").encode()


async def status_of(reader, writer, raw: bytes) -> int:
    writer.write(raw)
    line = await asyncio.wait_for(reader.readline(), 5)
    status = int(line.split()[1])
    while (await asyncio.wait_for(reader.readline(), 5)) not in (b"\r\n", b""):
        pass
    if status == 200:
        await asyncio.wait_for(reader.readexactly(2), 5)  # "ok"
    return status


@pytest.mark.parametrize("shape", ["long", "tiny"])
@pytest.mark.parametrize("size, expected", [(100, 200), (LIMIT // 2, 200), (LIMIT * 3 // 4, 200), (LIMIT + 200, 431), (LIMIT * 2 - 100, 431)])
async def test_headers_in_one_read_are_held_to_the_limit_on_every_request_of_a_connection(guarded, size, expected, shape):
    listener, port = guarded
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        # The first request (waited for since the connection opened), a kept-alive one, and
        # one pipelined behind it in the same read.
        assert await status_of(reader, writer, b"GET /ok HTTP/1.1\r\nHost: g\r\n\r\n") == 200
        assert await status_of(reader, writer, head(size, shape)) == expected
        if expected == 200:
            assert await status_of(reader, writer, b"GET /ok HTTP/1.1\r\nHost: g\r\n\r\n" + head(size, shape)) == 200
            assert await status_of(reader, writer, b"") == expected
    finally:
        writer.close()
    assert listener.open <= 1


async def test_headers_that_stop_short_still_meet_the_deadline(guarded):
    listener, port = guarded
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        assert await status_of(reader, writer, b"GET /ok HTTP/1.1\r\nHost: g\r\n\r\n") == 200
        # Kept alive, then half a request: its deadline starts with its first byte.
        assert await status_of(reader, writer, b"GET /ok HTTP/1.1\r\nHost: g\r\n") == 408
    finally:
        writer.close()


# -- Hooks: arguments picked per implementation once, not per call ---------------------------


async def test_each_implementation_gets_the_arguments_it_names_in_its_order():
    seen = []

    class Reversed:
        @hookimpl
        async def imgproxy_record_usage(self, outcome, ctx):
            seen.append(("reversed", outcome, ctx))

    class Partial:
        @hookimpl
        def imgproxy_record_usage(self, outcome):
            seen.append(("partial", outcome))

    class Nothing:
        @hookimpl
        def imgproxy_record_usage(self):
            seen.append(("nothing",))

    class Failing:
        @hookimpl
        def imgproxy_record_usage(self, ctx, outcome):
            seen.append(("failing", ctx, outcome))
            raise RuntimeError("a guarded hook goes on")

    hooks = Hooks(build_plugin_manager(disable=tuple(DEFAULT_PLUGINS), extra=(Reversed, Partial, Nothing, Failing)))
    await hooks.call("imgproxy_record_usage", ctx="the ctx", outcome="the outcome")
    assert seen == [("failing", "the ctx", "the outcome"), ("nothing",), ("partial", "the outcome"), ("reversed", "the outcome", "the ctx")]

    class Second:
        @hookimpl
        def imgproxy_configure(self, gateway):
            seen.append(gateway)

    class First:
        @hookimpl
        async def imgproxy_authenticate(self, ctx):
            return ctx

    hooks = Hooks(build_plugin_manager(disable=tuple(DEFAULT_PLUGINS), extra=(Second, First)))
    assert await hooks.call("imgproxy_authenticate", ctx="me") == "me"
    await hooks.call("imgproxy_configure", gateway="the gateway")
    assert seen[-1] == "the gateway"


# -- The upstream buffer: a lease is tied to the request's task only once it holds bytes -------


async def test_bytes_held_for_a_request_are_released_when_its_task_ends_not_a_childs():
    buffer = UpstreamBuffer(Metrics())
    child_done, finish = asyncio.Event(), asyncio.Event()

    async def download() -> None:  # as the rewrite plugin's parallel fetches: a task of its own
        limits.charge(1000)

    async def request(charges: bool) -> None:
        buffer.admit(10_000)
        if charges:
            await asyncio.gather(download(), download())
        child_done.set()
        await finish.wait()

    task = asyncio.ensure_future(request(True))
    await child_done.wait()
    await asyncio.sleep(0)
    assert buffer.held == 2000  # the children have ended; the request has not
    finish.set()
    await task
    await asyncio.sleep(0)
    assert buffer.held == 0
    # A request that held nothing leaves nothing behind, and no reference cycle.
    gc.disable()
    try:
        task = asyncio.ensure_future(request(False))
        await task
        await asyncio.sleep(0)
        ended, task = weakref.ref(task), None
        assert ended() is None  # freed by its count of references, not left to the collector
    finally:
        gc.enable()
    assert buffer.held == 0
    limits.charge(5)  # outside an admitted request (this test's task) nothing is counted
    assert buffer.held == 0


# -- untrusted_json: the scanner called directly decides as JSONDecoder.decode does ---------


def decoded_as_before(raw: bytes):
    """untrusted_json.loads as it was, through JSONDecoder.decode: the value, or the error."""
    try:
        text = raw.decode("utf-8")
        value = untrusted_json._DECODER.decode(text)
        if text.count("[") + text.count("{") > untrusted_json.MAX_DEPTH or "\\u" in text:
            untrusted_json._walk(value, untrusted_json.MAX_DEPTH, True)
        return "ok", value
    except RecursionError:
        return "error", "nested"
    except ValueError as exc:
        return "error", "nested" if "nested" in str(exc) else f"{type(exc).__name__}: {exc}"


def decoded_now(raw: bytes):
    try:
        return "ok", untrusted_json.loads(raw, text_only=True)
    except ValueError as exc:
        return "error", "nested" if "nested" in str(exc) else f"{type(exc).__name__}: {exc}"


json_texts = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=4), children, max_size=3),
    max_leaves=8,
).map(json.dumps)
EDGES = ["", " ", "\n", "x", "]", "}", "{", "1", '"', " 1", "NaN", "\ud800"]


@SETTINGS
@given(text=json_texts, before=st.sampled_from(EDGES), after=st.sampled_from(EDGES), cut=st.integers(0, 3))
@example(text="", before=" ", after="", cut=0)
@example(text="", before="", after="", cut=0)
@example(text="[]", before=" \n", after="\t ", cut=0)
@example(text='{"a": 1}', before="", after=" x", cut=0)
@example(text="1e999", before="", after="", cut=0)
@example(text="[" * 70 + "]" * 70, before="", after="", cut=0)
def test_loads_decides_as_the_decoder_did(text, before, after, cut):
    raw = (before + text[: len(text) - cut] + after).encode("utf-8", "surrogatepass")
    assert decoded_now(raw) == decoded_as_before(raw)
