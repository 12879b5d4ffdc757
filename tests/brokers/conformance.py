"""The contract every broker keeps, written once (phoenix_pubsub's shared suite).

A broker test module subclasses :class:`BrokerConformance` and provides the
``nodes`` fixture: two started brokers on one backend, as two relay nodes
would hold them. Waits are on the delivery itself, bounded by ``TIMEOUT``;
absence is checked behind a fence (a later publication that must arrive).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest

from tests.utils import TIMEOUT
from wsrelay.brokers import Broker
from wsrelay.core.fanout import Publication


class Inbox:
    """Collects what a broker hands to a node."""

    def __init__(self) -> None:
        self.items: list[Publication] = []
        self._changed = asyncio.Event()

    def __call__(self, publication: Publication) -> None:
        self.items.append(publication)
        self._changed.set()

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

    async def test_a_node_does_not_receive_its_own_publications(
        self, nodes: tuple[Node, Node]
    ) -> None:
        (a, inbox_a), (b, inbox_b) = nodes
        await a.subscribe("t")
        await b.subscribe("t")
        await a.publish(Publication("t", "from a"))
        await b.publish(Publication("t", "from b"))
        await inbox_a.wait_for(1)
        await inbox_b.wait_for(1)
        assert [p.message for p in inbox_a.items] == ["from b"]
        assert [p.message for p in inbox_b.items] == ["from a"]

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

    async def test_stop_is_idempotent_and_silences_the_node(self, nodes: tuple[Node, Node]) -> None:
        (a, inbox_a), (b, inbox_b) = nodes
        await a.subscribe("t")
        await b.subscribe("t")
        await b.stop()
        await b.stop()
        await a.publish(Publication("t", "after stop"))
        # a publishes to itself nothing, so fence through a second subscriber: b restarts
        await b.start(inbox_b, "node-b")
        await b.subscribe("t")
        await a.publish(Publication("t", "fence"))
        await inbox_b.wait_for(1)
        assert [p.message for p in inbox_b.items] == ["fence"]
        assert inbox_a.items == []
