"""Webhooks: a node's events, batched, signed and delivered at least once.

:class:`WebhookSender` is the node's :class:`~wsrelay.core.events.EventSink` when
``--webhook-url`` is set. ``emit`` only appends to a bounded queue (past
``--webhook-queue-size`` the event is dropped, counted and logged: a slow receiver
never slows clients down). One task sends the queue in order, in batches of up to
:data:`MAX_BATCH` events, each batch leaving at most :data:`BATCH_WINDOW` seconds after
its first event was queued, as ``POST <url>`` with the body ``{"events": [...]}`` and
the header::

    Wsrelay-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>

A batch is sent again (the same events, signed anew) until the receiver answers 2xx,
with exponential backoff and jitter, for ``--webhook-retry-for`` seconds after its
first attempt; then it is dropped (counted, logged). Delivery is at least once: an
answer lost on the way back means the batch comes again, so a receiver deduplicates by
the events' ``id``. :func:`verify` checks a signature (receivers in Python can use it).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import hmac
import logging
import random
import time
from typing import Final

import aiohttp
import msgspec
import yarl

from wsrelay.core.events import Event

log = logging.getLogger("wsrelay.webhooks")

SIGNATURE_HEADER: Final = "Wsrelay-Signature"
MAX_BATCH: Final = 100
"""Most events in one POST."""
BATCH_WINDOW: Final = 0.05
"""Seconds an event waits for others to share its POST."""
FIRST_BACKOFF: Final = 0.1
MAX_BACKOFF: Final = 5.0
"""Seconds between two attempts at most: a receiver back from an outage gets the
backlog within this."""
REQUEST_TIMEOUT: Final = 10.0
"""Seconds one POST may take before it counts as failed (and is retried)."""
STOP_TIMEOUT: Final = 5.0
"""Seconds a stopping node keeps delivering what is queued."""
MAX_RECEIVER_ANSWER: Final = 64 * 1024
"""Bytes of a receiver's answer read (only its status matters); the rest is dropped."""

_encode = msgspec.json.Encoder().encode


class _Batch(msgspec.Struct):
    events: list[Event]


def sign(secret: str, body: bytes, timestamp: int | None = None) -> str:
    """The ``Wsrelay-Signature`` header value for ``body`` at ``timestamp`` (now)."""
    t = int(time.time()) if timestamp is None else timestamp
    digest = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={t},v1={digest}"


def verify(
    secret: str, header: str, body: bytes, tolerance: float = 300, now: float | None = None
) -> bool:
    """Whether ``header`` (a ``Wsrelay-Signature`` value) signs ``body`` (the raw request
    body, as received) with ``secret``, made within ``tolerance`` seconds of ``now``
    (refuses replays of old requests; 0: any age). Never raises on malformed input."""
    fields: dict[str, list[str]] = {}
    for part in header.split(","):
        key, _, value = part.strip().partition("=")
        fields.setdefault(key, []).append(value)
    try:
        timestamp = int(fields["t"][0])
    except (KeyError, ValueError):
        return False
    current = time.time() if now is None else now
    if tolerance and abs(current - timestamp) > tolerance:
        return False
    expected = sign(secret, body, timestamp).partition(",v1=")[2]
    return any(hmac.compare_digest(expected, given) for given in fields.get("v1", ()))


