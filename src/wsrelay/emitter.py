"""Publish into a relay's Redis backplane from any process: no HTTP hop, no node needed.

A Celery worker, a cron job or a Django process that can reach the relay's Redis
publishes with :class:`Emitter` (blocking, redis-py) or :class:`AsyncEmitter`
(asyncio)::

    from wsrelay.emitter import Emitter

    emitter = Emitter("redis://127.0.0.1:6379/0")
    emitter.publish("orders:42", "shipped")      # Emitted(offset=7, epoch='9f2c…')

Each publish runs the node's own script (:data:`wsrelay.brokers.redis_scripts.PUBLISH`,
built by :func:`wsrelay.brokers.redis.publish_command`) with the node's key layout, so
it is a publication like any other: it gets the topic's next offset, goes into the
topic's history, is handed to the subscribers of every node in offset order, and its
idempotency key is the one a backend's ``POST /publish`` uses (``api:<key>``): a
publish retried over HTTP after it went through the emitter, or the other way round,
is published once.

What the nodes would apply comes from the same :class:`~wsrelay.config.Settings`:
``history_size`` (and each namespace's), ``history_ttl``, ``idempotency_window`` and
``max_topic_length``. By default they are read as ``wsrelay serve`` reads them
(``Settings.from_env()``: ``WSRELAY_*`` variables and the ``WSRELAY_CONFIG`` file),
and so is the Redis URL (``--broker``), so a worker started with the relay's
environment needs no argument at all. There is no recipient count (no node answers);
a publish is delivered by whichever nodes have subscribers for its topic.

Failures are the client's exceptions (:mod:`wsrelay.client`), retried under the
same :class:`~wsrelay.client.RetryPolicy` as :class:`~wsrelay.client.SyncRelay`, each
publish with an idempotency key made for it and kept by its retries:
:class:`~wsrelay.client.BadRequest` (an invalid topic; never retried),
:class:`~wsrelay.client.ServiceUnavailable` (``broker_unavailable``: Redis could not
be reached, nothing was sent) and :class:`~wsrelay.client.PublishOutcomeUnknown`
(sent, and no answer came: publish again with the same key).
"""

from __future__ import annotations

import asyncio
import os
import random
import socket
import time
from collections.abc import Callable, Iterable, Sequence
from types import TracebackType
from typing import Any, Self

import msgspec
import redis
from redis.exceptions import NoScriptError, RedisError, ResponseError

from wsrelay.brokers import redis_scripts as scripts
from wsrelay.brokers.redis import publish_command
from wsrelay.brokers.redis_client import make_client, send_pipeline
from wsrelay.client._errors import (
    BadRequest,
    PublishOutcomeUnknown,
    RelayError,
    ServiceUnavailable,
)
from wsrelay.client._models import Position, Publish, UserId
from wsrelay.client._publishing import RetryPolicy, keyed
from wsrelay.client._relay import Item
from wsrelay.config import Settings
from wsrelay.core.fanout import Publication
from wsrelay.core.payload import message_text
from wsrelay.core.registry import user_key
from wsrelay.core.topics import validate_topic
from wsrelay.errors import BrokerUnavailable, InvalidField, InvalidJSON, InvalidTopic
from wsrelay.errors import PublishOutcomeUnknown as _SentUnanswered

BACKEND_KEY_PREFIX = "api:"
"""Prefix of a backend's idempotency keys, as ``POST /publish`` stores them
(:func:`wsrelay.server.http.backend_key`): a key is the same publish over either path."""

_encode_json = msgspec.json.Encoder().encode

MAX_PIPELINE = 1000
"""Publishes sent in one pipeline at most (one round trip)."""


class Emitted(msgspec.Struct, frozen=True):
    """A publication the emitter made: its ``offset`` in ``epoch``, or, with
    ``duplicate``, the first publish with the same idempotency key's position (this one
    published nothing)."""

    offset: int
    epoch: str
    duplicate: bool = False

    @property
    def position(self) -> Position:
        """Where the publication is in its topic."""
        return Position(self.offset, self.epoch)


