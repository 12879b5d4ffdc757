"""The node, in-process over the memory broker, with recording sinks."""

import pytest

from tests.fakes import RecordingSink, identity_framer
from wsrelay import codes
from wsrelay.brokers import MemoryBroker, MemoryBus
from wsrelay.config import Settings
from wsrelay.errors import InvalidTopic, NotFound, TooManyTopics
from wsrelay.relay import Relay


@pytest.fixture
async def relay():
    async with Relay(Settings(max_topics_per_client=3), identity_framer) as r:
        yield r


async def test_ids_are_128_bit_and_unique(relay: Relay) -> None:
    ids = {relay.register(None).id for _ in range(1000)}
    assert len(ids) == 1000
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)


async def test_publish_reaches_subscribers_and_counts_them(relay: Relay) -> None:
    a, b = relay.register(1, ["t"]), relay.register(2, ["u"])
    sa, sb = RecordingSink(), RecordingSink()
    await relay.attach(a, sa)
    await relay.attach(b, sb)
    assert await relay.publish("t", "m") == 1
    assert len(sa.frames) == 1 and sb.frames == []


async def test_unregister_closes_with_normal_code(relay: Relay) -> None:
    client = relay.register(1, ["t"])
    sink = RecordingSink()
    await relay.attach(client, sink)
    await relay.unregister(client.id)
    assert sink.closed == (codes.NORMAL, "unregistered")
    assert await relay.publish("t", "m") == 0
    with pytest.raises(NotFound):
        await relay.unregister(client.id)


async def test_second_connection_replaces_the_first(relay: Relay) -> None:
    client = relay.register(1, ["t"])
    first, second = RecordingSink(), RecordingSink()
    await relay.attach(client, first)
    await relay.attach(client, second)
    assert first.closed is not None and first.closed[0] == codes.REPLACED
    await relay.publish("t", "m")
    assert first.frames == [] and len(second.frames) == 1


async def test_topic_rules_apply_to_every_entry_point(relay: Relay) -> None:
    with pytest.raises(InvalidTopic):
        relay.register(1, ["bad topic"])
    client = relay.register(1, ["a", "b"])
    with pytest.raises(TooManyTopics):
        await relay.subscribe(client, ["c", "d"])
    assert client.topics == {"a", "b"}
    with pytest.raises(InvalidTopic):
        await relay.publish("", "m")


async def test_broker_follows_local_occupancy() -> None:
    """The broker is subscribed to a topic exactly while someone here listens to it."""
    broker = MemoryBroker()
    async with Relay(Settings(), identity_framer, broker) as relay:
        client = relay.register(None, ["t"])
        assert broker.topics == set()
        sink = RecordingSink()
        await relay.attach(client, sink)
        assert broker.topics == {"t"}
        await relay.set_topics(client, ["u"])
        assert broker.topics == {"u"}
        await relay.detach(client, sink)
        assert broker.topics == set()


async def test_publications_cross_nodes_sharing_a_bus() -> None:
    """Two nodes on one memory bus: a publish on A reaches B's subscriber, once."""
    bus = MemoryBus()
    async with (
        Relay(Settings(), identity_framer, MemoryBroker(bus)) as a,
        Relay(Settings(), identity_framer, MemoryBroker(bus)) as b,
    ):
        client = b.register("u", ["t"])
        sink = RecordingSink()
        await b.attach(client, sink)
        assert await a.publish("t", "m", "u") == 0  # none local to A
        await a.publish("t", "not for u", "someone else")
        assert sink.frames == [b'{"type":"message","topic":"t","message":"m"}']
