"""One order on every node: what the Redis broker hands its listener, and when.

Pub/sub brings a topic's publications in offset order, but loses whatever is
published while a node's connection is down, and knows nothing of a Redis that
restarted empty. :class:`Sequencer` remembers, per subscribed topic, the epoch
and last offset handed over, and fills what pub/sub lost from the topic's
stream before handing over anything newer:

* a live offset above the next one: the missing ones are read from the stream
  first;
* after a reconnect (:meth:`Sequencer.catch_up`): each topic's stream is read
  from the next offset;
* a new epoch (the node knew E1, now sees E2: Redis restarted, even from a
  snapshot, or was flushed, or the topic's keys expired): the listener is told
  ``gap(topic, E2, k)`` and gets E2's publications from ``k + 1``, where ``k``
  is 0 unless the stream no longer holds the first ones;
* entries the stream no longer holds (trimmed, expired, another new epoch):
  ``gap(topic, epoch, last missing offset)`` before the next one handed over.

Nothing is handed over twice or out of order, and nothing is skipped without a
``gap``. A topic whose history is gone altogether keeps its old epoch here, so
that the new epoch's first publication is reported as a gap.

A topic is handled alike whether it arrived on its own channel or through a pattern
(the node may get it by both: the second copy is dropped as handed over already).

A topic on which nothing arrived yet since it was subscribed has no position;
the positions the node answers clients (:meth:`Sequencer.floor`, from history
reads made after subscribing) say where a catch-up starts for it. A floor that
is an empty position (the topic had no publication: no epoch of its own) is
continued by the topic's next epoch from offset 1 without a gap if the broker
vouches for it after the read (:data:`Vouch`), and is a gap like any other
epoch change otherwise.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import TypeAlias

log = logging.getLogger("wsrelay.redis")

Entries: TypeAlias = list[tuple[int, bytes]]
"""Stream entries as ``(offset, payload)``, oldest first."""

Read: TypeAlias = Callable[[str, str, int, int | None], Awaitable[tuple[str | None, int, Entries]]]
"""``read(topic, epoch, first, last)``: the topic's current epoch (None if its history is
gone), its last offset, and its entries from ``first`` to ``last`` (None: to the end), or
from 1 if the epoch is not ``epoch``."""

Hand: TypeAlias = Callable[[str, str, int, bytes], None]
"""``hand(topic, epoch, offset, payload)``: give the listener one publication."""

Gap: TypeAlias = Callable[[str, str, int], None]
"""``gap(topic, epoch, offset)``: tell the listener publications before ``offset + 1``
were lost."""

Vouch: TypeAlias = Callable[[list[str]], Awaitable[set[str]]]
"""``vouch(epochs)``: those of ``epochs`` that are empty positions nothing can have been
lost since (so a topic's next epoch continues them from offset 1), asked after the read."""


class Sequencer:
    """Per topic, the position handed over last; see the module docstring. Calls are
    made one at a time (from the broker's listening task), so the positions cannot
    change under a read."""

    def __init__(self, read: Read, hand: Hand, gap: Gap, vouch: Vouch | None = None) -> None:
        self._read = read
        self._hand_over = hand
        self._tell_gap = gap
        self._vouch = vouch
        self.positions: dict[str, tuple[str, int]] = {}
        """topic -> (epoch, offset) handed over (or declared lost) last."""
        self.floors: dict[str, tuple[str, int]] = {}
        """topic -> a position nothing after which was handed over yet (no position)."""

    def floor(self, topic: str, epoch: str, offset: int) -> None:
        """The topic (subscribed) was at ``(epoch, offset)`` after the subscription
        took effect: a catch-up before anything arrives starts there."""
        if topic not in self.positions:
            self.floors.setdefault(topic, (epoch, offset))

    def forget(self, topic: str) -> None:
        """Unsubscribed: its positions no longer mean anything."""
        self.positions.pop(topic, None)
        self.floors.pop(topic, None)

    def topics(self) -> list[str]:
        """The topics it holds a position or a floor for."""
        return [*self.positions, *(t for t in self.floors if t not in self.positions)]

    def clear(self) -> None:
        self.positions.clear()
        self.floors.clear()

    async def live(self, topic: str, epoch: str, offset: int, payload: bytes) -> None:
        """A publication from pub/sub: hand over what is missing before it, then it."""
        known = self.positions.get(topic)
        if known is None:
            # The first since subscribing: nothing before it was this node's business.
            self._hand(topic, epoch, offset, payload)
            return
        known_epoch, last = known
        if epoch == known_epoch:
            if offset <= last:
                return  # handed over already (a catch-up read it first)
            if offset > last + 1:
                await self._fill(topic, epoch, last + 1, offset - 1, lost=False)
        else:
            await self._fill(topic, epoch, 1, offset - 1, lost=True)
        self._hand(topic, epoch, offset, payload)

    async def catch_up(self, topics: Iterable[str], read_all: ReadAll) -> None:
        """After (re)connecting, subscribed again: hand over what each topic got
        meanwhile (its publications since the last one handed over)."""
        known = [
            (topic, start)
            for topic in topics
            if (start := self.positions.get(topic) or self.floors.get(topic)) is not None
        ]
        if not known:
            return
        answers = await read_all([(t, epoch, last + 1) for t, (epoch, last) in known])
        moved = [
            epoch
            for (_, (epoch, _)), (current, _, _) in zip(known, answers, strict=True)
            if current is not None and current != epoch
        ]
        continued = await self._vouch(moved) if moved and self._vouch is not None else set()
        for (topic, (epoch, last)), (current, top, entries) in zip(known, answers, strict=True):
            if current is None:
                continue  # history gone: the new epoch's first publication says so
            if current == epoch:
                self._advance(topic, epoch, last + 1, entries, top, lost=False)
            else:
                self._advance(topic, current, 1, entries, top, lost=epoch not in continued)

    async def _fill(self, topic: str, epoch: str, first: int, last: int, *, lost: bool) -> None:
        entries: Entries = []
        if last >= first:
            current, _, entries = await self._read(topic, epoch, first, last)
            if current != epoch:
                entries = []  # yet another epoch since: those are gone
        self._advance(topic, epoch, first, entries, last, lost=lost)

    def _advance(
        self, topic: str, epoch: str, expected: int, entries: Entries, upto: int, *, lost: bool
    ) -> None:
        """Hand over ``entries`` of ``epoch`` from offset ``expected`` on, reaching
        ``upto``; a gap where one is missing (and first, if ``lost``)."""
        for offset, payload in entries:
            if offset < expected:
                continue
            if offset > expected or lost:
                self._gap(topic, epoch, offset - 1)
                lost = False
            self._hand(topic, epoch, offset, payload)
            expected = offset + 1
        if upto >= expected or lost:
            self._gap(topic, epoch, max(upto, expected - 1))

    def _gap(self, topic: str, epoch: str, offset: int) -> None:
        log.info("lost publications of %s: the stream continues after %s/%d", topic, epoch, offset)
        self.positions[topic] = (epoch, offset)
        self.floors.pop(topic, None)
        self._tell_gap(topic, epoch, offset)

    def _hand(self, topic: str, epoch: str, offset: int, payload: bytes) -> None:
        self.positions[topic] = (epoch, offset)
        self.floors.pop(topic, None)
        self._hand_over(topic, epoch, offset, payload)


ReadAll: TypeAlias = Callable[
    [list[tuple[str, str, int]]], Awaitable[list[tuple[str | None, int, Entries]]]
]
"""``read_all([(topic, epoch, first), ...])``: :data:`Read` for several topics at once,
each to the end."""
