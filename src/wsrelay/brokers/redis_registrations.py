"""Registrations in Redis, shared by every node (``--broker redis://``).

``wsrelay:reg:<id>`` holds ``[user, [topics]]``, or ``[user, [topics], [[subscribe
grants], [publish grants]]]`` for a registration with grants, with a TTL of
``registration_ttl`` seconds, refreshed while a connection is attached on some
node (every third of the TTL), so a registration outlives node restarts and
expires only when nobody uses it.

``wsrelay:user-regs:<user>`` counts a user's registrations for
``max_registrations_per_user``: a sorted set of their ids, each scored by the
time its key expires (Redis's clock, in milliseconds; a millisecond late, never
early). Every change to a key's TTL sets its score in the same Lua script, so
the two agree; adding prunes the scores already past, then counts and inserts,
atomically across nodes, so an expired registration never counts and two nodes
cannot both take the last slot. The set itself expires with its longest-lived
member. Anonymous registrations have no set.

Every command goes through :class:`~wsrelay.brokers.redis_client.Commands`, so
the commands of many clients attaching at once share round trips. What is only
this node's business stays here: which clients are attached (for the refresher).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import msgspec
import redis.asyncio as aioredis

from wsrelay.brokers.redis_client import FAILURES, Commands, Script, unavailable
from wsrelay.core.registry import Client
from wsrelay.core.rules import NO_GRANTS, Grants
from wsrelay.errors import BrokerUnavailable

log = logging.getLogger("wsrelay.redis")

_encode = msgspec.json.Encoder().encode


class _StoredValue(msgspec.Struct, array_like=True):
    """A registration's value; ``grants`` (subscribe, publish) is absent without grants."""

    user: str | None
    topics: list[str]
    grants: tuple[list[str], list[str]] | None = None


_decode_stored = msgspec.json.Decoder(_StoredValue).decode

_NOW_MS = """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
-- Score the id in its user's set by when its key (whose TTL was just set) expires, and
-- keep the set alive as long as its longest-lived member.
local function score_in_user_set(set, id, ttl)
  redis.call('ZADD', set, now_ms() + ttl * 1000 + 1, id)
  if redis.call('PTTL', set) < ttl * 1000 + 1 then
    redis.call('PEXPIRE', set, ttl * 1000 + 1)
  end
end
"""
# A score is read from the clock *after* the key's TTL was set, plus 1 ms, so it is never
# earlier than the moment the key expires: a pruned id is always a dead registration.

ADD_REGISTRATION_SCRIPT = (
    _NOW_MS
    + """
-- KEYS[1] the registration, KEYS[2] its user's set (absent if anonymous)
-- ARGV[1] value, ARGV[2] TTL in seconds, ARGV[3] limit (0: none), ARGV[4] the id
local ttl = tonumber(ARGV[2])
if KEYS[2] then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now_ms())
  local limit = tonumber(ARGV[3])
  if limit > 0 and redis.call('ZCARD', KEYS[2]) >= limit then
    return 0
  end
end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ttl)
if KEYS[2] then
  score_in_user_set(KEYS[2], ARGV[4], ttl)
end
return 1
"""
)

TOUCH_REGISTRATION_SCRIPT = (
    _NOW_MS
    + """
-- KEYS[1] the registration, KEYS[2] its user's set (absent if anonymous)
-- ARGV[1] TTL in seconds, ARGV[2] the id. Returns 0 if the registration is gone.
local ttl = tonumber(ARGV[1])
if redis.call('EXPIRE', KEYS[1], ttl) == 0 then
  if KEYS[2] then
    redis.call('ZREM', KEYS[2], ARGV[2])
  end
  return 0
end
if KEYS[2] then
  score_in_user_set(KEYS[2], ARGV[2], ttl)
end
return 1
"""
)

REMOVE_REGISTRATION_SCRIPT = """
-- KEYS[1] the registration, KEYS[2] its user's set (absent if anonymous); ARGV[1] the id
local removed = redis.call('DEL', KEYS[1])
if KEYS[2] then
  redis.call('ZREM', KEYS[2], ARGV[1])
end
return removed
"""


