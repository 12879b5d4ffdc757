"""The node, in-process over memory backends, with recording sinks."""

import asyncio
import re
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest

from tests.fakes import RecordingSink, identity_framer
from wsrelay import codes
from wsrelay.brokers import MemoryBus
from wsrelay.brokers.base import Listener
from wsrelay.config import Settings
from wsrelay.core.fanout import Publication
from wsrelay.core.history import EPOCH_BYTES, Position, Receipt
from wsrelay.core.registry import Client
from wsrelay.errors import (
    BrokerUnavailable,
    InvalidTopic,
    NotFound,
    PublishOutcomeUnknown,
    TooManyTopics,
)
from wsrelay.relay import CONTROL_TOPIC, Relay

EPOCH = re.compile(f"[0-9a-f]{{{2 * EPOCH_BYTES}}}")
"""A topic's epoch: random, so only its shape is known."""


@pytest.fixture
async def relay() -> AsyncIterator[Relay]:
    async with Relay(Settings(max_topics_per_client=3), identity_framer) as r:
        yield r


async def test_ids_are_128_bit_and_unique(relay: Relay) -> None:
    ids = {(await relay.register(None)).id for _ in range(1000)}
    assert len(ids) == 1000
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)


async def test_publish_reaches_subscribers_and_counts_them(relay: Relay) -> None:
    a, b = await relay.register(1, ["t"]), await relay.register(2, ["u"])
    sa, sb = RecordingSink(), RecordingSink()
    await relay.attach(a, sa)
    await relay.attach(b, sb)
    first = await relay.publish("t", "m")
    assert first.recipients == 1 and not first.receipt.duplicate
    assert first.receipt.position.offset == 1 and EPOCH.fullmatch(first.receipt.position.epoch)
    assert sa.frames == [b'{"type":"message","topic":"t","message":"m","offset":1}']
    assert sb.frames == []
    second = await relay.publish("t", "n")
    assert second.receipt.position == Position(first.receipt.position.epoch, 2)
    assert sa.frames[1:] == [b'{"type":"message","topic":"t","message":"n","offset":2}']


async def test_unregister_closes_with_normal_code(relay: Relay) -> None:
    client = await relay.register(1, ["t"])
    sink = RecordingSink()
    await relay.attach(client, sink)
    await relay.unregister(client.id)
    assert sink.closed == (codes.NORMAL, "unregistered")
    assert (await relay.publish("t", "m")).recipients == 0
    assert sink.frames == []
    with pytest.raises(NotFound):
        await relay.unregister(client.id)
    with pytest.raises(NotFound):
        await relay.lookup(client.id)


async def test_attaching_a_deleted_registration_fails_and_leaves_nothing(relay: Relay) -> None:
    client = await relay.register(1, ["t"])
    await relay.unregister(client.id)
    with pytest.raises(NotFound):
        await relay.attach(client, RecordingSink())
    assert relay.registry.connections == 0 and relay.registry.topics == 0


async def test_second_connection_replaces_the_first(relay: Relay) -> None:
    client = await relay.register(1, ["t"])
    first, second = RecordingSink(), RecordingSink()
    await relay.attach(client, first)
    await relay.attach(client, second)
    assert first.closed is not None and first.closed[0] == codes.REPLACED
    await relay.publish("t", "m")
    assert first.frames == [] and len(second.frames) == 1


async def test_topic_rules_apply_to_every_entry_point(relay: Relay) -> None:
    with pytest.raises(InvalidTopic):
        await relay.register(1, ["bad topic"])
    with pytest.raises(InvalidTopic):
        await relay.register(1, [CONTROL_TOPIC])
    client = await relay.register(1, ["a", "b"])
    with pytest.raises(TooManyTopics):
        await relay.subscribe(client, ["c", "d"])
    assert client.topics == {"a", "b"}
    with pytest.raises(InvalidTopic):
        await relay.publish("", "m")
    with pytest.raises(InvalidTopic):
        await relay.publish(CONTROL_TOPIC, "m")


async def test_broker_follows_local_occupancy() -> None:
    """The broker is subscribed to a topic exactly while someone here listens to it."""
    backend = MemoryBus().backend()
    broker = backend.broker
    async with Relay(Settings(), identity_framer, backend) as relay:
        client = await relay.register(None, ["t"])
        assert broker.topics == {CONTROL_TOPIC}  # type: ignore[attr-defined]
        sink = RecordingSink()
        await relay.attach(client, sink)
        assert broker.topics == {CONTROL_TOPIC, "t"}  # type: ignore[attr-defined]
        await relay.set_topics(client, ["u"])
        assert broker.topics == {CONTROL_TOPIC, "u"}  # type: ignore[attr-defined]
        await relay.detach(client, sink)
        assert broker.topics == {CONTROL_TOPIC}  # type: ignore[attr-defined]


