"""Registrations and the indexes that make a publish cost O(its recipients).

Theory of operation
-------------------
A *registration* (:class:`Client`) is created by ``POST /register`` and lives
until ``DELETE /register/<id>``. It owns its user and its topic set, which
survive disconnects: a client that reconnects to the same URL resumes its
subscriptions.

A registration is *attached* while a WebSocket connection (a :class:`Sink`) is
open for it. Only attached clients are in the two indexes:

* ``topic -> clients``: the clients a publication on that topic goes to;
* ``user -> clients``: narrows a user-targeted publication.

So a publish looks at the subscribers of one topic (or one user's clients,
whichever set is smaller), never at every client as the seed did.

Every mutation returns a :class:`Occupancy` change: the topics that just gained
their first attached subscriber here and those that just lost their last one.
The node passes these to the broker, so that it receives traffic only for
topics someone here listens to.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

from wsrelay.errors import NotFound


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
    """A registration. ``user`` is the user id as a string, or None if anonymous."""

    __slots__ = ("id", "sink", "topics", "user")

    def __init__(self, client_id: str, user: str | None, topics: set[str]) -> None:
        self.id = client_id
        self.user = user
        self.topics = topics
        self.sink: Sink | None = None

    def __repr__(self) -> str:
        # The id is the client's secret: show only a prefix.
        return f"<Client {self.id[:6]}… user={self.user!r} topics={len(self.topics)}>"


@dataclass(slots=True)
class Occupancy:
    """Topics that gained their first (``occupied``) or lost their last
    (``vacated``) attached subscriber on this node."""

    occupied: list[str] = field(default_factory=list)
    vacated: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.occupied or self.vacated)


def user_key(user_id: int | str | None) -> str | None:
    """The key a user id is indexed by: ``42`` and ``"42"`` are the same user."""
    return None if user_id is None else str(user_id)


class Registry:
    """All registrations of this node, and the indexes of attached clients."""

    def __init__(self) -> None:
        self._clients: dict[str, Client] = {}
        self._by_topic: dict[str, set[Client]] = {}
        self._by_user: dict[str, set[Client]] = {}
        self._attached = 0

    # -- registrations -------------------------------------------------------------------

    def add(self, client: Client) -> None:
        """Add a new registration. Its id must be new."""
        if client.id in self._clients:
            raise ValueError("duplicate client id")
        self._clients[client.id] = client

    def get(self, client_id: str) -> Client:
        """The registration with this id.

        Raises:
            NotFound: there is none (never registered, or unregistered).
        """
        client = self._clients.get(client_id)
        if client is None:
            raise NotFound("no registration with this id", code="unknown_client")
        return client

    def remove(self, client_id: str) -> tuple[Client, Occupancy]:
        """Delete a registration, detaching it first. The caller closes its sink.

        Raises:
            NotFound: there is no such registration.
        """
        client = self.get(client_id)
        change = self.detach(client, client.sink) if client.sink is not None else Occupancy()
        del self._clients[client_id]
        return client, change

    # -- connections ----------------------------------------------------------------------

    def attach(self, client: Client, sink: Sink) -> tuple[Sink | None, Occupancy]:
        """Make ``sink`` the client's connection; returns the sink it replaced, if any.

        Raises:
            NotFound: ``client`` was unregistered (say, while its connection opened).
        """
        if self._clients.get(client.id) is not client:
            raise NotFound("this registration was deleted", code="unknown_client")
        previous = client.sink
        change = Occupancy()
        if previous is None:
            self._attached += 1
            self._index(client, client.topics, change)
            if client.user is not None:
                self._by_user.setdefault(client.user, set()).add(client)
        client.sink = sink
        return previous, change

    def detach(self, client: Client, sink: Sink | None) -> Occupancy:
        """Forget ``sink`` if it is still the client's connection (a replaced
        connection detaching late must not detach its successor)."""
        change = Occupancy()
        if sink is None or client.sink is not sink:
            return change
        client.sink = None
        self._attached -= 1
        self._unindex(client, client.topics, change)
        if client.user is not None:
            _discard(self._by_user, client.user, client)
        return change

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
            subscribers = self._by_topic.get(topic)
            if subscribers is None:
                subscribers = self._by_topic[topic] = set()
                change.occupied.append(topic)
            subscribers.add(client)

    def _unindex(self, client: Client, topics: Iterable[str], change: Occupancy) -> None:
        for topic in topics:
            if _discard(self._by_topic, topic, client):
                change.vacated.append(topic)

    # -- lookups -------------------------------------------------------------------------------

    def recipients(self, topic: str, user: str | None) -> Iterator[Client]:
        """Attached clients that a publication on ``topic`` (for ``user``, if
        given) goes to. Cost: the smaller of the two index entries."""
        subscribers = self._by_topic.get(topic)
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

    def subscriber_count(self, topic: str) -> int:
        """Attached clients subscribed to ``topic``."""
        return len(self._by_topic.get(topic, ()))

    @property
    def registrations(self) -> int:
        return len(self._clients)

    @property
    def connections(self) -> int:
        return self._attached

    @property
    def topics(self) -> int:
        """Topics with at least one attached subscriber."""
        return len(self._by_topic)

    def clients(self) -> Iterator[Client]:
        return iter(list(self._clients.values()))


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
