"""wsrelay.js and the console with presence, in Chromium: ``relay.presence`` and
``presenceStats`` over the WebSocket (refusals reject with the server's code), ``join`` and
``leave`` events, the stream going on through them, and a ban (close 4503) stopping the
client for good; the console's presence list and the joins and leaves in its log."""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
from playwright.async_api import Page, expect

from tests.server.test_console_browser import (  # noqa: F401 (fixtures)
    WAIT,
    browser,
    page,
    subscribe_in_page,
)
from tests.utils import Api, ServerProcess

CONFIG = """
[[namespace]]
pattern = "room:*"
presence = true
join_leave = true

[[namespace]]
pattern = "secret:*"
subscribe = "granted"
presence = true
"""

SCRIPT = """
async () => {
  const { Relay } = await import("/client/wsrelay.js");
  const register = async (body) =>
    (await fetch("/register", { method: "POST", body: JSON.stringify(body) })).json();
  const mine = await register({ user_id: "js-user" });
  const relay = new Relay({ url: mine.url });
  await relay.connect();
  await relay.subscribe("room:js");
  const received = new Promise((resolve) => relay.on("room:js", (message) => resolve(message)));
  // Another connection joins: the client gets a join frame before the message below.
  const other = await register({ user_id: "other", topics: ["room:js"] });
  const socket = new WebSocket(other.url);
  await new Promise((resolve) => socket.addEventListener("open", resolve, { once: true }));
  const publish = { topic: "room:js", message: "after the join" };
  await fetch("/publish", { method: "POST", body: JSON.stringify(publish) });
  const message = await received;
  const closed = new Promise((resolve) =>
    relay.addEventListener("close", (e) => resolve(e.detail), { once: true }),
  );
  const ban = await (await fetch("/users/js-user/connections", { method: "DELETE" })).json();
  const detail = await closed;
  socket.close();
  return { message, ban, detail, state: relay.state };
}
"""


async def test_wsrelay_js_keeps_its_stream_through_joins_and_stops_when_banned(
    start_server: Callable[..., ServerProcess],
    page: Page,  # noqa: F811 (the imported fixture)
    tmp_path: Path,
) -> None:
    config = tmp_path / "wsrelay.toml"
    config.write_text(CONFIG)
    server = start_server("--config", str(config))
    await page.goto(server.url + "/console")  # any page of the server's origin
    result = await page.evaluate(SCRIPT)
    assert result["message"] == "after the join"
    assert result["ban"] == {"user_id": "js-user", "connections": 1, "registrations": 1}
    assert result["detail"] == {
        "code": 4503,
        "reason": "banned: the user was disconnected",
        "reconnect": False,
        "delay": None,
    }
    assert result["state"] == "closed"


def public(client_id: str) -> str:
    """A connection's public id, as presence shows it."""
    return hashlib.sha256(client_id.encode()).hexdigest()[:32]


def start_presence_server(
    start_server: Callable[..., ServerProcess], tmp_path: Path
) -> ServerProcess:
    config = tmp_path / "wsrelay.toml"
    config.write_text(CONFIG)
    return start_server("--config", str(config))


# -- wsrelay.js: presence, presenceStats, join and leave ----------------------------------

PRESENCE_SCRIPT = """
async (wait) => {
  const { Relay } = await import("/client/wsrelay.js");
  const register = async (body) =>
    (await fetch("/register", { method: "POST", body: JSON.stringify(body) })).json();
  // Nothing waits forever: `promise`, or an error after `wait` ms without its outcome.
  const within = (promise, what) =>
    Promise.race([
      promise,
      new Promise((_, reject) =>
        setTimeout(() => reject(new Error(`no ${what} within ${wait} ms`)), wait),
      ),
    ]);
  const outcome = (promise) =>
    within(promise, "answer").then(
      (ok) => ({ ok }),
      (error) => ({ code: error.code ?? error.name, message: error.message }),
    );
  const ask = (promise) => within(promise, "answer");
  const next = (relay, type) =>
    within(
      new Promise((resolve) =>
        relay.addEventListener(type, (event) => resolve(event.detail), { once: true }),
      ),
      `${type} event`,
    );
  const mine = await register({ user_id: "js-user" });
  const relay = new Relay({ url: mine.url });
  const errors = [];
  relay.addEventListener("error", (event) => errors.push(event.detail.error.code));
  const early = await outcome(relay.presence("room:js"));
  await relay.connect();
  await relay.subscribe("room:js");
  const alone = await ask(relay.presence("room:js"));

  // A second connection, anonymous, joins by connecting with the topic among its
  // registration's.
  const other = await register({ topics: ["room:js"] });
  const joined = next(relay, "join");
  const second = new Relay({ url: other.url });
  await second.connect();
  const join = await joined;
  const both = await ask(relay.presence("room:js"));
  const stats = await ask(relay.presenceStats("room:js"));

  const refused = {
    forbidden: await outcome(relay.presence("secret:js")),
    forbiddenStats: await outcome(relay.presenceStats("secret:js")),
    disabled: await outcome(relay.presence("plain.js")),
    invalid: await outcome(relay.presence("room:" + "x".repeat(200))),
    pattern: await outcome(relay.presence("room:*")),
  };
  // The refusals went to their promises, not to the command queue: this still works.
  const acknowledged = await relay.subscribe("room:more");

  const left = next(relay, "leave");
  second.close();
  const leave = await left;
  const after = await ask(relay.presenceStats("room:js"));

  // A query waiting for its answer when the connection goes rejects.
  const waiting = outcome(relay.presence("room:js"));
  relay.close();
  const interrupted = await waiting;
  return {
    ids: [mine.id, other.id], early, alone, join, both, stats, refused, acknowledged,
    leave, after, interrupted, errors, state: relay.state,
  };
}
"""


