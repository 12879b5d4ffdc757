"""The WebSocket endpoints: ``GET /ws/<id>[?format=json|raw]`` and ``GET /ws?token=...``.

What a connection may do does not depend on which stack carries it. This module
holds those rules once: :func:`admit` decides whether a handshake may open a
connection (origin, registration or token, format, upgrade), and
:func:`on_text`, :func:`report` and :func:`log_closed` are what every
connection does with a command, a refused frame and its end. Two drivers use
them:

* the aiohttp handlers below, for connections that aiohttp accepts (an app
  mounted elsewhere, or an upgrade on a kept-alive HTTP connection);
* :mod:`wsrelay.server.native`, the small protocol that ``wsrelay serve`` hands
  fresh upgrade requests to, which holds an idle connection in a third of the
  memory (docs/decisions/0004).

Everything a driver does on bad input concerns its one connection only.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from aiohttp import WebSocketError, WSMsgType, web

from wsrelay import codes
from wsrelay.core.registry import Client
from wsrelay.core.schema import (
    ClientCommand,
    ErrorDetail,
    ErrorFrame,
    SubscribedFrame,
    decode,
    encode,
)
from wsrelay.errors import (
    BadRequest,
    BrokerUnavailable,
    ClientError,
    InvalidField,
    InvalidToken,
    NotFound,
    UnsupportedFrame,
    UpgradeRequired,
)
from wsrelay.relay import Relay
from wsrelay.server.auth import TOKENS, check_origin
from wsrelay.server.connection import CLOSE_TIMEOUT, AiohttpConnection, Connection, frame_text
from wsrelay.server.keys import CONNECTIONS, FLUSHER, RELAY, SETTINGS
from wsrelay.server.limits import SLOTS
from wsrelay.server.logs import short_id
from wsrelay.server.metrics import METRICS, Metrics

log = logging.getLogger("wsrelay.server")
conn_log = logging.getLogger("wsrelay.connections")

ABNORMAL_CLOSURE = 1006
"""RFC 6455: no close frame was exchanged (never sent on the wire; for logs and metrics)."""

FORMATS = ("json", "raw")

_ENDED = frozenset((WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED))
"""What ``async for message in ws`` stops at."""


# -- the rules every driver shares ------------------------------------------------------------


@dataclass(slots=True)
class Admission:
    """What an accepted handshake opens: whose connection, in which format."""

    client: Client
    raw: bool
    temporary: bool
    """Registered from a connection token: unregister it when the connection ends."""


async def admit(
    app: web.Application,
    client_id: str | None,
    query: Mapping[str, str],
    headers: Mapping[str, str],
    check_upgrade: Callable[[], None],
) -> Admission:
    """Decide a handshake for ``/ws/<client_id>`` (or, if ``client_id`` is None,
    ``/ws?token=...``), in the order a client can act on: origin (403), the
    registration or token (404/401), the format (400), the upgrade itself (426,
    ``check_upgrade``), and only then any registration made from a token.
    ``headers`` is read with lower-case names (aiohttp's are case-insensitive).

    Raises:
        ClientError: the handshake is refused; the error knows its status.
        BrokerUnavailable: the registration store is unreachable (503).
    """
    check_origin(headers.get("origin"), app[SETTINGS].allowed_origin)  # 403 before anything
    relay = app[RELAY]
    if client_id is not None:
        client = await relay.lookup(client_id)  # 404
        raw = _is_raw(query)
        check_upgrade()
        return Admission(client, raw, temporary=False)
    verifier = app[TOKENS]
    if verifier is None:
        raise NotFound(
            "connection tokens are not enabled on this server (--jwt-secret or "
            "--jwt-public-key-file); register with POST /register and use /ws/<id>"
        )
    token = query.get("token")
    if not token:
        raise InvalidToken("pass the connection token as /ws?token=<token>")
    claims = verifier.verify(token)  # 401 token_expired / invalid_token
    raw = _is_raw(query)  # refuse a doomed request before registering anything
    check_upgrade()
    client = await relay.register(claims.user, claims.topics)
    return Admission(client, raw, temporary=True)


async def release(relay: Relay, admission: Admission) -> None:
    """Undo what :func:`admit` made for a connection that has ended."""
    if admission.temporary:
        with contextlib.suppress(NotFound, BrokerUnavailable):  # deleted already, or down
            await relay.unregister(admission.client.id)


def _is_raw(query: Mapping[str, str]) -> bool:
    fmt = query.get("format", "json")
    if fmt not in FORMATS:
        raise BadRequest(f"format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    return fmt == "raw"


async def on_text(relay: Relay, client: Client, connection: Connection, text: str | bytes) -> None:
    """Carry out one command frame and answer it (JSON mode), or report why not."""
    try:
        command = decode(text, ClientCommand)
        present = [
            (name, topics)
            for name, topics in (
                ("topics", command.topics),
                ("subscribe", command.subscribe),
                ("unsubscribe", command.unsubscribe),
            )
            if topics is not None
        ]
        if len(present) != 1:
            raise InvalidField('send exactly one of "topics", "subscribe" or "unsubscribe"')
        name, topics = present[0]
        if name == "topics":
            await relay.set_topics(client, topics)
        elif name == "subscribe":
            await relay.subscribe(client, topics)
        else:
            await relay.unsubscribe(client, topics)
    except ClientError as exc:
        report(connection, exc)
        return
    if not connection.raw:
        connection.send(frame_text(encode(SubscribedFrame(sorted(client.topics)))))


BINARY_REFUSED = "binary frames are not supported; send JSON text"


def report(connection: Connection, error: ClientError) -> None:
    """An error frame in JSON mode; in raw mode, where a frame would read as a
    message, a close whose reason names the problem."""
    if connection.raw:
        connection.close(error.close_code, error.message)
    else:
        frame = ErrorFrame(ErrorDetail(code=error.code, message=error.message))
        connection.send(frame_text(encode(frame)))


def log_opened(metrics: Metrics, client: Client, raw: bool, peer: str | None) -> None:
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


def log_closed(
    metrics: Metrics, client: Client, code: int, reason: str, by: str, seconds: float
) -> None:
    """Count and log one closed connection: who closed it, with what code and why."""
    metrics.connections_closed.labels(str(code)).inc()
    conn_log.info(
        "connection closed",
        extra={
            "event": "ws_close",
            "client": short_id(client.id),
            "code": code,
            "reason": reason,
            "by": by,
            "seconds": round(seconds, 3),
        },
    )


# -- the aiohttp driver -----------------------------------------------------------------------


async def websocket(request: web.Request) -> web.StreamResponse:
    """``GET /ws/<id>``: the connection of a registration made with ``POST /register``."""
    return await _serve(request, request.match_info["client_id"])


async def token_websocket(request: web.Request) -> web.StreamResponse:
    """``GET /ws?token=<JWT>``: a registration made from the token's claims that
    lives as long as this connection."""
    return await _serve(request, None)


def _upgrade_check(request: web.Request, ws: web.WebSocketResponse) -> Callable[[], None]:
    def check() -> None:
        if not ws.can_prepare(request).ok:
            raise UpgradeRequired("this endpoint only speaks WebSocket; send an Upgrade request")

    return check


async def _serve(request: web.Request, client_id: str | None) -> web.StreamResponse:
    app = request.app
    settings = app[SETTINGS]
    ws = web.WebSocketResponse(
        compress=False,  # frames are built once for all clients; see connection.py
        max_msg_size=settings.max_message_size,
        timeout=CLOSE_TIMEOUT,
        heartbeat=settings.ping_interval or None,  # no pong within half of it: dropped
    )
    admission = await admit(
        app, client_id, request.query, request.headers, _upgrade_check(request, ws)
    )
    relay = app[RELAY]
    try:
        slots = app[SLOTS]
        slots.acquire()  # 503 past --max-connections, before the upgrade
        try:
            await _run(request, ws, admission)
        finally:
            slots.release()
    finally:
        await release(relay, admission)
    return ws


async def _run(request: web.Request, ws: web.WebSocketResponse, admission: Admission) -> None:
    await ws.prepare(request)
    transport = request.transport
    if transport is None:  # the peer vanished during the handshake
        return
    app = request.app
    relay, metrics, client = app[RELAY], app[METRICS], admission.client
    connection = AiohttpConnection(
        ws,
        transport,
        raw=admission.raw,
        outbox_limit=app[SETTINGS].outbox_limit,
        flusher=app[FLUSHER],
        stats=metrics.stats,
    )
    log_opened(metrics, client, admission.raw, request.remote)
    opened = time.monotonic()
    connections = app[CONNECTIONS]
    connections.add(connection)
    try:
        try:
            await relay.attach(client, connection)
        except ClientError as exc:  # unregistered while the handshake ran
            code = exc.close_code if admission.raw else codes.NORMAL
            connection.closed_with = (code, "unregistered")
            await ws.close(code=code, message=b"unregistered")
            return
        receive = ws.receive
        while True:
            # ws.receive() rather than ``async for``: one coroutine frame less per
            # idle connection (see docs/decisions/0003).
            message = await receive()
            if message.type in _ENDED:
                break
            if message.type is WSMsgType.TEXT:
                await on_text(relay, client, connection, message.data)
            elif message.type is WSMsgType.BINARY:
                report(connection, UnsupportedFrame(BINARY_REFUSED))
            elif message.type is WSMsgType.ERROR and isinstance(message.data, WebSocketError):
                # aiohttp closed for a protocol error (1002, 1007, 1009...); record the
                # code it sent, which its close_code no longer shows afterwards.
                connection.closed_with = connection.closed_with or (
                    message.data.code,
                    str(message.data),
                )
    finally:
        connections.discard(connection)
        await relay.detach(client, connection)
        if connection.closed_with is not None:
            code, reason, by = *connection.closed_with, "server"
        else:
            code = ws.close_code if ws.close_code is not None else ABNORMAL_CLOSURE
            error = ws.exception()
            reason, by = (str(error), "server") if error is not None else ("", "client")
        log_closed(metrics, client, code, reason, by, time.monotonic() - opened)
    await connection.wait_closed()
