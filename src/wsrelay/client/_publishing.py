"""What every publisher shares: when to try again, how long to wait, and the keys that
make trying again safe.

:class:`wsrelay.client.SyncRelay` (HTTP) and :mod:`wsrelay.emitter` (straight into
Redis) publish with the same rules:

* every publish carries an idempotency key: the caller's, or one made for the call
  (:func:`new_idempotency_key`) and reused by each of its attempts, so a publish
  whose answer was lost is published at most once however often it is retried;
* a failure is retried when trying again can help (:meth:`RetryPolicy.delay`): the
  server could not be reached or did not answer (:class:`ConnectionFailed`), or
  answered 502, 503 (:class:`ServiceUnavailable`, :class:`PublishOutcomeUnknown`
  included) or 504, or 429 with ``Retry-After``; never a refusal (400, 401, 403, 404,
  413), which would be refused again;
* the wait before attempt ``n`` is the server's ``Retry-After`` when it sent one
  (:meth:`Backoff.after`: capped, plus jitter), else :meth:`Backoff.delay` (exponential
  backoff with full jitter): the rules a subscription of :class:`wsrelay.client.Relay`
  follows when it reconnects.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Final

import msgspec

from wsrelay.client._errors import (
    ConnectionFailed,
    HTTPError,
    RelayError,
    ServerError,
    ServiceUnavailable,
    TooManyRequests,
)
from wsrelay.client._models import Backoff, Publish
from wsrelay.client._relay import Item

RETRIED_STATUSES: Final = frozenset({502, 503, 504})
"""5xx answers worth another attempt: a proxy's bad gateway or timeout, a node that is
shedding load or lost its broker. A 500 is a bug; it would fail again."""

_encode = msgspec.json.Encoder().encode


def new_idempotency_key() -> str:
    """A fresh key for one publish: 128 random bits, as 32 hex digits."""
    return uuid.uuid4().hex


@dataclass(frozen=True)
class RetryPolicy:
    """How a publisher retries a failed call.

    Attributes:
        attempts: attempts after the first (0: never retry, and no idempotency key is
            made for a publish that has none).
        backoff: the waits; by default short ones (0.1 s doubling up to 2 s, a
            ``Retry-After`` counted up to 10 s), fit for a web request that waits for
            the publish.
    """

    attempts: int = 3
    backoff: Backoff = field(
        default_factory=lambda: Backoff(initial=0.1, maximum=2.0, max_retry_after=10.0)
    )

    def __post_init__(self) -> None:
        if self.attempts < 0:
            raise ValueError("attempts must be 0 or more")

    @property
    def keys(self) -> bool:
        """Whether publishes get an idempotency key made for them (when retrying)."""
        return self.attempts > 0

    def delay(
        self, error: BaseException, attempt: int, rng: random.Random | None = None
    ) -> float | None:
        """The wait before retry ``attempt`` (1 for the first retry) after ``error``, or
        None when the call must not be retried: the error is not worth it, or
        ``attempts`` are used up."""
        if attempt > self.attempts or not retryable(error):
            return None
        retry_after = error.retry_after if isinstance(error, HTTPError) else None
        if retry_after is not None:
            return self.backoff.after(retry_after, rng)
        return self.backoff.delay(attempt, rng)


NO_RETRY: Final = RetryPolicy(attempts=0)
"""A policy that never retries."""


def retryable(error: BaseException) -> bool:
    """Whether another attempt after ``error`` may succeed (see the module docstring)."""
    if not isinstance(error, RelayError):
        return False
    if isinstance(error, ConnectionFailed | ServiceUnavailable):
        return True
    if isinstance(error, ServerError):
        return error.status in RETRIED_STATUSES
    if isinstance(error, TooManyRequests):
        return error.retry_after is not None
    return False


def keyed(item: Item, keys: bool) -> Publish:
    """``item`` as a :class:`Publish`, with a new idempotency key if ``keys`` and it has
    none."""
    publish = item if isinstance(item, Publish) else Publish(*item)
    if keys and publish.idempotency_key is None:
        publish = msgspec.structs.replace(publish, idempotency_key=new_idempotency_key())
    return publish


def batch_bodies(
    items: Iterable[Item], *, keys: bool, max_count: int, max_bytes: int
) -> Iterator[tuple[bytes, int]]:
    """``POST /publish/batch`` bodies for ``items``, in order, each of at most
    ``max_count`` messages and (unless one message alone is larger) ``max_bytes``; with
    the number of messages in each."""
    parts: list[bytes] = []
    size = 0
    for item in items:
        part = _encode(keyed(item, keys))
        if parts and (len(parts) >= max_count or size + len(part) + 1 > max_bytes):
            yield b'{"messages":[' + b",".join(parts) + b"]}", len(parts)
            parts, size = [], 0
        parts.append(part)
        size += len(part) + 1
    if parts:
        yield b'{"messages":[' + b",".join(parts) + b"]}", len(parts)
