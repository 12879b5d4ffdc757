"""The contract every broker keeps, written once (phoenix_pubsub's shared suite).

A broker test module subclasses :class:`BrokerConformance` and provides the
``nodes`` fixture: two started brokers on one backend, as two relay nodes
would hold them. Waits are on the delivery itself, bounded by ``TIMEOUT``;
absence is checked behind a fence (a later publication that must arrive).

Likewise :class:`RegistrationStoreConformance` (the per-user limit) with the
``stores`` fixture: two nodes' views of one store, and ``expiring_stores``, the
same with a registration TTL of ``EXPIRING_TTL`` seconds (skipped by stores
without a TTL).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest

from tests.utils import TIMEOUT
from wsrelay.brokers import Broker, RegistrationStore
from wsrelay.brokers.base import PresenceStore
from wsrelay.core.fanout import Publication
from wsrelay.core.history import Position, recovered
from wsrelay.core.registry import Client
from wsrelay.core.schema import PresenceClient


class Inbox:
    """Collects what a broker hands to a node (a :class:`~wsrelay.brokers.Listener`)."""

    def __init__(self) -> None:
        self.items: list[Publication] = []
        self.gaps: list[tuple[str, str, int]] = []
        self._changed = asyncio.Event()

    def publication(self, publication: Publication) -> None:
        self.items.append(publication)
        self._changed.set()

    def gap(self, topic: str, epoch: str, offset: int) -> None:
        self.gaps.append((topic, epoch, offset))
        self._changed.set()

    def on(self, topic: str) -> list[Publication]:
        return [p for p in self.items if p.topic == topic]

    async def wait_for(self, count: int) -> list[Publication]:
        async def wait() -> None:
            while len(self.items) < count:
                self._changed.clear()
                await self._changed.wait()

        await asyncio.wait_for(wait(), TIMEOUT)
        return self.items


Node = tuple[Broker, Inbox]
NodesFactory = Callable[[], AsyncIterator[tuple[Node, Node]]]


class BrokerConformance:
    """Tests every broker must pass. Subclasses define the ``nodes`` fixture."""

    @pytest.fixture
    async def nodes(self) -> AsyncIterator[tuple[Node, Node]]:
        raise NotImplementedError
        yield  # pragma: no cover

    async def test_publication_reaches_a_subscribed_node(self, nodes: tuple[Node, Node]) -> None:
        (a, _), (b, inbox) = nodes
        await b.subscribe("t")
        await a.publish(Publication("t", "hello \u2603", "42"))
        [got] = await inbox.wait_for(1)
        assert (got.topic, got.message, got.user) == ("t", "hello \u2603", "42")

    async def test_json_text_keeps_its_flag_live_in_history_and_announced(
        self, nodes: tuple[Node, Node]
    ) -> None:
        """A message that is JSON text (Publication.json) stays JSON text, and a string
        holding the same text stays a string, on every path a publication takes."""
        (a, _), (b, inbox) = nodes
        await b.subscribe("t")
        await a.publish(Publication("t", '{"a":[1,"\u2603"]}', "42", json=True))
        await a.publish_many([Publication("t", '{"a":1}'), Publication("t", "[1]", json=True)])
        await a.announce(Publication("t", "null", json=True))
        got = await inbox.wait_for(4)
        assert [(p.message, p.json) for p in got] == [
            ('{"a":[1,"\u2603"]}', True),
            ('{"a":1}', False),
            ("[1]", True),
            ("null", True),
        ]
        page = await b.history("t", limit=10)
        assert [(p.message, p.json, p.user) for p in page.publications] == [
            ('{"a":[1,"\u2603"]}', True, "42"),
            ('{"a":1}', False, None),
            ("[1]", True, None),
        ]

    async def test_every_node_receives_every_publication_in_one_order(
        self, nodes: tuple[Node, Node]
    ) -> None:
        """Its own included: the publishing node's subscribers see what the others see."""
        (a, inbox_a), (b, inbox_b) = nodes
        await a.subscribe("t")
        await b.subscribe("t")
        await asyncio.gather(
            *(
                node.publish(Publication("t", f"{name}{i}"))
                for i in range(50)
                for node, name in ((a, "a"), (b, "b"))
            )
        )
        got_a = await inbox_a.wait_for(100)
        got_b = await inbox_b.wait_for(100)
        assert [p.offset for p in got_a] == list(range(1, 101))
        assert [(p.offset, p.message) for p in got_a] == [(p.offset, p.message) for p in got_b]
        assert len({p.epoch for p in got_a}) == 1
        assert sorted(p.message for p in got_a) == sorted(
            f"{n}{i}" for i in range(50) for n in "ab"
        )

    async def test_offsets_count_per_topic_and_the_receipt_says_them(
        self, nodes: tuple[Node, Node]
    ) -> None:
        (a, _), (b, inbox) = nodes
        await b.subscribe("x", "y")
        receipts = [await a.publish(Publication(t, t)) for t in ("x", "y", "x", "x", "y")]
        assert [r.position.offset for r in receipts] == [1, 1, 2, 3, 2]
        assert not any(r.duplicate for r in receipts)
        got = await inbox.wait_for(5)
        assert [(p.topic, p.offset) for p in got] == [
            ("x", 1),
            ("y", 1),
            ("x", 2),
            ("x", 3),
            ("y", 2),
        ]
        assert {p.epoch for p in got if p.topic == "x"} == {receipts[0].position.epoch}
        assert receipts[0].position.epoch != receipts[1].position.epoch

    async def test_history_pages_oldest_first_newest_first_and_position_only(
        self, nodes: tuple[Node, Node]
    ) -> None:
        (a, _), (b, _) = nodes
        receipts = await a.publish_many(
            [Publication("h", f"m{i}", "u" if i == 3 else None) for i in range(1, 8)]
        )
        epoch = receipts[0].position.epoch  # type: ignore[union-attr]
        page = await b.history("h", since=2, limit=3)
        assert [(p.offset, p.message) for p in page.publications] == [
            (3, "m3"),
            (4, "m4"),
            (5, "m5"),
        ]
        assert page.publications[0].user == "u"
        assert (page.position.epoch, page.position.offset) == (epoch, 7)
        newest = await b.history("h", limit=2, reverse=True)
        assert [p.offset for p in newest.publications] == [7, 6]
        only = await b.history("h")
        assert only.publications == [] and only.position == page.position
        assert (await b.history("h", since=7, limit=10)).publications == []

    async def test_a_position_read_before_the_first_publication_recovers_from_it(
        self, nodes: tuple[Node, Node]
    ) -> None:
        """A topic never published has a position (offset 0) that a client may recover
        from once the topic is published: its first publications, from offset 1, and the
        position in the topic's epoch it stands for. The broker may answer it without an
        epoch of the topic's own (Redis creates nothing for it), so it is compared through
        ``recover``, not by its epoch."""
        (a, _), (b, _) = nodes
        before = (await b.history("fresh")).position
        assert before.offset == 0 and before.epoch
        receipts = [await a.publish(Publication("fresh", m)) for m in ("first", "second")]
        epoch = receipts[0].position.epoch
        assert [(r.position.epoch, r.position.offset) for r in receipts] == [(epoch, 1), (epoch, 2)]
        page, since = await b.recover("fresh", before, 10)
        assert since == Position(epoch, 0) and recovered(page, since)
        assert [(p.offset, p.message) for p in page.publications] == [(1, "first"), (2, "second")]
        # A client that saw the first one live (its frames carry no epoch: it still labels
        # offset 1 with the position it was answered) recovers the rest.
        page, since = await b.recover("fresh", Position(before.epoch, 1), 10)
        assert since == Position(epoch, 1) and recovered(page, since)
        assert [p.offset for p in page.publications] == [2]

    async def test_a_position_read_before_any_publication_is_recovered_while_none_came(
        self, nodes: tuple[Node, Node]
    ) -> None:
        (_, _), (b, _) = nodes
        before = (await b.history("quiet")).position
        page, since = await b.recover("quiet", before, 10)
        assert since.offset == 0 and page.publications == [] and recovered(page, since)
        assert page.position == since  # the position to answer the client

    async def test_an_unknown_epoch_is_not_recovered(self, nodes: tuple[Node, Node]) -> None:
        (a, _), (b, _) = nodes
        await a.publish(Publication("known", "x"))
        for epoch in ("e", "g:nothing:0", "g::1", "g:x:-1", ""):
            page, since = await b.recover("known", Position(epoch, 0), 10)
            assert since == Position(epoch, 0) and not recovered(page, since), epoch

    async def test_an_idempotency_key_publishes_once(self, nodes: tuple[Node, Node]) -> None:
        (a, _), (b, inbox) = nodes
        await b.subscribe("t")
        first = await a.publish(Publication("t", "once"), "key-1")
        again = await b.publish(Publication("t", "once"), "key-1")
        other_topic = await a.publish(Publication("u", "same key, other topic"), "key-1")
        assert again.duplicate and not first.duplicate and not other_topic.duplicate
        assert again.position == first.position
        await a.publish(Publication("t", "fence"))
        got = await inbox.wait_for(2)
        assert [p.message for p in got] == ["once", "fence"]
        [repeat, fresh] = await a.publish_many(
            [Publication("t", "once"), Publication("t", "new")], ["key-1", "key-2"]
        )
        assert repeat.duplicate and repeat.position == first.position  # type: ignore[union-attr]
        assert not fresh.duplicate  # type: ignore[union-attr]

    async def test_only_subscribed_topics_arrive(self, nodes: tuple[Node, Node]) -> None:
        (a, _), (b, inbox) = nodes
        await b.subscribe("wanted")
        await a.publish(Publication("unwanted", "no"))
        await a.publish(Publication("wanted", "fence"))
        await inbox.wait_for(1)
        assert [p.message for p in inbox.items] == ["fence"]

    async def test_unsubscribe_stops_delivery(self, nodes: tuple[Node, Node]) -> None:
        (a, _), (b, inbox) = nodes
        await b.subscribe("t")
        await b.subscribe("fence")
        await b.unsubscribe("t")
        await a.publish(Publication("t", "no"))
        await a.publish(Publication("fence", "yes"))
        await inbox.wait_for(1)
        assert [p.message for p in inbox.items] == ["yes"]

    async def test_order_is_kept(self, nodes: tuple[Node, Node]) -> None:
        (a, _), (b, inbox) = nodes
        await b.subscribe("t")
        for i in range(200):
            await a.publish(Publication("t", str(i)))
        await inbox.wait_for(200)
        assert [p.message for p in inbox.items] == [str(i) for i in range(200)]

    async def test_publish_many_arrives_in_order_and_reports_each(
        self, nodes: tuple[Node, Node]
    ) -> None:
        (a, _), (b, inbox) = nodes
        await b.subscribe("x")
        await b.subscribe("y")
        batch = [Publication("xy"[i % 2], str(i), "u" if i % 3 else None) for i in range(200)]
        receipts = await a.publish_many(batch)
        assert [r.position.offset for r in receipts] == [i // 2 + 1 for i in range(200)]  # type: ignore[union-attr]
        got = await inbox.wait_for(200)
        assert [(p.topic, p.message, p.user) for p in got] == [
            (p.topic, p.message, p.user) for p in batch
        ]

    async def test_several_topics_in_one_subscribe(self, nodes: tuple[Node, Node]) -> None:
        (a, _), (b, inbox) = nodes
        await b.subscribe("x", "y", "z")
        for topic in ("w", "x", "y", "z"):
            await a.publish(Publication(topic, topic))
        await inbox.wait_for(3)
        await b.subscribe("fence")
        await a.publish(Publication("fence", "fence"))
        await inbox.wait_for(4)
        assert [p.message for p in inbox.items] == ["x", "y", "z", "fence"]

    async def test_several_topics_in_one_unsubscribe(self, nodes: tuple[Node, Node]) -> None:
        (a, _), (b, inbox) = nodes
        await b.subscribe("x", "y", "z")
        await b.unsubscribe("x", "z", "never-subscribed")
        for topic in ("x", "y", "z"):
            await a.publish(Publication(topic, topic))
        await inbox.wait_for(1)
        await a.publish(Publication("y", "fence"))
        await inbox.wait_for(2)
        assert [p.message for p in inbox.items] == ["y", "fence"]

    async def test_no_topics_is_no_change(self, nodes: tuple[Node, Node]) -> None:
        (a, _), (b, inbox) = nodes
        await b.subscribe()
        await b.unsubscribe()
        await b.subscribe("t")
        await b.unsubscribe()
        await a.publish(Publication("t", "still subscribed"))
        [got] = await inbox.wait_for(1)
        assert got.message == "still subscribed"

    async def test_a_thousand_and_more_topics_in_one_subscribe(
        self, nodes: tuple[Node, Node]
    ) -> None:
        (a, _), (b, inbox) = nodes
        topics = [f"t{i}" for i in range(1500)]
        await b.subscribe(*topics)
        receipts = await a.publish_many([Publication(t, t) for t in topics])
        assert [r.position.offset for r in receipts] == [1] * 1500  # type: ignore[union-attr]
        got = await inbox.wait_for(1500)
        assert sorted(p.message for p in got) == sorted(topics)

    async def test_concurrent_subscription_changes_all_take_effect(
        self, nodes: tuple[Node, Node]
    ) -> None:
        """Calls made at once (a storm of attaches) may travel together; each returns once
        its own topics are subscribed, and a later call is not overtaken by an earlier one."""
        (a, _), (b, inbox) = nodes
        await asyncio.gather(
            b.subscribe("x"),
            b.subscribe("y", "z"),
            b.subscribe("gone"),
            b.unsubscribe("gone"),
            b.subscribe("back"),
            b.unsubscribe("back"),
            b.subscribe("back"),
        )
        for topic in ("gone", "x", "y", "z", "back"):
            await a.publish(Publication(topic, topic))
        await inbox.wait_for(4)
        await a.publish(Publication("x", "fence"))
        await inbox.wait_for(5)
        assert [p.message for p in inbox.items] == ["x", "y", "z", "back", "fence"]

    async def test_an_announcement_reaches_subscribed_nodes_but_not_its_own(
        self, nodes: tuple[Node, Node]
    ) -> None:
        (a, inbox_a), (b, inbox_b) = nodes
        await a.subscribe("t")
        await b.subscribe("t")
        await a.announce(Publication("t", "announced \u2603", "42"))
        await a.announce(Publication("elsewhere", "not subscribed"))
        [got] = await inbox_b.wait_for(1)
        assert (got.topic, got.message, got.user) == ("t", "announced \u2603", "42")
        await b.announce(Publication("t", "fence"))
        await inbox_a.wait_for(1)
        assert [p.message for p in inbox_a.items] == ["fence"]
        await a.publish(Publication("t", "fence"))
        await inbox_b.wait_for(2)
        assert [p.message for p in inbox_b.items] == ["announced \u2603", "fence"]

    async def test_announcements_leave_publications_in_order_and_complete(
        self, nodes: tuple[Node, Node]
    ) -> None:
        """Announcements on a topic do not disturb its publications: all of those
        arrive, once each, in order."""
        (a, _), (b, inbox) = nodes
        await b.subscribe("t")
        for i in range(50):
            await a.publish(Publication("t", f"p{i}"))
            await a.announce(Publication("t", f"a{i}"))
        got = await inbox.wait_for(100)
        assert [p.message for p in got if p.message.startswith("p")] == [f"p{i}" for i in range(50)]
        assert sorted(p.message for p in got if p.message.startswith("a")) == sorted(
            f"a{i}" for i in range(50)
        )

    async def test_stop_is_idempotent_and_silences_the_node(self, nodes: tuple[Node, Node]) -> None:
        (a, inbox_a), (b, inbox_b) = nodes
        await a.subscribe("t")
        await b.subscribe("t")
        await b.stop()
        await b.stop()
        await a.publish(Publication("t", "after stop"))
        await b.start(inbox_b, "node-b")
        await b.subscribe("t")
        await a.publish(Publication("t", "fence"))
        await inbox_b.wait_for(1)
        assert [p.message for p in inbox_b.items] == ["fence"]
        assert [p.message for p in await inbox_a.wait_for(2)] == ["after stop", "fence"]

    # -- subscription patterns ---------------------------------------------------------------

    async def test_a_pattern_brings_the_topics_it_matches_and_no_other(
        self, nodes: tuple[Node, Node]
    ) -> None:
        """NATS semantics: * is one segment, > one or more; the engine's own wildcards
        (Redis's * also matches ".") must not widen them."""
        (a, _), (b, inbox) = nodes
        await b.subscribe("news.*", "sport.>")
        for topic in ("news.eu", "news.eu.fr", "news", "sport.foot.eu", "sport", "other.eu"):
            await a.publish(Publication(topic, topic))
        await a.publish(Publication("sport.fence", "fence"))
        await inbox.wait_for(3)
        assert [p.message for p in inbox.items] == ["news.eu", "sport.foot.eu", "fence"]

    async def test_a_publication_matching_several_subscriptions_arrives_once(
        self, nodes: tuple[Node, Node]
    ) -> None:
        """By its topic and two patterns (Redis: a channel and two globs): once, in order,
        each with its offset."""
        (a, _), (b, inbox) = nodes
        await b.subscribe("news.eu", "news.*", "news.>", ">")
        for i in range(20):
            await a.publish(Publication("news.eu", str(i)))
        await a.publish(Publication("fence.x", "fence"))
        got = await inbox.wait_for(21)
        assert [p.message for p in got] == [*map(str, range(20)), "fence"]
        assert [p.offset for p in got[:20]] == list(range(1, 21))

    async def test_an_announcement_through_patterns_arrives_once(
        self, nodes: tuple[Node, Node]
    ) -> None:
        (a, _), (b, inbox) = nodes
        await b.subscribe("news.*", ">", "fence")  # two globs, and a channel
        await a.announce(Publication("news.eu", "announced"))
        await a.announce(Publication("fence", "fence"))
        await inbox.wait_for(2)
        await a.publish(Publication("fence", "last"))
        await inbox.wait_for(3)
        assert sorted(p.message for p in inbox.items) == ["announced", "fence", "last"]

    async def test_unsubscribing_a_pattern_stops_its_topics_but_not_others(
        self, nodes: tuple[Node, Node]
    ) -> None:
        """``news.*`` and ``news.>`` share one Redis glob: dropping one keeps the other."""
        (a, _), (b, inbox) = nodes
        await b.subscribe("news.*", "news.>", "news.kept")
        await b.unsubscribe("news.*")
        await a.publish(Publication("news.eu", "still, by news.>"))
        await inbox.wait_for(1)
        await b.unsubscribe("news.>")
        await a.publish(Publication("news.eu", "no"))
        await a.publish(Publication("news.eu.fr", "no"))
        await a.publish(Publication("news.kept", "by name"))
        await inbox.wait_for(2)
        assert [p.message for p in inbox.items] == ["still, by news.>", "by name"]

    async def test_a_topic_reached_by_a_pattern_keeps_its_order(
        self, nodes: tuple[Node, Node]
    ) -> None:
        """Several topics through one pattern, interleaved: each in its offset order."""
        (a, _), (b, inbox) = nodes
        await b.subscribe("room.>")
        batch = [Publication(f"room.{i % 3}", str(i)) for i in range(90)]
        await a.publish_many(batch)
        got = await inbox.wait_for(90)
        for room in range(3):
            mine = [p for p in got if p.topic == f"room.{room}"]
            assert [p.offset for p in mine] == list(range(1, 31))
            assert [p.message for p in mine] == [str(i) for i in range(room, 90, 3)]


Stores = tuple[RegistrationStore, RegistrationStore]

EXPIRING_TTL = 2
"""Seconds registrations live in ``expiring_stores``; the expiry tests leave half of it as
their margin for a slow machine."""


def reg(client_id: str, user: str | None = "u") -> Client:
    return Client(client_id, user, {"t"})


async def add_all(store: RegistrationStore, ids: list[str], user: str | None, limit: int) -> None:
    for client_id in ids:
        assert await store.add(reg(client_id, user), limit), f"{client_id} refused"


class RegistrationStoreConformance:
    """The per-user registration limit. Subclasses define ``stores`` and ``expiring_stores``
    (two nodes' views of one store; the latter with a TTL of ``EXPIRING_TTL`` seconds)."""

    @pytest.fixture
    async def stores(self) -> AsyncIterator[Stores]:
        raise NotImplementedError
        yield  # pragma: no cover

    @pytest.fixture
    async def expiring_stores(self) -> AsyncIterator[Stores]:
        raise NotImplementedError
        yield  # pragma: no cover

    async def test_the_limit_refuses_one_more(self, stores: Stores) -> None:
        a, _ = stores
        await add_all(a, ["r1", "r2", "r3"], "u", limit=3)
        assert await a.add(reg("r4"), 3) is False
        assert await a.get("r4") is None  # refused means not stored
        for client_id in ("r1", "r2", "r3"):
            stored = await a.get(client_id)
            assert stored is not None and stored.user == "u"

    async def test_the_count_is_shared_by_nodes(self, stores: Stores) -> None:
        a, b = stores
        await add_all(a, ["r1", "r2"], "u", limit=3)
        await add_all(b, ["r3"], "u", limit=3)
        assert await a.add(reg("r4"), 3) is False
        assert await b.add(reg("r5"), 3) is False

    async def test_concurrent_adds_on_two_nodes_never_pass_the_limit(self, stores: Stores) -> None:
        a, b = stores
        results = await asyncio.gather(
            *(
                (a if i % 2 else b).add(reg(f"r{i}"), 5)
                for i in range(40)  # interleaved between the nodes
            )
        )
        assert results.count(True) == 5

    async def test_deleting_one_frees_a_slot(self, stores: Stores) -> None:
        a, b = stores
        await add_all(a, ["r1", "r2"], "u", limit=2)
        assert await a.add(reg("r3"), 2) is False
        assert await b.remove("r1") is True
        assert await a.add(reg("r3"), 2) is True
        assert await a.add(reg("r4"), 2) is False
        assert await b.remove("r1") is False  # removing twice frees nothing more
        assert await a.add(reg("r4"), 2) is False

    async def test_users_are_counted_separately(self, stores: Stores) -> None:
        a, _ = stores
        await add_all(a, ["a1", "a2"], "alice", limit=2)
        await add_all(a, ["b1", "b2"], "bob", limit=2)
        assert await a.add(reg("a3", "alice"), 2) is False
        assert await a.add(reg("b3", "bob"), 2) is False

    async def test_anonymous_registrations_are_not_limited_and_not_counted(
        self, stores: Stores
    ) -> None:
        a, _ = stores
        await add_all(a, [f"anon{i}" for i in range(5)], None, limit=1)
        await add_all(a, ["u1"], "u", limit=1)  # the anonymous ones took no user's slot
        assert await a.remove("anon0") is True

    async def test_a_limit_of_zero_is_no_limit(self, stores: Stores) -> None:
        a, _ = stores
        await add_all(a, [f"r{i}" for i in range(50)], "u", limit=0)
        assert await a.add(reg("one-more"), 50) is False  # yet all 50 were counted

    async def test_expired_registrations_do_not_count(self, expiring_stores: Stores) -> None:
        a, b = expiring_stores
        await add_all(a, ["old"], "u", limit=2)
        await asyncio.sleep(EXPIRING_TTL / 2)
        await add_all(a, ["young"], "u", limit=2)  # expires half a TTL after "old"
        assert await b.add(reg("new1"), 2) is False

        async def until_accepted() -> None:
            while not await b.add(reg("new1"), 2):
                await asyncio.sleep(0.05)

        await asyncio.wait_for(until_accepted(), EXPIRING_TTL + TIMEOUT)
        assert await a.get("old") is None
        # "old" stopped counting on its own, not with everything of its user's at once
        assert await a.get("young") is not None
        assert await b.add(reg("new2"), 2) is False

    async def test_a_refreshed_registration_keeps_counting(self, expiring_stores: Stores) -> None:
        """An attached client's TTL is restarted (by ``attached`` and the refresher); the
        count follows the registration's real lifetime, not the one it was added with."""
        a, b = expiring_stores
        await add_all(a, ["kept"], "u", limit=1)
        await asyncio.sleep(EXPIRING_TTL / 2)
        assert await b.attached(reg("kept")) is True  # now lives until 1.5 TTLs
        await asyncio.sleep(EXPIRING_TTL * 3 / 4)  # past the first expiry, before the second
        assert await a.get("kept") is not None
        assert await b.add(reg("other"), 1) is False
        await b.detached(reg("kept"))

    async def test_remove_user_deletes_every_registration_of_the_user(self, stores: Stores) -> None:
        a, b = stores
        await add_all(a, ["x1", "x2"], "banned", limit=0)
        await add_all(b, ["x3"], "banned", limit=0)
        await add_all(a, ["y1"], "kept", limit=0)
        assert sorted(await b.remove_user("banned")) == ["x1", "x2", "x3"]
        for client_id in ("x1", "x2", "x3"):
            assert await a.get(client_id) is None
        assert await a.get("y1") is not None
        assert await a.remove_user("banned") == []
        assert await a.add(reg("x4", "banned"), 1)  # the user's count went with them


PresenceStores = tuple[PresenceStore, PresenceStore]


def entry(client: str, node: str, user: str | None = "u", at: float = 1.0) -> PresenceClient:
    return PresenceClient(client, user, node, at)


class PresenceStoreConformance:
    """Presence entries shared by nodes. Subclasses define ``presence_stores``: two nodes'
    views of one store, started as ``node-a`` and ``node-b``."""

    @pytest.fixture
    async def presence_stores(self) -> AsyncIterator[PresenceStores]:
        raise NotImplementedError
        yield  # pragma: no cover

    async def test_entries_added_on_either_node_are_listed_on_both(
        self, presence_stores: PresenceStores
    ) -> None:
        a, b = presence_stores
        assert await a.add("topic:t", entry("c1", "node-a", "1")) is True
        assert await b.add("topic:t", entry("c2", "node-b", None)) is True
        for store in (a, b):
            listed = sorted(await store.entries("topic:t"), key=lambda e: e.client)
            assert listed == [entry("c1", "node-a", "1"), entry("c2", "node-b", None)]
            assert await store.count("topic:t") == 2
        assert await a.entries("topic:other") == []
        assert await a.count("user:nobody") == 0

    async def test_adding_again_replaces_and_is_no_join(
        self, presence_stores: PresenceStores
    ) -> None:
        a, b = presence_stores
        assert await a.add("topic:t", entry("c1", "node-a", at=1.0)) is True
        assert await b.add("topic:t", entry("c1", "node-b", at=2.0)) is False  # it moved
        assert await a.entries("topic:t") == [entry("c1", "node-b", at=2.0)]

    async def test_only_the_holding_node_removes_an_entry(
        self, presence_stores: PresenceStores
    ) -> None:
        a, b = presence_stores
        await a.add("topic:t", entry("c1", "node-a"))
        await b.add("topic:t", entry("c1", "node-b"))  # moved to node-b
        assert await a.remove("topic:t", "c1", "node-a") is False  # node-b's now
        assert await a.count("topic:t") == 1
        assert await b.remove("topic:t", "c1", "node-b") is True  # a leave
        assert await b.remove("topic:t", "c1", "node-b") is False  # once
        assert await a.entries("topic:t") == []
        assert await a.remove("topic:never", "c9", "node-a") is False

    async def test_sets_are_apart(self, presence_stores: PresenceStores) -> None:
        a, _ = presence_stores
        await a.add("topic:u", entry("c1", "node-a"))
        await a.add("user:u", entry("c1", "node-a"))
        await a.remove("topic:u", "c1", "node-a")
        assert await a.count("user:u") == 1
        assert await a.count("topic:u") == 0
