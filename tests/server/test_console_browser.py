"""The web console and wsrelay.js in a real headless Chromium, against a real server.

The browser is the system's Chromium (Debian's ``chromium`` package), driven by
Playwright; never one downloaded by ``playwright install``. Without it these tests
skip, saying how to enable them, unless ``WSRELAY_REQUIRE_BROWSER=1`` (set by
``.ci/run``) makes that a failure. Every wait is Playwright's own (``expect``) or
on a promise of the page, bounded by a timeout; nothing sleeps. Each test leaves a
screenshot of the page in ``test-artifacts/`` (gitignored), whatever its outcome.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from playwright.async_api import Browser, ConsoleMessage, Page, Route, async_playwright, expect

from tests.redis_server import RedisServer
from tests.test_client_publish import CONFIG
from tests.utils import TIMEOUT, Api, ServerProcess, free_port, stop_and_check
from wsrelay import codes

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts"
REQUIRED = os.environ.get("WSRELAY_REQUIRE_BROWSER") == "1"
WAIT = TIMEOUT * 1000  # Playwright counts in milliseconds
RECONNECT_WAIT = WAIT * 4  # a server restart, plus the console's backoff (at most 5 s)
KEY = "console-key-1"

expect.set_options(timeout=WAIT)


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        message = (
            "no Chromium on PATH: install Debian's (apt-get install chromium) to run the "
            "browser tests"
        )
        if REQUIRED:
            pytest.fail(message + " — WSRELAY_REQUIRE_BROWSER=1 makes this a failure")
        pytest.skip(message)
    return path


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    executable = chromium()
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=executable)
        yield browser
        await browser.close()


@pytest.fixture
async def page(browser: Browser, request: pytest.FixtureRequest) -> AsyncIterator[Page]:
    """A fresh page; fails the test on an uncaught script error or a CSP violation,
    and saves a screenshot in test-artifacts/ at the end."""
    context = await browser.new_context(viewport={"width": 1280, "height": 1000})
    page = await context.new_page()
    problems: list[str] = []
    page.on("pageerror", lambda error: problems.append(f"uncaught: {error}"))

    def on_console(message: ConsoleMessage) -> None:
        if "Content Security Policy" in message.text:
            problems.append(f"CSP: {message.text}")

    page.on("console", on_console)
    try:
        yield page
    finally:
        ARTIFACTS.mkdir(exist_ok=True)
        name = re.sub(r"[^A-Za-z0-9_.-]+", "-", request.node.name)
        await page.screenshot(path=ARTIFACTS / f"{name}.png", full_page=True)
        await context.close()
    assert problems == []


async def subscribe_in_page(page: Page, *topics: str) -> None:
    await page.get_by_label("Topics to subscribe to").fill(" ".join(topics))
    await page.get_by_role("button", name="Subscribe", exact=True).click()
    await expect(page.locator("#client-state")).to_have_text("connected")
    await expect(page.locator("#subscribed li:not(.pending) span")).to_have_text(sorted(topics))


async def publish_in_page(page: Page, topic: str, message: str) -> None:
    await page.get_by_label("Topic", exact=True).fill(topic)
    await page.get_by_label("Message", exact=True).fill(message)
    await page.get_by_role("button", name="Publish").click()


def messages(page: Page) -> Any:
    """The message log, newest first: one row of time, topic, text per message."""
    return page.locator("#messages li")


# -- the files themselves (no browser needed) ---------------------------------------------


async def test_console_files_have_types_csp_and_revalidate(
    server: ServerProcess, session: aiohttp.ClientSession
) -> None:
    expected = {
        "/console": "text/html",
        "/console/console.js": "text/javascript",
        "/console/console.css": "text/css",
        "/client/wsrelay.js": "text/javascript",
    }
    for path, content_type in expected.items():
        async with session.get(server.url + path) as response:
            assert response.status == 200, path
            assert response.content_type == content_type, path
            assert response.headers["Cache-Control"] == "no-cache", path
            assert response.headers["X-Content-Type-Options"] == "nosniff"
            etag = response.headers["ETag"]
            if path == "/console":
                csp = response.headers["Content-Security-Policy"]
                assert "script-src 'self';" in csp and "default-src 'none'" in csp
                assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
                assert "<script>" not in await response.text()  # nothing inline
        async with session.get(server.url + path, headers={"If-None-Match": etag}) as response:
            assert response.status == 304, path
    async with session.get(server.url + "/console/wsrelay.py") as response:
        assert response.status == 404
        assert (await response.json())["error"]["code"] == "not_found"


# -- the console in a browser -------------------------------------------------------------


async def test_console_shows_messages_published_from_the_page_and_the_api(
    start_server: Callable[..., ServerProcess], session: aiohttp.ClientSession, page: Page
) -> None:
    server = start_server()
    api = Api(session, server.url)
    await page.goto(server.url + "/console")
    await expect(page.locator("#api-status")).to_have_text("live")

    await subscribe_in_page(page, "console.cats", "console.dogs")
    await expect(page.locator("#connections")).to_have_text("1")
    rows = page.locator("#topic-rows tr")
    await expect(rows).to_have_count(2)
    await expect(rows.filter(has_text="console.cats")).to_contain_text("1")

    await publish_in_page(page, "console.cats", "from the <b>page</b>")
    await expect(page.locator("#publish-result")).to_have_text("Delivered to 1 connection.")
    await expect(messages(page).first).to_contain_text("console.catsfrom the <b>page</b>")

    assert await api.publish("console.dogs", "from the API") == 1
    await expect(messages(page)).to_have_count(2)
    await expect(messages(page).first).to_contain_text("console.dogsfrom the API")
    await expect(page.locator("#message-count")).to_have_text("(2)")
    # message text is shown as text, never parsed as HTML
    await expect(page.locator("#messages b")).to_have_count(0)

    # the counters move: two publishes became two deliveries
    await expect(page.locator("#registrations")).to_have_text("1")
    status, stats = await api.call("GET", "/stats")
    assert (status, stats["publishes"], stats["deliveries"]) == (200, 2, 2)

    # unsubscribing in the page reaches the server
    await page.get_by_role("button", name="Unsubscribe from console.dogs").click()
    await expect(page.locator("#subscribed li span")).to_have_text(["console.cats"])
    assert await api.publish("console.dogs", "not any more") == 0


async def test_console_asks_for_the_api_key_and_keeps_it_in_session_storage(
    start_server: Callable[..., ServerProcess], session: aiohttp.ClientSession, page: Page
) -> None:
    server = start_server("--api-key", KEY)
    await page.goto(server.url + "/console")
    dialog = page.get_by_role("dialog", name="API key")
    await expect(dialog).to_be_visible()
    await expect(page.locator("#api-status")).to_have_text("API key needed")

    await dialog.get_by_label("API key").fill("wrong")
    await dialog.get_by_role("button", name="Use key").click()
    await expect(dialog).to_contain_text("The server refused that key")

    await dialog.get_by_label("API key").fill(KEY)
    await dialog.get_by_role("button", name="Use key").click()
    await expect(dialog).to_be_hidden()
    await expect(page.locator("#api-status")).to_have_text("live")
    await expect(page.locator("#node")).not_to_have_text("…")

    await subscribe_in_page(page, "keyed")
    await publish_in_page(page, "keyed", "with the key")
    await expect(messages(page).first).to_contain_text("keyedwith the key")
    api = Api(session, server.url)
    headers = {"Authorization": f"Bearer {KEY}"}
    status, body = await api.call(
        "POST", "/publish", {"topic": "keyed", "message": "from the API"}, headers=headers
    )
    assert (status, body["recipients"]) == (200, 1)
    await expect(messages(page).first).to_contain_text("keyedfrom the API")

    # the key lives in this tab's sessionStorage only: no cookie, no localStorage
    assert await page.evaluate("sessionStorage.getItem('wsrelay.apiKey')") == KEY
    assert await page.evaluate("localStorage.length") == 0
    state = await page.context.storage_state()
    assert state["cookies"] == []
    # and a new tab (a new session) has to ask again
    other = await page.context.new_page()
    await other.goto(server.url + "/console")
    await expect(other.get_by_role("dialog", name="API key")).to_be_visible()
    await other.close()


async def test_the_browser_client_reconnects_and_resubscribes_after_a_restart(
    start_server: Callable[..., ServerProcess], session: aiohttp.ClientSession, page: Page
) -> None:
    port = free_port()
    server = start_server("--port", str(port))
    await page.goto(server.url + "/console")
    await subscribe_in_page(page, "restart.a", "restart.b")
    assert await Api(session, server.url).publish("restart.a", "before") == 1
    await expect(messages(page).first).to_contain_text("restart.abefore")
    before = await page.locator("#client-detail").text_content()
    assert before is not None and "/ws/" in before and before.endswith("over WebSocket")

    assert server.stop() == 0  # SIGTERM: the page sees 1001 "going away"
    state = page.locator("#client-state")
    await expect(state).not_to_have_text("connected")
    await expect(page.locator("#subscribed li.pending span")).to_have_text(
        ["restart.a", "restart.b"]
    )
    await expect(page.locator("#api-status")).to_have_text("server unreachable")

    # The same port, but a new process: the in-memory registration is gone, so the
    # client's reconnect gets 404, it registers again and sends its whole topic set.
    restarted = start_server("--port", str(port))
    assert restarted.url == server.url
    await expect(state).to_have_text("connected", timeout=RECONNECT_WAIT)
    await expect(page.locator("#subscribed li:not(.pending) span")).to_have_text(
        ["restart.a", "restart.b"], timeout=RECONNECT_WAIT
    )
    # The memory broker's history died with the process: the log says, for each topic,
    # that messages may have been missed.
    notices = page.locator("#messages li.notice")
    await expect(notices).to_have_count(2)
    assert sorted(await notices.locator(".topic").all_text_contents()) == [
        "restart.a",
        "restart.b",
    ]
    await expect(notices.first).to_contain_text(
        "Not recovered: messages may have been missed; the relay lost its history"
    )
    await expect(page.locator("#message-count")).to_have_text("(1)")  # notices are not counted
    after = await page.locator("#client-detail").text_content()
    assert after is not None and "/ws/" in after and after != before  # a new registration

    api = Api(session, restarted.url)
    status, listed = await api.call("GET", "/topics")
    assert status == 200
    assert {t["topic"]: t["subscribers"] for t in listed["topics"]} == {
        "restart.a": 1,
        "restart.b": 1,
    }
    assert await api.publish("restart.b", "after") == 1
    await expect(messages(page).first).to_contain_text("restart.bafter")
    await expect(page.locator("#api-status")).to_have_text("live")


async def test_console_shows_what_was_published_while_its_connection_was_cut_once_in_order(
    server: ServerProcess, session: aiohttp.ClientSession, page: Page, topic: str
) -> None:
    """The console, served through a TCP proxy that cuts its connections (the relay keeps
    running, memory broker): messages published while it is away and while it reconnects
    appear in the log once each, in order, with no "not recovered" notice, on the same
    registration."""
    from tests.tcp_proxy import Proxy

    api = Api(session, server.url)
    published = [f"m{i}" for i in range(90)]
    async with Proxy(server.url) as proxy:
        await page.goto(proxy.url + "/console")
        await subscribe_in_page(page, topic)
        detail = page.locator("#client-detail")
        before = await detail.text_content()
        assert before is not None and "/ws/" in before
        for text in published[:10]:
            assert await api.publish(topic, text) == 1
        await expect(page.locator("#message-count")).to_have_text("(10)")

        proxy.down()
        await expect(page.locator("#client-state")).not_to_have_text("connected")
        for text in published[10:50]:  # while the console is away
            assert await api.publish(topic, text) == 0
        proxy.up()
        for text in published[50:]:  # while it reconnects, and after
            await api.publish(topic, text)
        await expect(page.locator("#message-count")).to_have_text(
            f"({len(published)})", timeout=RECONNECT_WAIT
        )
        await expect(page.locator("#client-state")).to_have_text("connected")
        published.append("fence")  # anything delivered twice would come before it
        assert await api.publish(topic, "fence") == 1
        await expect(page.locator("#message-count")).to_have_text(f"({len(published)})")
        shown = await messages(page).locator(".text").all_text_contents()
        assert shown[::-1] == published  # newest first in the log
        await expect(page.locator("#messages li.notice")).to_have_count(0)
        assert await detail.text_content() == before  # the same registration
        assert proxy.accepted >= 2  # it did connect again


async def test_console_message_text_keeps_its_width_on_a_phone(
    start_server: Callable[..., ServerProcess], session: aiohttp.ClientSession, page: Page
) -> None:
    """At 390 px (a phone) each message's text gets a line of its own under its time and
    topic: at least 24 characters wide (it used to be one), and nothing scrolls sideways."""
    await page.set_viewport_size({"width": 390, "height": 844})
    server = start_server()
    await page.goto(server.url + "/console")
    await subscribe_in_page(page, "phone.updates.with.a.long.topic.name")
    text = "hello from a phone, a sentence long enough to need several lines " * 2
    api = Api(session, server.url)
    assert await api.publish("phone.updates.with.a.long.topic.name", text) == 1
    await expect(messages(page).first.locator(".text")).to_have_text(text)
    await messages(page).first.scroll_into_view_if_needed()
    measured = await page.evaluate(
        """() => {
          const text = document.querySelector("#messages .text");
          const ctx = document.createElement("canvas").getContext("2d");
          ctx.font = getComputedStyle(text).font;
          return {
            chars: text.getBoundingClientRect().width / ctx.measureText("0").width,
            scrollWidth: document.documentElement.scrollWidth,
          };
        }"""
    )
    assert measured["chars"] >= 24, measured
    assert measured["scrollWidth"] <= 390, measured


# -- wsrelay.js on its own ----------------------------------------------------------------

CLIENT_SCRIPT = """
async () => {
  const { Relay, closeAction } = await import("/client/wsrelay.js");
  const register = async () =>
    (await (await fetch("/register", { method: "POST", body: "{}" })).json()).url;
  const nextClose = (relay) =>
    new Promise((resolve) =>
      relay.addEventListener("close", (e) => resolve(e.detail), { once: true }),
    );
  const url = await register();
  const first = new Relay({ url });
  await first.connect();
  const replaced = nextClose(first);
  const second = new Relay({ url });
  const received = new Promise((resolve) =>
    second.on("*", (message, topic) => resolve([topic, message])),
  );
  await second.connect();
  const acknowledged = await second.subscribe("js.a", "js.b");
  const refused = await second.subscribe("js.c", "bad topic").then(() => null, (e) => e.name);
  const rejected = await second.subscribe("js.d", "x".repeat(200)).then(() => null, (e) => e.code);
  const publish = { topic: "js.b", message: "hi" };
  await fetch("/publish", { method: "POST", body: JSON.stringify(publish) });
  const message = await received;
  const unregistered = nextClose(second);
  await fetch(new URL(url).pathname.replace("/ws/", "/register/"), { method: "DELETE" });
  const codes = [
    1000, 1001, 1002, 1003, 1006, 1007, 1008, 1009, 1011, 4000, 4008, 4499, 4500, 4999,
  ];
  return {
    replaced: await replaced,
    firstState: first.state,
    acknowledged,
    refused,
    rejected,
    topics: second.topics,
    message,
    unregistered: await unregistered,
    secondState: second.state,
    actions: Object.fromEntries(codes.map((code) => [code, closeAction(code)])),
  };
}
"""


async def test_wsrelay_js_subscribes_receives_and_stops_on_terminal_codes(
    start_server: Callable[..., ServerProcess], page: Page
) -> None:
    server = start_server()
    await page.goto(server.url + "/console")  # any page of the server's origin
    result = await page.evaluate(CLIENT_SCRIPT)
    # a second connection to one registration replaces the first: 4500, no reconnect
    assert result["replaced"] == {
        "code": 4500,
        "reason": "replaced by a newer connection",
        "reconnect": False,
        "delay": None,
    }
    assert result["firstState"] == "closed"
    assert result["acknowledged"] == ["js.a", "js.b"]
    assert result["refused"] == "TypeError"  # checked in the browser, nothing sent
    assert result["rejected"] == "invalid_topic"  # the server refused it; dropped locally
    assert result["topics"] == ["js.a", "js.b"]
    assert result["message"] == ["js.b", "hi"]
    # deleting the registration closes with 1000: stop
    assert result["unregistered"]["code"] == 1000
    assert result["unregistered"]["reconnect"] is False
    assert result["secondState"] == "closed"
    # the same advice as the server's codes.should_reconnect (and so the README's table)
    assert result["actions"] == {
        code: "reconnect" if codes.should_reconnect(int(code)) else "stop"
        for code in result["actions"]
    }
    assert len(result["actions"]) == 14


# -- wsrelay.js and Retry-After -----------------------------------------------------------
#
# A browser cannot read the status or headers of a refused WebSocket upgrade (the page
# sees a close 1006), so these refusals come where wsrelay.js reads HTTP answers: the
# backend's Response to its `register` callback, and its own GET on the registration's
# URL after a failed connection. Playwright answers those requests in place of the
# server with a 503 and `Retry-After: 1`, then lets them through to the real server.

SHEDDING = json.dumps({"error": {"code": "broker_unavailable", "message": "shedding load"}})
EARLY = 0.01
"""Seconds a timer may fire before its time, and more (wsrelay.js waits in whole ms)."""


class Refusals:
    """A Playwright route handler: answers the first ``count`` requests with 503 and
    ``Retry-After: 1``, then ``through(route)``; records when each arrived and what
    status it got."""

    def __init__(self, count: int, through: Callable[[Route], Any]) -> None:
        self.count = count
        self.through = through
        self.seen: list[tuple[float, int]] = []

    async def __call__(self, route: Route) -> None:
        at = time.monotonic()
        if len(self.seen) < self.count:
            self.seen.append((at, 503))
            await route.fulfill(
                status=503,
                headers={"Retry-After": "1", "Content-Type": "application/json"},
                body=SHEDDING,
            )
        else:
            self.seen.append((at, 0))
            await self.through(route)

    def gaps(self) -> list[float]:
        """Seconds from each refused request to the next request."""
        pairs = zip(self.seen, self.seen[1:], strict=False)
        return [later - at for (at, status), (later, _) in pairs if status == 503]


def check_retry_after_waits(result: dict[str, Any], refusals: Refusals, min_delay: int) -> None:
    """Each refusal was an error event with status and retryAfter, followed by a
    `reconnecting` state whose delay is 1 s plus at most max(20 %, minDelay), and the
    next request came no sooner."""
    refused = {"code": "broker_unavailable", "status": 503, "retryAfter": 1}
    assert [e for e in result["errors"] if e["status"] == 503] == [refused, refused]
    waits = [s for s in result["states"] if s["state"] == "reconnecting" and s["retryAfter"]]
    assert [s["retryAfter"] for s in waits] == [1, 1]
    assert all(1000 <= s["delay"] <= 1000 + max(200, min_delay) for s in waits), waits
    backoff = [s for s in result["states"] if s["state"] == "reconnecting" and s not in waits]
    assert all(s["retryAfter"] is None for s in backoff)
    gaps = refusals.gaps()
    assert len(gaps) == 2
    assert all(gap >= wait["delay"] / 1000 - EARLY for gap, wait in zip(gaps, waits, strict=True))


RECORD_EVENTS = """
  const states = [];
  const errors = [];
  relay.addEventListener("state", (e) => states.push(e.detail));
  relay.addEventListener("error", ({ detail: { error } }) => {
    const { code, status = null, retryAfter = null } = error;
    errors.push({ code, status, retryAfter });
  });
