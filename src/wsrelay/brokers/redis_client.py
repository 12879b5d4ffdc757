"""The redis-py client both Redis modules share, and how its failures are reported.

A node's commands wait for a connection instead of being refused (redis-py's
own pool refuses the command past its 100th connection), and the commands that
wait go to Redis together. :class:`Commands` queues every command a node sends
outside of publishing and pub/sub; each of up to ``broker_pool_size`` sender
tasks takes everything queued at once and sends it as one pipeline on one
connection. Alone, a command goes at once, in a pipeline of one; in a storm of
10,000 reconnecting clients, the commands of hundreds of them share each round
trip (docs/decisions/0006-redis-connection-pool.md has the measurements). The
connections come from a :class:`redis.asyncio.BlockingConnectionPool` with one
more connection, for the publishes (sent in order, one batch at a time); it
makes anything else that borrows a connection wait too, never fail.

Time is bounded by ``broker_timeout``: the wait for a connection, a command's
wait in the queue, and every read and write on a connection (the socket
timeout), so a stalled Redis is reported as :class:`BrokerUnavailable` after that
long rather than never. The pub/sub connection is the exception: it has its own
client (:func:`pubsub_client`) whose reads wait as long as no publication comes.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections import deque
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from wsrelay.errors import BrokerUnavailable, PublishOutcomeUnknown

HEALTH_CHECK_INTERVAL = 2
"""Idle connections are pinged before use after this many seconds, so that a
Redis restart costs few failed commands."""

CONNECT_TIMEOUT = 2.0
"""Seconds to open a TCP connection to Redis (at most ``timeout``)."""

DEFAULT_POOL_SIZE = 10
DEFAULT_TIMEOUT = 5.0

MAX_BATCH = 1000
"""Commands sent in one pipeline at most: a bigger storm takes several."""

FAILURES = (RedisError, OSError, BrokerUnavailable)
"""What a command here may fail with (:class:`Commands` reports a lost or stalled
connection as BrokerUnavailable, a command Redis refused as the ResponseError)."""


def make_client(
    url: str, *, pool_size: int = DEFAULT_POOL_SIZE, timeout: float = DEFAULT_TIMEOUT
) -> aioredis.Redis:
    """A client for ``url`` (password, ``rediss://`` TLS and ``/<db>`` as redis-py reads
    them) that never retries on its own (failures must reach us), holds at most
    ``pool_size`` connections and waits up to ``timeout`` seconds for one of them, and
    for any reply."""
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=pool_size,
        timeout=timeout,
        retry=Retry(NoBackoff(), 0),
        health_check_interval=HEALTH_CHECK_INTERVAL,
        socket_connect_timeout=min(CONNECT_TIMEOUT, timeout),
        socket_timeout=timeout,
    )
    return aioredis.Redis.from_pool(pool)


def pubsub_client(client: aioredis.Redis) -> aioredis.Redis:
    """A client like ``client`` for its pub/sub connection: outside its pool (a
    subscriber holds its connection for good) and without its read timeout (a quiet
    topic is not a stalled Redis)."""
    pool = client.connection_pool
    kwargs = {**pool.connection_kwargs, "socket_timeout": None}
    return aioredis.Redis.from_pool(
        aioredis.ConnectionPool(connection_class=pool.connection_class, **kwargs)
    )


def unavailable(exc: BaseException) -> BrokerUnavailable:
    """The error a caller sees when Redis failed with ``exc`` (a 503 over HTTP)."""
    if isinstance(exc, BrokerUnavailable):
        return exc
    if isinstance(exc, RedisTimeoutError):
        return BrokerUnavailable(
            f"Redis is stalled: no answer within broker_timeout ({type(exc).__name__}: "
            f"{exc}); try again"
        )
    return BrokerUnavailable(f"Redis is unreachable ({type(exc).__name__}: {exc}); try again")


def outcome_unknown(exc: BaseException) -> PublishOutcomeUnknown:
    """The error a publisher sees when Redis got the publish but its answer did not come."""
    return PublishOutcomeUnknown(
        f"Redis did not answer after the publish was sent ({type(exc).__name__}: {exc}): it "
        "may have been published; retry with the same idempotency_key"
    )


async def send_pipeline(client: aioredis.Redis, commands: Sequence[tuple[Any, ...]]) -> list[Any]:
    """Send ``commands`` as one pipeline on a connection of ``client``'s pool and read each
    reply (an error reply as its :class:`ResponseError`), telling apart what Redis
    certainly did not get from what it may have run.

    The replies that did not come (the connection failed or timed out once the commands
    were written) are :class:`PublishOutcomeUnknown` instances in the list.

    Raises:
        BrokerUnavailable: nothing was sent (no connection could be had or made, or its
            health check failed before the commands were written).
    """
    pool = client.connection_pool
    try:
        connection = await pool.get_connection()  # type: ignore[no-untyped-call]
    except FAILURES as exc:
        raise unavailable(exc) from None
    try:
        try:
            await connection.check_health()
        except FAILURES as exc:
            raise unavailable(exc) from None
        replies: list[Any] = []
        try:
            await connection.send_packed_command(
                connection.pack_commands(commands), check_health=False
            )
            for _ in commands:
                try:
                    replies.append(await connection.read_response())
                except ResponseError as exc:  # Redis answered, with an error
                    replies.append(exc)
        except (RedisError, OSError) as exc:
            # Written (perhaps in part) and not all answered: the connection is out of step
            # with its replies, and what Redis did with the rest is unknown.
            with contextlib.suppress(RedisError, OSError, TimeoutError):  # (TLS: may hang)
                async with asyncio.timeout(CONNECT_TIMEOUT):
                    await connection.disconnect(nowait=True)
            replies.extend([outcome_unknown(exc)] * (len(commands) - len(replies)))
        return replies
    finally:
        # Shielded: a cancelled sender must still give the connection back.
        await asyncio.shield(pool.release(connection))


class Script:
    """A Lua script run by :meth:`Commands.script`: EVALSHA, and the source to load it
    with if Redis lost it."""

    __slots__ = ("sha", "source")

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()


class _Call:
    __slots__ = ("args", "done", "queued", "script")

    def __init__(
        self, args: tuple[Any, ...], done: asyncio.Future[Any], queued: float, script: Script | None
    ) -> None:
        self.args = args
        self.done = done
        self.queued = queued
        self.script = script


class Commands:
    """Commands queued and sent in pipelines, over at most ``lanes`` connections at once.

    Replies come back in the order each connection's pipeline was sent; commands sent
    on different connections may run in any order, so a caller that needs one command
    to run before another awaits the first (as every caller here does). No command is
    retried, except a script Redis answered ``NOSCRIPT`` for, which did not run.
    """

    def __init__(self, client: aioredis.Redis, *, lanes: int, timeout: float) -> None:
        self.client = client
        """The client whose pool the pipelines take their connections from."""
        self._lanes = lanes
        self._timeout = timeout
        self._queue: deque[_Call] = deque()
        self._senders: set[asyncio.Task[None]] = set()
        self._sending = 0
        """Senders started and not finished. Counted down as a sender finds the queue
        empty, without an await in between: a task's done callback would come a loop
        iteration later, and a command queued meanwhile would wait for no sender."""

    @classmethod
    def over(cls, client: aioredis.Redis) -> Commands:
        """Commands over ``client``'s pool, leaving one of its connections free (for
        the publishes, which go in order on one connection at a time)."""
        pool = client.connection_pool
        timeout = getattr(pool, "timeout", None) or pool.connection_kwargs.get("socket_timeout")
        lanes = max(1, pool.max_connections - 1)
        return cls(client, lanes=lanes, timeout=float(timeout or DEFAULT_TIMEOUT))

    def call(self, *args: Any) -> asyncio.Future[Any]:
        """Send one command (``"GET", key``); its reply, as redis-py parses it.

        Raises (from the future):
            BrokerUnavailable: Redis did not answer within the timeout, or failed.
            redis.exceptions.ResponseError: Redis refused the command itself.
        """
        return self._enqueue(args, None)

    def script(
        self, script: Script, keys: Sequence[str], args: Sequence[bytes | str | int]
    ) -> asyncio.Future[Any]:
        """Run ``script`` (EVALSHA, loading it first if Redis answers NOSCRIPT)."""
        return self._enqueue(("EVALSHA", script.sha, len(keys), *keys, *args), script)

    def _enqueue(self, args: tuple[Any, ...], script: Script | None) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[Any] = loop.create_future()
        self._queue.append(_Call(args, done, loop.time(), script))
        if self._sending < self._lanes:
            # Started, not run: everything queued until it runs goes in its pipeline.
            self._sending += 1
            sender = loop.create_task(self._send(), name="wsrelay-redis-commands")
            self._senders.add(sender)
            sender.add_done_callback(self._senders.discard)
        return done

    async def stop(self) -> None:
        """Fail what waits and stop the senders."""
        for sender in list(self._senders):
            sender.cancel()
        if self._senders:
            await asyncio.gather(*self._senders, return_exceptions=True)
        while self._queue:
            call = self._queue.popleft()
            if not call.done.done():
                call.done.set_exception(BrokerUnavailable("the relay is shutting down"))

    async def _send(self) -> None:
        try:
            await self._send_all()
        finally:
            self._sending -= 1

    async def _send_all(self) -> None:
        queue, loop = self._queue, asyncio.get_running_loop()
        while queue:
            batch: list[_Call] = []
            stale = loop.time() - self._timeout
            while queue and len(batch) < MAX_BATCH:
                call = queue.popleft()
                if call.done.done():
                    continue  # its caller went away
                if call.queued < stale:
                    call.done.set_exception(
                        BrokerUnavailable(
                            f"Redis did not take the command within {self._timeout:g} s "
                            "(broker_timeout); try again"
                        )
                    )
                    continue
                batch.append(call)
            if batch:
                await self._run(batch)

    async def _run(self, batch: list[_Call]) -> None:
        try:
            results = await self._pipeline([call.args for call in batch])
            scripts: dict[str, Script] = {}
            lost = []
            for i, (call, result) in enumerate(zip(batch, results, strict=True)):
                if isinstance(result, NoScriptError) and call.script is not None:
                    scripts[call.script.sha] = call.script
                    lost.append(i)
            if lost:
                # NOSCRIPT: nothing ran. Load each script once, then run those again.
                again = await self._pipeline(
                    [("SCRIPT", "LOAD", s.source) for s in scripts.values()]
                    + [batch[i].args for i in lost]
                )
                for i, result in zip(lost, again[len(scripts) :], strict=True):
                    results[i] = result
        except (RedisError, OSError, RuntimeError) as exc:
            # RuntimeError: uvloop's "unable to perform operation on <TCPTransport closed>",
            # when redis-py writes on a connection Redis has just closed.
            results = [unavailable(exc)] * len(batch)
        except BaseException:  # stopped (cancelled) mid-batch: nobody may wait forever
            for call in batch:
                if not call.done.done():
                    call.done.set_exception(BrokerUnavailable("the relay is shutting down"))
            raise
        for call, result in zip(batch, results, strict=True):
            if call.done.done():
                continue
            if isinstance(result, BaseException):
                call.done.set_exception(result)
            else:
                call.done.set_result(result)

    async def _pipeline(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        async with self.client.pipeline(transaction=False) as pipe:
            for args in commands:
                pipe.execute_command(*args)
            results: list[Any] = await pipe.execute(raise_on_error=False)
            return results
