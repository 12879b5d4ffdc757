"""The Redis backend: many processes and machines act as one relay.

Publications: one script, pub/sub for speed, a stream for what pub/sub loses
-----------------------------------------------------------------------------
Each publish runs one Lua script (:mod:`wsrelay.brokers.redis_scripts`), atomically:
it answers a repeated idempotency key with the first publish's position, or takes
the topic's next *offset* (an epoch per topic history), appends the publication to
the topic's stream (the last ``history_size``), and ``PUBLISH``-es it with its
position to the topic's channel. Every node subscribed to the topic, the
publishing one included, hands it to its listener from that channel: the
channel carries a topic's publications in offset order, so every node hands
them over in the same order (:mod:`wsrelay.brokers.redis_order` fills from the
stream what pub/sub lost, and says ``gap`` where the stream cannot).

Publishes go in batches on one connection, one batch at a time (in order): those
made while a batch is on its way go together in the next one. They are never
retried by the client. A publish Redis certainly did not get fails with
:class:`~wsrelay.errors.BrokerUnavailable`; one sent whose answer did not come
with :class:`~wsrelay.errors.PublishOutcomeUnknown` (retry with the same
idempotency key). :class:`~wsrelay.brokers.redis_probe.HealthProbe` pings Redis
twice a second: while it gets no answer the node is unhealthy (``/ready`` 503),
publishes fail at once, and those in flight fail as soon as it says so.

A topic never published has no keys, and reading its position creates none (anyone may
subscribe to fresh names): it is answered an *empty position* naming Redis's generation
(one key for the whole Redis, made anew when Redis lost or evicted keys or restarted) and
time, which :meth:`RedisBroker.recover` trusts while neither can have let a later epoch
of the topic go (docs/decisions/0008). A topic's position is trusted only in the Redis
process that made it (the scripts compare Redis's ``run_id``): a Redis restarted, even from
a snapshot that lacks the last offsets given, starts new epochs rather than give them again.

Announcements (:meth:`RedisBroker.announce`, the relay's "connected elsewhere"
signal) are a bare ``PUBLISH`` on the topic's channel, ``"- - <data>"``: no
position, no stream, not handed to the node that made them.

Subscribing costs one command for many topics: the topics asked for while the
previous ``SUBSCRIBE`` or ``UNSUBSCRIBE`` was being written go together in the
next one (in the order asked), and each caller waits for the confirmations of its
own.

Subscription patterns (``news.*``, ``news.>``) go to Redis as ``PSUBSCRIBE`` of the
glob ``wsrelay:{news.*}:live`` (both: Redis's ``*`` also matches ``.``, so a glob
is wider than its patterns and what arrives is filtered with
:func:`wsrelay.core.patterns.matches`): a node receives only the topics it serves. A
publication reaching the node by several routes (its topic's channel and one or more
globs) is handed over once: the :class:`~wsrelay.brokers.redis_order.Sequencer` orders
a topic's publications by offset whichever route brought them (a ``pmessage`` names
the channel, so the topic) and drops those handed over already; an announcement,
which has no offset, is taken from one route only (the topic's channel if subscribed,
else the least glob matching). The Sequencer remembers a position per topic that
arrived through a pattern until that pattern is unsubscribed. Every other command goes through
:class:`~wsrelay.brokers.redis_client.Commands`, pipelined with whatever else the
node is sending (docs/decisions/0006). Registrations are kept by
:mod:`wsrelay.brokers.redis_registrations`, over the same client.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Final

import msgspec
import redis.asyncio as aioredis
from redis.exceptions import NoScriptError, RedisError, ResponseError

from wsrelay.brokers import redis_scripts as scripts
from wsrelay.brokers.base import Backend, Listener
from wsrelay.brokers.redis_client import (
    DEFAULT_POOL_SIZE,
    DEFAULT_TIMEOUT,
    FAILURES,
    Commands,
    make_client,
    pubsub_client,
    send_pipeline,
    unavailable,
)
from wsrelay.brokers.redis_nodes import RedisNodes
from wsrelay.brokers.redis_order import Entries, Sequencer
from wsrelay.brokers.redis_presence import RedisPresence
from wsrelay.brokers.redis_probe import HealthProbe
from wsrelay.brokers.redis_registrations import RedisRegistrations
from wsrelay.core.fanout import Publication
from wsrelay.core.history import (
    DEFAULT_LIMITS,
    META_TTL,
    HistoryLimits,
    HistoryPage,
    Position,
    Receipt,
    new_epoch,
)
from wsrelay.core.patterns import is_pattern
from wsrelay.core.schema import EMPTY_EPOCH_PREFIX
from wsrelay.core.topics import PatternIndex
from wsrelay.errors import BrokerUnavailable, PublishOutcomeUnknown

__all__ = ["Commands", "RedisBroker", "RedisRegistrations", "make_client", "redis_backend"]

log = logging.getLogger("wsrelay.redis")

RECONNECT_DELAYS = (0.05, 0.1, 0.2, 0.5, 1.0)
"""Seconds between attempts to reconnect the subscriber connection (the last repeats)."""

SUBSCRIBE_TIMEOUT = 2.0
"""Seconds :meth:`RedisBroker.subscribe` waits for Redis to confirm a subscription."""

SUBSCRIBE_BATCH = 1000
"""Channels named in one ``SUBSCRIBE`` or ``UNSUBSCRIBE`` at most."""

CLOSE_TIMEOUT = 1.0
"""Seconds closing connections may take (a TLS close to a dead Redis may never end)."""

ANNOUNCED = b"-"
"""The epoch and offset of an announcement: it has neither."""

EMPTY_LIFETIME_MS: Final = META_TTL * 1000
"""Milliseconds (Redis's clock) an empty position is vouched for: an epoch made after it
lives at least META_TTL (every node's ``max(history_ttl, META_TTL)``), so none can have
expired within that time."""


CLOCK_SLACK_MS: Final = 60_000
"""Milliseconds an empty position's time may be off Redis's clock as last read (the
read's round trip, the probe's period) before it is refused without asking Redis."""


def empty_epoch(epoch: str) -> tuple[str, int] | None:
    """``(generation, Redis's time in ms)`` of an empty position's epoch
    (``g:<generation>:<ms>``, see :meth:`RedisBroker.history`), or None for any other
    epoch (a topic's own are 8 hex characters)."""
    if not epoch.startswith(EMPTY_EPOCH_PREFIX):
        return None
    generation, _, born = epoch[len(EMPTY_EPOCH_PREFIX) :].rpartition(":")
    if not generation or not born.isascii() or not born.isdigit() or len(born) > 15:
        return None
    return generation, int(born)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class _Data(msgspec.Struct, array_like=True):
    """A publication as stored and sent: who published it, for whom, what."""

    origin: str
    user: str | None
    message: str
    skip: str | None = None  # a client it must not reach (optional: older payloads lack it)
    json: bool = False
    """``message`` is JSON text (Publication.json); only JSON payloads carry it."""


_encode = msgspec.json.Encoder().encode
_decode_data = msgspec.json.Decoder(_Data).decode


def _payload(origin: str, publication: Publication) -> bytes:
    """``publication`` as stored and sent, from node ``origin``: ``[origin, user, message,
    skip]`` as before JSON messages existed (so string payloads are what they were, and
    nodes of either version read them), with ``true`` added when the message is JSON text.
    JSON text goes as a string: a node never parses the value it carries."""
    p = publication
    if p.json:
        return _encode((origin, p.user, p.message, p.skip, True))
    return _encode((origin, p.user, p.message, p.skip))


def _entries(raw: list[Any]) -> Entries:
    """Stream entries as a script answers them (``[id, [field, value, ...]]``)."""
    entries: Entries = []
    for entry_id, fields in raw:
        offset = int(entry_id.rsplit(b"-", 1)[1])
        entries.append((offset, fields[fields.index(b"d") + 1]))
    return entries


def publish_command(
    publication: Publication, key: str | None, *, origin: str, size: int, limits: HistoryLimits
) -> tuple[Any, ...]:
    """The ``EVALSHA`` of :data:`~wsrelay.brokers.redis_scripts.PUBLISH` that publishes
    ``publication`` (with idempotency ``key``, if given) from ``origin``, keeping ``size``
    publications of its topic: what a node sends, and :mod:`wsrelay.emitter` too."""
    topic = publication.topic
    names: tuple[str, ...] = scripts.keys(topic)
    if key is not None:
        names = (*names, scripts.idempotency_key(topic, key))
    return (
        "EVALSHA",
        scripts.PUBLISH.sha,
        len(names),
        *names,
        _payload(origin, publication),
        new_epoch(),
        size,
        max(1, int(limits.ttl * 1000)),
        int(max(limits.ttl, META_TTL) * 1000),
        scripts.channel(topic),
        max(1, int(limits.idempotency_window * 1000)),
    )


def glob(pattern: str) -> str:
    """The Redis glob whose channels include those of every topic ``pattern`` matches
    (and more: its ``*`` also matches ``.``)."""
    return scripts.channel(pattern.replace(">", "*"))


def redis_backend(
    url: str,
    *,
    registration_ttl: float,
    history: HistoryLimits = DEFAULT_LIMITS,
    pool_size: int = DEFAULT_POOL_SIZE,
    timeout: float = DEFAULT_TIMEOUT,
    history_size: Callable[[str], int] | None = None,
    presence_ttl: float = 30.0,
) -> Backend:
    """A broker, a registration store and a presence store sharing one Redis client for
    ``url`` (presence entries expire ``presence_ttl`` after their node's last heartbeat): at most
    ``pool_size`` connections for commands, one more for publishes (sent in order),
    one for pub/sub and one for the health probe; ``timeout`` bounds every command.
    ``history_size``: publications kept per topic, if not ``history.size`` for all."""
    client = make_client(url, pool_size=pool_size + 1, timeout=timeout)
    commands = Commands(client, lanes=pool_size, timeout=timeout)
    registrations = RedisRegistrations(commands, int(registration_ttl))
    broker = RedisBroker(commands, history, registrations, history_size)
    presence = RedisPresence(commands, presence_ttl)
    return Backend(broker, registrations, presence, RedisNodes(commands, presence_ttl))


class _Pending:
    __slots__ = ("command", "done")

    def __init__(self, command: tuple[Any, ...], done: asyncio.Future[Receipt]) -> None:
        self.command = command
        self.done = done


class RedisBroker:
    """A :class:`~wsrelay.brokers.base.Broker` over Redis; see the module docstring."""

    def __init__(
        self,
        client: aioredis.Redis | Commands,
        history: HistoryLimits = DEFAULT_LIMITS,
        registrations: RedisRegistrations | None = None,
        history_size: Callable[[str], int] | None = None,
    ) -> None:
        self._commands = client if isinstance(client, Commands) else Commands.over(client)
        self._size_of = history_size
        self._client = self._commands.client
        self._subscriber = pubsub_client(self._client)
        self._limits = history
        self._history_ms = max(1, int(history.ttl * 1000))
        self._meta_ms = int(max(history.ttl, META_TTL) * 1000)
        self._window_ms = max(1, int(history.idempotency_window * 1000))
        self._registrations = registrations
        self._generation: str | None = None
        """Redis's generation (:data:`~wsrelay.brokers.redis_scripts.GENERATION`) as last
        read: the probe reads it again after every PONG."""
        self._redis_clock: float | None = None
        """Redis's time in ms minus this node's monotonic clock in ms, as last read."""
        self._generation_waiting: asyncio.Future[tuple[str, int]] | None = None
        self._probe = HealthProbe(
            self._client,
            self._probe_verdict,
            also=(self._generation_command, self._generation_read),
        )
        self._batch: list[_Pending] = []
        self._in_flight: list[_Pending] = []
        self._sender: asyncio.Task[None] | None = None
        self._topics: set[str] = set()
        self._patterns: PatternIndex[str] = PatternIndex()
        """Subscribed patterns, each held by itself."""
        self._globs: dict[str, set[str]] = {}
        """glob -> the subscribed patterns it stands for (``news.*`` and ``news.>`` share
        one)."""
        self._sequencer = Sequencer(self._read, self._hand, self._gap, self._vouched)
        self._pubsub: Any = None
        self._pubsub_ready = asyncio.Event()
        """Set once the current pub/sub connection made its first SUBSCRIBE: redis-py
        opens the connection on the first command, so nothing else may send one before."""
        self._task: asyncio.Task[None] | None = None
        self._connected = asyncio.Event()
        """Set while the pub/sub connection is up and caught up."""
        self._up = asyncio.Event()
        """Set while :attr:`healthy`."""
        self._confirmations: dict[bytes, list[asyncio.Future[None]]] = {}
        self._pubsub_requests: list[tuple[str, list[str]]] = []  # (command, channels), in order
        self._pubsub_writer: asyncio.Task[None] | None = None
        self._listener: Listener | None = None
        self._origin = ""
        self._last_error: str | None = None

    @property
    def healthy(self) -> bool:
        """Subscribed and caught up, and Redis answered the last PING in time."""
        return self._connected.is_set() and self._probe.up

    async def start(self, listener: Listener, origin: str) -> None:
        """Start listening; waits briefly for Redis but starts (unhealthy) without it."""
        self._listener, self._origin = listener, origin
        self._task = asyncio.create_task(self._listen_forever(), name="wsrelay-redis")
        self._probe.start()
        if self._registrations is not None:
            self._registrations.start()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5):
                await self._up.wait()
        if not self.healthy:
            log.warning(
                "broker down: Redis is unreachable (%s); retrying in the background",
                self._last_error or "no answer yet",
            )

    async def stop(self) -> None:
        self._up.clear()  # going away is not an outage: no "broker down" on the way out
        if self._registrations is not None:
            await self._registrations.stop()
        await self._probe.stop()
        sender = self._sender
        self._fail_publishes(BrokerUnavailable("the relay is shutting down"))
        for task in (self._task, sender, self._pubsub_writer):
            if task is not None:
                task.cancel()
                # Bounded: shutting down must not wait on a connection to a dead Redis.
                done, _ = await asyncio.wait({task}, timeout=CLOSE_TIMEOUT)
                if not done:
                    log.debug("%s did not stop within %g s", task.get_name(), CLOSE_TIMEOUT)
                elif not task.cancelled() and task.exception() is not None:
                    log.debug("%s ended with %r", task.get_name(), task.exception())
        self._task = None
        self._pubsub_requests.clear()
        await self._commands.stop()
        self._listener = None
        self._connected.clear()
        self._up.clear()
        self._topics.clear()
        self._patterns = PatternIndex()
        self._globs.clear()
        self._sequencer.clear()
        for client in (self._client, self._subscriber):
            # Bounded: closing TLS connections to a dead Redis can wait forever.
            with contextlib.suppress(RedisError, OSError, TimeoutError):
                async with asyncio.timeout(CLOSE_TIMEOUT):
                    await client.aclose()

    def _health_changed(self, reason: str) -> None:
        if self.healthy == self._up.is_set():
            return
        if self.healthy:
            self._up.set()
            log.info("broker up: connected to Redis")
        else:
            self._up.clear()
            log.warning("broker down: %s", reason)

    def _probe_verdict(self, up: bool, reason: str) -> None:
        if not up:
            # Publishes in flight may never be answered (a stalled Redis): say so now
            # rather than after broker_timeout. The connection they went on is dropped.
            self._fail_publishes(None)
        self._health_changed(f"Redis does not answer ({reason})")

    # -- subscriptions --------------------------------------------------------------------

    async def subscribe(self, *topics: str) -> None:
        """Returns once Redis confirmed every one of ``topics``, so that a client told it
        is subscribed gets every publication from then on (or after a timeout, if Redis
        is down; the listener subscribes again when it reconnects)."""
        channels, globs = [], []
        for name in topics:
            if is_pattern(name):
                self._patterns.add(name, name)
                globs.append(glob(name))
                self._globs.setdefault(globs[-1], set()).add(name)
            else:
                self._topics.add(name)
                channels.append(scripts.channel(name))
        if self._pubsub is None or not topics:
            return
        loop = asyncio.get_running_loop()
        waiting: list[tuple[bytes, asyncio.Future[None]]] = []
        for name in (*channels, *globs):  # a glob cannot be a channel's name: it has a *
            confirmed: asyncio.Future[None] = loop.create_future()
            self._confirmations.setdefault(name.encode(), []).append(confirmed)
            waiting.append((name.encode(), confirmed))
        if channels:
            self._request("subscribe", channels)
        if globs:
            self._request("psubscribe", globs)
        try:
            async with asyncio.timeout(SUBSCRIBE_TIMEOUT):
                await asyncio.gather(*(confirmed for _, confirmed in waiting))
        except TimeoutError:
            log.debug("subscriptions to %d topic(s) not confirmed yet", len(topics))
        finally:
            for channel_key, confirmed in waiting:
                futures = self._confirmations.get(channel_key)
                if futures is not None:
                    futures.remove(confirmed)
                    if not futures:
                        del self._confirmations[channel_key]

    async def unsubscribe(self, *topics: str) -> None:
        channels, globs = [], []
        patterns = False
        for name in topics:
            if is_pattern(name):
                if not self._patterns.discard(name, name):
                    continue
                patterns = True
                held = self._globs.get(glob(name))
                if held is not None:
                    held.discard(name)
                    if not held:
                        del self._globs[glob(name)]
                        globs.append(glob(name))
            else:
                self._topics.discard(name)
                channels.append(scripts.channel(name))
                if not self._serves(name):
                    self._sequencer.forget(name)
        if patterns:
            # Topics that came through a pattern alone are no longer this node's business.
            for topic in self._sequencer.topics():
                if not self._serves(topic):
                    self._sequencer.forget(topic)
        if self._pubsub is not None:
            if channels:
                self._request("unsubscribe", channels)
            if globs:
                self._request("punsubscribe", globs)

    def _serves(self, topic: str) -> bool:
        """Whether this node is subscribed to ``topic``, by name or by a pattern."""
        return topic in self._topics or (bool(self._patterns) and self._patterns.matches_any(topic))

    def _request(self, command: str, channels: list[str]) -> None:
        """Queue a (UN)SUBSCRIBE: merged with the one queued last if it is the same
        command, written by one task, in order."""
        requests = self._pubsub_requests
        if requests and requests[-1][0] == command:
            requests[-1][1].extend(channels)
        else:
            requests.append((command, channels))
        if self._pubsub_writer is None or self._pubsub_writer.done():
            self._pubsub_writer = asyncio.create_task(
                self._write_requests(), name="wsrelay-redis-subscribe"
            )

    async def _write_requests(self) -> None:
        requests = self._pubsub_requests
        while requests:
            if not self._pubsub_ready.is_set():
                await self._pubsub_ready.wait()  # requests dropped meanwhile are gone
                continue
            command, channels = requests.pop(0)
            pubsub = self._pubsub
            try:
                for start in range(0, len(channels), SUBSCRIBE_BATCH):
                    chunk = channels[start : start + SUBSCRIBE_BATCH]
                    await getattr(pubsub, command)(*chunk)  # (p)(un)subscribe
            except (RedisError, OSError) as exc:
                log.debug("%s skipped, Redis is down: %s", command, exc)
                if command in ("subscribe", "psubscribe"):
                    self._confirm_all(channels)  # don't wait: resubscribed on reconnect

    def _drop_requests(self) -> None:
        """The pub/sub connection is gone: the next one subscribes to ``self._topics``,
        which every request queued so far is already part of."""
        for command, channels in self._pubsub_requests:
            if command in ("subscribe", "psubscribe"):
                self._confirm_all(channels)
        self._pubsub_requests.clear()

    def _confirm_all(self, channels: list[str]) -> None:
        for name in channels:
            for confirmed in self._confirmations.get(name.encode(), ()):
                if not confirmed.done():
                    confirmed.set_result(None)

    # -- publishing -----------------------------------------------------------------------

    async def publish(self, publication: Publication, key: str | None = None) -> Receipt:
        """Publishes made while a batch is on its way to Redis wait and go together in
        the next one: one round trip for many publishes (Centrifugo's smart batching)."""
        return await self._enqueue(publication, key)

    async def publish_many(
        self, publications: Sequence[Publication], keys: Sequence[str | None] | None = None
    ) -> list[Receipt | Exception]:
        """All of them in the next batch, in order; waiting on futures, not one task each."""
        keys = keys if keys is not None else [None] * len(publications)
        waiting = [self._enqueue(p, k) for p, k in zip(publications, keys, strict=True)]
        outcomes = await asyncio.gather(*waiting, return_exceptions=True)
        return [o if isinstance(o, Receipt | Exception) else unavailable(o) for o in outcomes]

    async def announce(self, publication: Publication) -> None:
        """One ``PUBLISH``, pipelined with the node's other commands; no stream."""
        data = _payload(self._origin, publication)
        try:
            await self._commands.call(
                "PUBLISH",
                scripts.channel(publication.topic),
                ANNOUNCED + b" " + ANNOUNCED + b" " + data,
            )
        except FAILURES as exc:
            raise unavailable(exc) from None

    def _enqueue(self, publication: Publication, key: str | None) -> asyncio.Future[Receipt]:
        done: asyncio.Future[Receipt] = asyncio.get_running_loop().create_future()
        if not self._probe.up:  # (a pub/sub reconnect alone does not stop publishes)
            done.set_exception(
                BrokerUnavailable(
                    "Redis is unreachable or stalled (it did not answer the last check); "
                    "nothing was published, try again"
                )
            )
            return done
        command = publish_command(
            publication,
            key,
            origin=self._origin,
            size=self._size(publication.topic),
            limits=self._limits,
        )
        self._batch.append(_Pending(command, done))
        if self._sender is None or self._sender.done():
            self._sender = asyncio.create_task(self._send_batches(), name="wsrelay-redis-pub")
        return done

    async def _send_batches(self) -> None:
        while self._batch:
            batch, self._batch = self._batch, []
            self._in_flight = batch
            try:
                replies = await self._run_scripts([p.command for p in batch])
            except BrokerUnavailable as exc:
                replies = [exc] * len(batch)
            finally:
                if self._in_flight is batch:
                    self._in_flight = []
            if any(isinstance(reply, BrokerUnavailable) for reply in replies):
                self._probe.kick()  # is Redis gone, or only this connection?
            for pending, reply in zip(batch, replies, strict=True):
                if pending.done.done():
                    continue  # the publisher went away, or the probe failed it
                if isinstance(reply, BrokerUnavailable):
                    pending.done.set_exception(reply)
                elif isinstance(reply, ResponseError):
                    pending.done.set_exception(
                        BrokerUnavailable(f"Redis refused the publish ({reply}); try again")
                    )
                else:
                    at, repeat = reply
                    epoch, offset = at.split(b" ")
                    position = Position(epoch.decode(), int(offset))
                    pending.done.set_result(Receipt(position, duplicate=bool(repeat)))

    async def _run_scripts(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """Send ``commands`` (EVALSHA) on one connection, in order; if Redis lost the
        script, load it and send those again (NOSCRIPT means nothing ran)."""
        replies = await send_pipeline(self._client, commands)
        lost = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
        if lost:
            load = ("SCRIPT", "LOAD", scripts.PUBLISH.source)
            again = await send_pipeline(self._client, [load, *(commands[i] for i in lost)])
            for i, reply in zip(lost, again[1:], strict=True):
                replies[i] = reply
        return replies

    def _fail_publishes(self, reason: BrokerUnavailable | None) -> None:
        """Fail every publish not answered yet: those sent as PublishOutcomeUnknown,
        those queued as BrokerUnavailable (``reason``, if given); stop the sender."""
        sent, self._in_flight = self._in_flight, []
        queued, self._batch = self._batch, []
        if self._sender is not None and not self._sender.done():
            self._sender.cancel()  # its connection is dropped: replies would be out of step
        self._sender = None
        for pending in sent:
            if not pending.done.done():
                pending.done.set_exception(
                    PublishOutcomeUnknown(
                        "Redis stopped answering after the publish was sent: it may have "
                        "been published; retry with the same idempotency_key"
                    )
                )
        for pending in queued:
            if not pending.done.done():
                pending.done.set_exception(
                    reason or BrokerUnavailable("Redis stopped answering; nothing was published")
                )

    # -- history --------------------------------------------------------------------------

    def _size(self, topic: str) -> int:
        """Publications kept for ``topic`` (its namespace's ``history_size``, if set)."""
        return self._limits.size if self._size_of is None else self._size_of(topic)

    async def history(
        self, topic: str, *, since: int | None = None, limit: int = 0, reverse: bool = False
    ) -> HistoryPage:
        """A topic without a position in Redis (never published, or its position lost) is
        answered the *empty position* ``g:<generation>:<ms>`` at offset 0, and nothing is
        stored for it: the generation this node knew before the read, and Redis's time
        then. :meth:`recover` vouches for it while nothing can have been lost since."""
        size = self._size(topic)
        try:
            # Read before the topic, so that an unchanged generation afterwards means
            # nothing was lost from before the read on.
            generation = self._generation or (await self._generation_shared())[0]
            reply = await self._commands.script(
                scripts.HISTORY,
                scripts.keys(topic),
                (
                    self._meta_ms,
                    max(0, since or 0),
                    limit if size > 0 else 0,
                    1 if reverse else 0,
                    size,
                    self._history_ms,
                ),
            )
        except FAILURES as exc:
            raise unavailable(exc) from None
        epoch_bytes, top, raw, *born = reply
        epoch = (
            f"{EMPTY_EPOCH_PREFIX}{generation}:{_text(born[0])}" if born else epoch_bytes.decode()
        )
        if topic in self._topics:
            self._sequencer.floor(topic, epoch, top)
        publications = []
        for offset, payload in _entries(raw):
            data = _decode_data(payload)
            publications.append(
                Publication(topic, data.message, data.user, offset, epoch, data.skip, data.json)
            )
        return HistoryPage(publications, Position(epoch, top))

    async def recover(
        self, topic: str, since: Position, limit: int
    ) -> tuple[HistoryPage, Position]:
        """An empty position ``since`` (:meth:`history`) stands for the topic's current
        epoch if Redis's generation did not change since and it is younger than
        :data:`EMPTY_LIFETIME_MS` (both checked after the read): then no epoch of the topic
        can have been lost since it was answered, and the first one made since is the
        current one (or none yet)."""
        page = await self.history(topic, since=since.offset, limit=limit)
        try:
            vouched = await self._vouched([since.epoch])
        except FAILURES as exc:
            raise unavailable(exc) from None
        if not vouched:
            return page, since
        top = page.position
        if empty_epoch(top.epoch) is None:
            return page, Position(top.epoch, since.offset)
        # Still never published: nothing to miss, and the position answered now is as good.
        return page, (top if since.offset == 0 else since)

    async def _vouched(self, epochs: Iterable[str]) -> set[str]:
        """Of ``epochs``, the empty positions' that nothing can have been lost since:
        Redis's generation unchanged (read now, after what they are checked against) and
        younger than :data:`EMPTY_LIFETIME_MS`. No command without an empty position that
        could pass: one naming another generation than the one last read, or a time
        clearly outside the window by Redis's clock as last read, is refused here (a
        forged ``since`` costs Redis nothing). Concurrent calls share one check."""
        empty = {epoch: parsed for epoch in epochs if (parsed := empty_epoch(epoch))}
        known, clock = self._generation, self._redis_clock
        if known is not None and clock is not None:
            now = time.monotonic() * 1000 + clock
            empty = {
                epoch: (made_in, born)
                for epoch, (made_in, born) in empty.items()
                if made_in == known
                and -CLOCK_SLACK_MS <= now - born < EMPTY_LIFETIME_MS + CLOCK_SLACK_MS
            }
        if not empty:
            return set()
        generation, now = await self._generation_shared()
        return {
            epoch
            for epoch, (made_in, born) in empty.items()
            if made_in == generation and 0 <= now - born < EMPTY_LIFETIME_MS
        }

    async def _generation_shared(self) -> tuple[str, int]:
        """:meth:`_generation_now`, one script for every caller that asks before it is
        sent (each asks after its own read, so the script runs after every one of them)."""
        waiting = self._generation_waiting
        if waiting is None:
            waiting = self._generation_waiting = asyncio.get_running_loop().create_future()
            asyncio.get_running_loop().call_soon(self._generation_send, waiting)
        return await asyncio.shield(waiting)

    def _generation_send(self, waiting: asyncio.Future[tuple[str, int]]) -> None:
        self._generation_waiting = None  # who asks from now on needs a later script
        task = asyncio.ensure_future(self._generation_now())

        def done(task: asyncio.Future[tuple[str, int]]) -> None:
            if waiting.done():
                return
            if task.cancelled():
                waiting.cancel()
            elif (exc := task.exception()) is not None:
                waiting.set_exception(exc)
            else:
                waiting.set_result(task.result())

        task.add_done_callback(done)

    async def _generation_now(self) -> tuple[str, int]:
        """Redis's generation (made anew if it changed) and Redis's time in ms."""
        generation, now = await self._commands.script(
            scripts.GENERATION, (scripts.GENERATION_KEY,), (new_epoch(), 1)
        )
        self._generation = _text(generation)
        self._redis_clock = int(now) - time.monotonic() * 1000
        return self._generation, int(now)

    def _generation_command(self) -> tuple[Any, ...]:
        """What the probe sends after each PONG: the generation, made anew if it changed,
        and Redis's time."""
        return ("EVAL", scripts.GENERATION.source, 1, scripts.GENERATION_KEY, new_epoch(), 1)

    def _generation_read(self, reply: Any) -> None:
        self._generation = _text(reply[0])
        self._redis_clock = int(reply[1]) - time.monotonic() * 1000

    async def _read(
        self, topic: str, epoch: str, first: int, last: int | None
    ) -> tuple[str | None, int, Entries]:
        [answer] = await self._read_all([(topic, epoch, first)], last)
        return answer

    async def _read_all(
        self, wanted: list[tuple[str, str, int]], last: int | None = None
    ) -> list[tuple[str | None, int, Entries]]:
        """What the streams of several topics hold from an offset on (one script each,
        pipelined together)."""
        end = "+" if last is None else last
        replies = await asyncio.gather(
            *(
                self._commands.script(
                    scripts.READ,
                    scripts.keys(topic),
                    (epoch, first, end, max(1, self._size(topic))),
                )
                for topic, epoch, first in wanted
            )
        )
        return [
            (None if epoch is None else epoch.decode(), top, _entries(raw))
            for epoch, top, raw in replies
        ]

    # -- what the listener gets -----------------------------------------------------------

    def _hand(self, topic: str, epoch: str, offset: int, payload: bytes) -> None:
        try:
            data = _decode_data(payload)
        except msgspec.DecodeError:
            log.warning("dropped an unreadable publication on %s (offset %d)", topic, offset)
            return
        if self._listener is not None:
            try:
                self._listener.publication(
                    Publication(topic, data.message, data.user, offset, epoch, data.skip, data.json)
                )
            except Exception:  # the listener's bug must not stop delivery of the rest
                log.exception("the listener failed on a publication of %s", topic)

    def _gap(self, topic: str, epoch: str, offset: int) -> None:
        if self._listener is not None:
            try:
                self._listener.gap(topic, epoch, offset)
            except Exception:
                log.exception("the listener failed on a gap of %s", topic)

    async def _on_message(self, name: str, data: bytes, via: bytes | None = None) -> None:
        """A message on channel ``name``; ``via``: the glob it came through (a
        ``pmessage``), else None (its own channel)."""
        topic = scripts.topic_of(name)
        if via is None:
            if topic not in self._topics:
                return  # unsubscribed while the message was in flight
        elif not self._patterns or not self._patterns.matches_any(topic):
            return  # the glob is wider than the patterns (or unsubscribed meanwhile)
        epoch, offset, payload = data.split(b" ", 2)
        if epoch == ANNOUNCED:
            if via is not None and via.decode() != self._route(topic):
                return  # it comes by another route too: hand it over once
            announced = _decode_data(payload)
            if announced.origin != self._origin and self._listener is not None:
                self._listener.publication(
                    Publication(
                        topic,
                        announced.message,
                        announced.user,
                        skip=announced.skip,
                        json=announced.json,
                    )
                )
            return
        await self._sequencer.live(topic, epoch.decode(), int(offset), payload)

    def _route(self, topic: str) -> str:
        """The one route an announcement on ``topic`` is taken from: its channel if
        subscribed, else the least glob of the patterns matching it."""
        if topic in self._topics:
            return scripts.channel(topic)
        return min(glob(p) for held in self._patterns.match(topic) for p in held)

    # -- the subscriber connection ---------------------------------------------------------

    async def _listen_forever(self) -> None:
        failures = 0
        while True:
            try:
                await self._listen_once()
            except FAILURES as exc:
                # Say why (a wrong password or TLS setting must not look like an outage),
                # once per distinct reason rather than on every retry.
                reason = f"{type(exc).__name__}: {exc}"
                self._probe.kick()  # is Redis gone, or only this connection?
                if self._connected.is_set():
                    failures = 0
                elif reason != self._last_error and self._last_error is not None:
                    log.warning("broker still down: %s", reason)
                self._last_error = reason
                await self._drop_idle_connections()
            except Exception:  # a bug must not silently end cross-node delivery
                log.exception("broker listener failed; reconnecting")
            finally:
                self._connected.clear()
                self._health_changed(f"lost the Redis connection ({self._last_error})")
                self._pubsub_ready.clear()
                if self._pubsub is not None:
                    pubsub, self._pubsub = self._pubsub, None
                    self._drop_requests()
                    with contextlib.suppress(RedisError, OSError, TimeoutError):
                        async with asyncio.timeout(CLOSE_TIMEOUT):
                            await pubsub.aclose()
            await asyncio.sleep(RECONNECT_DELAYS[min(failures, len(RECONNECT_DELAYS) - 1)])
            failures += 1

    async def _drop_idle_connections(self) -> None:
        """Close the pool's idle connections. When Redis went away they all died with it,
        and redis-py would only find out by failing the next command sent on each (a 503
        for a publish made after Redis is back).

        Under the pool's lock: otherwise a publish could take a connection from the pool
        between the moment it is picked for closing and the moment it is closed, and fail
        mid-write. (redis-py's blocking pool hands out connections under its condition,
        its plain pool under its lock; the attributes are private, so without them this
        falls back to no lock.)"""
        pool = self._client.connection_pool
        lock = getattr(pool, "_condition", None) or getattr(pool, "_lock", None)
        guard: Any = (
            lock if isinstance(lock, asyncio.Lock | asyncio.Condition) else contextlib.nullcontext()
        )

        async def drop() -> None:
            async with guard:
                await pool.disconnect(inuse_connections=False)

        # Bounded: closing each connection to a dead Redis may wait (TLS: for its close
        # to be acknowledged), and meanwhile the pool's lock keeps every command waiting.
        with contextlib.suppress(RedisError, OSError, TimeoutError):
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await drop()

    async def _listen_once(self) -> None:
        pubsub = self._pubsub = self._subscriber.pubsub()
        # A channel of our own keeps the connection open while no topic is wanted.
        channels = [f"wsrelay:node:{self._origin}", *map(scripts.channel, self._topics)]
        globs = list(self._globs)
        await pubsub.subscribe(*channels)
        if globs:
            await pubsub.psubscribe(*globs)
        # The subscriptions must be in effect before the streams are read: else a
        # publication made between the read and the SUBSCRIBE would be in neither.
        async with asyncio.timeout(SUBSCRIBE_TIMEOUT * 2):
            early = await self._confirmed(pubsub, [*channels, *globs])
        self._pubsub_ready.set()  # subscriptions asked for meanwhile may go now
        # Topics known through patterns catch up too (those never seen have no position).
        known = self._topics | {t for t in self._sequencer.topics() if self._serves(t)}
        await self._sequencer.catch_up(list(known), self._read_all)
        for name, data, via in early:
            await self._dispatch(name, data, via)
        if not self._connected.is_set():
            await self._drop_idle_connections()
            self._connected.set()
            self._last_error = None
            self._health_changed("")
        async for message in pubsub.listen():
            kind = message["type"]
            if kind == "subscribe" or kind == "psubscribe":
                for confirmed in self._confirmations.get(message["channel"], ()):
                    if not confirmed.done():
                        confirmed.set_result(None)
            elif kind == "message" or kind == "pmessage":
                await self._dispatch(
                    message["channel"].decode(), message["data"], message["pattern"]
                )

    async def _confirmed(
        self, pubsub: Any, channels: list[str]
    ) -> list[tuple[str, bytes, bytes | None]]:
        """Wait for Redis to confirm ``channels`` (and globs); the messages that came
        meanwhile, with the glob each came through (None: its channel)."""
        pending = {name.encode() for name in channels}
        early: list[tuple[str, bytes, bytes | None]] = []
        async for message in pubsub.listen():
            if message["type"] in ("subscribe", "psubscribe"):
                pending.discard(message["channel"])
                if not pending:
                    break
            elif message["type"] in ("message", "pmessage"):
                early.append((message["channel"].decode(), message["data"], message["pattern"]))
        return early

    async def _dispatch(self, name: str, data: bytes, via: bytes | None = None) -> None:
        try:
            await self._on_message(name, data, via)
        except FAILURES:
            raise  # the read that fills a gap failed: reconnect, and catch up
        except Exception:  # not ours, or a listener bug: drop it, keep listening
            log.exception("dropped an unreadable message on %s", name)