class WebhookSender:
    """See the module docstring. Counters (for ``/metrics``): ``sent`` events delivered,
    ``failed`` attempts (a batch answered otherwise than 2xx, or not at all),
    ``dropped`` events (queue full, retried too long, or left at shutdown)."""

    def __init__(
        self,
        url: str,
        secret: str,
        *,
        retry_for: float = 600.0,
        queue_size: int = 100_000,
        max_backoff: float = MAX_BACKOFF,
    ) -> None:
        self.url = url
        self.secret = secret
        self.retry_for = retry_for
        self.queue_size = queue_size
        self.max_backoff = max_backoff
        self.sent = 0
        self.failed = 0
        self.dropped = 0
        self._queue: collections.deque[tuple[float, Event]] = collections.deque()
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None
        self._stopping = False
        self._warned_full = 0.0

    @property
    def queued(self) -> int:
        return len(self._queue)

    def emit(self, event: Event) -> None:
        if len(self._queue) >= self.queue_size:
            self.dropped += 1
            now = time.monotonic()
            if now - self._warned_full > 10:  # one line per 10 s, not one per event
                self._warned_full = now
                log.warning(
                    "webhook queue full (%d events, --webhook-queue-size): dropping events",
                    self.queue_size,
                )
            return
        self._queue.append((time.monotonic(), event))
        if self._wake is not None and len(self._queue) == 1:
            self._wake.set()

    async def start(self) -> None:
        self._wake = asyncio.Event()
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT))
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        """Deliver what is queued for up to :data:`STOP_TIMEOUT` seconds, then drop it."""
        self._stopping = True
        if self._wake is not None:
            self._wake.set()
        task = self._task
        if task is not None:
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                async with asyncio.timeout(STOP_TIMEOUT):
                    await asyncio.shield(task)
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._queue:
            self.dropped += len(self._queue)
            log.warning("dropped %d webhook events at shutdown", len(self._queue))
            self._queue.clear()
        if self._session is not None:
            await self._session.close()

    async def _run(self) -> None:
        assert self._wake is not None
        queue = self._queue
        while True:
            if not queue:
                if self._stopping:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            # The first event's window: wait for others to share the POST.
            wait = queue[0][0] + BATCH_WINDOW - time.monotonic()
            if wait > 0 and len(queue) < MAX_BATCH and not self._stopping:
                await asyncio.sleep(wait)
            count = min(MAX_BATCH, len(queue))
            batch = [queue[i][1] for i in range(count)]
            await self._deliver(batch)
            for _ in range(count):
                queue.popleft()

    async def _deliver(self, batch: list[Event]) -> None:
        """Send ``batch`` until it is accepted or it has been retried for too long."""
        body = _encode(_Batch(batch))
        started = time.monotonic()
        backoff = FIRST_BACKOFF
        while True:
            if await self._post(body):
                self.sent += len(batch)
                return
            self.failed += 1
            elapsed = time.monotonic() - started
            if elapsed >= self.retry_for or (self._stopping and elapsed >= STOP_TIMEOUT):
                self.dropped += len(batch)
                log.error(
                    "dropped %d webhook events (%s to %s): %s answered no 2xx for %.0f s "
                    "(--webhook-retry-for)",
                    len(batch),
                    batch[0].id,
                    batch[-1].id,
                    shown(self.url),
                    elapsed,
                )
                return
            delay = min(backoff, self.max_backoff, self.retry_for - elapsed)
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))  # jitter
            backoff *= 2

    async def _post(self, body: bytes) -> bool:
        assert self._session is not None
        headers = {
            "Content-Type": "application/json",
            SIGNATURE_HEADER: sign(self.secret, body),
        }
        try:
            # Not following redirects: a 301/302/303 repeats the call as a GET without the
            # events (whose 2xx would count them delivered), and takes the signature along.
            async with self._session.post(
                self.url, data=body, headers=headers, allow_redirects=False
            ) as response:
                # Read (to keep the connection) but never more than a receiver's answer
                # needs: a huge body must not fill this node's memory.
                await read_at_most(response, MAX_RECEIVER_ANSWER)
                if 200 <= response.status < 300:
                    return True
                log.warning("webhook POST %s answered %d", shown(self.url), response.status)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            log.warning("webhook POST %s failed: %s", shown(self.url), exc or type(exc).__name__)
        return False


async def read_at_most(response: aiohttp.ClientResponse, limit: int) -> bytes:
    """The body of ``response``, whole, or its first ``limit`` bytes if it is longer
    (``content.read(n)`` alone gives only what has arrived so far: a body in several
    pieces would be cut)."""
    parts: list[bytes] = []
    size = 0
    while size < limit:
        part = await response.content.read(limit - size)
        if not part:
            break
        parts.append(part)
        size += len(part)
    return b"".join(parts)


def shown(url: str) -> str:
    """``url`` as logs show it: without its query and credentials, which may hold a token."""
    try:
        plain = yarl.URL(url).with_query(None).with_fragment(None)
        return str(plain.with_user(None).with_password(None))
    except ValueError:
        return "<unreadable URL>"