"""


async def test_wsrelay_js_waits_as_long_as_a_refused_registration_asks(
    start_server: Callable[..., ServerProcess], page: Page
) -> None:
    """`register` returns the backend's fetch Response: a 503 with Retry-After: 1 is
    followed by a wait of 1 s or more (instead of the backoff of at most 200 ms)."""
    server = start_server()
    await page.goto(server.url + "/console")

    async def register(route: Route) -> None:
        answer = await route.fetch(url=server.url + "/register", method="POST", post_data="{}")
        await route.fulfill(response=answer)

    refusals = Refusals(2, register)
    await page.route("**/backend/relay", refusals)
    script = (
        """
async () => {
  const { Relay } = await import("/client/wsrelay.js");
  const relay = new Relay({
    register: () => fetch("/backend/relay", { method: "POST" }),
    minDelay: 50,
    maxDelay: 200,
  });"""
        + RECORD_EVENTS
        + """
  await relay.connect();
  const url = relay.url;
  relay.close();
  return { states, errors, url };
}
"""
    )
    async with asyncio.timeout(TIMEOUT * 4):
        result = await page.evaluate(script)
    assert "/ws/" in result["url"]
    assert [status for _, status in refusals.seen] == [503, 503, 0]
    check_retry_after_waits(result, refusals, 50)


async def test_wsrelay_js_waits_as_long_as_its_own_check_is_told(
    start_server: Callable[..., ServerProcess], page: Page
) -> None:
    """After a failed connection wsrelay.js asks the server (GET on the URL) whether its
    registration is gone; a 503 with Retry-After: 1 to that is followed by a wait of
    1 s or more before it tries again, instead of a WebSocket the node would refuse."""
    port = free_port()
    server = start_server("--port", str(port))
    await page.goto(server.url + "/console")
    refusals = Refusals(2, lambda route: route.continue_())
    script = (
        """