class _Publisher:
    """What both emitters share: settings, commands, and the meaning of replies."""

    def __init__(self, url: str | None, settings: Settings | None, retry: RetryPolicy | None):
        self.settings = settings if settings is not None else Settings.from_env()
        self.url = url if url is not None else self.settings.broker
        if not self.url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(
                f"the emitter publishes into Redis; {self.url!r} is not a Redis URL (give "
                "the relay's --broker, e.g. redis://127.0.0.1:6379/0)"
            )
        self.retry = retry if retry is not None else RetryPolicy()
        self.origin = f"emitter:{socket.gethostname()}:{os.getpid()}"
        self._limits = self.settings.history_limits()
        self._sizes = self.settings.rules().history_sizes(self.settings.history_size)
        self._rng = random.Random()

    def _command(self, item: Publish) -> tuple[Any, ...]:
        try:
            validate_topic(item.topic, self.settings.max_topic_length)
        except InvalidTopic as exc:
            raise BadRequest(exc.message, code=exc.code, status=exc.http_status) from None
        size = self.settings.history_size if self._sizes is None else self._sizes(item.topic)
        key = None if item.idempotency_key is None else BACKEND_KEY_PREFIX + item.idempotency_key
        text, is_json = _message_text(item.message)
        publication = Publication(item.topic, text, user_key(item.user_id), json=is_json)
        return publish_command(publication, key, origin=self.origin, size=size, limits=self._limits)

    def _commands(self, items: Iterable[Item]) -> list[tuple[Any, ...]]:
        """Every item's command, all checked before anything is sent."""
        commands = []
        for index, item in enumerate(items):
            try:
                commands.append(self._command(keyed(item, self.retry.keys)))
            except BadRequest as exc:
                raise BadRequest(
                    f"messages[{index}]: {exc.message}", code=exc.code, status=exc.status
                ) from None
        return commands

    @staticmethod
    def _outcome(reply: Any) -> Emitted | RelayError:
        if isinstance(reply, _SentUnanswered):
            return PublishOutcomeUnknown(reply.message, code=reply.code, status=503)
        if isinstance(reply, BrokerUnavailable):
            return ServiceUnavailable(reply.message, code=reply.code, status=503)
        if isinstance(reply, ResponseError):
            return ServiceUnavailable(
                f"Redis refused the publish ({reply}); try again",
                code="broker_unavailable",
                status=503,
            )
        at, repeat = reply
        epoch, offset = at.split(b" ")
        return Emitted(int(offset), epoch.decode(), bool(repeat))

    def _settle(
        self, results: list[Emitted | RelayError | None], replies: list[Any], pending: list[int]
    ) -> tuple[list[int], RelayError | None]:
        """Record ``replies`` to the ``pending`` indexes; those that failed, and the first
        failure."""
        failed: list[int] = []
        first: RelayError | None = None
        for index, reply in zip(pending, replies, strict=True):
            outcome = self._outcome(reply)
            results[index] = outcome
            if isinstance(outcome, RelayError):
                failed.append(index)
                first = first or outcome
        return failed, first

    @staticmethod
    def _done(results: list[Emitted | RelayError | None]) -> list[Emitted]:
        emitted = [r for r in results if isinstance(r, Emitted)]
        if len(emitted) < len(results):
            error = next(r for r in results if isinstance(r, RelayError))
            if len(results) > 1:
                error.message = (
                    f"{error.message}; {len(emitted)} of {len(results)} messages were "
                    "published (retry the others with the same idempotency_key)"
                )
                error.args = (error.message,)
            raise error
        return emitted


