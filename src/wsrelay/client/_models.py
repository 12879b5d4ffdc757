"""What the client returns and yields: typed, immutable, decoded with msgspec.

The structs ignore fields they do not know, so a newer server that adds fields
to an answer does not break an older client.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from datetime import UTC
from email.utils import parsedate_to_datetime
from typing import Any, Literal, Self

import msgspec

from wsrelay.client._presence import Join, Leave

UserId = int | str | None
"""A user id: an integer or a string (``42`` and ``"42"`` are the same user), or None."""


class Message(msgspec.Struct, frozen=True):
    """One publication received on a subscription.

    ``offset`` is its place in the topic (1 for the topic's first publication, +1 per
    publication) and ``epoch`` the topic history it belongs to: together they are the
    topic's :class:`Position` after this message. Offsets are comparable only within
    one epoch, and a client sees gaps between them when publications were targeted at
    other users. Both are 0 and ``""`` from a server too old to send them.

    ``message`` is what was published, decoded: a ``str`` for a string (even one
    holding JSON text), else the JSON value (``dict``, ``list``, ``int``, ``float``,
    ``bool`` or ``None``).
    """

    topic: str
    message: Any
    offset: int = 0
    epoch: str = ""


class Position(msgspec.Struct, frozen=True):
    """A place in a topic's stream: the publication at ``offset`` (0: none yet) of
    ``epoch``, a random id of the topic's history that changes when the history is
    lost (e.g. a relay on the memory broker restarted)."""

    offset: int
    epoch: str


class Publish(msgspec.Struct, frozen=True, omit_defaults=True):
    """One message of :meth:`Relay.publish_many`; with ``user_id`` only that user gets it.

    ``idempotency_key``: publishes with the same key on the same topic within the
    server's idempotency window are published once; a repeat answers the first one's
    position (:attr:`Published.duplicate`). Retrying a publish that failed with
    :class:`~wsrelay.client.PublishOutcomeUnknown` with the same key is safe.
    """

    topic: str
    message: Any
    """A string, or any value msgspec encodes as JSON (see :meth:`Relay.publish`)."""
    user_id: UserId = None
    idempotency_key: str | None = None


class Published(int):
    """What :meth:`Relay.publish` and :meth:`Relay.publish_many` return for a message.

    It *is* the recipient count (an ``int``: ``await relay.publish(...) == 1`` works as
    it always did), with the publication's place in its topic added:

    Attributes:
        recipients: connections on the answering node it was handed to (the int's value).
        offset: its offset in the topic.
        epoch: the topic history that offset belongs to.
        duplicate: a publish with the same ``idempotency_key`` was accepted before;
            this one published nothing, and offset and epoch are the first one's.
    """

    offset: int
    epoch: str
    duplicate: bool

    def __new__(cls, recipients: int, offset: int, epoch: str, duplicate: bool = False) -> Self:
        value = super().__new__(cls, recipients)
        value.offset = offset
        value.epoch = epoch
        value.duplicate = duplicate
        return value

    @property
    def recipients(self) -> int:
        """The recipient count, as a plain int."""
        return int(self)

    @property
    def position(self) -> Position:
        """Where the publication is in its topic."""
        return Position(self.offset, self.epoch)

    def __str__(self) -> str:
        # The count, as print(), f-strings and str() always showed it.
        return int.__repr__(self)

    def __repr__(self) -> str:
        more = ", duplicate=True" if self.duplicate else ""
        return (
            f"Published(recipients={int(self)}, offset={self.offset}, epoch={self.epoch!r}{more})"
        )


class ClientPublished(msgspec.Struct, frozen=True):
    """What :meth:`Subscription.publish` returns: the server accepted the client publish
    at ``offset`` in ``epoch`` (its :attr:`position`). ``duplicate``: a publish with the
    same ``idempotency_key`` was accepted before; this one published nothing, and offset
    and epoch are the first one's. There is no recipient count: a client publish is
    answered before it is delivered."""

    offset: int
    epoch: str
    duplicate: bool = False

    @property
    def position(self) -> Position:
        """Where the publication is in its topic."""
        return Position(self.offset, self.epoch)


class Grants(msgspec.Struct, frozen=True, omit_defaults=True):
    """Topic patterns a registration may subscribe and publish to where its namespace
    asks for a grant (``subscribe = "granted"``, ``publish = "granted"`` or
    ``"subscribers"``): ``*`` matches within a ``.``-separated segment, ``>`` as the last
    segment the rest, and ``{user}`` stands for the connection's own user id
    (``"inbox:{user}"``). Sent as ``"grants"`` with ``POST /register``."""

    subscribe: list[str] = []
    publish: list[str] = []


class HistoryItem(msgspec.Struct, frozen=True):
    """One kept publication of :meth:`Relay.history`: its offset, its message (decoded
    as in :class:`Message`), and the user it was published for (as a string; None:
    everyone)."""

    offset: int
    message: Any
    user_id: str | None = None


class History(msgspec.Struct, frozen=True):
    """Answer to ``GET /history``: kept publications of ``topic`` (oldest first, or
    newest first with ``reverse``) and the topic's current position (``offset`` of its
    newest publication, ``epoch``)."""

    topic: str
    offset: int
    epoch: str
    publications: list[HistoryItem]

    @property
    def position(self) -> Position:
        """The topic's current position."""
        return Position(self.offset, self.epoch)


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
    """Reconnect delays: exponential backoff with full jitter, or the server's
    ``Retry-After``.

    Before attempt ``n`` (1, 2, ...) the client waits a random time between 0 and
    ``min(maximum, initial * factor ** (n - 1))`` seconds. The count restarts
    after each successful subscription. ``max_attempts=None`` retries forever.

    When the previous attempt was refused with a ``Retry-After`` header (a 429 or a
    5xx, e.g. 503 ``too_many_connections``, on ``POST /register`` or on the WebSocket
    upgrade) the client waits :meth:`after` instead: the server's value, at most
    ``max_retry_after``, plus a random 0 to ``max(20 % of it, initial)`` seconds, so
    that clients refused together do not come back together. A ``Retry-After`` over
    ``max_retry_after`` (a broken or hostile server's ``1e9``) counts as
    ``max_retry_after``: by default no wait is longer than 360 s.
    """

    initial: float = 0.5
    maximum: float = 30.0
    factor: float = 2.0
    max_attempts: int | None = None
    max_retry_after: float = 300.0

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """The wait before reconnect attempt ``attempt`` (counted from 1)."""
        ceiling = min(self.maximum, self.initial * self.factor ** max(0, attempt - 1))
        return (rng or random).uniform(0.0, ceiling)

    def after(self, retry_after: float, rng: random.Random | None = None) -> float:
        """The wait before the next attempt when the server answered ``Retry-After:
        retry_after`` (seconds): ``min(retry_after, max_retry_after)`` plus a random
        0 to ``max(20 % of that, initial)`` seconds."""
        base = min(max(0.0, retry_after), self.max_retry_after)
        return base + (rng or random).uniform(0.0, max(0.2 * base, self.initial))


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header: a number of seconds (``"120"``;
    decimals are accepted too) or an HTTP date (the time until it, 0 if past). None
    when there is no header or it is neither (negative, ``inf``, garbage), in which
    case the client falls back to its backoff. Not capped: see
    :attr:`Backoff.max_retry_after`."""
    if value is None:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return seconds if math.isfinite(seconds) and seconds >= 0 else None
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:  # "-0000": HTTP dates are GMT anyway
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


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
    ``delay`` seconds. ``close_code`` is None when there was no close frame; ``reason``
    says what failed (e.g. ``"HTTP 503 too_many_connections: …"``). ``retry_after`` is
    the server's ``Retry-After`` (seconds, as sent) when it set ``delay`` (see
    :meth:`Backoff.after`), None when the backoff did."""

    attempt: int
    delay: float
    close_code: int | None
    reason: str
    retry_after: float | None = None


