import pytest

from tests.fakes import RecordingSink
from wsrelay.core.registry import Client, Registry, user_key
from wsrelay.errors import NotFound


def make(
    registry: Registry, cid: str, user: str | None = None, topics: set[str] | None = None
) -> Client:
    client = Client(cid, user, set(topics or ()))
    registry.add(client)
    return client


def test_only_attached_clients_are_recipients() -> None:
    """A registration without a connection receives nothing and occupies no topic."""
    reg = Registry()
    a = make(reg, "a", topics={"t"})
    assert list(reg.recipients("t", None)) == []
    _, change = reg.attach(a, RecordingSink())
    assert change.occupied == ["t"]
    assert list(reg.recipients("t", None)) == [a]


def test_first_and_last_subscriber_are_reported() -> None:
    """occupied/vacated tell the broker exactly when to (un)subscribe a topic."""
    reg = Registry()
    a, b = make(reg, "a"), make(reg, "b")
    reg.attach(a, RecordingSink())
    reg.attach(b, RecordingSink())
    assert reg.subscribe(a, {"t"}).occupied == ["t"]
    assert not reg.subscribe(b, {"t"})
    assert not reg.unsubscribe(a, {"t"})
    assert reg.unsubscribe(b, {"t"}).vacated == ["t"]
    assert reg.topics == 0


def test_set_topics_replaces() -> None:
    reg = Registry()
    a = make(reg, "a", topics={"x", "y"})
    reg.attach(a, RecordingSink())
    change = reg.set_topics(a, {"y", "z"})
    assert (change.occupied, change.vacated) == (["z"], ["x"])
    assert a.topics == {"y", "z"}


def test_topics_survive_a_disconnect() -> None:
    """Detaching leaves the registration's topics for the next connection."""
    reg = Registry()
    a = make(reg, "a", topics={"t"})
    sink = RecordingSink()
    reg.attach(a, sink)
    assert reg.detach(a, sink).vacated == ["t"]
    assert a.topics == {"t"} and reg.connections == 0
    reg.attach(a, RecordingSink())
    assert list(reg.recipients("t", None)) == [a]


def test_a_replaced_sink_detaching_late_keeps_its_successor() -> None:
    reg = Registry()
    a = make(reg, "a", topics={"t"})
    old, new = RecordingSink(), RecordingSink()
    reg.attach(a, old)
    previous, _ = reg.attach(a, new)
    assert previous is old
    assert not reg.detach(a, old)
    assert a.sink is new and reg.connections == 1


def test_user_targeting_narrows_recipients() -> None:
    reg = Registry()
    clients = [make(reg, str(i), user=str(i % 3), topics={"t"}) for i in range(9)]
    for c in clients:
        reg.attach(c, RecordingSink())
    assert {c.id for c in reg.recipients("t", "1")} == {"1", "4", "7"}
    assert list(reg.recipients("t", "nobody")) == []
    assert len(list(reg.recipients("t", None))) == 9
    # a user with fewer clients than the topic has subscribers: walk the user's side
    lone = make(reg, "lone", user="solo", topics={"t"})
    reg.attach(lone, RecordingSink())
    assert list(reg.recipients("t", "solo")) == [lone]
    assert list(reg.recipients("other", "solo")) == []


def test_user_ids_compare_as_strings() -> None:
    assert user_key(42) == user_key("42") == "42"
    assert user_key(None) is None


def test_remove_detaches_and_forgets() -> None:
    reg = Registry()
    a = make(reg, "a", topics={"t"})
    reg.attach(a, RecordingSink())
    _, change = reg.remove("a")
    assert change.vacated == ["t"] and reg.registrations == 0 and reg.connections == 0
    with pytest.raises(NotFound):
        reg.get("a")
    with pytest.raises(NotFound):
        reg.attach(a, RecordingSink())
