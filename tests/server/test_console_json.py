"""JSON payloads in a real headless Chromium (see test_console_browser.py for the browser
and its rules): wsrelay.js publishes any JSON value and hands handlers the parsed value;
the console publishes the value its text holds when "JSON value" is checked and shows
received values as JSON text."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
from playwright.async_api import Page, expect

from tests.server.test_console_browser import (  # noqa: F401 (fixtures used by name)
    browser,
    messages,
    page,
    publish_in_page,
    start_rules_server,
    subscribe_in_page,
)
from tests.utils import Api, ServerProcess

VALUES_SCRIPT = """
async (values) => {
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
      (answer) => ({ ok: answer.offset }),
      (error) => ({ code: error.code ?? error.name, message: error.message }),
    );
  const listener = new Relay({ register: register(undefined) });
  const received = [];
  let enough;
  const done = new Promise((resolve) => (enough = resolve));
  listener.on("granted:json", (message, topic, offset) => {
    received.push({ message, type: message === null ? "null" : typeof message, offset });
    if (received.length === values.length + 1) enough();
  });
  await listener.connect();
  await listener.subscribe("granted:json");
  const client = new Relay({ register: register({ publish: ["granted:json"] }) });
  await client.connect();
  const published = [];
  for (const value of values) published.push(await outcome(client.publish("granted:json", value)));
  const refused = [
    await outcome(client.publish("granted:json", undefined)),
    await outcome(client.publish("granted:json", 10n)),
    await outcome(client.publish("granted:json", () => 1)),
  ];
  // the test publishes one more over HTTP, then reads what the listener got
  window.jsonReceived = done.then(() => {
    client.close();
    listener.close();
    return received;
  });
  return { published, refused };
}
"""

VALUES: list[Any] = [
    {"a": [1, {"b": None}], "é": "🐈"},
    [1, "two", False],
    3.25,
    True,
    None,
    '{"a":1}',  # a string holding JSON text stays a string
]


async def test_wsrelay_js_publishes_values_and_handlers_get_them_parsed(
    start_server: Callable[..., ServerProcess],
    tmp_path: Path,
    page: Page,  # noqa: F811
    session: aiohttp.ClientSession,
) -> None:
    server = start_rules_server(start_server, tmp_path)
    await page.goto(server.url + "/console")
    result: dict[str, Any] = await page.evaluate(VALUES_SCRIPT, VALUES)
    assert [p.get("ok") for p in result["published"]] == list(range(1, len(VALUES) + 1)), result
    # Not JSON: refused in the page with a TypeError, nothing sent.
    assert [r["code"] for r in result["refused"]] == ["TypeError"] * 3, result
    status, body = await Api(session, server.url).call(
        "POST", "/publish", {"topic": "granted:json", "message": {"from": "api"}}
    )
    assert status == 200, body
    received: list[dict[str, Any]] = await page.evaluate("window.jsonReceived")
    sent = [*VALUES, {"from": "api"}]
    assert [r["message"] for r in received] == sent
    assert [r["type"] for r in received] == [
        "object",
        "object",
        "number",
        "boolean",
        "null",
        "string",
        "object",
    ]
    assert [r["offset"] for r in received] == list(range(1, len(sent) + 1))


async def test_console_publishes_a_json_value_and_shows_values_as_json(
    start_server: Callable[..., ServerProcess],
    page: Page,  # noqa: F811
    session: aiohttp.ClientSession,
) -> None:
    server = start_server()
    api = Api(session, server.url)
    await page.goto(server.url + "/console")
    await subscribe_in_page(page, "console.json")
    result = page.locator("#publish-result")

    await page.get_by_label("JSON value").check()
    await publish_in_page(page, "console.json", '{ "a": [1, 2], "b": null }')
    await expect(result).to_have_text("Delivered to 1 connection.")
    row = messages(page).first
    await expect(row.locator(".text")).to_have_text('{"a":[1,2],"b":null}')
    await expect(row).to_have_class(re.compile(r"\bjson\b"))

    await publish_in_page(page, "console.json", "not json")
    await expect(result).to_have_text(re.compile(r"^Not JSON: "))
    await expect(result).to_have_class("bad")
    await expect(messages(page)).to_have_count(1)  # nothing was sent

    await publish_in_page(page, "console.json", '"a quoted string"')  # a JSON string
    await expect(messages(page).first.locator(".text")).to_have_text("a quoted string")
    await expect(messages(page).first).not_to_have_class(re.compile(r"\bjson\b"))

    await page.get_by_label("JSON value").uncheck()
    await publish_in_page(page, "console.json", '{"looks": "like JSON"}')  # a string
    await expect(messages(page).first.locator(".text")).to_have_text('{"looks": "like JSON"}')
    await expect(messages(page).first).not_to_have_class(re.compile(r"\bjson\b"))

    assert await api.publish("console.json", [1, {"x": True}]) == 1
    await expect(messages(page).first.locator(".text")).to_have_text('[1,{"x":true}]')
    await expect(messages(page)).to_have_count(4)

    # What the subscriber received is what was published: the API's history says so.
    status, page_body = await api.call("GET", "/history?topic=console.json")
    assert status == 200, page_body
    assert [p["message"] for p in page_body["publications"]] == [
        {"a": [1, 2], "b": None},
        "a quoted string",
        '{"looks": "like JSON"}',
        [1, {"x": True}],
    ]