async def test_wsrelay_js_asks_presence_and_reports_joins_and_leaves(
    start_server: Callable[..., ServerProcess],
    page: Page,  # noqa: F811 (the imported fixture)
    tmp_path: Path,
) -> None:
    server = start_presence_server(start_server, tmp_path)
    await page.goto(server.url + "/console")
    result: dict[str, Any] = await page.evaluate(PRESENCE_SCRIPT, WAIT)
    mine, other = (public(client_id) for client_id in result["ids"])
    assert result["early"]["code"] == "not_connected"

    alone = result["alone"]
    assert (alone["topic"], alone["total"]) == ("room:js", 1)
    [entry] = alone["clients"]
    assert set(entry) == {"client", "user", "node", "connectedAt"}
    assert (entry["client"], entry["user"]) == (mine, "js-user")
    assert entry["node"] and abs(entry["connectedAt"] - time.time()) < 60

    assert result["join"] == {"topic": "room:js", "user": None, "client": other}
    both = result["both"]
    assert [(c["client"], c["user"]) for c in both["clients"]] == [
        (mine, "js-user"),
        (other, None),
    ]
    assert both["total"] == 2
    assert result["stats"] == {"topic": "room:js", "numClients": 2, "numUsers": 1}

    refused = result["refused"]
    assert refused["forbidden"]["code"] == "forbidden_topic"
    assert refused["forbiddenStats"]["code"] == "forbidden_topic"
    assert refused["disabled"]["code"] == "presence_disabled"
    assert "plain.js" in refused["disabled"]["message"]
    assert refused["invalid"]["code"] == "invalid_topic"
    assert refused["pattern"]["code"] == "TypeError"  # checked in the page, nothing sent
    assert result["acknowledged"] == ["room:js", "room:more"]

    assert result["leave"] == {"topic": "room:js", "user": None, "client": other}
    assert result["after"] == {"topic": "room:js", "numClients": 1, "numUsers": 1}
    assert result["interrupted"]["code"] == "connection_failed"
    assert result["errors"] == []  # refusals reject their promises, never an error event
    assert result["state"] == "closed"


# -- the console: the presence list, and joins and leaves in its log ----------------------


async def test_console_lists_presence_and_logs_joins_and_leaves(
    start_server: Callable[..., ServerProcess],
    session: aiohttp.ClientSession,
    page: Page,  # noqa: F811 (the imported fixture)
    tmp_path: Path,
) -> None:
    server = start_presence_server(start_server, tmp_path)
    api = Api(session, server.url)
    status, stats = await api.call("GET", "/stats")
    assert status == 200
    # The page's clock stands still once loaded: no poll refreshes the list, so what
    # changes it below is the subscriber's own acknowledgement and the join and leave
    # events.
    await page.clock.install()
    await page.goto(server.url + "/console")
    await expect(page.locator("#api-status")).to_have_text("live")
    await page.clock.pause_at(datetime.now() + timedelta(seconds=1))

    rows = page.locator("#presence-rows tr")
    summary = page.locator("#presence-summary")
    await page.get_by_label("Topic to watch").fill("room:console")
    await page.get_by_role("button", name="Show").click()
    await expect(summary).to_have_text("No connection is subscribed to room:console.")

    await subscribe_in_page(page, "room:console")
    await expect(rows).to_have_count(1)
    await expect(rows.first).to_contain_text("anonymous")
    await expect(summary).to_have_text("1 connection, 0 users subscribed to room:console.")

    visitor = await api.connect("visitor", ["room:console"])
    short = public(visitor.id)[:8] + "…"
    await expect(rows).to_have_count(2)
    row = rows.filter(has_text="visitor")
    await expect(row.locator("td")).to_have_text([short, "visitor", stats["node"], re.compile(".")])
    await expect(row.locator("td").first).to_have_attribute("title", public(visitor.id))
    since = await row.locator("time").get_attribute("datetime")
    assert since is not None
    assert abs(datetime.fromisoformat(since).timestamp() - time.time()) < 60
    await expect(summary).to_have_text("2 connections, 1 user subscribed to room:console.")
    log = page.locator("#messages li")
    await expect(log.first).to_have_text(
        re.compile(rf"room:console\s*Joined: user visitor, client {re.escape(short)}$")
    )
    await expect(log.first).to_have_class("presence")

    await visitor.close()
    await expect(rows).to_have_count(1)
    await expect(rows.filter(has_text="visitor")).to_have_count(0)
    await expect(summary).to_have_text("1 connection, 0 users subscribed to room:console.")
    await expect(log.first).to_contain_text(f"Left: user visitor, client {short}")
    await expect(log).to_have_count(2)
    await expect(page.locator("#message-count")).to_have_text("(0)")  # not messages

    # With time running again, the list of a topic the page does not follow (so no
    # event comes) is polled; a topic without presence shows the server's refusal.
    await page.clock.resume()
    await page.get_by_label("Topic to watch").fill("room:elsewhere")
    await page.get_by_role("button", name="Show").click()
    await expect(summary).to_have_text("No connection is subscribed to room:elsewhere.")
    elsewhere = await api.connect("away", ["room:elsewhere"])
    await expect(rows.filter(has_text="away")).to_have_count(1)
    await expect(summary).to_have_text("1 connection, 1 user subscribed to room:elsewhere.")
    await elsewhere.close()

    await page.get_by_label("Topic to watch").fill("plain.topic")
    await page.get_by_role("button", name="Show").click()
    await expect(summary).to_have_text(re.compile(r"^Refused \(presence_disabled\): "))
    await expect(summary).to_have_class(re.compile(r"\bbad-text\b"))
    await expect(rows).to_have_count(0)