class Emitter(_Publisher):
    """A blocking publisher into the relay's Redis (see the module docstring); safe to
    share between threads, and, like redis-py's pool, between a process and its forks.

    Args:
        url: the relay's Redis (``--broker``); default: ``settings.broker``.
        settings: the relay's settings; default: ``Settings.from_env()``.
        retry: the retry policy (as :class:`~wsrelay.client.SyncRelay`'s).
        timeout: seconds a connection or a reply may take.
        client: a redis-py client to use instead of one of its own.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        settings: Settings | None = None,
        retry: RetryPolicy | None = None,
        timeout: float = 5.0,
        client: redis.Redis | None = None,
    ) -> None:
        super().__init__(url, settings, retry)
        self._own = client is None
        self.client = client if client is not None else _sync_client(self.url, timeout)
        self.sleep: Callable[[float], None] = time.sleep

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the connections (of its own client only)."""
        if self._own:
            self.client.close()

    def publish(
        self,
        topic: str,
        message: Any,
        *,
        user_id: UserId = None,
        idempotency_key: str | None = None,
    ) -> Emitted:
        """Publish ``message`` to ``topic`` (only to ``user_id``'s clients, if given): a
        string, or any value msgspec encodes as JSON, received as that value (as
        :meth:`wsrelay.client.Relay.publish` sends it)."""
        [emitted] = self.publish_many([Publish(topic, message, user_id, idempotency_key)])
        return emitted

    def publish_many(self, messages: Iterable[Item]) -> list[Emitted]:
        """Publish several messages in order, in pipelines of up to 1000 (one round trip
        each); those that fail are retried, with their keys. Raises the first failure
        left once the retries are spent (those published stay published)."""
        commands = self._commands(messages)
        results: list[Emitted | RelayError | None] = [None] * len(commands)
        for start in range(0, len(commands), MAX_PIPELINE):
            pending = list(range(start, min(start + MAX_PIPELINE, len(commands))))
            attempt = 0
            while pending:
                replies = self._send([commands[i] for i in pending])
                pending, error = self._settle(results, replies, pending)
                if error is None:
                    break
                attempt += 1
                delay = self.retry.delay(error, attempt, self._rng)
                if delay is None:
                    return self._done(results)
                self.sleep(delay)
        return self._done(results)

    def _send(self, commands: Sequence[tuple[Any, ...]]) -> list[Any]:
        """The replies to ``commands``, sent on one connection; the script loaded and
        those sent again if Redis lost it (``NOSCRIPT``: nothing ran)."""
        replies = _send_sync(self.client, commands)
        lost = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
        if lost:
            load = ("SCRIPT", "LOAD", scripts.PUBLISH.source)
            again = _send_sync(self.client, [load, *(commands[i] for i in lost)])
            for i, reply in zip(lost, again[1:], strict=True):
                replies[i] = reply
        return replies