class RedisRegistrations:
    """A :class:`~wsrelay.brokers.base.RegistrationStore` in Redis keys with a TTL."""

    def __init__(self, client: aioredis.Redis | Commands, ttl: int) -> None:
        self._commands = client if isinstance(client, Commands) else Commands.over(client)
        self._ttl = ttl
        self._attached: dict[str, str | None] = {}  # id -> user, of clients attached here
        self._refresher: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._refresher = asyncio.create_task(self._refresh_forever(), name="wsrelay-reg-ttl")

    async def stop(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresher
            self._refresher = None

    @staticmethod
    def _key(client_id: str) -> str:
        return f"wsrelay:reg:{client_id}"

    @classmethod
    def _keys(cls, client_id: str, user: str | None) -> list[str]:
        """The registration's key, and its user's set unless it is anonymous."""
        key = cls._key(client_id)
        return [key] if user is None else [key, f"wsrelay:user-regs:{user}"]

    @staticmethod
    def _value(client: Client) -> bytes:
        grants = client.grants
        if not grants:  # the value every node has always written and read
            return _encode([client.user, sorted(client.topics)])
        return _encode([client.user, sorted(client.topics), [grants.subscribe, grants.publish]])

    async def add(self, client: Client, limit: int = 0) -> bool:
        keys = self._keys(client.id, client.user)
        args: list[bytes | int | str] = [self._value(client), self._ttl, limit, client.id]
        return bool(await self._run(self._commands.script(_ADD, keys, args)))

    async def get(self, client_id: str) -> Client | None:
        raw = await self._run(self._commands.call("GET", self._key(client_id)))
        if raw is None:
            return None
        stored = _decode_stored(raw)
        grants = Grants(*map(tuple, stored.grants)) if stored.grants else NO_GRANTS
        return Client(client_id, stored.user, set(stored.topics), grants)

    async def remove(self, client_id: str) -> bool:
        self._attached.pop(client_id, None)
        stored = await self.get(client_id)  # its user names the set to take it out of
        if stored is None:
            return False
        keys = self._keys(client_id, stored.user)
        return bool(await self._run(self._commands.script(_REMOVE, keys, [client_id])))

    async def save_topics(self, client: Client) -> None:
        key, value = self._key(client.id), self._value(client)
        await self._run(self._commands.call("SET", key, value, "XX", "KEEPTTL"))

    async def attached(self, client: Client) -> bool:
        exists = bool(await self._run(self._touch(client.id, client.user)))
        if exists:
            self._attached[client.id] = client.user
        return exists

    async def detached(self, client: Client) -> None:
        self._attached.pop(client.id, None)
        with contextlib.suppress(BrokerUnavailable):  # the TTL runs on regardless
            await self._run(self._touch(client.id, client.user))

    def _touch(self, client_id: str, user: str | None) -> asyncio.Future[Any]:
        """Restart the registration's TTL and its score in its user's set together."""
        return self._commands.script(_TOUCH, self._keys(client_id, user), [self._ttl, client_id])

    async def count(self) -> int | None:
        return None  # counting keys would need a SCAN of the keyspace

    async def remove_user(self, user: str) -> list[str]:
        """Delete each registration in the user's set (one script each, queued together)."""
        members = await self._run(self._commands.call("ZRANGE", f"wsrelay:user-regs:{user}", 0, -1))
        ids = [member.decode() for member in members]
        for client_id in ids:
            self._attached.pop(client_id, None)
        removed = await self._run(
            asyncio.gather(
                *(
                    self._commands.script(_REMOVE, self._keys(client_id, user), [client_id])
                    for client_id in ids
                )
            )
        )
        return [client_id for client_id, done in zip(ids, removed, strict=True) if done]

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(max(self._ttl / 3, 0.1))
            attached = list(self._attached.items())
            if not attached:
                continue
            # Queued at once: they go in as few pipelines as the queue allows.
            touches = [self._touch(client_id, user) for client_id, user in attached]
            for outcome in await asyncio.gather(*touches, return_exceptions=True):
                if isinstance(outcome, Exception):
                    log.debug("could not refresh registration TTLs: %s", outcome)
                    break

    @staticmethod
    async def _run(awaitable: Any) -> Any:
        try:
            return await awaitable
        except FAILURES as exc:
            raise unavailable(exc) from None


_ADD = Script(ADD_REGISTRATION_SCRIPT)
_TOUCH = Script(TOUCH_REGISTRATION_SCRIPT)
_REMOVE = Script(REMOVE_REGISTRATION_SCRIPT)
