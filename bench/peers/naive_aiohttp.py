"""The seed relay written the obvious way on aiohttp: the "naive baseline" peer of bench/fanout.py.

Design (deliberately unoptimised, mirroring the seed tutorial):

* a ``dict`` of registered clients behind one ``asyncio.Lock``;
* each publish takes the lock and scans *every* client, checking ``user_id`` and topic membership;
* each connected client owns an unbounded ``asyncio.Queue`` drained by its own writer task that
  does ``await ws.send_str(message)`` (a frame is built per client, one task wake-up per delivery).

Messages are delivered as raw text (the seed's behaviour), so ``?format=raw`` is implied.

    python bench/peers/naive_aiohttp.py [--host 127.0.0.1] [--port 8000] [--loop uvloop|asyncio]

Prints ``naive-aiohttp listening on http://<host>:<port>`` once bound (``--port 0`` picks a port).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from aiohttp import WSMsgType, web


@dataclass
class Client:
    user_id: Any
    topics: list[str]
    queue: asyncio.Queue[str] | None = None
    writer: asyncio.Task[None] | None = field(default=None, repr=False)


clients: dict[str, Client] = {}
lock = asyncio.Lock()


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def register(request: web.Request) -> web.Response:
    body = await request.json()
    topics = body.get("topics")
    client_id = uuid.uuid4().hex
    async with lock:
        clients[client_id] = Client(body.get("user_id"), list(topics) if topics else ["cats"])
    return web.json_response({"id": client_id, "url": f"ws://{request.host}/ws/{client_id}"})


async def unregister(request: web.Request) -> web.Response:
    async with lock:
        clients.pop(request.match_info["id"], None)
    return web.json_response({})


async def publish(request: web.Request) -> web.Response:
    body = await request.json()
    topic, user_id, message = body["topic"], body.get("user_id"), body["message"]
    recipients = 0
    async with lock:
        for client in clients.values():
            if client.queue is None:
                continue
            if user_id is not None and client.user_id != user_id:
                continue
            if topic in client.topics:
                client.queue.put_nowait(message)
                recipients += 1
    return web.json_response({"recipients": recipients})


async def write_loop(ws: web.WebSocketResponse, queue: asyncio.Queue[str]) -> None:
    while True:
        message = await queue.get()
        await ws.send_str(message)


async def websocket(request: web.Request) -> web.WebSocketResponse:
    client_id = request.match_info["id"]
    async with lock:
        client = clients.get(client_id)
    if client is None:
        raise web.HTTPNotFound()
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    queue: asyncio.Queue[str] = asyncio.Queue()
    writer = asyncio.create_task(write_loop(ws, queue))
    client.queue, client.writer = queue, writer
    try:
        async for msg in ws:
            if msg.type != WSMsgType.TEXT:
                continue
            with contextlib.suppress(ValueError, TypeError, KeyError):
                client.topics = list(json.loads(msg.data)["topics"])
    finally:
        writer.cancel()
        async with lock:
            clients.pop(client_id, None)
    return ws


def make_app() -> web.Application:
    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_post("/register", register)
    app.router.add_delete("/register/{id}", unregister)
    app.router.add_post("/publish", publish)
    app.router.add_get("/ws/{id}", websocket)
    return app


async def serve(host: str, port: int) -> None:
    runner = web.AppRunner(make_app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = runner.addresses[0][1]
    print(f"naive-aiohttp listening on http://{host}:{bound}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--loop",
        choices=["uvloop", "asyncio"],
        default="uvloop",
        help="event loop (default uvloop, like wsrelay, so the comparison isolates the design)",
    )
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        if args.loop == "uvloop":
            import uvloop

            uvloop.run(serve(args.host, args.port))
        else:
            asyncio.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
