"""A real HTTP server in the test process standing for your backend: it receives
webhooks (and verifies their signatures) and answers authorization requests."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

from aiohttp import web

from tests.utils import TIMEOUT, free_port
from wsrelay.webhooks import SIGNATURE_HEADER, verify

SECRET = "webhook-secret-for-tests-0123456789"


class Backend:
    """``POST /hook`` takes event batches; ``POST /authorize`` answers with ``decide``.
    Can be stopped and started again on the same port."""

    def __init__(self, secret: str = SECRET) -> None:
        self.secret = secret
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.batches: list[list[dict[str, Any]]] = []
        self.bad_signatures = 0
        self.status = 200
        self.asked: list[dict[str, Any]] = []
        self.decide: Callable[[dict[str, Any]], dict[str, bool]] = lambda body: {}
        self.authorize_status = 200
        self.stall = asyncio.Event()
        """Cleared: authorization requests hang until it is set."""
        self.stall.set()
        self._changed = asyncio.Event()
        self._runner: web.AppRunner | None = None

    async def start(self) -> Backend:
        app = web.Application()
        app.router.add_post("/hook", self._hook)
        app.router.add_post("/authorize", self._authorize)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def _verified(self, request: web.Request, body: bytes) -> bool:
        ok = verify(self.secret, request.headers.get(SIGNATURE_HEADER, ""), body)
        if not ok:
            self.bad_signatures += 1
        return ok

    async def _hook(self, request: web.Request) -> web.Response:
        body = await request.read()
        if not self._verified(request, body):
            return web.Response(status=401)
        if self.status == 200:
            self.batches.append(json.loads(body)["events"])
            self._changed.set()
        return web.Response(status=self.status)

    async def _authorize(self, request: web.Request) -> web.Response:
        body = await request.read()
        if not self._verified(request, body):
            return web.Response(status=401)
        asked = json.loads(body)
        self.asked.append(asked)
        self._changed.set()
        await self.stall.wait()
        if self.authorize_status != 200:
            return web.Response(status=self.authorize_status)
        return web.json_response({"topics": self.decide(asked)})

    @property
    def events(self) -> list[dict[str, Any]]:
        """Every event received, redeliveries included, in order of arrival."""
        return [event for batch in self.batches for event in batch]

    async def wait_for(self, condition: Callable[[], bool], timeout: float = TIMEOUT * 3) -> None:
        """Until ``condition()`` holds after something arrived (fails past ``timeout``)."""
        async with asyncio.timeout(timeout):
            while not condition():
                self._changed.clear()
                await self._changed.wait()
