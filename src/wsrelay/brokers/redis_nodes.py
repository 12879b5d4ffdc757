"""The node registry in Redis (``GET /nodes``, and the metrics ``--workers`` share).

Three keys under one hash tag, so that a Redis Cluster keeps them in one slot:

``wsrelay:{nodes}:info``
    A hash: node id -> its last heartbeat's :class:`~wsrelay.core.schema.NodeInfo` (JSON).
``wsrelay:{nodes}:metrics``
    A hash: node id -> its last metrics snapshot (:mod:`wsrelay.server.metrics`).
``wsrelay:{nodes}:exp``
    A sorted set: node id -> when its entry expires (Redis's clock, ms).

As with presence (:mod:`wsrelay.brokers.redis_presence`), a node writes its entry every
third of ``ttl`` (:class:`wsrelay.nodes.Beacon`), and every read drops the expired
entries first: a node killed without a word vanishes within ``ttl``. The keys expire
``ttl`` after the last heartbeat of any node, so nothing is left behind.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Final

import msgspec
import redis.asyncio as aioredis

from wsrelay.brokers.redis_client import FAILURES, Commands, Script, unavailable
from wsrelay.core.schema import NodeInfo

log = logging.getLogger("wsrelay.redis")

KEYS: Final = ("wsrelay:{nodes}:info", "wsrelay:{nodes}:metrics", "wsrelay:{nodes}:exp")

_encode = msgspec.json.Encoder().encode
_decode_info = msgspec.json.Decoder(NodeInfo).decode

_DROP_EXPIRED = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
while true do
  local dead = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now, 'LIMIT', 0, 500)
  if #dead == 0 then break end
  redis.call('HDEL', KEYS[1], unpack(dead))
  redis.call('HDEL', KEYS[2], unpack(dead))
  redis.call('ZREM', KEYS[3], unpack(dead))
end
"""

HEARTBEAT = Script(
    _DROP_EXPIRED
    + """
-- KEYS: info, metrics, expiry.  ARGV: node, info, ttl ms[, metrics].
local ttl = tonumber(ARGV[3])
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
if ARGV[4] then redis.call('HSET', KEYS[2], ARGV[1], ARGV[4]) end
redis.call('ZADD', KEYS[3], now + ttl, ARGV[1])
for i = 1, 3 do redis.call('PEXPIRE', KEYS[i], ttl) end
return 1
"""
)

READ = Script(
    _DROP_EXPIRED
    + """
-- KEYS: info, metrics, expiry.  ARGV: 'info', or 'metrics' and node ids.
if ARGV[1] == 'info' then return redis.call('HVALS', KEYS[1]) end
if #ARGV < 2 then return {} end
return redis.call('HMGET', KEYS[2], unpack(ARGV, 2))
"""
)

LEAVE = Script(
    """
-- KEYS: info, metrics, expiry.  ARGV: node.
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
return 1
"""
)


class RedisNodes:
    """A :class:`~wsrelay.brokers.base.NodeRegistry` in Redis; see the module docstring.
    ``ttl``: seconds an entry lives after its node's last heartbeat."""

    def __init__(self, client: aioredis.Redis | Commands, ttl: float = 30.0) -> None:
        self._commands = client if isinstance(client, Commands) else Commands.over(client)
        self.ttl = ttl
        self._ttl_ms = max(1, int(ttl * 1000))

    async def heartbeat(self, info: NodeInfo, metrics: bytes | None = None) -> None:
        args: list[bytes | str | int] = [info.id, _encode(info), self._ttl_ms]
        if metrics is not None:
            args.append(metrics)
        await self._run(self._commands.script(HEARTBEAT, KEYS, args))

    async def nodes(self) -> list[NodeInfo]:
        found = []
        for value in await self._run(self._commands.script(READ, KEYS, ("info",))):
            try:
                found.append(_decode_info(value))
            except msgspec.DecodeError:
                log.warning("ignored an unreadable node entry in %s", KEYS[0])
        found.sort(key=lambda info: (info.started_at, info.id))
        return found

    async def metrics(self, ids: Sequence[str]) -> dict[str, bytes]:
        ids = list(ids)
        if not ids:
            return {}
        values = await self._run(self._commands.script(READ, KEYS, ("metrics", *ids)))
        return {node: value for node, value in zip(ids, values, strict=True) if value is not None}

    async def leave(self, node: str) -> None:
        await self._run(self._commands.script(LEAVE, KEYS, (node,)))

    @staticmethod
    async def _run(awaitable: Any) -> Any:
        try:
            return await awaitable
        except FAILURES as exc:
            raise unavailable(exc) from None
