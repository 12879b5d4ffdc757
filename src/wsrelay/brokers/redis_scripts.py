"""What the Redis broker keeps in Redis, and the Lua scripts that keep it.

Per topic, under one hash tag (Redis Cluster puts a topic's keys in one slot):

``wsrelay:{<topic>}:epoch``
    The topic's epoch, a random id made with its history (``SET`` by whichever
    script finds it missing, from an id the node passes in).
``wsrelay:{<topic>}:offset``
    The last offset given (``INCR``). It and the epoch live ``max(history_ttl,
    META_TTL)`` after the topic's last publish or history read, so a quiet topic
    keeps its epoch. A topic that lost either one lost its history: the script
    that notices makes a new epoch, offsets start again at 1, the stream goes.
``wsrelay:{<topic>}:stream``
    The last ``history_size`` publications, entry id ``0-<offset>``, fields ``d``
    (the payload) and ``t`` (Redis's clock, ms, to expire entries older than
    ``history_ttl``); the key expires ``history_ttl`` after the last publish.
    Absent when ``history_size`` is 0.
``wsrelay:{<topic>}:key:<idempotency key>``
    ``"<epoch> <offset>"`` of the first publish made with that key, for
    ``idempotency_window``; ``SET`` in the publish script itself, so a repeat
    (on any node) is answered that position and publishes nothing.

Live traffic goes to the channel ``wsrelay:{<topic>}:live`` as
``"<epoch> <offset> <payload>"``, ``PUBLISH``-ed by the same script: the
channel carries a topic's publications in offset order.
"""

from __future__ import annotations

from typing import Final

from wsrelay.brokers.redis_client import Script

LIVE_SUFFIX: Final = "}:live"


def keys(topic: str) -> tuple[str, str, str]:
    """The topic's stream, offset and epoch keys."""
    base = f"wsrelay:{{{topic}}}"
    return f"{base}:stream", f"{base}:offset", f"{base}:epoch"


def idempotency_key(topic: str, key: str) -> str:
    return f"wsrelay:{{{topic}}}:key:{key}"


def channel(topic: str) -> str:
    return f"wsrelay:{{{topic}{LIVE_SUFFIX}"


def topic_of(channel_name: str) -> str:
    return channel_name[len("wsrelay:{") : -len(LIVE_SUFFIX)]


# Shared by the scripts that may find a topic's history lost: make a new epoch, offsets
# from 1, no stream (its entries belong to the lost epoch, and XADD 0-1 would be refused
# after them).
_POSITION = """
local function position(stream, offset_key, epoch_key, new_epoch, meta_ttl)
  local epoch = redis.call('GET', epoch_key)
  local offset = redis.call('GET', offset_key)
  if not epoch or not offset then
    epoch = new_epoch
    offset = 0
    redis.call('DEL', stream)
    redis.call('SET', epoch_key, epoch, 'PX', meta_ttl)
    redis.call('SET', offset_key, 0, 'PX', meta_ttl)
  else
    redis.call('PEXPIRE', epoch_key, meta_ttl)
    redis.call('PEXPIRE', offset_key, meta_ttl)
  end
  return epoch, tonumber(offset)
end
"""

PUBLISH = Script(
    _POSITION
    + """
-- KEYS: stream, offset, epoch[, idempotency key]
-- ARGV: payload, new epoch, history size, history ttl ms, meta ttl ms, channel, key window ms
-- Returns {"<epoch> <offset>", 1 if a repeat of an earlier publish with that key}.
if KEYS[4] then
  local seen = redis.call('GET', KEYS[4])
  if seen then return {seen, 1} end
end
local epoch, offset = position(KEYS[1], KEYS[2], KEYS[3], ARGV[2], ARGV[5])
offset = redis.call('INCR', KEYS[2])
local size = tonumber(ARGV[3])
if size > 0 then
  local now = redis.call('TIME')
  local ms = now[1] .. string.format('%03d', math.floor(tonumber(now[2]) / 1000))
  redis.call('XADD', KEYS[1], 'MAXLEN', '=', size, '0-' .. offset, 'd', ARGV[1], 't', ms)
  redis.call('PEXPIRE', KEYS[1], ARGV[4])
end
local at = epoch .. ' ' .. offset
if KEYS[4] then redis.call('SET', KEYS[4], at, 'PX', ARGV[7]) end
redis.call('PUBLISH', ARGV[6], at .. ' ' .. ARGV[1])
return {at, 0}
"""
)

HISTORY = Script(
    _POSITION
    + """
-- KEYS: stream, offset, epoch
-- ARGV: new epoch, meta ttl ms, since, limit, reverse (1/0), history size, history ttl ms
-- Returns {epoch, offset, entries}: at most limit entries with an offset above since,
-- among the last history-size offsets and younger than history ttl.
local epoch, top = position(KEYS[1], KEYS[2], KEYS[3], ARGV[1], ARGV[2])
local limit = tonumber(ARGV[4])
if limit <= 0 or top == 0 then return {epoch, top, {}} end
-- Entries are in time order: drop the prefix older than the history ttl.
local now = redis.call('TIME')
local cutoff = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000) - tonumber(ARGV[7])
while true do
  local head = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 64)
  if #head == 0 then break end
  local young = nil
  for _, entry in ipairs(head) do
    local t = tonumber(entry[2][4])
    if t == nil or t >= cutoff then
      young = entry[1]
      break
    end
  end
  if young then
    redis.call('XTRIM', KEYS[1], 'MINID', young)
    break
  end
  local last = tonumber(string.match(head[#head][1], '-(%d+)$'))
  redis.call('XTRIM', KEYS[1], 'MINID', '0-' .. (last + 1))
end
-- Never more than history-size, even if the stream keeps more.
local low = math.max(tonumber(ARGV[3]), top - tonumber(ARGV[6])) + 1
if low > top then return {epoch, top, {}} end
local entries
if ARGV[5] == '1' then
  entries = redis.call('XREVRANGE', KEYS[1], '0-' .. top, '0-' .. low, 'COUNT', limit)
else
  entries = redis.call('XRANGE', KEYS[1], '0-' .. low, '0-' .. top, 'COUNT', limit)
end
return {epoch, top, entries}
"""
)

READ = Script(
    """
-- KEYS: stream, offset, epoch.  ARGV: known epoch, first offset, last offset (or +), count
-- Returns {epoch or nil, offset, entries from first to last}: what a node missed. From
-- offset 1 if the epoch is not the one the node knew (the whole new epoch is new to it).
local epoch = redis.call('GET', KEYS[3])
if not epoch then return {false, 0, {}} end
local top = tonumber(redis.call('GET', KEYS[2]) or '0')
local first = ARGV[2]
if epoch ~= ARGV[1] then first = '1' end
local last = ARGV[3]
if last ~= '+' then last = '0-' .. last end
return {epoch, top, redis.call('XRANGE', KEYS[1], '0-' .. first, last, 'COUNT', ARGV[4])}
"""
)