async def two_nodes(bus: MemoryBus) -> tuple[Relay, Relay]:
    a = Relay(Settings(), identity_framer, bus.backend())
    b = Relay(Settings(), identity_framer, bus.backend())
    await a.start()
    await b.start()
    return a, b


async def test_publications_cross_nodes_sharing_a_bus() -> None:
    """Two nodes on one memory bus: a publish on A reaches B's subscriber, once, and
    offsets count the topic's publications whichever node made them."""
    a, b = await two_nodes(MemoryBus())
    client = await a.register("u", ["t"])  # registered on A, connected on B
    sink = RecordingSink()
    await b.attach(await b.lookup(client.id), sink)
    first = await a.publish("t", "m", "u")
    assert first.recipients == 0  # none local to A
    skipped = await a.publish("t", "not for u", "someone else")
    third = await b.publish("t", "from b", "u")
    assert third.recipients == 1
    positions = [p.receipt.position for p in (first, skipped, third)]
    assert [p.offset for p in positions] == [1, 2, 3]
    assert len({p.epoch for p in positions}) == 1
    assert sink.frames == [
        b'{"type":"message","topic":"t","message":"m","offset":1}',
        b'{"type":"message","topic":"t","message":"from b","offset":3}',
    ]


async def test_a_node_receives_its_own_publications_from_the_broker_once() -> None:
    """The broker hands every publication to every subscribed node, the publisher's own
    included: a node delivers to its subscribers what its broker hands it, so each local
    subscriber gets a publication made here exactly once, in offset order."""
    bus = MemoryBus()
    a, b = await two_nodes(bus)
    handed: list[Publication] = []
    real_publication = a._on_broker_publication

    def recording(publication: Publication) -> None:
        if publication.topic != CONTROL_TOPIC:
            handed.append(publication)
        real_publication(publication)

    a._on_broker_publication = recording  # type: ignore[method-assign]
    on_a, on_b = RecordingSink(), RecordingSink()
    await a.attach(await a.register(None, ["t"]), on_a)
    await b.attach(await b.register(None, ["t"]), on_b)
    answers = [await a.publish("t", f"m{i}") for i in range(3)]
    assert [p.recipients for p in answers] == [1, 1, 1]
    assert [(p.message, p.offset) for p in handed] == [("m0", 1), ("m1", 2), ("m2", 3)]
    assert {p.epoch for p in handed} == {answers[0].receipt.position.epoch}
    expected = [
        b'{"type":"message","topic":"t","message":"m%d","offset":%d}' % (i, i + 1) for i in range(3)
    ]
    assert on_a.frames == expected and on_b.frames == expected
    assert (a.published, a.delivered, b.published, b.delivered) == (3, 3, 0, 3)


async def test_unregister_and_reconnect_on_another_node_close_the_old_socket() -> None:
    a, b = await two_nodes(MemoryBus())
    client = await a.register(1, ["t"])
    on_a = RecordingSink()
    await a.attach(client, on_a)
    on_b = RecordingSink()
    await b.attach(await b.lookup(client.id), on_b)
    assert on_a.closed == (codes.REPLACED, "replaced by a newer connection")
    await a.unregister(client.id)
    assert on_b.closed == (codes.NORMAL, "unregistered")


async def test_publish_many_checks_every_topic_before_publishing(relay: Relay) -> None:
    client = await relay.register(None, ["t"])
    sink = RecordingSink()
    await relay.attach(client, sink)
    with pytest.raises(InvalidTopic, match=r"messages\[1\]"):
        await relay.publish_many([("t", "a", None, None), ("bad topic", "b", None, None)])
    assert sink.frames == [] and relay.published == 0
    answers = await relay.publish_many(
        [("t", "a", None, None), ("u", "b", None, None), ("t", "c", 7, None)]
    )
    assert [a.recipients for a in answers] == [1, 0, 0]
    positions = [a.receipt.position for a in answers]
    assert [p.offset for p in positions] == [1, 1, 2]  # offsets count per topic
    assert positions[0].epoch == positions[2].epoch and EPOCH.fullmatch(positions[1].epoch)
    assert sink.frames == [b'{"type":"message","topic":"t","message":"a","offset":1}']
    assert (relay.published, relay.delivered) == (3, 1)


