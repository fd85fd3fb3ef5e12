"""What the request path leaves behind: no reference cycles per request (each one would wait
for the garbage collector, which then walks the whole heap more often), and a served config
kept out of the collector's sight without pinning a config that was reloaded away."""

import gc
import weakref
from contextlib import contextmanager

from aiohttp import web

from imgproxy.gateway import Gateway
from imgproxy.messages import RequestContext
from imgproxy.runtime import Runtime
from imgproxy.server import RUNTIME
from tests.conftest import AUTH

URL = "/v1/images/generations"


@contextmanager
def cyclic_garbage():
    """Collects what only the garbage collector could free while the block ran."""
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    found: list = []
    try:
        yield found
        gc.collect()
        found.extend(gc.garbage)
    finally:
        gc.set_debug(0)
        gc.garbage.clear()


def served_by_imgproxy(obj) -> bool:
    if isinstance(obj, RequestContext):
        return True
    return isinstance(obj, web.Request) and RUNTIME in obj.app


async def test_requests_leave_no_reference_cycles(client):
    requests = [
        ({"model": "dall-e-2", "prompt": "x"}, AUTH, 200),
        ({"model": "dall-e-2", "prompt": "x", "response_format": "b64_json"}, AUTH, 200),
        ({"model": "gpt-image-1", "prompt": "x", "stream": True}, AUTH, 200),
        ({"model": "placeholder", "prompt": "x"}, AUTH, 200),
        ({"model": "dall-e-2", "prompt": "x"}, {"Authorization": "Bearer sk-wrong"}, 401),
        ({"model": "dall-e-2", "prompt": "x", "size": "7x7"}, AUTH, 400),
        ({"model": "no-such-model", "prompt": "x"}, AUTH, 404),
    ]
    with cyclic_garbage() as garbage:
        for body, headers, status in requests:
            for _ in range(3):
                resp = await client.post(URL, json=body, headers=headers)
                await resp.read()
                assert resp.status == status, (body, await resp.text())
    left = [type(obj).__name__ for obj in garbage if served_by_imgproxy(obj)]
    garbage.clear()
    assert left == []


async def test_a_frozen_heap_does_not_pin_a_reloaded_config(config_text, tmp_path):
    path = tmp_path / "proxy.yaml"
    path.write_text(config_text())
    runtime = Runtime(await Gateway.load(path), str(path), freeze_heap=True)
    try:
        await runtime.start()
        assert gc.get_freeze_count() > 0
        # Config objects that point back at their owner (as plugins' often do) form cycles,
        # which only a collection of the unfrozen heap frees.
        runtime.gateway.owner_cycle = [runtime.gateway]
        old = weakref.ref(runtime.gateway)
        path.write_text(config_text() + "\n# changed\n")
        assert await runtime.reload() is True
        await next(iter(runtime._retiring))  # the old config is closed once drained
        assert old() is None, "the reloaded-away config is still alive"
    finally:
        await runtime.close()
        gc.unfreeze()
