"""The paths the relay answers, named once for the front door, the native drivers and aiohttp.

aiohttp's router is built from these templates (:func:`wsrelay.server.app.create_app`),
the front door's request-line patterns are derived from them
(:mod:`wsrelay.server.front`), and the native WebSocket driver parses a
handshake's target with :func:`websocket_target`, so the three cannot disagree
about which path is which route.
"""

from __future__ import annotations

import re
from typing import Final
from urllib.parse import parse_qsl, unquote, urlsplit

from wsrelay.errors import NotFound
from wsrelay.server.logs import redact

HEALTH: Final = "/health"
READY: Final = "/ready"
REGISTER: Final = "/register"
UNREGISTER: Final = "/register/{client_id}"
PUBLISH: Final = "/publish"
PUBLISH_BATCH: Final = "/publish/batch"
STATS: Final = "/stats"
TOPICS: Final = "/topics"
HISTORY: Final = "/history"
PRESENCE: Final = "/presence"
PRESENCE_STATS: Final = "/presence/stats"
USER: Final = "/users/{user_id}"
USER_CONNECTIONS: Final = "/users/{user_id}/connections"
METRICS: Final = "/metrics"
NODES: Final = "/nodes"
OPENAPI: Final = "/openapi.json"
WEBSOCKET_BY_ID: Final = "/ws/{client_id}"
WEBSOCKET_BY_TOKEN: Final = "/ws"
SSE_BY_ID: Final = "/sse/{client_id}"
"""``GET``: a registration's server-sent events; ``POST``: a command for that stream."""
SSE_BY_TOKEN: Final = "/sse"

NATIVE_PUBLISH: Final = (PUBLISH, PUBLISH_BATCH)
"""The routes the native HTTP driver serves (docs/decisions/0005)."""

WEBSOCKET_REQUEST_LINE: Final = re.compile(
    rb"GET " + re.escape(WEBSOCKET_BY_TOKEN.encode()) + rb"(?:[/?][^ \r\n]*)? HTTP/1\.1\r?\n"
)
"""First request lines the native WebSocket driver takes: both WebSocket routes."""

PUBLISH_REQUEST_LINE: Final = re.compile(
    rb"POST (?:"
    + b"|".join(re.escape(route.encode()) for route in sorted(NATIVE_PUBLISH, key=len)[::-1])
    + rb")(?:\?[^ \r\n]*)? HTTP/1\.1\r?\n"
)
"""First request lines the native HTTP driver takes."""

NATIVE_PREFIXES: Final = (b"GET " + WEBSOCKET_BY_TOKEN.encode(), b"POST " + PUBLISH.encode())
"""What a first request line starts with if a native driver may take it."""


def websocket_target(target: str) -> tuple[str | None, dict[str, str], str]:
    """``(client_id or None, query, route)`` of a WebSocket handshake's request target
    (path and query). The first of repeated query parameters counts, as in aiohttp.

    Raises:
        NotFound: the path is neither ``/ws`` nor ``/ws/<id>``.
    """
    parts = urlsplit(target)
    query: dict[str, str] = {}
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        query.setdefault(key, value)
    if parts.path == WEBSOCKET_BY_TOKEN:
        return None, query, WEBSOCKET_BY_TOKEN
    prefix = WEBSOCKET_BY_TOKEN + "/"
    client_id = unquote(parts.path[len(prefix) :]) if parts.path.startswith(prefix) else ""
    if not client_id or "/" in client_id:
        raise NotFound(f"no route for GET {redact(parts.path)[:200]}")
    return client_id, query, WEBSOCKET_BY_ID
