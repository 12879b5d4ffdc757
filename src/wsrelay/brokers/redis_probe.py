"""Is Redis answering? A PING on a connection of its own, twice a second.

A stalled Redis (``SIGSTOP``, swapping, a long script) keeps its connections
open and answers nothing, so the pub/sub connection cannot tell, and a command
only notices after its timeout. :class:`HealthProbe` sends ``PING`` every
:data:`PROBE_INTERVAL` seconds and declares Redis down when no ``PONG`` came
within :data:`PROBE_TIMEOUT`, or the connection fails; it declares it up at the
first ``PONG`` after that. A stalled Redis is thus declared down 1.0 to 1.5 s
after it stopped, and up as soon as it runs again: the PING it owes is still
awaited on the same connection.

A node too busy to read its sockets for a second (a reconnect storm on one
core) must not take its own lateness for an outage: before declaring one, the
probe checks that its event loop runs on time (a 50 ms sleep takes less than
250 ms), and waits on while it does not.

After each PONG it may send one more command (``also``; the Redis broker reads
Redis's generation, docs/decisions/0008), awaited the same way; Redis refusing
it is logged once and does not count against Redis's health.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any, Final, TypeAlias

import redis.asyncio as aioredis
from redis.backoff import NoBackoff
from redis.exceptions import RedisError, ResponseError
from redis.retry import Retry

log = logging.getLogger("wsrelay.redis")

PROBE_INTERVAL: Final = 0.5
"""Seconds between one PONG and the next PING."""

PROBE_TIMEOUT: Final = 1.0
"""Seconds without a PONG (or to connect) after which Redis is declared down."""

LAG_SAMPLE: Final = 0.05
LAG_LIMIT: Final = 0.25
"""A sleep of LAG_SAMPLE seconds taking longer than LAG_LIMIT: the node's event loop lags,
and a late PONG may be the node's fault, not Redis's."""

STALL_PATIENCE: Final = 10.0
"""Seconds the probe keeps waiting for an overdue PONG before it opens a new connection
(a stalled Redis answers on the old one when it resumes; a dead route never does)."""


Also: TypeAlias = tuple[Callable[[], tuple[Any, ...]], Callable[[Any], None]]
"""``(command, answered)``: the command to send after each PONG (made anew each time), and
what is called with its reply."""


class HealthProbe:
    """Pings Redis; calls ``changed(up, reason)`` on every change of its verdict."""

    def __init__(
        self,
        client: aioredis.Redis,
        changed: Callable[[bool, str], None],
        *,
        interval: float = PROBE_INTERVAL,
        timeout: float = PROBE_TIMEOUT,
        also: Also | None = None,
    ) -> None:
        pool = client.connection_pool
        self._connection_class = pool.connection_class
        self._kwargs: dict[str, Any] = {
            **pool.connection_kwargs,
            "socket_timeout": None,  # the probe times its reads itself
            "socket_connect_timeout": timeout,
            "retry": Retry(NoBackoff(), 0),
            "health_check_interval": 0,
        }
        self._changed = changed
        self._also = also
        self._also_refused = False
        self._interval = interval
        self._timeout = timeout
        self.up = False
        self._kicked = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="wsrelay-redis-probe")

    async def stop(self) -> None:
        task, self._task = self._task, None
        self.up = False
        while task is not None and not task.done():
            # Again until it ends: a cancellation that meets a timeout inside redis-py
            # (which still uses wait_for) may come out as a TimeoutError, which the
            # probe takes for an outage.
            task.cancel()
            await asyncio.wait({task}, timeout=0.1)

    def kick(self) -> None:
        """Check now (another connection just failed), not at the next interval."""
        self._kicked.set()

    def _verdict(self, up: bool, reason: str) -> None:
        if up != self.up:
            self.up = up
            self._changed(up, reason)

    async def _pause(self) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._interval):
                await self._kicked.wait()
        self._kicked.clear()

    async def _run(self) -> None:
        while self._task is asyncio.current_task():  # (stop() clears it)
            answered = False
            connection = self._connection_class(**self._kwargs)
            try:
                async with asyncio.timeout(self._timeout):
                    await connection.connect()  # type: ignore[no-untyped-call]
                while True:
                    await self._ask(connection, ("PING",))
                    answered = True
                    self._verdict(True, "PONG")
                    if self._also is not None:
                        await self._ask_also(connection, *self._also)
                    await self._pause()
            except (RedisError, OSError, TimeoutError) as exc:
                if answered and not isinstance(exc, TimeoutError):
                    # A connection that worked failed: Redis may have restarted, or closed
                    # an idle client. A new connection says which, at once.
                    continue
                self._verdict(False, f"{type(exc).__name__}: {exc}")
            finally:
                # Bounded: closing a TLS connection to a dead Redis can wait forever (seen
                # on shutdown), and this runs when the probe is cancelled too.
                with contextlib.suppress(RedisError, OSError, TimeoutError):
                    async with asyncio.timeout(self._timeout):
                        await connection.disconnect(nowait=True)
            await self._pause()

    async def _ask_also(
        self,
        connection: Any,
        command: Callable[[], tuple[Any, ...]],
        answered: Callable[[Any], None],
    ) -> None:
        sent = command()
        try:
            reply = await self._ask(connection, sent)
        except ResponseError as exc:
            if not self._also_refused:
                log.warning("Redis refused the probe's %s: %s", sent[0], exc)
                self._also_refused = True
            return
        answered(reply)

    async def _ask(self, connection: Any, command: tuple[Any, ...]) -> Any:
        """Send ``command`` and return its reply, declaring Redis down if it is late."""
        name = command[0]
        await connection.send_command(*command, check_health=False)
        reply = asyncio.ensure_future(connection.read_response())
        try:
            await asyncio.wait({reply}, timeout=self._timeout)
            waited = self._timeout
            while not reply.done() and await self._busy():
                # The node, not Redis, may be the one late (a reconnect storm on a busy
                # core): wait on while its event loop lags, up to STALL_PATIENCE.
                if waited >= STALL_PATIENCE:
                    break
                await asyncio.wait({reply}, timeout=LAG_LIMIT)
                waited += LAG_LIMIT
            if not reply.done():
                self._verdict(False, f"no answer to {name} within {waited:g} s (stalled?)")
                await asyncio.wait({reply}, timeout=STALL_PATIENCE)
                if not reply.done():
                    raise TimeoutError(f"no answer to {name} within {STALL_PATIENCE:g} s")
            return reply.result()
        finally:
            if not reply.done():
                reply.cancel()
                # asyncio.wait, not await: a cancellation of the probe itself must go on
                await asyncio.wait({reply})
            if not reply.cancelled():
                reply.exception()  # retrieved, so that asyncio does not log it

    @staticmethod
    async def _busy() -> bool:
        """Whether the event loop lags (a short sleep takes much longer), reading what
        already arrived meanwhile."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        await asyncio.sleep(LAG_SAMPLE)
        return loop.time() - started > LAG_LIMIT