NotRecoveredReason = Literal["epoch_changed", "too_far_behind", "gap"]


@dataclass(frozen=True)
class NotRecovered:
    """Event: publications of ``topic`` may have been missed, so the application should
    reload what it derives from that topic from its own data (or from
    :meth:`Relay.history`).

    A subscription recovers by itself: after every reconnect it asks the server for
    every publication after the last one it delivered, and gets them before the live
    stream, each once. This event says that this failed for one topic:

    * ``"epoch_changed"``: the topic's history was lost (``position.epoch`` differs from
      ``previous.epoch``), e.g. the relay restarted on the memory broker;
    * ``"too_far_behind"``: the history no longer reaches back to ``previous`` (the
      server keeps a bounded history and replays at most 1000 publications);
    * ``"gap"``: while connected, the server reported publications lost on their way to
      this client.

    ``position`` is where the stream continues: the messages that follow come after it.
    ``previous`` is the last position the client had (None only for a gap on a topic
    it had no position for yet). The event arrives before any message after
    ``position``.
    """

    topic: str
    position: Position
    previous: Position | None
    reason: NotRecoveredReason


Event = Subscribed | Reconnecting | NotRecovered | Join | Leave
"""What a subscription's ``on_event`` callback receives (:class:`Join` and :class:`Leave`:
joins and leaves of its topics, where their namespace has ``join_leave``)."""
