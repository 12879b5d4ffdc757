"""Registrations and the indexes that make a publish cost O(its recipients).

Theory of operation
-------------------
A *registration* (:class:`Client`) is created by ``POST /register`` and lives
until ``DELETE /register/<id>`` (or its TTL, with Redis). It owns its user and
its topic set, which survive disconnects: a client that reconnects to the same
URL, on any node, resumes its subscriptions. Registrations are kept by a store
(:mod:`wsrelay.brokers`); this module indexes the ones in use here.

A registration is *attached* while a WebSocket connection (a :class:`Sink`) is
open for it on this node. Only attached clients are in the two indexes:

* ``topic -> clients``: the clients a publication on that topic goes to;
* ``pattern -> clients`` (:class:`~wsrelay.core.topics.PatternIndex`, a trie by
  segment): those subscribed to ``news.*`` or ``news.>``;
* ``user -> clients``: narrows a user-targeted publication.

So a publish looks at the subscribers of one topic and of the patterns matching it
(or one user's clients, whichever set is smaller), never at every client as the seed
did, nor at every pattern held. While no pattern is held, a publish costs what it
did before patterns existed: one test of an empty index.

Every mutation returns a :class:`Occupancy` change: the topics (and patterns) that
just gained their first attached subscriber here and those that just lost their last
one. The node passes these to the broker, so that it receives traffic only for
topics someone here listens to.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from wsrelay.core.patterns import is_pattern, matches
from wsrelay.core.rules import NO_GRANTS, Grants
from wsrelay.core.topics import PatternIndex

if TYPE_CHECKING:
    from wsrelay.core.fanout import Publication


class Sink(Protocol):
    """One live connection, as the core sees it. Implemented by the I/O layer."""

    raw: bool
    """True if the client asked for raw mode (message text only, no envelope)."""

    def send(self, frame: bytes) -> bool:
        """Queue a ready-to-write frame; False if the connection refused it
        (closing, or over its outbox limit, in which case it closes itself)."""
        ...

    def close(self, code: int, reason: str) -> None:
        """Start closing the connection with ``code``; must not block or raise."""
        ...


class Client:
    """A registration. ``user`` is the user id as a string, or None if anonymous;
    ``grants`` the topic patterns it may subscribe and publish to beyond what the
    namespaces allow everyone (:mod:`wsrelay.core.rules`)."""

    __slots__ = ("grants", "held", "id", "sink", "topics", "user")

    def __init__(
        self, client_id: str, user: str | None, topics: set[str], grants: Grants = NO_GRANTS
    ) -> None:
        self.id = client_id
        self.user = user
        self.topics = topics
        self.grants = grants
        self.sink: Sink | None = None
        self.held: Hold | None = None
        """Topics being recovered: their live publications wait (see :class:`Hold`)."""

    def __repr__(self) -> str:
        # The id is the client's secret: show only a prefix.
        return f"<Client {self.id[:6]}… user={self.user!r} topics={len(self.topics)}>"


class Hold:
    """The seam between a recovery's replay and the live stream, for one client.

    While a topic is *held* its live publications are kept back (:meth:`admit` says
    False and keeps them) until the replay has been read; :meth:`release` then returns
    those the replay did not include, and leaves a *floor* behind: live publications
    at or below the replay's last offset that are still on their way (another node's,
    over Redis) are dropped rather than sent twice. The first one above it removes the
    floor. So the client gets the replay, then the live stream, with no gap and no
    duplicate.
    """

    __slots__ = ("_client", "_topics")

    def __init__(self, client: Client) -> None:
        self._client = client
        self._topics: dict[str, list[Publication] | tuple[str, int]] = {}

    def hold(self, topics: Iterable[str]) -> None:
        """Keep back the live publications of ``topics`` from now on."""
        for topic in topics:
            self._topics[topic] = []

    def holding(self, topic: str) -> bool:
        return isinstance(self._topics.get(topic), list)

    def admit(self, publication: Publication) -> bool:
        """Whether a live publication goes to the client now (else it is kept or dropped)."""
        state = self._topics.get(publication.topic)
        if state is None:
            return True
        if isinstance(state, list):
            state.append(publication)
            return False
        epoch, floor = state
        if publication.epoch == epoch and publication.offset <= floor:
            return False
        self._forget(publication.topic)
        return True

    def release(self, topic: str, epoch: str, floor: int) -> list[Publication]:
        """Stop holding ``topic``, replayed up to ``floor`` in ``epoch``: the kept
        publications that come after the replay, in order."""
        kept = self._topics.get(topic)
        if not isinstance(kept, list):
            return []
        after = [p for p in kept if p.epoch != epoch or p.offset > floor]
        if floor > 0:
            self._topics[topic] = (epoch, floor)
        else:
            self._forget(topic)
        return after

    def release_all(self) -> list[Publication]:
        """Stop holding every topic still held: their kept publications, topic by topic,
        each topic's in order."""
        kept: list[Publication] = []
        for topic, state in list(self._topics.items()):
            if isinstance(state, list):
                kept.extend(state)
                self._forget(topic)
        return kept

    def _forget(self, topic: str) -> None:
        self._topics.pop(topic, None)
        if not self._topics and self._client.held is self:
            self._client.held = None


