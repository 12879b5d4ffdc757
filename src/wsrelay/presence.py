"""The node's part of presence: writing its connections' entries, and joins and leaves.

:class:`PresenceTracker` is told by the :class:`~wsrelay.relay.Relay` when a
connection attaches, detaches or changes its topics, and keeps the presence store
(:class:`~wsrelay.brokers.base.PresenceStore`) up to date: an entry per connection in
each of its topics that keeps presence (:mod:`wsrelay.core.presence`), and one in its
user's set. Where the store says an entry is new (a join) or was removed (a leave)
and the topic's namespace has ``join_leave``, it has the event sent to the topic's
subscribers on every node.

Presence never makes a connection or a command fail: when the store is unreachable
the entries wait for the store's next refresh (its heartbeat writes again every entry
this node holds), and the events of that moment are lost, like any announcement.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

from wsrelay.brokers.base import PresenceStore
from wsrelay.core import presence as rules_of
from wsrelay.core.registry import Client
from wsrelay.core.rules import Rules
from wsrelay.core.schema import JoinFrame, LeaveFrame, PresenceClient
from wsrelay.errors import BrokerUnavailable

log = logging.getLogger("wsrelay")

Announce = Callable[[str, JoinFrame | LeaveFrame, str], Awaitable[None]]
"""Sends a join or leave of a topic to its subscribers on every node, except the client
whose registration id is the last argument."""


class PresenceTracker:
    """See the module docstring. ``node``: this node's id, named in its entries."""

    def __init__(self, store: PresenceStore, rules: Rules, node: str, announce: Announce) -> None:
        self.store = store
        self.rules = rules
        self.node = node
        self._announce = announce
        self._since: dict[str, float] = {}
        """Registration id -> when its connection here opened (Unix seconds)."""

    async def start(self) -> None:
        await self.store.start(self.node)

    async def stop(self) -> None:
        await self.store.stop()

    def _entry(self, client: Client) -> PresenceClient:
        since = self._since.get(client.id)
        if since is None:
            since = self._since[client.id] = time.time()
        return PresenceClient(rules_of.public_id(client.id), client.user, self.node, since)

    async def attached(self, client: Client) -> None:
        """``client``'s connection opened here (or replaced its previous one)."""
        self._since[client.id] = time.time()
        await self._add(client, rules_of.presence_topics(self.rules, client.topics), user=True)

    async def detached(self, client: Client, *, moved: bool = False) -> None:
        """``client`` has no connection here any more. ``moved``: because a newer
        connection opened on another node, which writes the entries now (removing them
        here could overtake its writes: a leave and a join for a connection that stayed)."""
        self._since.pop(client.id, None)
        topics = rules_of.presence_topics(self.rules, client.topics)
        if not moved:
            await self._remove(client, topics, user=True)
            return
        public = rules_of.public_id(client.id)
        for topic in topics:
            self.store.forget(rules_of.topic_set(topic), public)
        if client.user is not None:
            self.store.forget(rules_of.user_set(client.user), public)

    async def topics_changed(self, client: Client, before: Iterable[str]) -> None:
        """The attached ``client``'s topics changed from ``before`` to ``client.topics``."""
        if self.rules.open:
            return
        old = set(before)
        joined = rules_of.presence_topics(self.rules, client.topics - old)
        left = rules_of.presence_topics(self.rules, old - client.topics)
        if joined or left:
            await asyncio.gather(self._add(client, joined), self._remove(client, left))

    async def _add(self, client: Client, topics: Iterable[str], *, user: bool = False) -> None:
        entry = self._entry(client)
        topics = list(topics)
        keys = [rules_of.topic_set(topic) for topic in topics]
        if user and client.user is not None:
            keys.append(rules_of.user_set(client.user))
        if not keys:
            return
        outcomes = await asyncio.gather(
            *(self.store.add(key, entry) for key in keys), return_exceptions=True
        )
        frames = [
            (topic, JoinFrame(topic, client.user, entry.client))
            for topic, new in zip(topics, outcomes, strict=False)
            if new is True and rules_of.announces(self.rules, topic)
        ]
        await self._tell(client, frames, outcomes)

    async def _remove(self, client: Client, topics: Iterable[str], *, user: bool = False) -> None:
        public = rules_of.public_id(client.id)
        topics = list(topics)
        keys = [rules_of.topic_set(topic) for topic in topics]
        if user and client.user is not None:
            keys.append(rules_of.user_set(client.user))
        if not keys:
            return
        outcomes = await asyncio.gather(
            *(self.store.remove(key, public, self.node) for key in keys), return_exceptions=True
        )
        frames = [
            (topic, LeaveFrame(topic, client.user, public))
            for topic, removed in zip(topics, outcomes, strict=False)
            if removed is True and rules_of.announces(self.rules, topic)
        ]
        await self._tell(client, frames, outcomes)

    async def _tell(
        self,
        client: Client,
        frames: Sequence[tuple[str, JoinFrame | LeaveFrame]],
        outcomes: Iterable[Any],
    ) -> None:
        for outcome in outcomes:
            if isinstance(outcome, BrokerUnavailable):
                log.debug("presence not written (the next heartbeat will): %s", outcome)
            elif isinstance(outcome, BaseException):
                raise outcome
        if not frames:
            return
        sent = await asyncio.gather(
            *(self._announce(topic, frame, client.id) for topic, frame in frames),
            return_exceptions=True,
        )
        for outcome in sent:
            if isinstance(outcome, BrokerUnavailable):
                log.debug("a join or leave was not announced: %s", outcome)
            elif isinstance(outcome, BaseException):
                raise outcome
