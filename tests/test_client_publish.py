"""Client publishing and grants through wsrelay.client, against a real server configured
with namespaces (``--config``): a subscription publishes over its own connection, is
refused with the mapped error class, and its connection carries on.

Nothing sleeps to wait for delivery: each wait is on the message or answer itself,
bounded by TIMEOUT.
"""

from __future__ import annotations

import asyncio
import signal
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.tcp_proxy import Proxy
from tests.utils import TIMEOUT, ServerProcess, stop_and_check
from wsrelay.client import (
    Backoff,
    BadRequest,
    ClientPublished,
    ForbiddenTopic,
    Grants,
    Message,
    MessageTooLarge,
    NotConnected,
    PublishInterrupted,
    RateLimited,
    Relay,
    Subscribed,
    Subscription,
)

CONFIG = """
[[namespace]]
pattern = "chat:*"
subscribe = "granted"
publish = "subscribers"

[[namespace]]
pattern = "granted:*"
publish = "granted"

[[namespace]]
pattern = "small:*"
publish = "subscribers"
max_message_size = 8

[[namespace]]
pattern = "burst:*"
publish = "subscribers"
publish_burst = 3
publish_rate = 0.001
"""


@pytest.fixture(scope="module")
def rules_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    config = tmp_path_factory.mktemp("client-publish") / "wsrelay.toml"
    config.write_text(CONFIG)
    process = ServerProcess(["--config", str(config)]).start()
    yield process
    stop_and_check(process)


@pytest.fixture
def room() -> str:
    """A suffix unique to the test: the topics of a module-wide server never cross."""
    return uuid.uuid4().hex[:12]


async def receive(subscription: Subscription) -> Message:
    async with asyncio.timeout(TIMEOUT):
        return await anext(subscription)


async def test_a_granted_client_publishes_and_another_subscriber_receives_it(
    rules_server: ServerProcess, room: str
) -> None:
    topic = f"granted:{room}"
    async with (
        Relay(rules_server.url) as relay,
        relay.subscribe(topic) as listener,
        relay.connect(user_id=7, grants={"publish": ["granted:*"]}) as publisher,
    ):
        answer = await publisher.publish(topic, "hello", idempotency_key="k-1")
        assert isinstance(answer, ClientPublished) and answer.offset == 1 and answer.epoch
        assert not answer.duplicate
        message = await receive(listener)
        assert (message.topic, message.message, message.offset) == (topic, "hello", 1)
        assert message.epoch == answer.epoch
        # The same key again publishes nothing and answers the first position.
        again = await publisher.publish(topic, "hello", idempotency_key="k-1")
        assert again.duplicate and again.position == answer.position
        second = await publisher.publish(topic, "second")
        assert second.offset == 2
        assert (await receive(listener)).message == "second"  # not the duplicate


async def test_a_subscriber_of_a_chat_room_publishes_with_grants_from_subscribe(
    rules_server: ServerProcess, room: str
) -> None:
    topic = f"chat:{room}"
    grants = Grants(subscribe=[topic])
    async with (
        Relay(rules_server.url) as relay,
        relay.subscribe(topic, user_id=1, grants=grants) as alice,
        relay.subscribe(topic, user_id=2, grants={"subscribe": ["chat:*"]}) as bob,
    ):
        answer = await alice.publish(topic, "hi bob")
        got = await receive(bob)
        assert (got.message, got.offset) == ("hi bob", answer.offset)
        # Without skip_self the publisher gets its own copy too.
        own = await receive(alice)
        assert (own.message, own.offset) == ("hi bob", answer.offset)


async def test_without_a_grant_the_publish_is_refused_and_the_connection_carries_on(
    rules_server: ServerProcess, room: str
) -> None:
    allowed, refused = f"granted:{room}", f"granted:{room}-x"
    async with (
        Relay(rules_server.url) as relay,
        relay.subscribe(allowed, refused) as listener,
        relay.subscribe(allowed, grants={"publish": [allowed]}) as client,
    ):
        with pytest.raises(ForbiddenTopic) as caught:
            await client.publish(refused, "no")
        assert caught.value.code == "forbidden_topic" and caught.value.status == 403
        assert refused in caught.value.message and "granted:*" in caught.value.message
        # Default namespace: no client publishes at all.
        with pytest.raises(ForbiddenTopic):
            await client.publish(f"plain.{room}", "no")
        with pytest.raises(BadRequest) as bad:
            await client.publish("not a topic!", "no")
        assert bad.value.code == "invalid_topic"
        # The connection is still there: the next publish goes through, and the
        # refused ones never reached anyone.
        answer = await client.publish(allowed, "yes", skip_self=True)
        got = await receive(listener)
        assert (got.topic, got.message, got.offset) == (allowed, "yes", answer.offset)
        assert not client.closed


async def test_a_subscription_cannot_take_a_topic_its_grants_do_not_allow(
    rules_server: ServerProcess, room: str
) -> None:
    async with Relay(rules_server.url) as relay:
        with pytest.raises(ForbiddenTopic) as caught:
            async with relay.subscribe(f"chat:{room}", grants={"subscribe": ["chat:other"]}):
                pass
        assert caught.value.status == 403