@dataclass(slots=True)
class Occupancy:
    """Topics that gained their first (``occupied``) or lost their last
    (``vacated``) attached subscriber on this node; patterns among them are patterns
    (:func:`~wsrelay.core.patterns.is_pattern`) gaining or losing theirs."""

    occupied: list[str] = field(default_factory=list)
    vacated: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.occupied or self.vacated)


def user_key(user_id: int | str | None) -> str | None:
    """The key a user id is indexed by: ``42`` and ``"42"`` are the same user."""
    return None if user_id is None else str(user_id)


class Registry:
    """The clients attached to this node, and their topic and user indexes.

    Registrations themselves live in a store (memory or Redis, see
    :mod:`wsrelay.brokers`); the registry holds a registration only while a
    connection on this node is attached to it.
    """

    def __init__(self) -> None:
        self._attached: dict[str, Client] = {}
        self._by_topic: dict[str, set[Client]] = {}
        self._patterns: PatternIndex[Client] = PatternIndex()
        self._by_user: dict[str, set[Client]] = {}

    # -- connections ----------------------------------------------------------------------

    def attach(self, client: Client, sink: Sink) -> tuple[Sink | None, Occupancy]:
        """Make ``sink`` the client's connection; returns the sink it replaced, if any.

        A registration loaded again from the store (Redis) while attached here is a
        different object with the same id: it takes the old one's place.
        """
        change = Occupancy()
        current = self._attached.get(client.id)
        previous = current.sink if current is not None else None
        if current is not client:
            if current is not None:
                change = self.detach(current, current.sink)
            self._attached[client.id] = client
            self._index(client, client.topics, change)
            if client.user is not None:
                self._by_user.setdefault(client.user, set()).add(client)
        client.sink = sink
        return previous, _net(change)

    def detach(self, client: Client, sink: Sink | None) -> Occupancy:
        """Forget ``sink`` if it is still the client's connection (a replaced
        connection detaching late must not detach its successor)."""
        change = Occupancy()
        if sink is None or client.sink is not sink or self._attached.get(client.id) is not client:
            return change
        client.sink = None
        del self._attached[client.id]
        self._unindex(client, client.topics, change)
        if client.user is not None:
            _discard(self._by_user, client.user, client)
        return change

    def attached(self, client_id: str) -> Client | None:
        """The registration attached here under ``client_id``, if any."""
        return self._attached.get(client_id)

    # -- subscriptions ----------------------------------------------------------------------

    def set_topics(self, client: Client, topics: set[str]) -> Occupancy:
        """Replace the client's topics (the seed's ``{"topics": [...]}``)."""
        return self._update(client, add=topics - client.topics, remove=client.topics - topics)

    def subscribe(self, client: Client, topics: set[str]) -> Occupancy:
        return self._update(client, add=topics - client.topics, remove=set())

    def unsubscribe(self, client: Client, topics: set[str]) -> Occupancy:
        return self._update(client, add=set(), remove=topics & client.topics)

    def _update(self, client: Client, add: set[str], remove: set[str]) -> Occupancy:
        change = Occupancy()
        client.topics.difference_update(remove)
        client.topics.update(add)
        if client.sink is not None:
            self._unindex(client, remove, change)
            self._index(client, add, change)
        return change

    def _index(self, client: Client, topics: Iterable[str], change: Occupancy) -> None:
        for topic in topics:
            if is_pattern(topic):
                if self._patterns.add(topic, client):
                    change.occupied.append(topic)
                continue
            subscribers = self._by_topic.get(topic)
            if subscribers is None:
                subscribers = self._by_topic[topic] = set()
                change.occupied.append(topic)
            subscribers.add(client)

    def _unindex(self, client: Client, topics: Iterable[str], change: Occupancy) -> None:
        for topic in topics:
            if is_pattern(topic):
                if self._patterns.discard(topic, client):
                    change.vacated.append(topic)
            elif _discard(self._by_topic, topic, client):
                change.vacated.append(topic)

    # -- lookups -------------------------------------------------------------------------------

    def recipients(self, topic: str, user: str | None) -> Iterator[Client]:
        """Attached clients that a publication on ``topic`` (for ``user``, if
        given) goes to, each once however many of its subscriptions match. Cost: the
        smaller of the two index entries (the topic's subscribers and its patterns'
        together), plus one walk of the pattern index if it holds any."""
        subscribers = self._by_topic.get(topic)
        if self._patterns:
            subscribers = self._with_patterns(topic, subscribers)
        if not subscribers:
            return iter(())
        if user is None:
            return iter(subscribers)
        users_clients = self._by_user.get(user)
        if not users_clients:
            return iter(())
        if len(users_clients) < len(subscribers):
            return (c for c in users_clients if c in subscribers)
        return (c for c in subscribers if c.user == user)

    def _with_patterns(self, topic: str, subscribers: set[Client] | None) -> set[Client] | None:
        """``subscribers`` of ``topic`` joined with those of the patterns matching it;
        a new set only where several sets must be merged (so each client is once)."""
        groups = self._patterns.match(topic)
        if not groups:
            return subscribers
        if not subscribers and len(groups) == 1:
            return groups[0]
        merged = set(subscribers) if subscribers else set()
        for group in groups:
            merged |= group
        return merged

    def receives(self, client: Client, topic: str) -> bool:
        """Whether ``client`` is subscribed to ``topic``, by name or by a pattern."""
        if topic in client.topics:
            return True
        return any(is_pattern(name) and matches(name, topic) for name in client.topics)

    def count_recipients(self, topic: str, user: str | None) -> int:
        """How many attached clients a publication on ``topic`` (for ``user``) goes to."""
        if user is None and not self._patterns:
            return self.subscriber_count(topic)
        return sum(1 for _ in self.recipients(topic, user))

    def subscriber_count(self, topic: str) -> int:
        """Attached clients subscribed to ``topic`` by name (not by a pattern)."""
        return len(self._by_topic.get(topic, ()))

    def busiest_topics(
        self, prefix: str = "", limit: int = 100
    ) -> tuple[list[tuple[str, int]], int]:
        """Up to ``limit`` topics starting with ``prefix``, most subscribers first (ties
        by name), and how many topics match in all."""
        matching = [(t, len(s)) for t, s in self._by_topic.items() if t.startswith(prefix)]
        matching.sort(key=lambda item: (-item[1], item[0]))
        return matching[:limit], len(matching)

    @property
    def connections(self) -> int:
        return len(self._attached)

    @property
    def topics(self) -> int:
        """Topics with at least one attached subscriber (by name)."""
        return len(self._by_topic)

    @property
    def patterns(self) -> int:
        """Patterns with at least one attached subscriber."""
        return len(self._patterns)

    def clients(self) -> list[Client]:
        """A snapshot of the attached clients."""
        return list(self._attached.values())

    def clients_of(self, user: str) -> list[Client]:
        """A snapshot of ``user``'s attached clients."""
        return list(self._by_user.get(user, ()))


def _net(change: Occupancy) -> Occupancy:
    """Cancel topics both vacated and re-occupied within one change."""
    both = set(change.occupied) & set(change.vacated)
    if both:
        change.occupied = [t for t in change.occupied if t not in both]
        change.vacated = [t for t in change.vacated if t not in both]
    return change


def _discard(index: dict[str, set[Client]], key: str, client: Client) -> bool:
    """Remove ``client`` from ``index[key]``; True if that emptied (and dropped) the entry."""
    members = index.get(key)
    if members is None or client not in members:
        return False
    members.discard(client)
    if members:
        return False
    del index[key]
    return True
