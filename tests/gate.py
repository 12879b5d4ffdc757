"""A front door for a real wsrelay server that refuses on cue with 503 and Retry-After.

A load-shedding node answers ``POST /register`` or a WebSocket upgrade with 503 and a
``Retry-After`` header; to make one refuse exactly when a test wants, the client talks
to a :class:`Gate` instead. The gate answers queued refusals itself (503, the JSON
error body, and ``Retry-After`` as queued, or none); otherwise it forwards every HTTP
request to the real server (rewriting the ``url`` of a registration to point at
itself) and redirects upgrades (307) to the real server, which the ``websockets``
client follows. It records when each registration and upgrade arrived and what it
answered, so that tests can check how long a client waited.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import TracebackType
from typing import Literal, Self

import aiohttp
from aiohttp import web

from tests.utils import TIMEOUT, free_port

Kind = Literal["register", "upgrade"]


@dataclass(frozen=True)
class Seen:
    """One registration or upgrade request: when it arrived and the status answered."""

    at: float
    """``time.monotonic()`` on arrival."""
    status: int


class Gate:
    """See the module docstring. ``refuse(kind, "1", None)`` queues two refusals of
    ``kind``: one with ``Retry-After: 1``, one without the header."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.url = ""
        self.seen: dict[Kind, list[Seen]] = {"register": [], "upgrade": []}
        self._refusals: dict[Kind, deque[str | None]] = {"register": deque(), "upgrade": deque()}
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None

    def refuse(self, kind: Kind, *retry_after: str | None) -> None:
        self._refusals[kind].extend(retry_after)

    def statuses(self, kind: Kind) -> list[int]:
        return [seen.status for seen in self.seen[kind]]

    # -- running ----------------------------------------------------------------------------

    async def start(self) -> Self:
        app = web.Application()
        app.router.add_post("/register", self._register)
        app.router.add_get("/ws/{id}", self._upgrade)
        app.router.add_route("*", "/{tail:.*}", self._forward)
        self._session = aiohttp.ClientSession()
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        port = free_port()
        await web.TCPSite(self._runner, "127.0.0.1", port).start()
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    @contextmanager
    def in_thread(self) -> Iterator[Self]:
        """Run the gate on an event loop of its own, for tests that are not async."""
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name="gate", daemon=True)
        thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self.start(), loop).result(TIMEOUT)
            yield self
        finally:
            asyncio.run_coroutine_threadsafe(self.stop(), loop).result(TIMEOUT)
            loop.call_soon_threadsafe(loop.stop)
            thread.join(TIMEOUT)
            loop.close()

    # -- handlers ---------------------------------------------------------------------------

    def _refusal(self, kind: Kind) -> web.Response | None:
        """The queued refusal of ``kind``, if any, recorded with the request's arrival."""
        at = time.monotonic()
        if not self._refusals[kind]:
            return None
        retry_after = self._refusals[kind].popleft()
        self.seen[kind].append(Seen(at, 503))
        headers = {} if retry_after is None else {"Retry-After": retry_after}
        body = {"error": {"code": "broker_unavailable", "message": "shedding load (test gate)"}}
        return web.json_response(body, status=503, headers=headers)

    async def _register(self, request: web.Request) -> web.Response:
        at = time.monotonic()
        refused = self._refusal("register")
        if refused is not None:
            return refused
        response = await self._forward(request)
        self.seen["register"].append(Seen(at, response.status))
        if response.status != 200:
            return response
        assert isinstance(response.body, bytes)
        registration = json.loads(response.body)  # the WebSocket URL must lead back here
        registration["url"] = f"ws{self.url.removeprefix('http')}/ws/{registration['id']}"
        return web.json_response(registration)

    async def _upgrade(self, request: web.Request) -> web.Response:
        at = time.monotonic()
        refused = self._refusal("upgrade")
        if refused is not None:
            return refused
        self.seen["upgrade"].append(Seen(at, 307))
        location = f"ws{self.upstream.removeprefix('http')}{request.path_qs}"
        return web.Response(status=307, headers={"Location": location})

    async def _forward(self, request: web.Request) -> web.Response:
        assert self._session is not None
        headers = {
            name: value
            for name, value in request.headers.items()
            if name.lower() in ("authorization", "content-type")
        }
        try:
            async with self._session.request(
                request.method,
                self.upstream + request.path_qs,
                data=await request.read(),
                headers=headers,
            ) as answer:
                return web.Response(
                    status=answer.status,
                    body=await answer.read(),
                    content_type=answer.content_type,
                )
        except aiohttp.ClientError as exc:
            return web.json_response(
                {"error": {"code": "bad_gateway", "message": f"upstream: {exc}"}}, status=502
            )
