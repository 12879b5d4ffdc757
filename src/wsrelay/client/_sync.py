"""A synchronous publisher for code without an event loop: Django, Flask, Celery, scripts.

:class:`SyncRelay` holds keep-alive connections in one ``urllib3`` pool (chosen by
measurement over httpx: docs/decisions/0009-sync-publisher.md), is safe to share
between threads, and retries what can be retried with the rules of
:mod:`wsrelay.client._publishing`. It raises the asyncio client's exceptions and
returns its models, so code moving between the two catches the same errors.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Callable, Iterable
from types import TracebackType
from typing import Any, Self, TypeVar
from urllib.parse import urlencode

import msgspec
import urllib3

from wsrelay.client._errors import ConnectionFailed, ProtocolError, RelayError
from wsrelay.client._models import History, Position, Publish, Published, Stats, UserId
from wsrelay.client._presence import Presence, PresenceStats
from wsrelay.client._publishing import (
    RetryPolicy,
    batch_bodies,
    keyed,
)
from wsrelay.client._relay import (
    DEFAULT_BATCH_BYTES,
    DEFAULT_URL,
    MAX_BATCH,
    Item,
    _BatchAnswer,
    _decode,
    _error_from,
    _one_line,
    _PublishAnswer,
    normalize_url,
)

T = TypeVar("T")

_encode = msgspec.json.Encoder().encode


class SyncRelay:
    """A blocking client of one wsrelay server's HTTP API, for publishing from any code.

    ::

        relay = SyncRelay("http://127.0.0.1:8000", api_key="secret")  # once, e.g. at import
        relay.publish("orders:42", "shipped")                           # from any thread

    Args:
        url: the server's base URL (``http(s)://host:port``; ``ws(s)://`` works too).
        api_key: sent as ``Authorization: Bearer <key>``.
        timeout: seconds one attempt may take (connecting, sending, reading the answer).
        retry: when and how long to wait before another attempt (:class:`RetryPolicy`:
            by default 3 more attempts, with short waits). ``RetryPolicy(attempts=0)``
            never retries.
        pool_size: keep-alive connections kept; a thread that finds them all busy waits
            for one (at most ``timeout``).
        batch_bytes: largest request body :meth:`publish_many` builds.

    Every method raises a :class:`~wsrelay.client.RelayError`, as
    :class:`~wsrelay.client.Relay` does: :class:`~wsrelay.client.ConnectionFailed`
    when the server cannot be reached, an :class:`~wsrelay.client.HTTPError` subclass
    for a refusal. Both are raised once the retries are spent. The pool is made again in
    a forked child (a Celery or gunicorn worker may inherit the parent's client), so
    processes never share a connection.
    """

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        api_key: str | None = None,
        timeout: float = 10.0,
        retry: RetryPolicy | None = None,
        pool_size: int = 10,
        batch_bytes: int = DEFAULT_BATCH_BYTES,
    ) -> None:
        self.url = normalize_url(url)
        self.timeout = timeout
        self.retry = retry if retry is not None else RetryPolicy()
        self.pool_size = pool_size
        self.batch_bytes = batch_bytes
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._lock = threading.Lock()
        self._pool: urllib3.PoolManager | None = None
        self._pid = 0
        self._rng = random.Random()
        self.sleep: Callable[[float], None] = time.sleep
        """Waits between attempts (tests may replace it)."""

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
        """Close the pooled connections (the next call opens new ones)."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.clear()

    # -- the API --------------------------------------------------------------------------------

    def publish(
        self,
        topic: str,
        message: Any,
        *,
        user_id: UserId = None,
        idempotency_key: str | None = None,
    ) -> Published:
        """``POST /publish``: as :meth:`wsrelay.client.Relay.publish` (``message``: a
        string, or any value msgspec encodes as JSON, received as that value). Without
        ``idempotency_key``, one is made for the call (unless the policy never
        retries), so a retried publish is published once."""
        body = _encode(keyed(Publish(topic, message, user_id, idempotency_key), self.retry.keys))
        answer = self._call("POST", "/publish", _PublishAnswer, body=body)
        return Published(answer.recipients, answer.offset, answer.epoch, answer.duplicate)

    def publish_many(self, messages: Iterable[Item]) -> list[Published]:
        """Publish several messages in order, in as few ``POST /publish/batch`` requests
        as the server's limits allow, as :meth:`wsrelay.client.Relay.publish_many`; each
        message without an idempotency key gets one, kept by every attempt of its batch.
        A batch that fails for good raises; the batches before it were published."""
        results: list[Published] = []
        for body, _ in batch_bodies(
            messages, keys=self.retry.keys, max_count=MAX_BATCH, max_bytes=self.batch_bytes
        ):
            answer = self._call("POST", "/publish/batch", _BatchAnswer, body=body)
            positions = answer.positions or [Position(0, "")] * len(answer.recipients)
            results += [
                Published(count, position.offset, position.epoch)
                for count, position in zip(answer.recipients, positions, strict=True)
            ]
        return results

    def history(
        self,
        topic: str,
        *,
        since: int | None = None,
        limit: int | None = None,
        reverse: bool = False,
    ) -> History:
        """``GET /history``: as :meth:`wsrelay.client.Relay.history`."""
        params = {"topic": topic}
        if since is not None:
            params["since"] = str(since)
        if limit is not None:
            params["limit"] = str(limit)
        if reverse:
            params["reverse"] = "true"
        return self._call("GET", "/history", History, params=params)

    def presence(self, topic: str) -> Presence:
        """``GET /presence?topic=``: the connections subscribed to ``topic`` on every
        node (the topic's namespace must have ``presence = true``, else
        :class:`~wsrelay.client.Forbidden`)."""
        return self._call("GET", "/presence", Presence, params={"topic": topic})

    def presence_stats(self, topic: str) -> PresenceStats:
        """``GET /presence/stats?topic=``: how many connections and distinct users are
        subscribed to ``topic`` on every node."""
        return self._call("GET", "/presence/stats", PresenceStats, params={"topic": topic})

    def stats(self) -> Stats:
        """``GET /stats``: the answering node's live counters."""
        return self._call("GET", "/stats", Stats)

    # -- requests -------------------------------------------------------------------------------

    def _call(
        self,
        method: str,
        path: str,
        into: type[T],
        *,
        body: bytes | None = None,
        params: dict[str, str] | None = None,
    ) -> T:
        """One request, attempted again while the retry policy says so (a publish's
        body, idempotency keys included, is the same in every attempt)."""
        target = self.url + path + ("?" + urlencode(params) if params else "")
        attempt = 0
        while True:
            try:
                return self._request(method, target, into, body)
            except RelayError as exc:
                attempt += 1
                delay = self.retry.delay(exc, attempt, self._rng)
                if delay is None:
                    raise
            self.sleep(delay)

    def _request(self, method: str, target: str, into: type[T], body: bytes | None) -> T:
        headers = dict(self._headers)
        if body is not None:
            headers["Content-Type"] = "application/json"
        try:
            response = self._connections().request(
                method,
                target,
                body=body,
                headers=headers,
                retries=False,  # ours are above, with the idempotency key
                redirect=False,
                pool_timeout=self.timeout,  # waiting for a free pooled connection
                timeout=urllib3.Timeout(connect=self.timeout, read=self.timeout),
            )
        except urllib3.exceptions.HTTPError as exc:
            raise ConnectionFailed(f"cannot reach {self.url}: {_one_line(exc)}") from exc
        except OSError as exc:
            raise ConnectionFailed(f"cannot reach {self.url}: {_one_line(exc)}") from exc
        status, raw = response.status, response.data
        if status >= 400:
            raise _error_from(status, raw, response.headers.get("Retry-After"))
        try:
            return _decode(raw, into)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise ProtocolError(
                f"{method} {target} answered HTTP {status} with an unexpected body: {exc}",
                status=status,
            ) from None

    def _connections(self) -> urllib3.PoolManager:
        """The pool of this process (made on first use, and again after a fork)."""
        pid = os.getpid()
        pool = self._pool
        if pool is not None and self._pid == pid:
            return pool
        with self._lock:
            if self._pool is None or self._pid != pid:
                self._pool = urllib3.PoolManager(
                    num_pools=4, maxsize=self.pool_size, block=True, retries=False
                )
                self._pid = pid
            return self._pool


__all__ = ["SyncRelay"]
