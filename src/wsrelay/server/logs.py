"""Log lines: text or JSON, one per event, and never a client's secret in full.

A registration id is the capability to connect, so logs show only its first
:data:`SHOWN_ID_CHARS` characters (enough to follow one client through a log,
far too few to connect with). Paths are logged by route template
(``/register/{client_id}``), and a path that matched no route has any long run
of hex shortened the same way. Query strings, which may carry a connection
token, are never logged.

Each event is logged with ``extra={"event": ..., ...}``: the text format shows
those fields as ``key=value`` after the message, the JSON format as keys of the
object.
"""

from __future__ import annotations

import json
import logging
import re
import time
from typing import TYPE_CHECKING, Any

from aiohttp import web

if TYPE_CHECKING:
    from wsrelay.core.registry import Client
    from wsrelay.core.session import Closed
    from wsrelay.server.metrics import Metrics

conn_log = logging.getLogger("wsrelay.connections")

SHOWN_ID_CHARS = 8
"""Characters of a client id that logs show (32 of its 128 bits)."""

_HEX_RUN = re.compile(r"[0-9a-fA-F]{16,}")

# Attributes every LogRecord has; anything else was passed in ``extra``.
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


def short_id(client_id: str) -> str:
    """The loggable form of a client id: its first characters and an ellipsis."""
    return client_id[:SHOWN_ID_CHARS] + "…"


def route_of(request: web.Request) -> str:
    """The request's route template, or its path with hex runs shortened."""
    info = request.match_info
    resource = info.route.resource if info is not None else None
    if resource is not None and info.http_exception is None:
        return resource.canonical
    return redact(request.path)


def redact(text: str) -> str:
    """``text`` with every run of 16 or more hex digits shortened like an id."""
    return _HEX_RUN.sub(lambda m: short_id(m.group()), text)


def log_opened(metrics: Metrics, client: Client, raw: bool, peer: str | None) -> None:
    """Count and log one opened WebSocket."""
    metrics.connections_opened.inc()
    conn_log.info(
        "connection opened",
        extra={
            "event": "ws_open",
            "client": short_id(client.id),
            "user": client.user,
            "format": "raw" if raw else "json",
            "peer": peer,
        },
    )


def log_closed(metrics: Metrics, client: Client, closed: Closed) -> None:
    """Count and log one closed WebSocket: who closed it, with what code and why."""
    metrics.connections_closed.labels(str(closed.code)).inc()
    conn_log.info(
        "connection closed",
        extra={
            "event": "ws_close",
            "client": short_id(client.id),
            "code": closed.code,
            "reason": closed.reason,
            "by": closed.by,
            "seconds": round(closed.seconds, 3),
        },
    )


def fields(record: logging.LogRecord) -> dict[str, Any]:
    """The ``extra`` fields of ``record``."""
    return {k: v for k, v in vars(record).items() if k not in _STANDARD}


class TextFormatter(logging.Formatter):
    """``time LEVEL logger: message key=value ...``"""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extra = fields(record)
        extra.pop("event", None)
        if extra:
            line += " " + " ".join(f"{k}={_text(v)}" for k, v in extra.items())
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``time``, ``level``, ``logger``, ``message``, the
    ``extra`` fields, and ``exception`` (the formatted traceback) if any."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": _iso(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            **fields(record),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


def configure_logging(level: str, fmt: str) -> None:
    """Send every log line to stderr at ``level`` in format ``text`` or ``json``."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def _text(value: Any) -> str:
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if (" " in text or not text) else text


def _iso(created: float) -> str:
    seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created))
    return f"{seconds}.{int(created % 1 * 1000):03d}Z"
