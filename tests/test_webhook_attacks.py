"""A webhook receiver that redirects: a 302/303 makes an HTTP client repeat the call as
a GET without the events (and send the signature header elsewhere); a 2xx for that GET
must not count as the batch delivered. A redirect is a failed attempt, retried."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import aiohttp
import pytest
from aiohttp import web

from tests.test_webhooks import metric, until
from tests.utils import Api, ServerProcess, free_port

Start = Callable[..., ServerProcess]


@pytest.fixture
async def redirecting_receiver() -> AsyncIterator[tuple[str, list[str]]]:
    """``POST /hook`` answers 302 to ``/page``, which answers 200 to anything."""
    followed: list[str] = []

    async def hook(request: web.Request) -> web.Response:
        raise web.HTTPFound("/page")

    async def page(request: web.Request) -> web.Response:
        followed.append(request.method)
        return web.Response(text="a page")

    app = web.Application()
    app.router.add_post("/hook", hook)
    app.router.add_route("*", "/page", page)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield f"http://127.0.0.1:{port}/hook", followed
    await runner.cleanup()


async def test_a_redirecting_receiver_is_a_failed_attempt_not_a_delivery(
    start_server: Start,
    redirecting_receiver: tuple[str, list[str]],
    session: aiohttp.ClientSession,
) -> None:
    url, followed = redirecting_receiver
    relay = start_server("--webhook-url", url, env={"WSRELAY_WEBHOOK_SECRET": "s" * 32})
    client = await Api(session, relay.url).connect(1)  # a "connected" event

    async def attempted() -> bool:
        sent = await metric(session, relay, "wsrelay_webhook_events_sent_total")
        failed = await metric(session, relay, "wsrelay_webhook_failed_attempts_total")
        return sent + failed > 0

    await until(attempted)
    assert await metric(session, relay, "wsrelay_webhook_events_sent_total") == 0
    assert followed == []  # the redirect is not followed: the events would not go with it
    await client.close()