class AsyncEmitter(_Publisher):
    """:class:`Emitter` for asyncio code (a FastAPI app, an aiohttp service); one event
    loop at a time. Its connections are the node's own kind
    (:func:`wsrelay.brokers.redis_client.make_client`)."""

    def __init__(
        self,
        url: str | None = None,
        *,
        settings: Settings | None = None,
        retry: RetryPolicy | None = None,
        timeout: float = 5.0,
        pool_size: int = 4,
    ) -> None:
        super().__init__(url, settings, retry)
        self.client = make_client(self.url, pool_size=pool_size, timeout=timeout)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the connections."""
        await self.client.aclose()

    async def publish(
        self,
        topic: str,
        message: Any,
        *,
        user_id: UserId = None,
        idempotency_key: str | None = None,
    ) -> Emitted:
        """As :meth:`Emitter.publish`."""
        [emitted] = await self.publish_many([Publish(topic, message, user_id, idempotency_key)])
        return emitted

    async def publish_many(self, messages: Iterable[Item]) -> list[Emitted]:
        """As :meth:`Emitter.publish_many`."""
        commands = self._commands(messages)
        results: list[Emitted | RelayError | None] = [None] * len(commands)
        for start in range(0, len(commands), MAX_PIPELINE):
            pending = list(range(start, min(start + MAX_PIPELINE, len(commands))))
            attempt = 0
            while pending:
                replies = await self._send([commands[i] for i in pending])
                pending, error = self._settle(results, replies, pending)
                if error is None:
                    break
                attempt += 1
                delay = self.retry.delay(error, attempt, self._rng)
                if delay is None:
                    return self._done(results)
                await asyncio.sleep(delay)
        return self._done(results)

    async def _send(self, commands: Sequence[tuple[Any, ...]]) -> list[Any]:
        try:
            replies = await send_pipeline(self.client, commands)
        except BrokerUnavailable as exc:
            return [exc] * len(commands)
        lost = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
        if lost:
            load = ("SCRIPT", "LOAD", scripts.PUBLISH.source)
            try:
                again = await send_pipeline(self.client, [load, *(commands[i] for i in lost)])
            except BrokerUnavailable as exc:
                again = [None, *([exc] * len(lost))]
            for i, reply in zip(lost, again[1:], strict=True):
                replies[i] = reply
        return replies


def _message_text(message: Any) -> tuple[str, bool]:
    """``(text, is_json)`` as a node keeps a message (:func:`wsrelay.core.payload.message_text`):
    a string as itself, any other value (a :class:`msgspec.Raw` as is) as its compact JSON
    text.

    Raises:
        BadRequest: not valid JSON text (a Raw), or nested too deep (as ``POST /publish``
            would answer).
        TypeError: msgspec cannot encode the value as JSON.
    """
    if isinstance(message, str):
        return message, False
    raw = message if isinstance(message, msgspec.Raw) else msgspec.Raw(_encode_json(message))
    try:
        msgspec.json.decode(raw)  # a Raw may hold anything: only JSON text is published
        return message_text(raw)
    except msgspec.DecodeError as exc:
        raise BadRequest(
            f"message: not valid JSON: {exc}", code="invalid_json", status=400
        ) from None
    except (InvalidJSON, InvalidField) as exc:
        raise BadRequest(exc.message, code=exc.code, status=exc.http_status) from None


def _sync_client(url: str, timeout: float) -> redis.Redis:
    """A blocking client that never retries by itself (the emitter does, with its key)."""
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    return redis.Redis.from_url(
        url,
        retry=Retry(NoBackoff(), 0),
        socket_connect_timeout=timeout,
        socket_timeout=timeout,
        health_check_interval=2,
    )


def _send_sync(client: redis.Redis, commands: Sequence[tuple[Any, ...]]) -> list[Any]:
    """:func:`wsrelay.brokers.redis_client.send_pipeline` for a blocking client: the
    replies (an error reply as its exception; one that never came as a
    :class:`wsrelay.errors.PublishOutcomeUnknown`), or, when nothing could be sent, a
    :class:`wsrelay.errors.BrokerUnavailable` for each."""
    pool = client.connection_pool
    try:
        connection = pool.get_connection()
    except (RedisError, OSError) as exc:
        failed = BrokerUnavailable(f"Redis is unreachable ({type(exc).__name__}: {exc}); try again")
        return [failed] * len(commands)
    replies: list[Any] = []
    try:
        packed = connection.pack_commands(commands)  # type: ignore[no-untyped-call]
        connection.send_packed_command(packed, check_health=False)  # type: ignore[no-untyped-call]
        for _ in commands:
            try:
                replies.append(connection.read_response())
            except ResponseError as exc:
                replies.append(exc)
    except (RedisError, OSError) as exc:
        connection.disconnect()  # type: ignore[no-untyped-call]
        unknown = _SentUnanswered(
            f"Redis did not answer after the publish was sent ({type(exc).__name__}: {exc}): "
            "it may have been published; retry with the same idempotency_key"
        )
        replies.extend([unknown] * (len(commands) - len(replies)))
    finally:
        pool.release(connection)
    return replies


__all__ = ["BACKEND_KEY_PREFIX", "AsyncEmitter", "Emitted", "Emitter"]