async def test_skip_self_leaves_the_publisher_out(rules_server: ServerProcess, room: str) -> None:
    topic = f"granted:{room}"
    async with (
        Relay(rules_server.url) as relay,
        relay.subscribe(topic) as listener,
        relay.subscribe(topic, grants={"publish": [topic]}) as client,
    ):
        skipped = await client.publish(topic, "not for me", skip_self=True)
        mine = await client.publish(topic, "for me too")
        # The listener gets both, in order; the publisher only the second: had the first
        # reached it, it would come first (one order on every connection).
        assert [(await receive(listener)).offset for _ in range(2)] == [
            skipped.offset,
            mine.offset,
        ]
        got = await receive(client)
        assert (got.message, got.offset) == ("for me too", mine.offset)


async def test_the_rate_limit_raises_rate_limited(rules_server: ServerProcess, room: str) -> None:
    topic = f"burst:{room}"
    async with Relay(rules_server.url) as relay, relay.subscribe(topic) as client:
        for n in range(3):  # publish_burst = 3
            await client.publish(topic, f"m{n}", skip_self=True)
        with pytest.raises(RateLimited) as caught:
            await client.publish(topic, "one too many", skip_self=True)
        assert caught.value.status == 429 and caught.value.code == "rate_limited"
        # Other namespaces have their own bucket: the connection still publishes there.
        other = f"small:{room}"
        async with relay.subscribe(other) as listener:
            await listener.publish(other, "ok", skip_self=True)


async def test_a_message_over_the_namespace_limit_raises_message_too_large(
    rules_server: ServerProcess, room: str
) -> None:
    topic = f"small:{room}"
    async with Relay(rules_server.url) as relay, relay.subscribe(topic) as client:
        with pytest.raises(MessageTooLarge) as caught:
            await client.publish(topic, "x" * 9)
        assert caught.value.status == 413
        answer = await client.publish(topic, "x" * 8)
        assert (await receive(client)).offset == answer.offset


async def test_concurrent_publishes_while_another_task_iterates(
    rules_server: ServerProcess, room: str
) -> None:
    """Answers matched by id: publishes from several tasks, one of them refused, while
    a task iterates; every answer reaches its caller and every message the iterator."""
    topic = f"granted:{room}"
    async with (
        Relay(rules_server.url) as relay,
        relay.subscribe(topic, grants={"publish": [topic]}) as client,
    ):
        reader = asyncio.create_task(_collect(client, 10))
        results = await asyncio.gather(
            *(client.publish(topic, f"m{n}") for n in range(10)),
            client.publish(f"granted:{room}-refused", "no"),
            return_exceptions=True,
        )
        *accepted, refused = results
        assert isinstance(refused, ForbiddenTopic)
        offsets = sorted(r.offset for r in accepted if isinstance(r, ClientPublished))
        assert offsets == list(range(1, 11))
        async with asyncio.timeout(TIMEOUT):
            messages = await reader
        assert [m.offset for m in messages] == offsets


async def _collect(subscription: Subscription, count: int) -> list[Message]:
    return [await anext(subscription) for _ in range(count)]


async def test_publishing_on_a_closed_subscription_raises_not_connected(
    rules_server: ServerProcess, room: str
) -> None:
    topic = f"granted:{room}"
    async with Relay(rules_server.url) as relay:
        client = relay.subscribe(topic, grants={"publish": [topic]})
        async with client:
            pass
        with pytest.raises(NotConnected):
            await client.publish(topic, "late")


async def test_a_lost_connection_interrupts_a_waiting_publish(
    start_server: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    """The connection drops while a publish waits for its answer (the server is stopped,
    so none can come): the publish raises PublishInterrupted; after the subscription
    reconnected (while iterated), publishing again with the same key lands exactly once."""
    config = tmp_path / "wsrelay.toml"
    config.write_text(CONFIG)
    server = start_server("--config", str(config))
    assert server.process is not None
    topic = "granted:lost"
    events = asyncio.Queue[object]()
    fast = Backoff(initial=0.05, maximum=0.2)
    async with (
        Proxy(server.url) as proxy,
        Relay(proxy.url, backoff=fast) as relay,
        relay.subscribe(topic, grants={"publish": [topic]}, on_event=events.put_nowait) as client,
    ):
        server.process.send_signal(signal.SIGSTOP)
        try:
            publish = asyncio.create_task(client.publish(topic, "maybe", idempotency_key="m"))
            await asyncio.sleep(0)  # let it send
            proxy.cut()
            with pytest.raises(PublishInterrupted, match="may or may not"):
                async with asyncio.timeout(TIMEOUT):
                    await publish
            with pytest.raises(NotConnected):
                await client.publish(topic, "between", idempotency_key="b")
        finally:
            server.process.send_signal(signal.SIGCONT)
        reader = asyncio.create_task(_collect(client, 1))
        async with asyncio.timeout(TIMEOUT * 4):
            while True:  # the reconnect's, not the first connection's
                event = await events.get()
                if isinstance(event, Subscribed) and event.reconnects == 1:
                    break
        again = await client.publish(topic, "maybe", idempotency_key="m")
        async with asyncio.timeout(TIMEOUT):
            (got,) = await reader
        assert (got.message, got.offset) == ("maybe", again.offset)
        history = await relay.history(topic)
        assert [p.message for p in history.publications] == ["maybe"]


async def test_grants_must_be_lists_of_patterns(rules_server: ServerProcess) -> None:
    async with Relay(rules_server.url) as relay:
        with pytest.raises(ValueError, match="list of patterns"):
            relay.connect(grants={"publish": "chat:*"})
        with pytest.raises(ValueError, match="unknown action"):
            relay.connect(grants={"publsh": ["chat:*"]})
        with pytest.raises(BadRequest):  # the server checks the patterns
            await relay.register(grants={"publish": ["no spaces"]})