async () => {
  const { Relay } = await import("/client/wsrelay.js");
  const register = async () =>
    (await (await fetch("/register", { method: "POST", body: "{}" })).json()).url;
  const relay = new Relay({ register, minDelay: 50, maxDelay: 200 });"""
        + RECORD_EVENTS
        + """
  await relay.connect();
  const first = relay.url;
  window.reopened = new Promise((resolve) =>
    relay.addEventListener(
      "open",
      () => {
        relay.close();
        resolve({ states, errors, first, url: relay.url });
      },
      { once: true },
    ),
  );
  return first;
}
"""
    )
    async with asyncio.timeout(TIMEOUT * 4):
        first_url = await page.evaluate(script)
    # Only plain GETs are routed: a page's WebSocket is not.
    await page.route(re.compile(r".*/ws/[0-9a-f]+(\?[^/]*)?$"), refusals)
    assert await asyncio.to_thread(server.stop) == 0  # 1001; the registration dies with it
    await asyncio.to_thread(start_server, "--port", str(port))
    async with asyncio.timeout(TIMEOUT * 4):
        result = await page.evaluate("window.reopened")
    assert result["url"] != first_url  # registered anew, after the check saw 404
    statuses = [status for _, status in refusals.seen]
    assert statuses[:2] == [503, 503] and statuses[2:] and 503 not in statuses[2:]
    check_retry_after_waits(result, refusals, 50)


# -- wsrelay.js on a page of another origin -----------------------------------------------
#
# After a failed connection wsrelay.js asks the relay with a plain GET on its URL (a
# browser shows a page nothing of a refused upgrade but a close 1006). The relay lets any
# origin read that answer, so a page elsewhere tells 404 (register again), 403
# origin_not_allowed (stop) and the rest apart.

APP_PAGE = "<!doctype html><meta charset=utf-8><title>app</title><p>a page of another origin"


@asynccontextmanager
async def other_origin(relay_url: str) -> AsyncIterator[str]:
    """A web app on another port of 127.0.0.1 (so another origin than the relay's): its
    page, and its backend's ``POST /backend/relay``, which registers with the relay as a
    real backend would and passes the answer on."""

    async def page(request: web.Request) -> web.Response:
        return web.Response(text=APP_PAGE, content_type="text/html")

    async def backend(request: web.Request) -> web.Response:
        async with client.post(relay_url + "/register", json={}) as answer:
            return web.Response(
                status=answer.status, body=await answer.read(), content_type="application/json"
            )

    app = web.Application()
    app.router.add_get("/", page)
    app.router.add_post("/backend/relay", backend)
    runner = web.AppRunner(app, access_log=None)
    async with aiohttp.ClientSession() as client:
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        try:
            host, port = runner.addresses[0][:2]
            yield f"http://{host}:{port}"
        finally:
            await runner.cleanup()


CROSS_ORIGIN_CLIENTS = """
async (relayUrl) => {
  const { Relay } = await import(`${relayUrl}/client/wsrelay.js`);
  const register = () => fetch("/backend/relay", { method: "POST" });
  window.received = [];
  window.errors = [];
  window.acknowledged = [];
  // the page's client: registers through its backend
  const relay = new Relay({ register, minDelay: 50, maxDelay: 500 });
  relay.on("*", (message) => window.received.push(message));
  relay.addEventListener("error", (e) => window.errors.push(e.detail.error.code));
  relay.addEventListener("subscribed", (e) => window.acknowledged.push(e.detail.topics));
  window.relay = relay;
  await relay.connect();
  const first = relay.url;
  await relay.subscribe("xo.news");
  // a client given only a URL: nothing can bring it back once its registration is gone
  const { url } = await (await register()).json();
  const orphan = new Relay({ url, minDelay: 50, maxDelay: 500 });
  window.orphanErrors = [];
  orphan.addEventListener("error", (e) => {
    const { code, status } = e.detail.error;
    window.orphanErrors.push({ code, status });
  });
  window.orphan = orphan;
  await orphan.connect();
  return first;
}
"""


async def test_wsrelay_js_on_another_origin_registers_again_after_a_restart(
    start_server: Callable[..., ServerProcess], session: aiohttp.ClientSession, page: Page
) -> None:
    """The relay restarts on the memory broker: the registration is gone. A page of
    another origin sees 1006, its check reads the relay's 404 (allowed by CORS), it
    registers again through its backend and resubscribes; a client with only a URL stops
    with ``unknown_client`` instead of retrying a dead URL forever."""
    port = free_port()
    server = start_server("--port", str(port))
    async with other_origin(server.url) as app:
        assert app != server.url
        await page.goto(app + "/")
        first = await page.evaluate(CROSS_ORIGIN_CLIENTS, server.url)
        api = Api(session, server.url)
        assert await api.publish("xo.news", "before") == 1
        await page.wait_for_function("window.received.includes('before')", timeout=WAIT)

        assert await asyncio.to_thread(server.stop) == 0
        restarted = await asyncio.to_thread(start_server, "--port", str(port))
        assert restarted.url == server.url
        await page.wait_for_function(
            f"window.relay.state === 'open' && window.relay.url !== {json.dumps(first)}",
            timeout=RECONNECT_WAIT,
        )
        await page.wait_for_function("window.orphan.state === 'closed'", timeout=RECONNECT_WAIT)
        # resubscribed (the server acknowledged the whole set again): it delivers to it
        await page.wait_for_function("window.acknowledged.length === 2", timeout=WAIT)
        assert await page.evaluate("window.acknowledged") == [["xo.news"], ["xo.news"]]
        api = Api(session, restarted.url)
        assert await api.publish("xo.news", "after") == 1
        await page.wait_for_function("window.received.includes('after')", timeout=WAIT)
        assert await page.evaluate("window.errors") == []
        assert await page.evaluate("window.orphanErrors") == [
            {"code": "unknown_client", "status": 404}
        ]


REFUSED_ORIGIN_CLIENT = """
async (relayUrl) => {
  const { Relay } = await import(`${relayUrl}/client/wsrelay.js`);
  const relay = new Relay({
    register: () => fetch("/backend/relay", { method: "POST" }),
    minDelay: 50,
    maxDelay: 200,
  });
  const states = [];
  const errors = [];
  relay.addEventListener("state", (e) => states.push(e.detail.state));
  relay.addEventListener("error", (e) => errors.push(e.detail.error.code));
  const error = await relay.connect().then(
    () => null,
    ({ code, status, message }) => ({ code, status, message }),
  );
  return { error, states, errors, state: relay.state };
}
"""


async def test_wsrelay_js_stops_on_a_refused_origin(
    start_server: Callable[..., ServerProcess], page: Page
) -> None:
    """``--allowed-origin`` leaves this page's origin out: its upgrade gets 403, which the
    page sees as 1006; its check reads ``origin_not_allowed`` and the client stops, after
    one attempt, with that error (it used to retry forever)."""
    server = start_server("--allowed-origin", "https://app.example.com")
    attempts: list[str] = []
    page.on("websocket", lambda ws: attempts.append(ws.url))
    async with other_origin(server.url) as app:
        await page.goto(app + "/")
        async with asyncio.timeout(TIMEOUT * 4):
            result = await page.evaluate(REFUSED_ORIGIN_CLIENT, server.url)
    assert result["error"]["code"] == "origin_not_allowed", result
    assert result["error"]["status"] == 403
    assert app in result["error"]["message"]  # the server names the refused origin
    assert result["state"] == "closed"
    assert result["states"] == ["connecting", "reconnecting", "connecting", "closed"]
    assert result["errors"] == ["origin_not_allowed"]
    assert len(attempts) == 1


async def test_console_shows_a_refused_origin_and_stops(
    start_server: Callable[..., ServerProcess], page: Page
) -> None:
    """The console's own origin left out of ``--allowed-origin``: its subscriber says
    ``origin_not_allowed`` and what to change, and stops (it used to show "closed (1006);
    retrying" forever)."""
    server = start_server("--allowed-origin", "https://app.example.com")
    await page.goto(server.url + "/console")
    await page.get_by_label("Topics to subscribe to").fill("refused")
    await page.get_by_role("button", name="Subscribe", exact=True).click()
    await expect(page.locator("#client-state")).to_have_text("stopped")
    detail = page.locator("#client-detail")
    await expect(detail).to_contain_text("origin_not_allowed")
    await expect(detail).to_contain_text(f"--allowed-origin must include {server.url}")
    await expect(detail).to_have_class(re.compile(r"\bbad-text\b"))


# -- wsrelay.js recovers what was published while it was away (issue 12) ------------------
#
# The page is of another origin (tests' `other_origin`), as a real application's would be.
# It records, for the test to read: every message with its offset, `notrecovered` events,
# and the WebSocket URLs it opened.

RECOVERING_CLIENT = """
async ([relayUrl, topic]) => {
  const { Relay } = await import(`${relayUrl}/client/wsrelay.js`);
  window.received = [];
  window.lost = [];
  window.opened = [];
  const relay = new Relay({
    register: () => fetch("/backend/relay", { method: "POST" }),
    minDelay: 50,
    maxDelay: 500,
  });
  relay.on(topic, (message, t, offset) => window.received.push([message, offset]));
  relay.addEventListener("notrecovered", (e) => window.lost.push(e.detail));
  relay.addEventListener("open", (e) => window.opened.push(e.detail.url));
  window.relay = relay;
  await relay.connect();
  await relay.subscribe(topic);
  return relay.url;
}
"""


async def received_in_page(page: Page, count: int, timeout: float = WAIT) -> list[list[Any]]:
    """The page's messages as [text, offset], once it has ``count`` of them."""
    await page.wait_for_function(f"window.received.length >= {count}", timeout=timeout)
    result: list[list[Any]] = await page.evaluate("window.received")
    return result


async def test_wsrelay_js_on_another_origin_recovers_a_cut_connection(
    server: ServerProcess, session: aiohttp.ClientSession, page: Page, topic: str
) -> None:
    """The relay keeps running (memory broker); the page's connection is cut (a TCP
    proxy between them) and messages are published while it is away and while it
    reconnects: every one arrives once, in order, with its offset; nothing is reported
    lost; the registration is the same."""
    from tests.tcp_proxy import Proxy

    api = Api(session, server.url)
    sockets: list[str] = []
    page.on("websocket", lambda ws: sockets.append(ws.url))
    async with Proxy(server.url) as proxy, other_origin(proxy.url) as app:
        await page.goto(app + "/")
        first = await page.evaluate(RECOVERING_CLIENT, [server.url, topic])
        assert first.startswith(proxy.url.replace("http", "ws"))
        published = [f"m{i}" for i in range(90)]
        for text in published[:10]:
            assert await api.publish(topic, text) == 1
        await received_in_page(page, 10)

        proxy.down()
        await page.wait_for_function("window.relay.state !== 'open'", timeout=WAIT)
        for text in published[10:50]:  # while the page is away
            assert await api.publish(topic, text) == 0
        proxy.up()
        for text in published[50:]:  # while it reconnects, and after
            await api.publish(topic, text)
        received = await received_in_page(page, len(published), RECONNECT_WAIT)
        assert received == [[text, i] for i, text in enumerate(published, 1)]
        assert await page.evaluate("window.lost") == []
        assert await page.evaluate("window.relay.url") == first  # not registered anew
        assert await page.evaluate("window.opened.length") >= 2
    assert sockets and all(url.endswith("?recover=true") for url in sockets)


async def test_wsrelay_js_on_another_origin_reports_a_restart_as_not_recovered(
    start_server: Callable[..., ServerProcess], session: aiohttp.ClientSession, page: Page
) -> None:
    """The relay restarts on the memory broker: the topic's history is gone. The page
    registers again, asks to recover, and reports ``notrecovered`` with the new epoch;
    the next message (offset 1 of the new epoch, below the old position) arrives."""
    port = free_port()
    server = start_server("--port", str(port))
    topic = "xo.recover"
    async with other_origin(server.url) as app:
        await page.goto(app + "/")
        first = await page.evaluate(RECOVERING_CLIENT, [server.url, topic])
        api = Api(session, server.url)
        status, before = await api.call("POST", "/publish", {"topic": topic, "message": "a"})
        assert status == 200 and before["recipients"] == 1
        await api.publish(topic, "b")
        assert await received_in_page(page, 2) == [["a", 1], ["b", 2]]

        assert await asyncio.to_thread(server.stop) == 0
        restarted = await asyncio.to_thread(start_server, "--port", str(port))
        await page.wait_for_function("window.lost.length === 1", timeout=RECONNECT_WAIT)
        (lost,) = await page.evaluate("window.lost")
        assert lost["topic"] == topic and lost["reason"] == "epoch_changed"
        assert lost["previous"] == {"offset": 2, "epoch": before["epoch"]}
        assert lost["offset"] == 0 and lost["epoch"] != before["epoch"]
        assert await page.evaluate("window.relay.url") != first  # registered anew

        status, after = await Api(session, restarted.url).call(
            "POST", "/publish", {"topic": topic, "message": "after"}
        )
        assert status == 200 and after["recipients"] == 1
        assert (after["offset"], after["epoch"]) == (1, lost["epoch"])
        assert await received_in_page(page, 3) == [["a", 1], ["b", 2], ["after", 1]]
        positions = await page.evaluate("window.relay.positions")
        assert positions == {topic: {"offset": 1, "epoch": lost["epoch"]}}


async def test_wsrelay_js_misses_nothing_when_its_redis_node_is_killed(
    start_server: Callable[..., ServerProcess],
    redis_server: RedisServer,
    session: aiohttp.ClientSession,
    page: Page,
) -> None:
    """Two relay nodes on one Redis. The page's node is killed (SIGKILL: no close frame,
    nothing flushed) and started again on its port while the other node takes
    publishes: the page reconnects to the same registration (kept in Redis), recovers
    from Redis's history, and gets every message exactly once, in order."""
    port = free_port()
    args = ("--broker", redis_server.url, "--port", str(port))
    node = ServerProcess(args).start()  # killed below: not one start_server checks
    try:
        other = start_server("--broker", redis_server.url)
        topic = "xo.redis"
        publisher = Api(session, other.url)
        published = [f"m{i}" for i in range(80)]
        async with other_origin(node.url) as app:
            await page.goto(app + "/")
            first = await page.evaluate(RECOVERING_CLIENT, [node.url, topic])
            for text in published[:10]:
                await publisher.publish(topic, text)
            await received_in_page(page, 10)

            assert node.process is not None
            node.process.kill()
            await asyncio.to_thread(node.process.wait)
            await page.wait_for_function("window.relay.state !== 'open'", timeout=WAIT)
            for text in published[10:50]:  # while its node is dead
                await publisher.publish(topic, text)
            node.stop()
            node = ServerProcess(args).start()
            for text in published[50:]:  # while it reconnects, and after
                await publisher.publish(topic, text)

            received = await received_in_page(page, len(published), RECONNECT_WAIT)
            assert received == [[text, i] for i, text in enumerate(published, 1)]
            assert await page.evaluate("window.lost") == []
            assert await page.evaluate("window.relay.url") == first  # the same registration
    finally:
        stop_and_check(node)


# A scripted peer (real sockets, every frame written by the test) for what a healthy relay
# does not send on cue: a replay overlapping what was received, and a `gap` frame.

SCRIPTED_CLIENT = """
async () => {
  const { Relay } = await import("/client/wsrelay.js");
  window.received = [];
  window.lost = [];
  const relay = new Relay({ url: "/ws/0123456789abcdef", minDelay: 50, maxDelay: 200 });
  relay.on("t", (message, topic, offset) => window.received.push([message, offset]));
  relay.addEventListener("notrecovered", (e) => window.lost.push(e.detail));
  window.relay = relay;
  const subscribed = relay.subscribe("t");  // sent with the whole set once open
  await relay.connect();
  await subscribed;
}
"""


def frame(**fields: Any) -> str:
    return json.dumps(fields)


async def test_wsrelay_js_drops_duplicates_and_reports_a_gap(page: Page) -> None:
    """Messages at or below the known position are dropped, a gap frame moves the
    position and is reported as ``notrecovered``, and the next connection sends the
    position as ``since`` on a ``recover=true`` URL."""
    seen: list[tuple[str, dict[str, Any]]] = []
    script_js = (ROOT / "src/wsrelay/server/static/wsrelay.js").read_text()

    async def client_js(request: web.Request) -> web.Response:
        return web.Response(text=script_js, content_type="text/javascript")

    async def app_page(request: web.Request) -> web.Response:
        return web.Response(text=APP_PAGE, content_type="text/html")

    async def socket(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        command = json.loads((await ws.receive()).data)
        seen.append((request.query_string, command))
        if len(seen) == 1:
            positions = {"t": {"offset": 2, "epoch": "e1"}}
            await ws.send_str(frame(type="subscribed", topics=["t"], positions=positions))
            for offset, text in [(1, "m1"), (2, "m2"), (3, "m3"), (3, "again"), (10, "m10")]:
                if offset == 10:
                    await ws.send_str(frame(type="gap", topic="t", offset=10, epoch="e1"))
                await ws.send_str(frame(type="message", topic="t", message=text, offset=offset))
            await ws.send_str(frame(type="message", topic="t", message="m11", offset=11))
            await ws.close(code=1011, message=b"test: reconnect")
        else:
            positions = {"t": {"offset": 11, "epoch": "e1", "recovered": True}}
            await ws.send_str(frame(type="subscribed", topics=["t"], positions=positions))
            await ws.send_str(frame(type="message", topic="t", message="twice", offset=11))
            await ws.send_str(frame(type="message", topic="t", message="m12", offset=12))
            await ws.receive()  # until the page goes
        return ws

    app = web.Application()
    app.router.add_get("/", app_page)
    app.router.add_get("/client/wsrelay.js", client_js)
    app.router.add_get("/ws/{id}", socket)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        host, port = runner.addresses[0][:2]
        await page.goto(f"http://{host}:{port}/")
        await page.evaluate(SCRIPTED_CLIENT)
        received = await received_in_page(page, 3, RECONNECT_WAIT)
        assert received == [["m3", 3], ["m11", 11], ["m12", 12]]
        assert await page.evaluate("window.lost") == [
            {
                "topic": "t",
                "offset": 10,
                "epoch": "e1",
                "previous": {"offset": 3, "epoch": "e1"},
                "reason": "gap",
            }
        ]
        assert seen == [
            ("recover=true", {"topics": ["t"]}),
            ("recover=true", {"topics": ["t"], "since": {"t": {"offset": 11, "epoch": "e1"}}}),
        ]
        positions = await page.evaluate("window.relay.positions")
        assert positions == {"t": {"offset": 12, "epoch": "e1"}}
        await page.evaluate("window.relay.close()")
    finally:
        await runner.cleanup()


# -- client publishing: wsrelay.js's publish and the console's "publish as a client" -------

PUBLISH_SCRIPT = """
async () => {
  const { Relay } = await import("/client/wsrelay.js");
  const register = (grants) => async () => {
    const response = await fetch("/register", {
      method: "POST",
      body: JSON.stringify({ topics: [], grants }),
    });
    return (await response.json()).url;
  };
  const outcome = (promise) =>
    promise.then(
      (answer) => ({ ok: answer }),
      (error) => ({ code: error.code ?? error.name, message: error.message }),
    );
  const listener = new Relay({ register: register(undefined) });
  const received = [];
  let enough;
  const done = new Promise((resolve) => (enough = resolve));
  listener.on("granted:js", (message, topic, offset) => {
    received.push([message, offset]);
    if (received.length === 2) enough();
  });
  await listener.connect();
  await listener.subscribe("granted:js");

  const client = new Relay({ register: register({ publish: ["granted:js"] }) });
  const own = [];
  let ownArrived;
  const ownDone = new Promise((resolve) => (ownArrived = resolve));
  client.on("granted:js", (message, topic, offset) => {
    own.push([message, offset]);
    ownArrived();
  });
  const before = await outcome(client.publish("granted:js", "too early"));
  await client.connect();
  await client.subscribe("granted:js");
  const skipped = await outcome(client.publish("granted:js", "one", { skipSelf: true }));
  const refused = await outcome(client.publish("granted:other", "no"));
  const invalid = await outcome(client.publish("no spaces", "no"));
  const kept = await outcome(client.publish("granted:js", "two", { idempotencyKey: "k" }));
  const repeat = await outcome(client.publish("granted:js", "two", { idempotencyKey: "k" }));
  await done;
  await ownDone; // its own copy of "two" (not of "one": skipSelf)
  const errors = [];
  client.addEventListener("error", (event) => errors.push(event.detail.error.code));
  const state = client.state;
  client.close();
  listener.close();
  return { before, skipped, refused, invalid, kept, repeat, received, own, state, errors };
}
"""


def start_rules_server(start: Callable[..., ServerProcess], tmp_path: Path) -> ServerProcess:
    config = tmp_path / "wsrelay.toml"
    config.write_text(CONFIG)
    return start("--config", str(config))


async def test_wsrelay_js_publishes_where_granted_and_is_refused_elsewhere(
    start_server: Callable[..., ServerProcess], tmp_path: Path, page: Page
) -> None:
    server = start_rules_server(start_server, tmp_path)
    await page.goto(server.url + "/console")
    result: dict[str, Any] = await page.evaluate(PUBLISH_SCRIPT)
    assert result["before"]["code"] == "not_connected"
    assert result["skipped"]["ok"]["offset"] == 1 and result["skipped"]["ok"]["epoch"]
    assert result["refused"]["code"] == "forbidden_topic"
    assert "granted:other" in result["refused"]["message"]
    assert result["invalid"]["code"] == "TypeError"  # checked in the page, nothing sent
    assert result["kept"]["ok"] == {
        "offset": 2,
        "epoch": result["skipped"]["ok"]["epoch"],
        "duplicate": False,
    }
    assert result["repeat"]["ok"]["duplicate"] is True
    assert result["repeat"]["ok"]["offset"] == 2
    assert result["received"] == [["one", 1], ["two", 2]]
    assert result["own"] == [["two", 2]]  # skip_self left "one" out
    assert result["state"] == "open"  # a refusal leaves the connection open


async def test_console_publishes_as_a_client_and_shows_refusals(
    start_server: Callable[..., ServerProcess], tmp_path: Path, page: Page
) -> None:
    server = start_rules_server(start_server, tmp_path)
    await page.goto(server.url + "/console")
    await page.get_by_label("Topics to subscribe to").fill("granted:console")
    await page.get_by_label("Publish grants").fill("granted:console")
    await page.get_by_role("button", name="Subscribe", exact=True).click()
    await expect(page.locator("#subscribed li:not(.pending) span")).to_have_text(
        ["granted:console"]
    )
    await page.get_by_label("Publish as a client").check()
    await expect(page.get_by_label("User id", exact=False).first).to_be_disabled()
    result = page.locator("#publish-result")

    await publish_in_page(page, "granted:console", "from the page")
    await expect(result).to_have_text("Published as a client at offset 1.")
    await expect(page.locator("#messages li .text").first).to_have_text("from the page")

    await publish_in_page(page, "granted:elsewhere", "refused")
    await expect(result).to_have_text(re.compile(r"^Refused \(forbidden_topic\): may not publish"))
    await expect(result).to_have_class("bad")

    # The connection carries on after the refusal.
    await publish_in_page(page, "granted:console", "again")
    await expect(result).to_have_text("Published as a client at offset 2.")
    await expect(page.locator("#client-state")).to_have_text("connected")


async def test_console_lists_the_nodes_sharing_the_broker(
    start_server: Callable[..., ServerProcess],
    redis_server: RedisServer,
    session: aiohttp.ClientSession,
    page: Page,
) -> None:
    """The Nodes panel (GET /nodes): both nodes on one Redis, the one answering marked,
    each with its connections as its heartbeat said."""
    args = ("--broker", redis_server.url, "--presence-ttl", "1.5")
    a, b = start_server(*args), start_server(*args)
    id_a = (await Api(session, a.url).call("GET", "/stats"))[1]["node"]
    id_b = (await Api(session, b.url).call("GET", "/stats"))[1]["node"]
    await page.goto(a.url + "/console")
    rows = page.locator("#node-rows tr")
    await expect(rows).to_have_count(2)
    await expect(page.locator("#nodes-summary")).to_contain_text("2 nodes on 1 host")
    await expect(page.locator("#node-rows tr.current td.id")).to_have_text(id_a)
    await expect(rows.filter(has_text=id_b)).to_be_visible()
    await subscribe_in_page(page, "console.nodes")
    # its connection, on A, shows once A's next heartbeat wrote it (every 0.5 s here)
    await expect(rows.filter(has_text=id_a).locator("td.num").first).to_have_text("1")
