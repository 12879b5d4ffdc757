"""JSON payloads (issue 13 item 6) on a real server, on both stacks (memory broker; two
nodes on Redis: tests/test_multinode_json.py): a message may be any JSON value, carried as
is in envelopes, history and replays, sent as its JSON text in raw mode; a string stays a
string, even one holding JSON text."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest

from tests.utils import Api, ServerProcess, stop_and_check
from wsrelay.config import STACKS

CONFIG = """
[[namespace]]
pattern = "json:*"
publish = "subscribers"
max_message_size = 32
"""

VALUES: list[Any] = [
    {"a": 1},
    [1, "two", 3.5, None, True, False],
    0,
    -17,
    2.5e-8,
    18446744073709551616,  # past 64 bits: kept as text, decoded by Python as is
    True,
    False,
    None,
    {},
    [],
    {"nested": {"deeper": [{"deepest": ["é", "日本", "🐈"]}]}},
    '{"a":1}',  # a string holding JSON text: a string
    "[1, 2]",
    "",
    "plain text",
    "null",
]


@pytest.fixture(scope="module", params=STACKS)
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    config = tmp_path_factory.mktemp("json") / "wsrelay.toml"
    config.write_text(CONFIG)
    process = ServerProcess(["--stack", request.param, "--config", str(config)]).start()
    yield process
    stop_and_check(process)


def unique(name: str) -> str:
    return f"{name}-{time.monotonic_ns()}"  # within one segment: json:* matches it


def raw_text(value: Any) -> str:
    """What a raw-mode client receives: a string's text, any other value's compact JSON."""
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))


def same(received: Any, sent: Any) -> bool:
    """Equal, and of the same JSON type (1 is not true, "1" is not 1)."""
    return json.dumps(received) == json.dumps(sent) and type(received) is type(sent)


async def publish(api: Api, topic: str, message: Any, **extra: Any) -> tuple[int, Any]:
    return await api.call("POST", "/publish", {"topic": topic, "message": message, **extra})


async def test_every_json_value_reaches_json_and_raw_subscribers(api: Api) -> None:
    topic = unique("values")
    sub = await api.connect(topics=[topic])
    raw = await api.connect(topics=[topic], fmt="raw")
    await sub.subscribe("fence")  # acknowledged: the registration's topic is live
    for value in VALUES:
        status, body = await publish(api, topic, value)
        assert status == 200 and body["recipients"] == 2, (value, body)
        data = await sub.raw()
        frame = json.loads(data)
        assert frame["type"] == "message" and same(frame["message"], value), (value, frame)
        if not isinstance(value, str):  # embedded as its JSON text, not in a string
            assert f'"message":{raw_text(value)},' in data, data
        assert await raw.raw() == raw_text(value)
    await sub.close()
    await raw.close()


async def test_a_value_is_compacted_once_and_sent_as_published(
    api: Api, session: aiohttp.ClientSession
) -> None:
    """Whitespace in the request does not reach subscribers; the value is as sent."""
    topic = unique("compact")
    raw = await api.connect(topics=[topic], fmt="raw")
    sub = await api.connect(topics=[topic])
    await sub.subscribe("fence")
    body = f'{{"topic": "{topic}", "message": {{ "a" : [ 1 , 2.50 , "x é" ] ,\n "b":null }} }}'
    async with session.post(api.base + "/publish", data=body.encode()) as response:
        assert response.status == 200, await response.text()
    assert await raw.raw() == '{"a":[1,2.50,"x é"],"b":null}'  # 2.50 kept as written
    assert (await sub.message())[1] == {"a": [1, 2.5, "x é"], "b": None}
    await sub.close()
    await raw.close()


async def test_a_batch_mixes_strings_and_values_in_order(api: Api) -> None:
    topic = unique("batch")
    sub = await api.connect(topics=[topic])
    await sub.subscribe("fence")
    messages = [{"topic": topic, "message": value} for value in VALUES]
    status, body = await api.call("POST", "/publish/batch", {"messages": messages})
    assert status == 200 and body["recipients"] == [1] * len(VALUES), body
    for value in VALUES:
        _, received = await sub.message()
        assert same(received, value), (received, value)
    await sub.close()


async def test_history_and_recovery_return_the_same_values(api: Api) -> None:
    topic = unique("history")
    for value in VALUES:
        status, body = await publish(api, topic, value)
        assert status == 200, body
    status, page = await api.call("GET", f"/history?topic={topic}&limit=100")
    assert status == 200, page
    assert [p["offset"] for p in page["publications"]] == list(range(1, len(VALUES) + 1))
    for item, value in zip(page["publications"], VALUES, strict=True):
        assert same(item["message"], value), (item, value)
    # A client recovering from offset 0 of the epoch is replayed every value.
    sub = await api.connect()
    since = {topic: {"offset": 0, "epoch": page["epoch"]}}
    ack = await sub.command({"subscribe": [topic], "since": since})
    assert ack["positions"][topic]["recovered"] is True, ack
    for value in VALUES:
        _, received = await sub.message()
        assert same(received, value), (received, value)
    await sub.close()


async def test_a_repeated_idempotency_key_publishes_a_value_once(api: Api) -> None:
    topic = unique("idem")
    sub = await api.connect(topics=[topic])
    await sub.subscribe("fence")
    first = await publish(api, topic, {"order": 17}, idempotency_key="k-17")
    again = await publish(api, topic, {"order": 17}, idempotency_key="k-17")
    assert first[0] == again[0] == 200, (first, again)
    assert again[1]["duplicate"] is True and again[1]["offset"] == first[1]["offset"], again
    await publish(api, topic, "after")
    assert await sub.message() == (topic, {"order": 17})
    assert await sub.message() == (topic, "after")  # the repeat never arrived
    await sub.close()


@pytest.mark.parametrize(
    ("body", "status", "code", "fragment"),
    [
        (b'{"topic":"t.bad","message":{"a":}}', 400, "invalid_json", "not valid JSON"),
        (b'{"topic":"t.bad","message":NaN}', 400, "invalid_json", "not valid JSON"),
        (b'{"topic":"t.bad","message":{"a":"\xff"}}', 400, "invalid_json", "message: not valid"),
        (b'{"topic":"t.bad"}', 400, "invalid_field", "message"),
        (
            b'{"topic":"t.bad","message":' + b"[" * 129 + b"]" * 129 + b"}",
            400,
            "invalid_field",
            "at most 128",
        ),
        (
            b'{"topic":"t.bad","message":' + b"[" * 20000 + b"]" * 20000 + b"}",
            400,
            "invalid_field",
            "128",
        ),
    ],
)
async def test_bad_messages_get_a_json_error_naming_the_problem(
    api: Api, session: aiohttp.ClientSession, body: bytes, status: int, code: str, fragment: str
) -> None:
    async with session.post(api.base + "/publish", data=body) as response:
        answer = await response.json(content_type=None)
        assert response.status == status, answer
    assert answer["error"]["code"] == code and fragment in answer["error"]["message"], answer


async def test_a_batch_with_a_bad_message_names_it_and_publishes_nothing(api: Api) -> None:
    topic = unique("badbatch")
    deep: Any = 1
    for _ in range(129):
        deep = [deep]
    messages = [{"topic": topic, "message": {"ok": 1}}, {"topic": topic, "message": deep}]
    status, body = await api.call("POST", "/publish/batch", {"messages": messages})
    assert status == 400 and "messages[1].message" in body["error"]["message"], body
    status, page = await api.call("GET", f"/history?topic={topic}&limit=0")
    assert page["offset"] == 0, page  # nothing was published
    # 128 levels are allowed.
    status, body = await publish(api, topic, deep[0])
    assert status == 200, body


async def test_a_client_publishes_a_value_over_its_websocket(api: Api) -> None:
    room = unique("json:room")
    sub = await api.connect()
    await sub.subscribe(room)
    listener = await api.connect(topics=[room], fmt="raw")
    await sub.subscribe("fence")
    value = {"said": ["hi", 1]}
    await sub.ws.send(json.dumps({"publish": {"topic": room, "message": value, "id": 1}}))
    frames = [await sub.frame(), await sub.frame()]  # the answer and its own copy, any order
    assert {f["type"] for f in frames} == {"published", "message"}, frames
    assert next(f for f in frames if f["type"] == "message")["message"] == value
    assert await listener.raw() == '{"said":["hi",1]}'
    await sub.close()
    await listener.close()


async def test_max_message_size_counts_the_compact_json_text(api: Api) -> None:
    """The namespace's max_message_size is 32 bytes of the value's compact JSON text,
    whatever whitespace the frame carried."""
    room = unique("json:size")
    sub = await api.connect()
    await sub.subscribe(room)
    fits = {"k": "é" * 12}  # {"k":"éééééééééééé"}: 8 + 24 bytes = 32
    text = json.dumps({"publish": {"topic": room, "message": fits, "id": 1}}, indent=4)
    await sub.ws.send(text.replace("\\u00e9", "é"))
    answer = await sub.frame()
    if answer["type"] == "message":  # its own copy came first
        answer = await sub.frame()
    assert answer["type"] == "published", answer
    over = {"k": "é" * 12 + "x"}
    await sub.ws.send(
        json.dumps({"publish": {"topic": room, "message": over, "id": 2}}, ensure_ascii=False)
    )
    frame = await sub.frame()
    while frame["type"] == "message":  # the first one's own copy, if it came after
        frame = await sub.frame()
    assert frame["error"]["code"] == "message_too_large" and frame["id"] == 2, frame
    assert "33 bytes" in frame["error"]["message"], frame
    # Escapes are text too: "\u00e9" is 6 bytes where "é" is 2.
    frame = await sub.command({"publish": {"topic": room, "message": {"k": "é" * 5}, "id": 3}})
    assert frame["error"]["code"] == "message_too_large" and frame["id"] == 3, frame
    assert "38 bytes" in frame["error"]["message"], frame
    await sub.close()


async def test_a_raw_client_publishes_a_value_and_a_bad_one_closes_it(api: Api) -> None:
    room = unique("json:raw")
    raw = await api.connect(topics=[room], fmt="raw")
    listener = await api.connect(topics=[room])
    await listener.subscribe("fence")
    await raw.ws.send(json.dumps({"publish": {"topic": room, "message": [1, {"b": True}]}}))
    assert await raw.raw() == '[1,{"b":true}]'
    assert await listener.message() == (room, [1, {"b": True}])
    deep = "[" * 129 + "]" * 129
    await raw.ws.send(json.dumps({"publish": {"topic": room, "message": 0}}).replace("0", deep))
    code, reason = await raw.closed()
    assert code == 1008 and reason is not None and "128" in reason, (code, reason)
    await listener.close()


async def test_the_body_limit_counts_the_json(
    start_server: Any, session: aiohttp.ClientSession
) -> None:
    node = start_server("--max-body-size", "100")
    api = Api(session, node.url)
    small = {"topic": "t.limit", "message": {"v": "x" * 40}}
    status, body = await api.call("POST", "/publish", small)
    assert status == 200, body
    status, body = await api.call(
        "POST", "/publish", {"topic": "t.limit", "message": {"v": "x" * 80}}
    )
    assert status == 413 and body["error"]["code"] == "payload_too_large", body


async def test_openapi_says_a_message_may_be_any_json_value(api: Api) -> None:
    status, doc = await api.call("GET", "/openapi.json")
    assert status == 200
    schemas = doc["components"]["schemas"]
    message = schemas["PublishRequest"]["properties"]["message"]
    assert "type" not in message and "any other JSON value" in message["description"], message
    assert "type" not in schemas["HistoryItem"]["properties"]["message"]
    assert "any JSON value" in doc["paths"]["/publish"]["post"]["description"]
    ws = doc["paths"]["/ws/{client_id}"]["get"]["parameters"]
    assert "compact JSON text" in next(p for p in ws if p["name"] == "format")["description"]
