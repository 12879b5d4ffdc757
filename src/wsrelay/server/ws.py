"""The WebSocket endpoints: ``GET /ws/<id>[?format=json|raw]`` and ``GET /ws?token=...``.

The handler is a driver: it opens the connection, attaches it to the relay,
then feeds each client frame to the command decoder and the relay, sending the
acknowledgement or error back through the same outbox as publications so that
a client sees them in order. Everything it does on bad input concerns this one
connection only.
"""

from __future__ import annotations

import contextlib
import logging
import time

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
from wsrelay.server.connection import CLOSE_TIMEOUT, Connection, frame_text
from wsrelay.server.keys import CONNECTIONS, FLUSHER, RELAY, SETTINGS
from wsrelay.server.limits import SLOTS
from wsrelay.server.logs import short_id
from wsrelay.server.metrics import METRICS

log = logging.getLogger("wsrelay.server")
conn_log = logging.getLogger("wsrelay.connections")

ABNORMAL_CLOSURE = 1006
"""RFC 6455: no close frame was exchanged (never sent on the wire; for logs and metrics)."""

FORMATS = ("json", "raw")

_ENDED = frozenset((WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED))
"""What ``async for message in ws`` stops at."""


async def websocket(request: web.Request) -> web.StreamResponse:
    """``GET /ws/<id>``: the connection of a registration made with ``POST /register``."""
    check_origin(request, request.app[SETTINGS].allowed_origin)  # 403 before anything
    client = await request.app[RELAY].lookup(request.match_info["client_id"])  # 404
    return await _serve(request, client)


async def token_websocket(request: web.Request) -> web.StreamResponse:
    """``GET /ws?token=<JWT>``: a registration made from the token's claims that
    lives as long as this connection."""
    check_origin(request, request.app[SETTINGS].allowed_origin)
    verifier = request.app[TOKENS]
    if verifier is None:
        raise NotFound(
            "connection tokens are not enabled on this server (--jwt-secret or "
            "--jwt-public-key-file); register with POST /register and use /ws/<id>"
        )
    token = request.query.get("token")
    if not token:
        raise InvalidToken("pass the connection token as /ws?token=<token>")
    claims = verifier.verify(token)  # 401 token_expired / invalid_token
    _format(request)  # refuse a doomed request before registering anything
    _upgrade_check(request)
    relay = request.app[RELAY]
    client = await relay.register(claims.user, claims.topics)
    try:
        return await _serve(request, client)
    finally:
        with contextlib.suppress(NotFound, BrokerUnavailable):  # deleted already, or down
            await relay.unregister(client.id)


def _format(request: web.Request) -> str:
    fmt = request.query.get("format", "json")
    if fmt not in FORMATS:
        raise BadRequest(f"format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    return fmt


def _upgrade_check(request: web.Request, ws: web.WebSocketResponse | None = None) -> None:
    """426 unless ``request`` is a WebSocket upgrade ``ws`` (or any) can accept."""
    if not (ws or web.WebSocketResponse()).can_prepare(request).ok:
        raise UpgradeRequired("this endpoint only speaks WebSocket; send an Upgrade request")


async def _serve(request: web.Request, client: Client) -> web.StreamResponse:
    relay = request.app[RELAY]
    settings = request.app[SETTINGS]
    fmt = _format(request)
    ws = web.WebSocketResponse(
        compress=False,  # frames are built once for all clients; see connection.py
        max_msg_size=settings.max_message_size,
        timeout=CLOSE_TIMEOUT,
        heartbeat=settings.ping_interval or None,  # no pong within half of it: dropped
    )
    _upgrade_check(request, ws)
    slots = request.app[SLOTS]
    slots.acquire()  # 503 past --max-connections, before the upgrade
    try:
        await ws.prepare(request)
        transport = request.transport
        if transport is None:  # the peer vanished during the handshake
            return ws
        metrics = request.app[METRICS]
        connection = Connection(
            ws,
            transport,
            raw=fmt == "raw",
            outbox_limit=settings.outbox_limit,
            flusher=request.app[FLUSHER],
            stats=metrics.stats,
        )
        metrics.connections_opened.inc()
        opened = time.monotonic()
        conn_log.info(
            "connection opened",
            extra={
                "event": "ws_open",
                "client": short_id(client.id),
                "user": client.user,
                "format": fmt,
                "peer": request.remote,
            },
        )
        connections = request.app[CONNECTIONS]
        connections.add(connection)
        try:
            try:
                await relay.attach(client, connection)
            except ClientError as exc:  # unregistered while the handshake ran
                code = exc.close_code if fmt == "raw" else codes.NORMAL
                connection.closed_with = (code, "unregistered")
                await ws.close(code=connection.closed_with[0], message=b"unregistered")
                return ws
            receive = ws.receive
            while True:
                # ws.receive() rather than ``async for``: one coroutine frame less per
                # idle connection (see docs/decisions/0003).
                message = await receive()
                if message.type in _ENDED:
                    break
                if message.type is WSMsgType.TEXT:
                    await _on_text(relay, client, connection, message.data)
                elif message.type is WSMsgType.BINARY:
                    _report(
                        connection,
                        UnsupportedFrame("binary frames are not supported; send JSON text"),
                    )
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
            _closed(request, client, connection, ws, time.monotonic() - opened)
        await connection.wait_closed()
        return ws
    finally:
        slots.release()


def _closed(
    request: web.Request,
    client: Client,
    connection: Connection,
    ws: web.WebSocketResponse,
    seconds: float,
) -> None:
    """Count and log one closed connection: who closed it, with what code and why."""
    if connection.closed_with is not None:
        code, reason, by = *connection.closed_with, "server"
    else:
        code = ws.close_code if ws.close_code is not None else ABNORMAL_CLOSURE
        exc = ws.exception()
        reason, by = (str(exc), "server") if exc is not None else ("", "client")
    request.app[METRICS].connections_closed.labels(str(code)).inc()
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


async def _on_text(relay: Relay, client: Client, connection: Connection, text: str) -> None:
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
        _report(connection, exc)
        return
    if not connection.raw:
        connection.send(frame_text(encode(SubscribedFrame(sorted(client.topics)))))


def _report(connection: Connection, error: ClientError) -> None:
    """An error frame in JSON mode; in raw mode, where a frame would read as a
    message, a close whose reason names the problem."""
    if connection.raw:
        connection.close(error.close_code, error.message)
    else:
        frame = ErrorFrame(ErrorDetail(code=error.code, message=error.message))
        connection.send(frame_text(encode(frame)))
