"""Positions in a topic's stream, the history kept in memory, and the recovery rule.

Every publication on a topic gets an *offset*, one more than the previous one on
that topic, and every topic an *epoch*: a random id made with the topic's
history, and made anew whenever that history is lost (a memory backend that
restarted, Redis restarted empty or flushed, a topic evicted or expired). A
client that remembers ``(epoch, offset)`` of the last publication it saw can
ask for everything after it; :func:`recovered` decides whether the history
still reaches back that far. Offsets are only ever compared within one epoch.

:class:`MemoryHistory` is the memory backend's store of positions and recent
publications, and :class:`IdempotencyCache` its memory of publish keys; the
Redis backend keeps the same in Redis (:mod:`wsrelay.brokers.redis`). Neither
does I/O: time is passed in as a clock.
"""

from __future__ import annotations

import secrets
import sys
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

from wsrelay.core.fanout import Publication

MAX_REPLAY: Final = 1000
"""Most publications one recovery replays per topic; a client further behind is told
``recovered: false`` (it reloads from the application's own data)."""

EPOCH_BYTES: Final = 4
"""An epoch is 8 hex characters: only compared for equality, per topic."""

META_TTL: Final = 86_400
"""Seconds a topic's position (epoch and last offset) outlives its last publication.
Longer than the history, so that a topic quiet for a while keeps its epoch: its
subscribers are not told that something was lost when nothing was."""

ENTRY_OVERHEAD: Final = 160
"""Bytes a stored publication costs besides its message's ``sys.getsizeof`` (the
publication, its tuple, the deque slot), measured with tracemalloc
(bench/history_memory.py); what ``history_memory`` counts."""

TOPIC_OVERHEAD: Final = 1000
"""Bytes a topic's history costs when it holds no publication (measured likewise)."""


@dataclass(frozen=True, slots=True)
class HistoryLimits:
    """How much history a backend keeps (the ``history_*`` and ``idempotency_window``
    settings)."""

    size: int = 100
    """Publications kept per topic; 0 keeps none (no history, no recovery)."""
    ttl: float = 300.0
    """Seconds a publication is kept."""
    memory: int = 64 * 1024 * 1024
    """Bytes the memory backend's history may take in all (Redis: its own maxmemory)."""
    idempotency_window: float = 300.0
    """Seconds a publish's idempotency key is remembered."""


DEFAULT_LIMITS: Final = HistoryLimits()


def new_epoch() -> str:
    return secrets.token_hex(EPOCH_BYTES)


@dataclass(frozen=True, slots=True)
class Position:
    """A place in a topic's stream: the last publication at ``offset`` (0: none yet)."""

    epoch: str
    offset: int


@dataclass(frozen=True, slots=True)
class Receipt:
    """What a publish was given. ``duplicate``: an earlier publish with the same
    idempotency key was given this position, and nothing was published this time."""

    position: Position
    duplicate: bool = False


@dataclass(frozen=True, slots=True)
class HistoryPage:
    """Publications of one topic (each with its offset and epoch) and the topic's
    current position, read together."""

    publications: list[Publication]
    position: Position


def recovered(page: HistoryPage, since: Position, limit: int = MAX_REPLAY) -> bool:
    """Whether ``page``, read oldest first from after ``since.offset``, holds every
    publication since ``since``: the same epoch, nothing newer than the topic, the
    first one kept is the next one, and no more than ``limit`` of them."""
    top = page.position
    if since.epoch != top.epoch or since.offset > top.offset:
        return False
    missed = top.offset - since.offset
    if missed == 0:
        return True
    if missed > limit or not page.publications:
        return False
    return page.publications[0].offset == since.offset + 1


class _Topic:
    __slots__ = ("entries", "epoch", "limit", "offset", "size", "touched")

    def __init__(self, epoch: str, now: float, limit: int) -> None:
        self.epoch = epoch
        self.limit = limit
        """Publications kept (its namespace's history_size, else the setting)."""
        self.offset = 0
        self.entries: deque[tuple[float, Publication]] = deque()
        self.size = TOPIC_OVERHEAD
        self.touched = now


@dataclass
class HistoryStats:
    """Counters for ``/metrics``."""

    evicted_topics: int = 0
    """Topics whose history was dropped to stay within ``memory_limit``."""
    bytes: int = 0
    """What the kept history is estimated to take."""
    evicted_positions: int = 0
    """Positions of topics never published to (asked by a subscription) dropped to stay
    within ``memory_limit``; they are dropped before any topic's publications."""


