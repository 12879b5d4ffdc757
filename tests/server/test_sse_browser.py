"""wsrelay.js falls back to server-sent events in a real Chromium when a proxy drops
WebSocket upgrades, says so, and recovers over SSE what was published while it was cut off.

Chromium and the fixtures are those of test_console_browser.py (skipped without it)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import aiohttp
import pytest
from playwright.async_api import Page

from tests.server.test_console_browser import WAIT, browser, page  # noqa: F401
from tests.tcp_proxy import Proxy
from tests.utils import Api, ServerProcess, stop_and_check


class NoUpgrades(Proxy):
    """A proxy that passes plain HTTP and drops every WebSocket upgrade (a reset)."""

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            writer.transport.abort()
            return
        if b"upgrade: websocket" in head.lower() or self._down:
            writer.transport.abort()
            return
        relay = asyncio.StreamReader()
        relay.feed_data(head)
        forward = asyncio.create_task(self._feed(reader, relay))
        try:
            await super()._serve(relay, writer)
        finally:
            forward.cancel()

    @staticmethod
    async def _feed(source: asyncio.StreamReader, target: asyncio.StreamReader) -> None:
        while data := await source.read(65536):
            target.feed_data(data)
        target.feed_eof()


@pytest.fixture
def server() -> Iterator[ServerProcess]:
    process = ServerProcess().start()
    yield process
    stop_and_check(process)


@pytest.fixture
async def proxy(server: ServerProcess) -> AsyncIterator[NoUpgrades]:
    async with NoUpgrades(server.url) as started:
        yield started


SCRIPT = """async (url) => {
  const { Relay } = await import("/client/wsrelay.js");
  const relay = new Relay({ url, minDelay: 50, maxDelay: 200 });
  window.relay = relay;
  window.got = [];
  window.transports = [];
  window.notRecovered = [];
  relay.addEventListener("transport", (e) => window.transports.push(e.detail.transport));
  relay.addEventListener("notrecovered", (e) => window.notRecovered.push(e.detail.topic));
  relay.on("*", (message, topic, offset) => window.got.push([topic, message, offset]));
  await relay.connect();
  const topics = await relay.subscribe("br.a", "br.b");
  return { transport: relay.transport, transports: window.transports, topics };
}"""


async def test_wsrelay_js_falls_back_to_sse_and_recovers_over_it(
    page: Page,  # noqa: F811
    server: ServerProcess,
    proxy: NoUpgrades,
) -> None:
    async with aiohttp.ClientSession() as http:
        api = Api(http, server.url)
        client_id = (await api.register())["id"]
        await page.goto(proxy.url + "/console")  # a page of the relay's origin, via the proxy
        ws_url = proxy.url.replace("http", "ws") + f"/ws/{client_id}"
        result = await page.evaluate(SCRIPT, ws_url)
        assert result == {"transport": "sse", "transports": ["sse"], "topics": ["br.a", "br.b"]}
        await api.publish("br.a", "one")
        await api.publish("br.b", {"n": 2})
        await page.wait_for_function("() => window.got.length >= 2", timeout=WAIT)
        # Publishing goes by POST /sse/<id>: refused here (no namespace allows it), clearly.
        refusal = await page.evaluate("relay.publish('br.a', 'x').then(() => null, (e) => e.code)")
        assert refusal == "forbidden_topic"
        # Cut off: what is published meanwhile comes back over SSE, once each, in order.
        proxy.down()
        await page.wait_for_function("() => relay.state !== 'open'", timeout=WAIT)
        await api.publish("br.a", "two")
        await api.publish("br.b", "three")
        proxy.up()
        await page.wait_for_function("() => window.got.length >= 4", timeout=WAIT * 2)
        await api.publish("br.a", "live")
        await page.wait_for_function("() => window.got.length >= 5", timeout=WAIT)
        got = await page.evaluate("window.got")
        # Each topic's messages once each, in offset order (topics interleave freely).
        assert [m for m in got if m[0] == "br.a"] == [
            ["br.a", "one", 1],
            ["br.a", "two", 2],
            ["br.a", "live", 3],
        ], got
        assert [m for m in got if m[0] == "br.b"] == [["br.b", {"n": 2}, 1], ["br.b", "three", 2]]
        assert await page.evaluate("window.notRecovered") == []
        assert await page.evaluate("relay.transport") == "sse"


async def test_the_console_falls_back_to_sse_and_says_so(
    page: Page,  # noqa: F811
    server: ServerProcess,
    proxy: NoUpgrades,
) -> None:
    from playwright.async_api import expect

    from tests.server.test_console_browser import messages, subscribe_in_page

    await page.goto(proxy.url + "/console")
    await subscribe_in_page(page, "console.sse")
    await expect(page.locator("#client-detail")).to_contain_text("over server-sent events")
    async with aiohttp.ClientSession() as http:
        assert await Api(http, server.url).publish("console.sse", "hello") == 1
    await expect(messages(page).first).to_contain_text("console.ssehello")
