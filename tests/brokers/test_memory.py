from collections.abc import AsyncIterator

import pytest

from tests.brokers.conformance import (
    BrokerConformance,
    Inbox,
    Node,
    RegistrationStoreConformance,
    Stores,
)
from wsrelay.brokers import MemoryBroker, MemoryBus, from_url


class TestMemoryBroker(BrokerConformance):
    @pytest.fixture
    async def nodes(self) -> AsyncIterator[tuple[Node, Node]]:
        bus = MemoryBus()
        a, b = MemoryBroker(bus), MemoryBroker(bus)
        inbox_a, inbox_b = Inbox(), Inbox()
        await a.start(inbox_a, "node-a")
        await b.start(inbox_b, "node-b")
        yield (a, inbox_a), (b, inbox_b)
        await a.stop()
        await b.stop()


class TestMemoryRegistrations(RegistrationStoreConformance):
    @pytest.fixture
    async def stores(self) -> AsyncIterator[Stores]:
        bus = MemoryBus()
        yield bus.backend().registrations, bus.backend().registrations

    @pytest.fixture
    async def expiring_stores(self) -> AsyncIterator[Stores]:
        pytest.skip("registrations kept in memory do not expire; only DELETE frees a slot")
        yield  # pragma: no cover


def test_from_url_picks_memory_and_refuses_unknown_schemes() -> None:
    assert isinstance(from_url("memory://").broker, MemoryBroker)
    with pytest.raises(ValueError, match="unsupported broker URL"):
        from_url("kafka://localhost")
