"""Log lines as JSON on stdout, each carrying the request id of the request it belongs to.

The access log (one line per request) is written directly rather than through `logging`,
which costs about four times as much per line; it is flushed once per event-loop turn.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import sys
import time

from .redaction import redact

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("imgproxy_request_id", default=None)

_make_record = logging.getLogRecordFactory()


def _record_with_request_id(*args, **kwargs) -> logging.LogRecord:
    # Stamp the request id when the line is made: a handler may format it later, elsewhere.
    record = _make_record(*args, **kwargs)
    record.request_id = request_id_var.get()
    return record


if not getattr(_make_record, "imgproxy", False):
    _record_with_request_id.imgproxy = True
    logging.setLogRecordFactory(_record_with_request_id)

_second = (0, "")


def timestamp(now: float) -> str:
    """UTC ISO 8601 with milliseconds; the part down to the second is formatted once a second."""
    global _second
    whole = int(now)
    if _second[0] != whole:
        _second = (whole, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)))
    return f"{_second[1]}.{int((now - whole) * 1000):03d}Z"


class _Formatter(logging.Formatter):
    def formatException(self, exc_info) -> str:
        # A traceback ends with str() of the exception, which may quote an upstream's answer:
        # anything shaped like a credential goes (newlines are kept, the rest is redact()'s).
        return "\n".join(redact(line, limit=4000) for line in super().formatException(exc_info).splitlines())


class JsonFormatter(_Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {"time": timestamp(record.created), "level": record.levelname.lower(), "logger": record.name, "message": record.getMessage()}
        request_id = getattr(record, "request_id", None)
        if request_id:
            line["request_id"] = request_id
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


class TextFormatter(_Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return timestamp(record.created)  # the same format as the access log's lines

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        request_id = getattr(record, "request_id", None)
        return f"{text} request_id={request_id}" if request_id else text


# One encoder for every access line; fresh dicts cannot be circular, so that check is skipped.
_encode = json.JSONEncoder(check_circular=False).encode
# A text line holds client text (a path, which aiohttp decodes, a prompt): any character a
# reader may take for a line break becomes a space, or a %0A in a path would forge log lines.
_LINE_BREAKS = dict.fromkeys([*range(0x20), 0x7F, *range(0x80, 0xA0), 0x2028, 0x2029], " ")


class AccessLog:
    def __init__(self) -> None:
        self.stream = sys.stdout
        self.enabled = True
        self.json = True
        self._flush_pending = False

    def write(self, message: str, request_id: str | None, fields: dict) -> None:
        if not self.enabled:
            return
        if self.json:
            line = _encode({"time": timestamp(time.time()), "level": "info", "logger": "imgproxy.access", "message": message, "request_id": request_id, **fields})
        else:
            # Fields without a value (no error, no user) are left out, as in a JSON reader's view.
            fields = {"request_id": request_id, **fields}
            line = f"{timestamp(time.time())} INFO imgproxy.access: {message} " + " ".join(f"{k}={v}" for k, v in fields.items() if v is not None)
            line = line.translate(_LINE_BREAKS)
        self.stream.write(line + "\n")
        if not self._flush_pending:
            try:
                asyncio.get_running_loop().call_soon(self._flush)
                self._flush_pending = True
            except RuntimeError:
                self.stream.flush()

    def _flush(self) -> None:
        self._flush_pending = False
        self.stream.flush()


access_log = AccessLog()


def setup(level: str = "info", fmt: str = "json") -> None:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    access_log.stream = sys.stdout
    access_log.enabled = logging.INFO >= root.level
    access_log.json = fmt == "json"