class MemoryHistory:
    """Each topic's position and its last ``size`` publications for ``ttl`` seconds,
    within ``memory_limit`` bytes in all: past it, the topics published to least
    recently are dropped whole (their next publication starts a new epoch).
    A topic's position is kept :data:`META_TTL` seconds after its last publication.
    """

    def __init__(
        self,
        size: int,
        ttl: float,
        memory_limit: int,
        clock: Callable[[], float] = time.monotonic,
        size_of: Callable[[str], int] | None = None,
    ) -> None:
        self.size = size
        self.size_of = size_of
        """Publications kept per topic if not ``size`` for every topic (namespaces'
        ``history_size``); asked once when a topic's history is made."""
        self.ttl = ttl
        self.memory_limit = memory_limit
        self.stats = HistoryStats()
        self._clock = clock
        self._topics: OrderedDict[str, _Topic] = OrderedDict()  # least recently touched first
        self._bare: OrderedDict[str, _Topic] = OrderedDict()
        """Topics with a position and no publication yet (a subscription asked): kept
        apart and evicted first, so that subscribing to fresh names, which anyone may do,
        never pushes out a topic's publications."""

    def append(self, publication: Publication) -> Publication:
        """Give ``publication`` the topic's next offset, keep it, and return it with
        its position."""
        now = self._clock()
        topic = self._touch(publication.topic, now, publishing=True)
        topic.offset += 1
        stored = Publication(
            publication.topic,
            publication.message,
            publication.user,
            topic.offset,
            topic.epoch,
            publication.skip,
            publication.json,
        )
        if topic.limit > 0:
            entries = topic.entries
            entries.append((now, stored))
            cost = ENTRY_OVERHEAD + sys.getsizeof(stored.message)
            topic.size += cost
            self.stats.bytes += cost
            if len(entries) > topic.limit:
                self._drop_oldest(topic)
            self._evict()
        return stored

    def position(self, topic_name: str) -> Position:
        """The topic's current position; a topic never seen gets its epoch now, so
        that a client told this position can recover from it."""
        topic = self._touch(topic_name, self._clock())
        return Position(topic.epoch, topic.offset)

    def read(
        self, topic_name: str, since: int | None = None, limit: int = 0, reverse: bool = False
    ) -> HistoryPage:
        """Up to ``limit`` kept publications with an offset above ``since`` (all kept
        ones if None), oldest first, or newest first if ``reverse``; and the position."""
        now = self._clock()
        topic = self._touch(topic_name, now)
        self._expire(topic, now)
        position = Position(topic.epoch, topic.offset)
        if limit <= 0:
            return HistoryPage([], position)
        floor = 0 if since is None else since
        kept = [p for _, p in topic.entries if p.offset > floor]
        chosen = kept[-limit:][::-1] if reverse else kept[:limit]
        return HistoryPage(chosen, position)

    def _touch(self, name: str, now: float, *, publishing: bool = False) -> _Topic:
        topics, bare = self._topics, self._bare
        topic = topics.get(name)
        if topic is not None:
            topics.move_to_end(name)
        elif (topic := bare.get(name)) is not None:
            if publishing:
                topics[name] = bare.pop(name)
            else:
                bare.move_to_end(name)
        else:
            self._forget_stale(now)
            limit = self.size if self.size_of is None else self.size_of(name)
            topic = _Topic(new_epoch(), now, limit)
            (topics if publishing else bare)[name] = topic
            self.stats.bytes += topic.size
            self._evict()
        topic.touched = now
        return topic

    def _forget_stale(self, now: float) -> None:
        """Drop topics untouched for META_TTL (the least recently touched come first)."""
        for topics in (self._bare, self._topics):
            while topics:
                name, oldest = next(iter(topics.items()))
                if now - oldest.touched < META_TTL:
                    break
                del topics[name]
                self.stats.bytes -= oldest.size

    def _expire(self, topic: _Topic, now: float) -> None:
        entries = topic.entries
        while entries and now - entries[0][0] > self.ttl:
            self._drop_oldest(topic)

    def _drop_oldest(self, topic: _Topic) -> None:
        _, publication = topic.entries.popleft()
        cost = ENTRY_OVERHEAD + sys.getsizeof(publication.message)
        topic.size -= cost
        self.stats.bytes -= cost

    def _evict(self) -> None:
        if self.stats.bytes <= self.memory_limit:
            return
        bare = self._bare
        while self.stats.bytes > self.memory_limit and len(bare) > 1:
            _, oldest = bare.popitem(last=False)
            self.stats.bytes -= oldest.size
            self.stats.evicted_positions += 1
        topics = self._topics
        while self.stats.bytes > self.memory_limit and len(topics) > 1:
            name, oldest = next(iter(topics.items()))
            del topics[name]
            self.stats.bytes -= oldest.size
            self.stats.evicted_topics += 1
        # One topic alone over the limit keeps its newest publications only.
        last = next(iter(topics.values()), None)
        while self.stats.bytes > self.memory_limit and last is not None and last.entries:
            self._drop_oldest(last)


@dataclass
class IdempotencyCache:
    """The receipts of publishes made with an idempotency key in the last ``window``
    seconds, at most ``capacity`` of them (the oldest forgotten first)."""

    window: float
    capacity: int = 100_000
    clock: Callable[[], float] = time.monotonic
    _seen: OrderedDict[tuple[str, str], tuple[float, Receipt]] = field(default_factory=OrderedDict)

    def get(self, topic: str, key: str) -> Receipt | None:
        self._expire()
        found = self._seen.get((topic, key))
        return None if found is None else Receipt(found[1].position, duplicate=True)

    def put(self, topic: str, key: str, receipt: Receipt) -> None:
        self._seen[(topic, key)] = (self.clock(), receipt)
        while len(self._seen) > self.capacity:
            self._seen.popitem(last=False)

    def _expire(self) -> None:
        seen, now = self._seen, self.clock()
        while seen:
            made, _ = next(iter(seen.values()))
            if now - made < self.window:
                break
            seen.popitem(last=False)
