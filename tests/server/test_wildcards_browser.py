"""Wildcard subscriptions in the browser: wsrelay.js's matcher (``topicMatches``) agrees
with the server's (``wsrelay.core.patterns.matches``) case by case, in real Chromium;
``relay.subscribe("news.*")`` brings matching topics' messages to ``on("news.*", …)``,
a reconnect sends ``since`` for named topics only; the console subscribes to a pattern."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import aiohttp
from playwright.async_api import Page, expect

from tests.server.test_console_browser import (  # noqa: F401 (fixtures)
    WAIT,
    browser,
    messages,
    page,
    subscribe_in_page,
)
from tests.utils import Api, ServerProcess
from wsrelay.core.patterns import matches

SEGMENTS = ["news", "eu", "fr", "a", "b", "c", "chat:1", "chat:", "x-y", "u@h", "p/q", "_", ""]


def cases(count: int, seed: int = 13) -> list[tuple[str, str]]:
    """(pattern, topic) pairs: fixed edge cases, then random ones built from segments
    with ``*`` and ``>`` in various places, each pattern tried on topics made to match it
    and on random ones."""
    fixed = [
        ("news.*", "news.eu"),
        ("news.*", "news.eu.fr"),
        ("news.*", "news"),
        ("news.*", "news."),
        ("news.>", "news."),
        ("news.>", "news.eu.fr"),
        ("news.>", "news"),
        ("news.>", "news.."),
        ("news.*", "news..x"),
        ("news.*.x", "news..x"),
        ("a.*.c", "a.b.c"),
        ("a.*.c", "a..c"),
        ("a.*.c", "a.b.b.c"),
        ("chat:*", "chat:1"),
        ("chat:*", "chat:"),
        ("chat:*", "chat:1.2"),
        ("*", "news"),
        ("*", "news.eu"),
        (">", "news.eu"),
        (">", ""),
        ("*.*", "a.b"),
        ("*.>", "a"),
        ("a*b.c", "ab.c"),
        ("a*b.c", "aXYb.c"),
        ("news", "news"),
        ("news", "news.eu"),
        ("a.>.b", "a.>.b"),
        ("a.b>", "a.b>"),
        ("x.*", "x.a*b"),
    ]
    rng = random.Random(seed)
    result = list(fixed)
    while len(result) < count:
        segments = [rng.choice(SEGMENTS) for _ in range(rng.randint(1, 4))]
        pattern_segments = []
        for segment in segments:
            roll = rng.random()
            if roll < 0.25:
                pattern_segments.append("*")
            elif roll < 0.35 and segment:
                cut = rng.randint(0, len(segment))
                pattern_segments.append(segment[:cut] + "*" + segment[cut:])
            else:
                pattern_segments.append(segment)
        if rng.random() < 0.3:
            pattern_segments.append(">")
        pattern = ".".join(pattern_segments)
        topic = (
            ".".join(segments)
            if rng.random() < 0.5
            else ".".join(rng.choice(SEGMENTS) for _ in range(rng.randint(1, 5)))
        )
        if pattern_segments[-1] == ">" and rng.random() < 0.7:
            topic += "." + ".".join(rng.choice(SEGMENTS) for _ in range(rng.randint(1, 2)))
        result.append((pattern, topic))
    return result


async def test_the_js_matcher_agrees_with_the_servers(
    server: ServerProcess,
    page: Page,  # noqa: F811 (the imported fixture)
) -> None:
    pairs = cases(600)
    expected = [matches(pattern, topic) for pattern, topic in pairs]
    # Both outcomes are well represented, so agreeing is not trivial.
    assert 100 < sum(expected) < len(expected) - 100
    await page.goto(server.url + "/console")
    got = await page.evaluate(
        """async (pairs) => {
          const { topicMatches } = await import("/client/wsrelay.js");
          return pairs.map(([pattern, topic]) => topicMatches(pattern, topic));
        }""",
        [list(pair) for pair in pairs],
    )
    differ = [(p, t, e) for (p, t), e, g in zip(pairs, expected, got, strict=True) if e != g]
    assert differ == []


SCRIPT = """
async (wait) => {
  // Every WebSocket the client opens, and what it sends; the first command of a new
  // connection waits for `window.hold` (the server holds its topics until then).
  const sockets = [];
  const sent = [];
  window.hold = null;
  class Recording extends WebSocket {
    constructor(...args) {
      super(...args);
      sockets.push(this);
    }
    send(data) {
      sent.push(JSON.parse(data));
      const hold = window.hold;
      if (hold) {
        window.hold = null;
        hold.then(() => super.send(data));
      } else super.send(data);
    }
  }
  window.WebSocket = Recording;
  const { Relay } = await import("/client/wsrelay.js");
  const within = (promise, what) =>
    Promise.race([
      promise,
      new Promise((_, reject) =>
        setTimeout(() => reject(new Error(`no ${what} within ${wait} ms`)), wait),
      ),
    ]);
  const publish = async (topic, message) =>
    (await fetch("/publish", { method: "POST", body: JSON.stringify({ topic, message }) })).json();
  // Resolves with the message of `text` once a handler added with `on(key, …)` got it.
  const seen = { "news.*": [], "*": [], "news.uk": [], "chat:*": [], "news.>": [] };
  const waiters = [];
  const arrived = (key, text) =>
    within(
      new Promise((resolve) => {
        const check = () => seen[key].some(([m]) => m === text) && (resolve(), true);
        if (!check()) waiters.push(check);
      }),
      `${text} on ${key}`,
    );
  const registration = await (
    await fetch("/register", { method: "POST", body: JSON.stringify({ topics: [] }) })
  ).json();
  const relay = new Relay({ url: registration.url, minDelay: 50, maxDelay: 200 });
  for (const key of Object.keys(seen)) {
    relay.on(key, (message, topic) => {
      seen[key].push([message, topic]);
      for (const check of [...waiters]) if (check()) waiters.splice(waiters.indexOf(check), 1);
    });
  }
  const refusals = [];
  for (const bad of ["chat:*", "news.>.x", "inbox:{user}", "news.*x"]) {
    await relay.subscribe(bad).then(
      () => refusals.push(null),
      (error) => refusals.push(error.name),
    );
  }
  let badOn = null;
  try {
    relay.on("a.>.b", () => {});
  } catch (error) {
    badOn = error.name;
  }
  await within(relay.connect(), "connection");
  const subscribing = relay.subscribe("news.*", "news.uk", "chat:1", "news.eu.fr");
  const acknowledged = await within(subscribing, "ack");
  await publish("news.uk", "uk-1");
  await arrived("news.uk", "uk-1");
  await publish("news.eu", "eu-1");
  await arrived("news.*", "eu-1");
  await publish("chat:1", "chat-1");
  await arrived("chat:*", "chat-1");
  await publish("news.eu.fr", "fr-1"); // news.* does not match it, news.> does
  await arrived("news.>", "fr-1");
  await publish("news.eu", "eu-2"); // after it, in the same connection
  await arrived("news.*", "eu-2");

  // A reconnect: publications to news.uk meanwhile are recovered by its position; the
  // pattern is sent again, without one.
  let release;
  window.hold = new Promise((resolve) => (release = resolve));
  const closed = new Promise((resolve) =>
    relay.addEventListener("close", (e) => resolve(e.detail), { once: true }),
  );
  const reopened = new Promise((resolve) =>
    relay.addEventListener("open", resolve, { once: true }),
  );
  sockets.at(-1).close(4000, "test");
  const closeDetail = await within(closed, "close");
  await within(reopened, "reopening");
  await publish("news.uk", "uk-2");
  release();
  await arrived("news.uk", "uk-2");
  await publish("news.eu", "eu-3");
  await arrived("news.*", "eu-3");
  await arrived("*", "eu-3");
  relay.close();
  return {
    refusals,
    badOn,
    acknowledged,
    closeDetail,
    sockets: sockets.length,
    commands: sent.filter((frame) => frame.subscribe || frame.topics),
    seen,
    positions: relay.positions,
  };
}
"""


async def test_wsrelay_js_subscribes_to_a_pattern_and_recovers_named_topics(
    server: ServerProcess,
    page: Page,  # noqa: F811 (the imported fixture)
) -> None:
    await page.goto(server.url + "/console")
    result = await page.evaluate(SCRIPT, WAIT)
    assert result["refusals"] == ["TypeError"] * 4  # nothing sent for them
    assert result["badOn"] == "TypeError"
    assert result["acknowledged"] == ["chat:1", "news.*", "news.eu.fr", "news.uk"]
    assert result["closeDetail"]["reconnect"] is True
    assert result["sockets"] == 2
    # the open sends the (empty) set of a client that never subscribed yet
    opening, first, again = result["commands"]
    assert opening == {"subscribe": []}
    assert first == {"subscribe": ["news.*", "news.uk", "chat:1", "news.eu.fr"]}
    assert again["topics"] == ["chat:1", "news.*", "news.eu.fr", "news.uk"]
    assert set(again["since"]) == {"news.uk", "chat:1", "news.eu.fr"}  # never the pattern
    seen: dict[str, list[Any]] = result["seen"]
    uk1, eu1, chat1, fr1, eu2, uk2, eu3 = (
        ["uk-1", "news.uk"],
        ["eu-1", "news.eu"],
        ["chat-1", "chat:1"],
        ["fr-1", "news.eu.fr"],
        ["eu-2", "news.eu"],
        ["uk-2", "news.uk"],
        ["eu-3", "news.eu"],
    )
    assert seen["news.*"] == [uk1, eu1, eu2, uk2, eu3]
    assert seen["news.>"] == [uk1, eu1, fr1, eu2, uk2, eu3]
    assert seen["news.uk"] == [uk1, uk2]
    assert seen["chat:*"] == [chat1]
    assert seen["*"] == [uk1, eu1, chat1, fr1, eu2, uk2, eu3]
    assert set(result["positions"]) == {"news.uk", "chat:1", "news.eu.fr"}


async def test_the_console_subscribes_to_a_pattern(
    start_server: Callable[..., ServerProcess],
    session: aiohttp.ClientSession,
    page: Page,  # noqa: F811 (the imported fixture)
) -> None:
    server = start_server()
    api = Api(session, server.url)
    await page.goto(server.url + "/console")
    await expect(page.locator("#api-status")).to_have_text("live")
    await subscribe_in_page(page, "news.*")
    assert await api.publish("news.eu", "from the API") == 1
    await expect(messages(page).first).to_contain_text("news.eufrom the API")
    assert await api.publish("news.eu.fr", "not matched") == 0
    assert await api.publish("news.uk", "matched too") == 1
    await expect(messages(page)).to_have_count(2)
    await expect(messages(page).first).to_contain_text("news.ukmatched too")
    await page.get_by_role("button", name="Unsubscribe from news.*").click()
    await expect(page.locator("#subscribed li span")).to_have_count(0)
    assert await api.publish("news.eu", "not any more") == 0
