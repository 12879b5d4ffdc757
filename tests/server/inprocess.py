"""An app served in the test's own process, on either stack: for tests that must see or
steer the server's state (a broker that fails on cue, a connection's protocol) while a
real socket talks to it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from aiohttp import web

from tests.utils import free_port
from wsrelay.server.front import RelaySite
from wsrelay.server.native import SHARED


@asynccontextmanager
async def served(app: web.Application, stack: str) -> AsyncIterator[str]:
    """Serve ``app`` on a free loopback port, as ``wsrelay serve --stack <stack>`` would
    (``native``: the front door takes fresh connections); yields its ``ws://`` base URL."""
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    site: web.BaseSite
    if stack == "native":
        site = RelaySite(runner, app[SHARED], "127.0.0.1", port)
    else:
        site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    try:
        yield f"ws://127.0.0.1:{port}"
    finally:
        await runner.cleanup()
