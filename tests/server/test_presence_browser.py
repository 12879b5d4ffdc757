"""wsrelay.js and presence, in Chromium: join frames are ignored (the stream goes on), and
a ban (close 4503) stops the client for good."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from playwright.async_api import Page

from tests.server.test_console_browser import browser, page  # noqa: F401 (fixtures)
from tests.utils import ServerProcess

CONFIG = """
[[namespace]]
pattern = "room:*"
presence = true
join_leave = true
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


async def test_wsrelay_js_ignores_joins_and_stops_when_banned(
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
