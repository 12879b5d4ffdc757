"""A webhook receiver that redirects: a 302/303 makes an HTTP client repeat the call as
a GET without the events (and send the signature header elsewhere); a 2xx for that GET
must not count as the batch delivered. A redirect is a failed attempt, retried."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import aiohttp
import pytest
from aiohttp import web

from tests.test_webhooks import metric, until
from tests.utils import TIMEOUT, Api, ServerProcess, free_port

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


def test_logs_show_a_receivers_url_without_its_query_or_credentials() -> None:
    from wsrelay.webhooks import shown

    url = "https://user:pass@hooks.example.com:8443/in?token=abc123#x"
    assert shown(url) == "https://hooks.example.com:8443/in"
    assert "abc123" not in shown("http://h/p?token=abc123")


async def test_a_huge_answer_is_read_no_further_than_needed(
    start_server: Start, session: aiohttp.ClientSession
) -> None:
    """A receiver whose 2xx carries 20 MB: the batch counts delivered, the node reads only
    MAX_RECEIVER_ANSWER of it and goes on delivering the next ones."""
    from wsrelay.webhooks import MAX_RECEIVER_ANSWER

    sent_bytes: list[int] = []
    answered = asyncio.Event()

    async def hook(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse()
        await response.prepare(request)
        chunk = b"x" * (1 << 20)
        try:
            for _ in range(20):
                await response.write(chunk)
                sent_bytes.append(len(chunk))
        except (ConnectionResetError, aiohttp.ClientConnectionResetError):
            pass  # the node stopped reading and let the connection go
        finally:
            answered.set()
        return response

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        relay = start_server(
            "--webhook-url",
            f"http://127.0.0.1:{port}/hook",
            env={"WSRELAY_WEBHOOK_SECRET": "s" * 32},
        )
        api = Api(session, relay.url)
        first = await api.connect(1)

        async def sent(n: int) -> bool:
            return await metric(session, relay, "wsrelay_webhook_events_sent_total") >= n

        await until(lambda: sent(1))
        async with asyncio.timeout(TIMEOUT):
            await answered.wait()
        # Reading it all would have let the receiver write its 20 MB.
        assert sum(sent_bytes) < 20 * (1 << 20), sum(sent_bytes)
        second = await api.connect(2)  # the next batch goes too
        await until(lambda: sent(2))
        await first.close()
        await second.close()
    finally:
        await runner.cleanup()
    assert MAX_RECEIVER_ANSWER < 20 * (1 << 20)  # (the claim depends on it)