@pytest.mark.parametrize(
    "error",
    [
        BrokerUnavailable("the broker is unreachable"),
        PublishOutcomeUnknown("the broker stopped answering"),
    ],
)
async def test_publish_many_delivers_what_the_broker_took_and_reports_the_rest(
    error: BrokerUnavailable,
) -> None:
    """If the broker fails part-way, what it accepted (other nodes have it) is still
    delivered here, and the caller learns how much got through, with the broker's
    own kind of failure (an outcome unknown is retried with the same keys)."""
    backend = MemoryBus().backend()
    broker = backend.broker
    real_publish_many = broker.publish_many
    sent: list[list[str | None]] = []

    async def flaky_publish_many(
        publications: Sequence[Publication], keys: Sequence[str | None] | None = None
    ) -> list[Receipt | Exception]:
        assert keys is not None
        sent.append(list(keys))
        taken = await real_publish_many(publications[:2], keys[:2])
        return [*taken, *(error for _ in publications[2:])]

    async with Relay(Settings(), identity_framer, backend) as relay:
        client = await relay.register(None, ["t"])
        sink = RecordingSink()
        await relay.attach(client, sink)
        broker.publish_many = flaky_publish_many  # type: ignore[method-assign]
        with pytest.raises(type(error), match="2 of 4 messages were published"):
            await relay.publish_many([("t", str(i), None, f"k{i}") for i in range(4)])
        assert sent == [["k0", "k1", "k2", "k3"]]  # the keys go with the publications
        assert sink.frames == [
            b'{"type":"message","topic":"t","message":"0","offset":1}',
            b'{"type":"message","topic":"t","message":"1","offset":2}',
        ]
        assert relay.published == 2


async def test_topic_commands_that_change_nothing_store_nothing() -> None:
    """A client sends its whole topic set again after each reconnect: when it is what the
    registration holds, nothing goes to the store (nor, with Redis, to Redis)."""
    backend = MemoryBus().backend()
    store = backend.registrations
    saved: list[set[str]] = []
    real_save = store.save_topics

    async def counting_save(client: Client) -> None:
        saved.append(set(client.topics))
        await real_save(client)

    store.save_topics = counting_save  # type: ignore[method-assign]
    async with Relay(Settings(), identity_framer, backend) as relay:
        client = await relay.register(1, ["a", "b"])
        await relay.attach(client, RecordingSink())
        await relay.set_topics(client, ["b", "a"])
        await relay.subscribe(client, ["a"])
        await relay.unsubscribe(client, ["c"])
        assert saved == []
        await relay.subscribe(client, ["a", "c"])
        assert saved == [{"a", "b", "c"}]


async def test_a_topic_change_the_store_refused_is_undone() -> None:
    """The client is told its command failed ("nothing changed"): the node's subscriptions
    are as before, and the same command sent again does it."""
    backend = MemoryBus().backend()
    store, broker = backend.registrations, backend.broker
    real_save = store.save_topics
    failing = True

    async def flaky_save(client: Client) -> None:
        if failing:
            raise BrokerUnavailable("the store is unreachable")
        await real_save(client)

    store.save_topics = flaky_save  # type: ignore[method-assign]
    async with Relay(Settings(), identity_framer, backend) as relay:
        client = await relay.register(1, ["a"])
        sink = RecordingSink()
        await relay.attach(client, sink)
        with pytest.raises(BrokerUnavailable):
            await relay.set_topics(client, ["b"])
        assert client.topics == {"a"}
        assert broker.topics == {CONTROL_TOPIC, "a"}  # type: ignore[attr-defined]
        assert (await relay.publish("a", "still here")).recipients == 1
        assert sink.frames == [b'{"type":"message","topic":"a","message":"still here","offset":1}']
        failing = False
        await relay.set_topics(client, ["b"])
        assert broker.topics == {CONTROL_TOPIC, "b"}  # type: ignore[attr-defined]
        stored = await store.get(client.id)
        assert stored is not None and stored.topics == {"b"}


async def test_an_attach_announces_itself_and_subscribes_all_new_topics_in_one_call() -> None:
    backend = MemoryBus().backend()
    broker = backend.broker
    subscribed: list[tuple[str, ...]] = []
    announced: list[Publication] = []
    real_subscribe, real_announce = broker.subscribe, broker.announce

    async def recording_subscribe(*topics: str) -> None:
        subscribed.append(topics)
        await real_subscribe(*topics)

    async def recording_announce(publication: Publication) -> None:
        announced.append(publication)
        await real_announce(publication)

    broker.subscribe = recording_subscribe  # type: ignore[method-assign]
    broker.announce = recording_announce  # type: ignore[method-assign]
    async with Relay(Settings(), identity_framer, backend) as relay:
        client = await relay.register(1, ["a", "b", "c"])
        await relay.attach(client, RecordingSink())
        assert [sorted(call) for call in subscribed] == [[CONTROL_TOPIC], ["a", "b", "c"]]
        assert [p.topic for p in announced] == [CONTROL_TOPIC]
        assert client.id in announced[0].message


