"""One server process from bind to exit, and the drain that ends it.

On SIGTERM (or SIGINT): readiness answers 503 at once on every port, the API stops accepting
connections, requests in flight get up to `server.drain_timeout` to finish, then the rest are
cancelled and the process exits, all within the drain timeout plus one second (aiohttp's own
shutdown would wait its timeout twice, past a pod's grace period).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time

from aiohttp import web

from .runtime import Runtime

log = logging.getLogger("imgproxy.server")

# After the drain timeout, how long cancelled requests get to record their usage. aiohttp
# waits up to this twice (for the handler, then for its cancellation): 2 x 0.4 s < 1 s.
CANCEL_GRACE = 0.4
POLL = 0.05


async def serve(runner: web.AppRunner, runtime: Runtime, host: str, port: int, *, backlog: int, reuse_port: bool = False, ready=None) -> None:
    """Serve the runner's app until SIGTERM or SIGINT, then drain. The runner's
    shutdown_timeout should be CANCEL_GRACE. `ready(host, port)` is called once the socket is
    bound (so no success line for a port that is taken: that raises OSError)."""
    try:
        await runner.setup()  # starts the gateway (store, plugins) and the operations port
    except BaseException:
        await runner.cleanup()  # what did start (connection pools, sweepers) is stopped again
        raise
    site = web.TCPSite(runner, host, port, backlog=backlog, reuse_port=reuse_port or None)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise ListenFailed(host, port, exc) from None
    if ready is not None:
        ready(host, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
        await drain(runner, site, runtime)
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        await runner.cleanup()


async def drain(runner: web.AppRunner, site: web.TCPSite, runtime: Runtime) -> None:
    started = time.monotonic()
    runtime.shutting_down = True  # /readyz answers 503 from now on, on every port
    await site.stop()  # new connections are refused
    if runner.server is not None:
        runner.server.pre_shutdown()  # idle keep-alive connections close; busy ones after their answer
    timeout = runtime.gateway.config.server.drain_timeout
    log.info("shutting down: %d requests in flight get up to %gs to finish", runtime.shared.in_flight, timeout)
    deadline = started + timeout
    while runtime.shared.in_flight and time.monotonic() < deadline:
        await asyncio.sleep(POLL)
    if runtime.shared.in_flight:
        # Their usage is still recorded: cancelled after an upstream call, at the worst case.
        log.warning("drain timeout: cancelling %d requests still in flight", runtime.shared.in_flight)


class ListenFailed(OSError):
    """A listening socket that could not be had, with the address it was for (the API port
    and the operations port fail alike; any other OSError at start is not about listening)."""

    def __init__(self, host: str, port: int, error: OSError) -> None:
        super().__init__(error.errno, error.strerror)
        self.host, self.port, self.error = host, port, error


def close_loop(loop: asyncio.AbstractEventLoop) -> None:
    """Cancel what is still scheduled (background tasks of plugins and stores), then close."""
    rest = asyncio.all_tasks(loop)
    for task in rest:
        task.cancel()
    loop.run_until_complete(asyncio.gather(*rest, return_exceptions=True))
    loop.run_until_complete(loop.shutdown_asyncgens())
    loop.close()
