from collections.abc import AsyncIterator

import pytest

from tests.brokers.conformance import (
    EXPIRING_TTL,
    BrokerConformance,
    Inbox,
    Node,
    PresenceStoreConformance,
    PresenceStores,
    RegistrationStoreConformance,
    Stores,
)
from wsrelay.brokers import MemoryBroker, MemoryBus, MemoryRegistrations, from_url
from wsrelay.core.registry import Client


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
        bus = MemoryBus(registration_ttl=EXPIRING_TTL)
        yield bus.backend().registrations, bus.backend().registrations


class TestMemoryPresence(PresenceStoreConformance):
    @pytest.fixture
    async def presence_stores(self) -> AsyncIterator[PresenceStores]:
        bus = MemoryBus()
        a, b = bus.backend().presence, bus.backend().presence
        assert a is not None and b is not None
        yield a, b


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def test_memory_registrations_expire_unless_attached() -> None:
    clock = Clock()
    store = MemoryRegistrations(ttl=10, clock=clock)
    never, attached, detached = (
        Client("n", "u", set()),
        Client("a", "u", set()),
        Client("d", None, set()),
    )
    for client in (never, attached, detached):
        assert await store.add(client)
    assert await store.attached(attached) and await store.attached(detached)
    clock.now = 5
    await store.detached(detached)  # its countdown restarts now: gone at 15
    clock.now = 10
    assert await store.get("n") is None  # never connected: gone at 10
    assert await store.count() == 2
    assert await store.add(Client("n2", "u", set()), limit=2)  # "n" no longer counts
    clock.now = 14.9
    assert await store.get("d") is not None
    clock.now = 15
    assert await store.get("d") is None
    clock.now = 1e9
    assert await store.get("a") is not None  # attached: never expires
    assert await store.count() == 1


async def test_memory_deadline_heap_stays_proportional_to_registrations() -> None:
    """Reconnect churn moves deadlines; stale heap entries must not pile up."""
    clock = Clock()
    store = MemoryRegistrations(ttl=3600, clock=clock)
    client = Client("c", "u", set())
    await store.add(client)
    for step in range(10_000):
        clock.now = step
        await store.attached(client)
        await store.detached(client)
    assert len(store._deadlines) <= 2 * 1 + 64
    assert await store.get("c") is not None
    clock.now = 9_999 + 3600
    assert await store.get("c") is None


def test_from_url_picks_memory_and_refuses_unknown_schemes() -> None:
    assert isinstance(from_url("memory://").broker, MemoryBroker)
    with pytest.raises(ValueError, match="unsupported broker URL"):
        from_url("kafka://localhost")
