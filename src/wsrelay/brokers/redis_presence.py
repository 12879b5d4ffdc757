"""Presence in Redis, shared by every node (``--broker redis://``).

Each presence set (:mod:`wsrelay.core.presence`: a topic's subscribers, a user's
connections) is two keys under one hash tag, so that a Redis Cluster keeps them in
one slot:

``wsrelay:{<topic>}:presence`` / ``wsrelay:user-online:{<user>}``
    A hash: public client id -> the entry (JSON: client, user, node, connected_at).
``…:exp`` (the same name followed by ``:exp``)
    A sorted set: public client id -> when its entry expires (Redis's clock, ms).

An entry lives ``presence_ttl`` seconds after it was last written. The node holding
a connection writes its entries again every third of that (:meth:`RedisPresence.start`
runs the heartbeat: the entries of each set in a few scripts, queued together so that
they share pipelines), so a live node's entries never expire, and those of a node that
died vanish within ``presence_ttl``. Expired entries are dropped by the script that
reads a set, before it answers; both keys expire ``presence_ttl`` after their last
write, so an abandoned set leaves nothing behind.

A heartbeat writes the whole entry, not only its expiry: entries lost meanwhile
(Redis restarted empty, or the node was cut off for longer than the expiry) come
back by themselves.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, Final

import msgspec
import redis.asyncio as aioredis

from wsrelay.brokers.redis_client import FAILURES, Commands, Script, unavailable
from wsrelay.core.schema import PresenceClient

log = logging.getLogger("wsrelay.redis")

REFRESH_BATCH: Final = 200
"""Entries one heartbeat script writes at most (a set holding more takes several)."""

_encode = msgspec.json.Encoder().encode
_decode_entry = msgspec.json.Decoder(PresenceClient).decode

_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

ADD = Script(
    _NOW
    + """
-- KEYS: the hash, the expiry set.  ARGV: client, entry, ttl ms.
-- Returns 1 if the set held no live entry for the client (a join), else 0.
local ttl = tonumber(ARGV[3])
local old = redis.call('ZSCORE', KEYS[2], ARGV[1])
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], now + ttl, ARGV[1])
redis.call('PEXPIRE', KEYS[1], ttl)
redis.call('PEXPIRE', KEYS[2], ttl)
if old and tonumber(old) > now then return 0 end
return 1
"""
)

REMOVE = Script(
    """
-- KEYS: the hash, the expiry set.  ARGV: client, node.
-- Removes the client's entry if that node holds it; returns 1 if it did (a leave).
local entry = redis.call('HGET', KEYS[1], ARGV[1])
if not entry then return 0 end
local ok, decoded = pcall(cjson.decode, entry)
if ok and type(decoded) == 'table' and decoded['node'] ~= ARGV[2] then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
return 1
"""
)

READ = Script(
    _NOW
    + """
-- KEYS: the hash, the expiry set.  ARGV: 'entries' or 'count'.
-- Drops the expired entries, then answers the live ones (or how many there are).
while true do
  local dead = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, 500)
  if #dead == 0 then break end
  redis.call('HDEL', KEYS[1], unpack(dead))
  redis.call('ZREM', KEYS[2], unpack(dead))
end
if ARGV[1] == 'count' then return redis.call('HLEN', KEYS[1]) end
return redis.call('HVALS', KEYS[1])
"""
)

REFRESH = Script(
    _NOW
    + """
-- KEYS: the hash, the expiry set.  ARGV: ttl ms, then client, entry, client, entry...
-- Writes the entries again, each expiring ttl from now (a node's heartbeat).
local ttl = tonumber(ARGV[1])
for i = 2, #ARGV, 2 do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
  redis.call('ZADD', KEYS[2], now + ttl, ARGV[i])
end
redis.call('PEXPIRE', KEYS[1], ttl)
redis.call('PEXPIRE', KEYS[2], ttl)
return 1
"""
)


def keys(key: str) -> tuple[str, str]:
    """The hash and the expiry set of presence set ``key`` (``topic:…`` or ``user:…``)."""
    kind, _, name = key.partition(":")
    base = f"wsrelay:{{{name}}}:presence" if kind == "topic" else f"wsrelay:user-online:{{{name}}}"
    return base, base + ":exp"


class RedisPresence:
    """A :class:`~wsrelay.brokers.base.PresenceStore` in Redis; see the module docstring.
    ``ttl``: seconds an entry lives after its last write."""

    def __init__(self, client: aioredis.Redis | Commands, ttl: float = 30.0) -> None:
        self._commands = client if isinstance(client, Commands) else Commands.over(client)
        self.ttl = ttl
        self._ttl_ms = max(1, int(ttl * 1000))
        self._node = ""
        self._held: dict[str, dict[str, bytes]] = {}
        """set -> client -> encoded entry, of the entries this node added: the heartbeat's."""
        self._heartbeat: asyncio.Task[None] | None = None

    async def start(self, node: str) -> None:
        self._node = node
        if self._heartbeat is None:
            self._heartbeat = asyncio.create_task(self._beat_forever(), name="wsrelay-presence")

    async def stop(self) -> None:
        heartbeat, self._heartbeat = self._heartbeat, None
        if heartbeat is not None:
            heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await heartbeat

    async def add(self, key: str, entry: PresenceClient) -> bool:
        encoded = _encode(entry)
        # Held before it is sent: a heartbeat writes it again if this write fails.
        self._held.setdefault(key, {})[entry.client] = encoded
        return bool(
            await self._run(
                self._commands.script(ADD, keys(key), (entry.client, encoded, self._ttl_ms))
            )
        )

    async def remove(self, key: str, client: str, node: str) -> bool:
        if node == self._node:
            self.forget(key, client)
        return bool(await self._run(self._commands.script(REMOVE, keys(key), (client, node))))

    def forget(self, key: str, client: str) -> None:
        held = self._held.get(key)
        if held is not None:
            held.pop(client, None)
            if not held:
                del self._held[key]

    async def entries(self, key: str) -> list[PresenceClient]:
        raw = await self._run(self._commands.script(READ, keys(key), ("entries",)))
        entries = []
        for value in raw:
            try:
                entries.append(_decode_entry(value))
            except msgspec.DecodeError:
                log.warning("ignored an unreadable presence entry in %s", keys(key)[0])
        return entries

    async def count(self, key: str) -> int:
        return int(await self._run(self._commands.script(READ, keys(key), ("count",))))

    async def refresh(self) -> None:
        """Write every entry this node holds again (one heartbeat).

        Raises:
            BrokerUnavailable: Redis is unreachable (the next heartbeat tries again).
        """
        calls = []
        for key, held in list(self._held.items()):
            items = list(held.items())
            for start in range(0, len(items), REFRESH_BATCH):
                args: list[Any] = [self._ttl_ms]
                for client, encoded in items[start : start + REFRESH_BATCH]:
                    args += (client, encoded)
                calls.append(self._commands.script(REFRESH, keys(key), args))
        # Queued at once: they go to Redis in as few pipelines as the queue allows.
        for outcome in await asyncio.gather(*calls, return_exceptions=True):
            if isinstance(outcome, BaseException):
                raise unavailable(outcome) if isinstance(outcome, FAILURES) else outcome

    async def _beat_forever(self) -> None:
        while True:
            await asyncio.sleep(self.ttl / 3)
            try:
                await self.refresh()
            except FAILURES as exc:
                log.debug("could not refresh presence entries: %s", exc)

    @staticmethod
    async def _run(awaitable: Any) -> Any:
        try:
            return await awaitable
        except FAILURES as exc:
            raise unavailable(exc) from None
