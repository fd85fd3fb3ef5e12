"""A process-wide budget of bytes held for upstream answers read whole (hosting, format
conversion, token usage), so that many large answers at once meet a 503, not a growing heap.

A request is admitted only while less than three quarters of the budget is held; the bytes
it then reads are charged to its lease as they arrive (the forwarder's size-limited reader does
it), and the lease is released when the request's task ends, that is once its response has been
written. Streamed pass-through answers are relayed, not held, and are not charged.
"""

from __future__ import annotations

import asyncio
import contextvars
import weakref

from .errors import GatewayError

# Seconds a client is asked to wait: answers being held are usually written within that.
RETRY_AFTER = 5

# The current request's lease: the forwarder's readers charge it without being handed it.
_lease: contextvars.ContextVar["Lease | None"] = contextvars.ContextVar("imgproxy_upstream_lease", default=None)


def overloaded(what: str = "upstream answers as its memory budget allows") -> GatewayError:
    return GatewayError(
        503,
        f"The gateway is holding as many {what}; retry shortly.",
        type="server_error",
        code="server_overloaded",
        headers={"Retry-After": str(RETRY_AFTER)},
    )


class UploadSlots:
    """Edit and variation forms this process holds at once (`server.max_uploads`): each keeps
    up to 1 MiB in memory while it is read, and up to `max_upload_bytes` on disk until its
    request ends. Lives as long as the process (in `Shared`)."""

    def __init__(self) -> None:
        self.used = 0

    def take(self, limit: int) -> None:
        """A slot for the current request, or 503 with Retry-After; `release` gives it back."""
        if self.used >= limit:
            raise overloaded("uploaded forms as `server.max_uploads` allows")
        self.used += 1

    def release(self) -> None:
        self.used -= 1


class UpstreamBuffer:
    """Bytes held, all requests together. Lives as long as the process (in `Shared`); each
    request brings the capacity of the config it is served by."""

    def __init__(self, metrics) -> None:
        self.held = 0
        self._refused = {stage: metrics.upstream_buffer_refusals.labels(stage) for stage in ("admission", "reading")}
        metrics.upstream_buffer_bytes.set_function(lambda: self.held)

    def admit(self, capacity: int) -> None:
        """Let the current request read upstream answers, or refuse it with 503 when three
        quarters of the budget are held: the last quarter is kept for the answers already being
        read, so that a paid answer is rarely lost mid-read. Must run in the request's own task:
        its end releases what it held."""
        if self.held >= capacity - capacity // 4:
            self._refused["admission"].inc()
            raise overloaded()
        _lease.set(Lease(self, capacity, weakref.ref(asyncio.current_task())))


class Lease:
    """What one request holds. Its release is tied to the request's task at the first charge:
    most requests (answers relayed as they arrive) never hold anything. The task is referred to
    weakly: its context refers to the lease."""

    __slots__ = ("buffer", "capacity", "held", "task")

    def __init__(self, buffer: UpstreamBuffer, capacity: int, task: "weakref.ref[asyncio.Task]") -> None:
        self.buffer, self.capacity, self.held, self.task = buffer, capacity, 0, task

    def charge(self, size: int) -> None:
        if self.task is not None:
            task, self.task = self.task() or asyncio.current_task(), None
            task.add_done_callback(self.release)
        buffer = self.buffer
        buffer.held += size
        self.held += size
        if buffer.held > self.capacity:
            buffer._refused["reading"].inc()
            # The answer read so far is dropped with the error: give its room back now, or the
            # other answers being read would fail too before this request's task has ended.
            self.release()
            raise overloaded()

    def release(self, _task=None) -> None:
        self.buffer.held -= self.held
        self.held = 0


def charge(size: int) -> None:
    """Count `size` more bytes held for the current request's upstream answer; 503 once the
    process holds more than its budget. Outside an admitted request, nothing is counted."""
    lease = _lease.get()
    if lease is not None:
        lease.charge(size)
