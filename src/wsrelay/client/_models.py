"""What the client returns and yields: typed, immutable, decoded with msgspec.

The structs ignore fields they do not know, so a newer server that adds fields
to an answer does not break an older client.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal

import msgspec

UserId = int | str | None
"""A user id: an integer or a string (``42`` and ``"42"`` are the same user), or None."""


class Message(msgspec.Struct, frozen=True):
    """One publication received on a subscription."""

    topic: str
    message: str


class Publish(msgspec.Struct, frozen=True, omit_defaults=True):
    """One message of :meth:`Relay.publish_many`; with ``user_id`` only that user gets it."""

    topic: str
    message: str
    user_id: UserId = None


class Registration(msgspec.Struct, frozen=True):
    """Answer to ``POST /register``: the client's id and the WebSocket URL to open."""

    id: str
    url: str


class Stats(msgspec.Struct, frozen=True):
    """Answer to ``GET /stats``: one node's live counters since it started.

    ``publishes``, ``deliveries`` and ``slow_consumers`` only grow; rates are their
    differences between two calls divided by the time between them.
    """

    node: str
    uptime: float
    broker: Literal["up", "down"]
    connections: int
    registrations: int | None
    topics: int
    publishes: int
    deliveries: int
    slow_consumers: int
    version: str = ""


class TopicCount(msgspec.Struct, frozen=True):
    """A topic and the number of connections on the node subscribed to it."""

    topic: str
    subscribers: int


class Topics(msgspec.Struct, frozen=True):
    """Answer to ``GET /topics``: the busiest topics first; ``total`` counts all that
    matched, which is more than ``len(topics)`` when the list was cut at ``limit``."""

    topics: list[TopicCount]
    total: int


@dataclass(frozen=True)
class Backoff:
    """Reconnect delays: exponential backoff with full jitter.

    Before attempt ``n`` (1, 2, ...) the client waits a random time between 0 and
    ``min(maximum, initial * factor ** (n - 1))`` seconds. The count restarts
    after each successful subscription. ``max_attempts=None`` retries forever.
    """

    initial: float = 0.5
    maximum: float = 30.0
    factor: float = 2.0
    max_attempts: int | None = None

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """The wait before reconnect attempt ``attempt`` (counted from 1)."""
        ceiling = min(self.maximum, self.initial * self.factor ** max(0, attempt - 1))
        return (rng or random).uniform(0.0, ceiling)


@dataclass(frozen=True)
class Subscribed:
    """Event: the connection is open and the server confirmed the topic set.

    ``reconnects`` is 0 for the first connection; ``registered`` is true when the
    client had to register anew (its old id was unknown to the server, e.g. after a
    restart of a server that keeps registrations in memory).
    """

    id: str
    topics: tuple[str, ...]
    reconnects: int
    registered: bool


@dataclass(frozen=True)
class Reconnecting:
    """Event: the connection was lost or could not be made; the client retries after
    ``delay`` seconds. ``close_code`` is None when there was no close frame."""

    attempt: int
    delay: float
    close_code: int | None
    reason: str


Event = Subscribed | Reconnecting
"""What a subscription's ``on_event`` callback receives."""
