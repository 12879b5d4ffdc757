"""An asyncio client for wsrelay: publish over HTTP, subscribe over WebSocket.

::

    import asyncio
    from wsrelay.client import Relay

    async def main() -> None:
        async with Relay("http://127.0.0.1:8000", api_key=None) as relay:
            async with relay.subscribe("cats") as messages:
                print(await relay.publish("cats", "hello"))  # 1 recipient
                async for message in messages:
                    print(message.topic, message.message)  # cats hello
                    break

    asyncio.run(main())

:class:`Relay` wraps the HTTP API (``publish``, ``publish_many``, ``history``,
``stats``, ``topics``, ``register``, ``unregister``, ``presence``, ``presence_stats``,
``user``, ``disconnect_user``); :meth:`Relay.subscribe`
returns a :class:`Subscription` that yields :class:`Message` objects, reconnects
by itself and recovers what was published meanwhile (or reports a
:class:`NotRecovered` event when it cannot), and publishes as a client over its
own connection (:meth:`Subscription.publish`, where a namespace allows it; grants
go with ``subscribe(..., grants=...)`` or :meth:`Relay.connect`), asks who is there
(:meth:`Subscription.presence`) and reports joins and leaves (:class:`Join`,
:class:`Leave` events). Failures are :class:`RelayError`
subclasses carrying the server's error ``code`` and HTTP ``status``.

:class:`SyncRelay` publishes (``publish``, ``publish_many``, ``history``, ``presence``,
``stats``) from code without an event loop (Django, Flask, Celery), on pooled
keep-alive connections, retrying under a :class:`RetryPolicy` with an idempotency key
per publish; it raises the same exceptions.
"""

from __future__ import annotations

from wsrelay.client._errors import (
    BadRequest,
    Banned,
    CommandRefused,
    ConnectionClosed,
    ConnectionFailed,
    Forbidden,
    ForbiddenTopic,
    HTTPError,
    MessageTooLarge,
    NotConnected,
    NotFound,
    PayloadTooLarge,
    PresenceDisabled,
    ProtocolError,
    PublishInterrupted,
    PublishOutcomeUnknown,
    RateLimited,
    RelayError,
    Replaced,
    ServerError,
    ServiceUnavailable,
    TooManyRequests,
    Unauthorized,
    Unregistered,
)
from wsrelay.client._models import (
    Backoff,
    ClientPublished,
    Event,
    Grants,
    History,
    HistoryItem,
    Message,
    NotRecovered,
    Position,
    Publish,
    Published,
    Reconnecting,
    Registration,
    Stats,
    Subscribed,
    TopicCount,
    Topics,
    UserId,
)
from wsrelay.client._presence import (
    Join,
    Leave,
    Presence,
    PresenceClient,
    PresenceStats,
    UserDisconnected,
    UserStatus,
)
from wsrelay.client._publishing import NO_RETRY, RetryPolicy, new_idempotency_key
from wsrelay.client._relay import DEFAULT_URL, MAX_BATCH, Relay, Subscription, normalize_url
from wsrelay.client._sync import SyncRelay

__all__ = [
    "DEFAULT_URL",
    "MAX_BATCH",
    "NO_RETRY",
    "Backoff",
    "BadRequest",
    "Banned",
    "ClientPublished",
    "CommandRefused",
    "ConnectionClosed",
    "ConnectionFailed",
    "Event",
    "Forbidden",
    "ForbiddenTopic",
    "Grants",
    "HTTPError",
    "History",
    "HistoryItem",
    "Join",
    "Leave",
    "Message",
    "MessageTooLarge",
    "NotConnected",
    "NotFound",
    "NotRecovered",
    "PayloadTooLarge",
    "Position",
    "Presence",
    "PresenceClient",
    "PresenceDisabled",
    "PresenceStats",
    "ProtocolError",
    "Publish",
    "PublishInterrupted",
    "PublishOutcomeUnknown",
    "Published",
    "RateLimited",
    "Reconnecting",
    "Registration",
    "Relay",
    "RelayError",
    "Replaced",
    "RetryPolicy",
    "ServerError",
    "ServiceUnavailable",
    "Stats",
    "Subscribed",
    "Subscription",
    "SyncRelay",
    "TooManyRequests",
    "TopicCount",
    "Topics",
    "Unauthorized",
    "Unregistered",
    "UserDisconnected",
    "UserId",
    "UserStatus",
    "new_idempotency_key",
    "normalize_url",
]
