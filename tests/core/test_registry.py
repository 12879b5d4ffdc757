from tests.fakes import RecordingSink
from wsrelay.core.fanout import Publication
from wsrelay.core.registry import Client, Hold, Registry, user_key


def make(cid: str, user: str | None = None, topics: set[str] | None = None) -> Client:
    return Client(cid, user, set(topics or ()))


def test_only_attached_clients_are_recipients() -> None:
    """A registration without a connection receives nothing and occupies no topic."""
    reg = Registry()
    a = make("a", topics={"t"})
    assert list(reg.recipients("t", None)) == []
    _, change = reg.attach(a, RecordingSink())
    assert change.occupied == ["t"]
    assert list(reg.recipients("t", None)) == [a]
    assert reg.attached("a") is a and reg.connections == 1


def test_first_and_last_subscriber_are_reported() -> None:
    """occupied/vacated tell the broker exactly when to (un)subscribe a topic."""
    reg = Registry()
    a, b = make("a"), make("b")
    reg.attach(a, RecordingSink())
    reg.attach(b, RecordingSink())
    assert reg.subscribe(a, {"t"}).occupied == ["t"]
    assert not reg.subscribe(b, {"t"})
    assert not reg.unsubscribe(a, {"t"})
    assert reg.unsubscribe(b, {"t"}).vacated == ["t"]
    assert reg.topics == 0


def test_set_topics_replaces() -> None:
    reg = Registry()
    a = make("a", topics={"x", "y"})
    reg.attach(a, RecordingSink())
    change = reg.set_topics(a, {"y", "z"})
    assert (change.occupied, change.vacated) == (["z"], ["x"])
    assert a.topics == {"y", "z"}


def test_topics_of_a_detached_client_change_without_indexing() -> None:
    reg = Registry()
    a = make("a")
    assert not reg.subscribe(a, {"t"})
    assert a.topics == {"t"} and reg.topics == 0


def test_topics_survive_a_disconnect() -> None:
    """Detaching leaves the registration's topics for the next connection."""
    reg = Registry()
    a = make("a", topics={"t"})
    sink = RecordingSink()
    reg.attach(a, sink)
    assert reg.detach(a, sink).vacated == ["t"]
    assert a.topics == {"t"} and reg.connections == 0 and reg.attached("a") is None
    reg.attach(a, RecordingSink())
    assert list(reg.recipients("t", None)) == [a]


def test_a_replaced_sink_detaching_late_keeps_its_successor() -> None:
    reg = Registry()
    a = make("a", topics={"t"})
    old, new = RecordingSink(), RecordingSink()
    reg.attach(a, old)
    previous, change = reg.attach(a, new)
    assert previous is old and not change
    assert not reg.detach(a, old)
    assert a.sink is new and reg.connections == 1


def test_a_reloaded_registration_takes_the_attached_ones_place() -> None:
    """With Redis, a second connection loads a new Client object with the same id."""
    reg = Registry()
    first = make("a", user="u", topics={"t", "old"})
    old_sink = RecordingSink()
    reg.attach(first, old_sink)
    second = make("a", user="u", topics={"t", "new"})
    previous, change = reg.attach(second, RecordingSink())
    assert previous is old_sink
    assert (change.occupied, change.vacated) == (["new"], ["old"])
    assert list(reg.recipients("t", "u")) == [second] and reg.connections == 1
    assert not reg.detach(first, old_sink)


def test_user_targeting_narrows_recipients() -> None:
    reg = Registry()
    clients = [make(str(i), user=str(i % 3), topics={"t"}) for i in range(9)]
    for c in clients:
        reg.attach(c, RecordingSink())
    assert {c.id for c in reg.recipients("t", "1")} == {"1", "4", "7"}
    assert list(reg.recipients("t", "nobody")) == []
    assert len(list(reg.recipients("t", None))) == 9
    # a user with fewer clients than the topic has subscribers: walk the user's side
    lone = make("lone", user="solo", topics={"t"})
    reg.attach(lone, RecordingSink())
    assert list(reg.recipients("t", "solo")) == [lone]
    assert list(reg.recipients("other", "solo")) == []