async def test_a_gap_the_broker_reports_is_told_to_json_subscribers_of_the_topic() -> None:
    """The broker says publications of a topic were lost (a new epoch): the topic's
    JSON-mode subscribers get a gap frame with where the stream continues; raw-mode
    ones (which have no offsets) and other topics' subscribers get nothing."""
    backend = MemoryBus().backend()
    broker = backend.broker
    listeners: list[Listener] = []
    real_start = broker.start

    async def recording_start(listener: Listener, origin: str) -> None:
        listeners.append(listener)
        await real_start(listener, origin)

    broker.start = recording_start  # type: ignore[method-assign]
    async with Relay(Settings(), identity_framer, backend) as relay:
        json_sink, raw_sink, other_sink = RecordingSink(), RecordingSink(raw=True), RecordingSink()
        await relay.attach(await relay.register(None, ["t"]), json_sink)
        await relay.attach(await relay.register(None, ["t"]), raw_sink)
        await relay.attach(await relay.register(None, ["u"]), other_sink)
        [listener] = listeners
        listener.gap("t", "e2", 5)
        assert json_sink.frames == [b'{"type":"gap","topic":"t","offset":5,"epoch":"e2"}']
        assert raw_sink.frames == [] and other_sink.frames == []
        assert relay.gaps == 1


async def test_commands_at_once_share_one_position_read_and_later_ones_read_anew() -> None:
    """A reconnect storm: many clients subscribe to the same topic at once; the node reads
    its position once. A command whose hold began after that read was sent reads again
    (the earlier position could miss a publication made in between)."""
    backend = MemoryBus().backend()
    broker = backend.broker
    reads: list[str] = []
    gate = asyncio.Event()
    real_history = broker.history

    async def slow_history(topic: str, **kwargs: Any) -> Any:
        reads.append(topic)
        await gate.wait()
        return await real_history(topic, **kwargs)

    broker.history = slow_history  # type: ignore[method-assign]
    async with Relay(Settings(), identity_framer, backend) as relay:
        await relay.publish("t", "before")
        clients = [await relay.register(i, []) for i in range(20)]
        sinks = [RecordingSink() for _ in clients]
        for client, sink in zip(clients, sinks, strict=True):
            await relay.attach(client, sink)
        first = [asyncio.create_task(relay.subscribe(c, ["t"])) for c in clients[:10]]
        await asyncio.sleep(0)  # (the shared read is sent now, from its task's first step)
        while not reads:
            await asyncio.sleep(0)
        assert reads == ["t"]
        later = [asyncio.create_task(relay.subscribe(c, ["t"])) for c in clients[10:]]
        while len(reads) < 2:
            await asyncio.sleep(0)
        gate.set()
        answers = await asyncio.gather(*first, *later)
        assert reads == ["t", "t"]
        assert {a.positions["t"][0].offset for a in answers} == {1}
        await relay.publish("t", "after")
        for sink in sinks:
            assert sink.frames == [b'{"type":"message","topic":"t","message":"after","offset":2}']


async def test_a_command_forwarded_to_the_node_holding_the_client_gets_its_answer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A forwards a command for a client attached on B: only B's runner carries it out
    (with B's client), and its answer is A's; a client attached nowhere gets no answer
    within the bounded wait."""
    a, b = await two_nodes(MemoryBus())
    ran: list[tuple[str, str, str]] = []

    def runner(node: str) -> Any:
        async def run(client: Client, text: str) -> tuple[int, str]:
            ran.append((node, client.id, text))
            return 403, '{"error":{"code":"forbidden_topic","message":"no"}}'

        return run

    a.command_runner, b.command_runner = runner("a"), runner("b")
    client = await a.register("u", ["t"])
    await b.attach(await b.lookup(client.id), RecordingSink())
    answer = await a.forward_command(client.id, '{"subscribe":["x"]}')
    assert answer == (403, '{"error":{"code":"forbidden_topic","message":"no"}}')
    assert ran == [("b", client.id, '{"subscribe":["x"]}')]
    nowhere = await a.register("v")
    monkeypatch.setattr("wsrelay.relay.FORWARD_TIMEOUT", 0.05)
    assert await a.forward_command(nowhere.id, "{}") is None
    assert len(ran) == 1 and not a._forwarded
    await a.stop()
    await b.stop()


def test_control_events_of_older_nodes_decode_with_the_new_fields_defaults() -> None:
    from wsrelay.relay import ControlEvent, _decode_control

    old = _decode_control(b'["unregistered","c1","n1"]')
    assert old == ControlEvent("unregistered", "c1", "n1", "", 0, "")
