"""The WebSocket endpoint: ``GET /ws/<id>[?format=json|raw]``.

The handler is a driver: it opens the connection, attaches it to the relay,
then feeds each client frame to the command decoder and the relay, sending the
acknowledgement or error back through the same outbox as publications so that
a client sees them in order. Everything it does on bad input concerns this one
connection only.
"""

from __future__ import annotations

import logging

from aiohttp import WSMsgType, web

from wsrelay.core.registry import Client
from wsrelay.core.schema import (
    ClientCommand,
    ErrorDetail,
    ErrorFrame,
    SubscribedFrame,
    decode,
    encode,
)
from wsrelay.errors import BadRequest, ClientError, InvalidField, UnsupportedFrame, UpgradeRequired
from wsrelay.relay import Relay
from wsrelay.server.connection import CLOSE_TIMEOUT, Connection, frame_text
from wsrelay.server.keys import CONNECTIONS, FLUSHER, RELAY, SETTINGS

log = logging.getLogger("wsrelay.server")

FORMATS = ("json", "raw")


async def websocket(request: web.Request) -> web.StreamResponse:
    relay = request.app[RELAY]
    settings = request.app[SETTINGS]
    client = relay.registry.get(request.match_info["client_id"])  # 404 before the upgrade
    fmt = request.query.get("format", "json")
    if fmt not in FORMATS:
        raise BadRequest(f"format must be one of {', '.join(FORMATS)}, not {fmt!r}")

    ws = web.WebSocketResponse(
        compress=False,  # frames are built once for all clients; see connection.py
        max_msg_size=settings.max_message_size,
        timeout=CLOSE_TIMEOUT,
    )
    if not ws.can_prepare(request).ok:
        raise UpgradeRequired("this endpoint only speaks WebSocket; send an Upgrade request")
    await ws.prepare(request)
    transport = request.transport
    if transport is None:  # the peer vanished during the handshake
        return ws

    connection = Connection(
        ws,
        transport,
        raw=fmt == "raw",
        outbox_limit=settings.outbox_limit,
        flusher=request.app[FLUSHER],
    )
    connections = request.app[CONNECTIONS]
    connections.add(connection)
    try:
        try:
            await relay.attach(client, connection)
        except ClientError as exc:  # unregistered while the handshake ran
            await ws.close(code=exc.close_code if fmt == "raw" else 1000, message=b"unregistered")
            return ws
        async for message in ws:
            if message.type is WSMsgType.TEXT:
                await _on_text(relay, client, connection, message.data)
            elif message.type is WSMsgType.BINARY:
                _report(
                    connection, UnsupportedFrame("binary frames are not supported; send JSON text")
                )
    finally:
        connections.discard(connection)
        await relay.detach(client, connection)
    await connection.wait_closed()
    return ws


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