def test_user_ids_compare_as_strings() -> None:
    assert user_key(42) == user_key("42") == "42"
    assert user_key(None) is None


def _pub(offset: int, epoch: str = "e", topic: str = "t") -> Publication:
    return Publication(topic, str(offset), None, offset, epoch)


def test_a_hold_keeps_back_then_releases_what_follows_the_replay() -> None:
    client = Client("c", None, {"t", "u"})
    hold = client.held = Hold(client)
    hold.hold(["t"])
    assert hold.admit(_pub(1, topic="u"))  # not held
    assert not hold.admit(_pub(5)) and not hold.admit(_pub(6))
    assert hold.release("t", "e", 5) == [_pub(6)]
    # The floor: a late copy of what the replay had is dropped; the next one passes
    # and removes the hold altogether.
    assert not hold.admit(_pub(4))
    assert hold.admit(_pub(7))
    assert client.held is None


def test_a_new_epoch_passes_the_floor() -> None:
    client = Client("c", None, {"t"})
    hold = client.held = Hold(client)
    hold.hold(["t"])
    assert hold.release("t", "old", 9) == []
    assert hold.admit(_pub(1, epoch="new"))


def test_release_all_hands_back_everything_held_each_topic_in_order() -> None:
    client = Client("c", None, {"t", "u"})
    hold = client.held = Hold(client)
    hold.hold(["t", "u"])
    for p in (_pub(1), _pub(1, topic="u"), _pub(2)):
        assert not hold.admit(p)
    assert hold.release_all() == [_pub(1), _pub(2), _pub(1, topic="u")]
    assert client.held is None


# -- wildcard subscriptions ------------------------------------------------------------------


def test_a_pattern_is_occupied_and_vacated_like_a_topic() -> None:
    """The broker is told of a pattern's first and last subscriber here, as of a topic's."""
    reg = Registry()
    a, b = make("a"), make("b")
    reg.attach(a, RecordingSink())
    reg.attach(b, RecordingSink())
    assert reg.subscribe(a, {"news.*"}).occupied == ["news.*"]
    assert not reg.subscribe(b, {"news.*"})
    assert not reg.unsubscribe(a, {"news.*"})
    assert reg.unsubscribe(b, {"news.*"}).vacated == ["news.*"]
    assert reg.patterns == 0 and reg.topics == 0


def test_pattern_subscribers_receive_matching_topics_each_once() -> None:
    """A client subscribed to a topic and to two patterns matching it is one recipient."""
    reg = Registry()
    both = make("both", topics={"news.eu", "news.*", "news.>"})
    one = make("one", topics={"news.*"})
    rest = make("rest", topics={"news.>"})
    other = make("other", topics={"sport.*", "news"})
    for client in (both, one, rest, other):
        reg.attach(client, RecordingSink())
    assert sorted(c.id for c in reg.recipients("news.eu", None)) == ["both", "one", "rest"]
    assert sorted(c.id for c in reg.recipients("news.eu.fr", None)) == ["both", "rest"]
    assert list(reg.recipients("news", None)) == [other]
    assert reg.count_recipients("news.eu", None) == 3


def test_pattern_recipients_narrow_by_user() -> None:
    reg = Registry()
    alice = make("alice", "alice", {"news.*"})
    bob = make("bob", "bob", {"news.eu"})
    reg.attach(alice, RecordingSink())
    reg.attach(bob, RecordingSink())
    assert list(reg.recipients("news.eu", "alice")) == [alice]
    assert reg.count_recipients("news.eu", "bob") == 1


def test_a_detached_pattern_subscriber_receives_nothing() -> None:
    reg = Registry()
    a = make("a", topics={"news.>"})
    sink = RecordingSink()
    reg.attach(a, sink)
    assert reg.detach(a, sink).vacated == ["news.>"]
    assert list(reg.recipients("news.eu", None)) == []


def test_receives_says_whether_a_topic_reaches_a_client() -> None:
    reg = Registry()
    a = make("a", topics={"news.*", "cats"})
    assert reg.receives(a, "cats") and reg.receives(a, "news.eu")
    assert not reg.receives(a, "news.eu.fr") and not reg.receives(a, "dogs")
