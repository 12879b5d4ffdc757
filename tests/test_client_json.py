"""JSON payloads through wsrelay.client against a real server: any JSON value published
over HTTP or a subscription's WebSocket comes back decoded, in messages, replays and
history; a string stays a string. Each wait is on the message itself, bounded by TIMEOUT."""

from __future__ import annotations

import asyncio
import math
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from tests.utils import TIMEOUT, ServerProcess, stop_and_check
from wsrelay.client import BadRequest, Message, Position, Publish, Relay

CONFIG = """
[[namespace]]
pattern = "room:*"
publish = "subscribers"
"""

VALUES: list[Any] = [
    {"order": 17, "items": [{"sku": "tea", "qty": 2}], "paid": True, "note": None},
    [1, 2.5, "three", False],
    42,
    -0.5,
    True,
    False,
    None,
    {"emoji": "🐈", "accents": "éàü", "cjk": "日本語"},
    '{"a":1}',  # a string that holds JSON text stays a string
    "",
    "hi",
]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    config: Path = tmp_path_factory.mktemp("client-json") / "wsrelay.toml"
    config.write_text(CONFIG)
    process = ServerProcess(["--config", str(config)]).start()
    yield process
    stop_and_check(process)


def typed(value: Any) -> tuple[str, Any]:
    """A value with its JSON type (True is not 1)."""
    return (type(value).__name__, value)


async def receive(messages: Any, count: int) -> list[Message]:
    received: list[Message] = []
    async with asyncio.timeout(TIMEOUT):
        async for message in messages:
            received.append(message)
            if len(received) == count:
                return received
    raise AssertionError("the subscription ended")


async def test_published_values_arrive_decoded(server: ServerProcess) -> None:
    topic = f"t.json-{uuid.uuid4().hex[:8]}"
    async with Relay(server.url) as relay, relay.subscribe(topic) as messages:
        for value in VALUES[:5]:
            assert await relay.publish(topic, value) == 1
        await relay.publish_many([(topic, v) for v in VALUES[5:8]] + [Publish(topic, VALUES[8])])
        await relay.publish_many([(topic, v, None) for v in VALUES[9:]])
        received = await receive(messages, len(VALUES))
    assert [typed(m.message) for m in received] == [typed(v) for v in VALUES]
    assert [m.offset for m in received] == list(range(1, len(VALUES) + 1))


async def test_history_and_a_resumed_subscription_give_the_same_values(
    server: ServerProcess,
) -> None:
    topic = f"t.json-{uuid.uuid4().hex[:8]}"
    async with Relay(server.url) as relay:
        first = await relay.publish(topic, VALUES[0])
        await relay.publish_many([(topic, v) for v in VALUES[1:]])
        history = await relay.history(topic)
        assert [typed(p.message) for p in history.publications] == [typed(v) for v in VALUES]
        # Resume from before the first publication: every value is replayed, decoded.
        since = {topic: Position(first.offset - 1, first.epoch)}
        async with relay.subscribe(topic, since=since) as messages:
            replayed = await receive(messages, len(VALUES))
    assert [typed(m.message) for m in replayed] == [typed(v) for v in VALUES]


async def test_raw_json_text_is_sent_as_is_and_big_numbers_decode(server: ServerProcess) -> None:
    topic = f"t.json-{uuid.uuid4().hex[:8]}"
    async with Relay(server.url) as relay, relay.subscribe(topic) as messages:
        await relay.publish(topic, msgspec.Raw(b'{"exact": 1.10, "huge": 1e400}'))
        await relay.publish(topic, msgspec.Raw(b"123456789012345678901234567890"))
        first, second = await receive(messages, 2)
        history = await relay.history(topic)
    assert first.message["exact"] == 1.1 and math.isinf(first.message["huge"]), first
    assert second.message == 123456789012345678901234567890
    assert math.isinf(history.publications[0].message["huge"])


async def test_a_subscription_publishes_a_value_over_its_websocket(server: ServerProcess) -> None:
    room = f"room:{uuid.uuid4().hex[:8]}"
    async with (
        Relay(server.url) as relay,
        relay.subscribe(room) as publisher,
        relay.subscribe(room) as listener,
    ):
        answer = await publisher.publish(room, {"said": "hi", "to": [1, 2]}, skip_self=True)
        [message] = await receive(listener, 1)
    assert message.message == {"said": "hi", "to": [1, 2]} and message.offset == answer.offset


async def test_a_value_nested_too_deeply_is_refused(server: ServerProcess) -> None:
    deep: Any = 0
    for _ in range(129):
        deep = [deep]
    async with Relay(server.url) as relay:
        with pytest.raises(BadRequest, match="at most 128") as info:
            await relay.publish("t.json-deep", deep)
        assert info.value.code == "invalid_field"
        assert await relay.publish("t.json-deep", deep[0]) == 0  # 128 levels are fine
