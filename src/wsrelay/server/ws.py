"""aiohttp's WebSocket routes: ``GET /ws/<id>[?format=json|raw]`` and ``GET /ws?token=...``.

aiohttp serves these for an upgrade that arrives as a later request on a
kept-alive connection, under ``--stack aiohttp``, and in an app mounted in
another aiohttp application; ``wsrelay serve`` hands fresh upgrades straight to
:mod:`wsrelay.server.native`. Either way the rules are the same ones: aiohttp
parses the HTTP request, :func:`wsrelay.server.native.handshake` decides it
(the session's admission, websockets' upgrade checks), aiohttp writes the 101,
and the connection is then adopted by a
:class:`~wsrelay.server.native.NativeConnection`, the one frame pump. This
handler only waits for it to end, so that aiohttp keeps the request open.
"""

from __future__ import annotations

import contextlib

from aiohttp import web
from websockets.datastructures import Headers
from websockets.http11 import Request
from websockets.protocol import State

from wsrelay.server.native import SHARED, NativeConnection, handshake
from wsrelay.server.proxies import request_address


async def websocket(request: web.Request) -> web.StreamResponse:
    """``GET /ws/<id>``: the connection of a registration made with ``POST /register``."""
    return await _serve(request, request.match_info["client_id"])


async def token_websocket(request: web.Request) -> web.StreamResponse:
    """``GET /ws?token=<JWT>``: a registration made from the token's claims that
    lives as long as this connection."""
    return await _serve(request, None)


async def _serve(request: web.Request, client_id: str | None) -> web.StreamResponse:
    shared = request.app[SHARED]
    wsp = shared.protocol()
    headers = Headers(
        (name.decode("latin-1"), value.decode("latin-1")) for name, value in request.raw_headers
    )
    address = request_address(request)
    session, accepted = await handshake(
        shared.gate_for(address), wsp, Request(request.raw_path, headers), client_id, request.query
    )
    response = web.StreamResponse(status=101, reason="Switching Protocols")
    transport = request.transport
    if transport is None:  # the peer left during the handshake: nobody to answer
        await session.release()
        return response
    connection = NativeConnection(shared, transport, shared.protocol(State.OPEN))
    connection.address = address
    refusal = await connection.attach(session)  # before the 101: a refusal is still HTTP
    if refusal is not None:
        await session.release()
        raise refusal
    response.headers.update(accepted.headers.raw_items())
    try:
        await response.prepare(request)
    except ConnectionError:
        with contextlib.suppress(Exception):
            await shared.relay.detach(session.client, connection)
        await session.release()
        return response
    connection.adopt(session, request.protocol)
    await connection.wait_closed()
    return response
