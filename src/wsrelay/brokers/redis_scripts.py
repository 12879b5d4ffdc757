"""What the Redis broker keeps in Redis, and the Lua scripts that keep it.

Per topic, under one hash tag (Redis Cluster puts a topic's keys in one slot):

``wsrelay:{<topic>}:epoch``
    The topic's epoch, a random id made with its history (``SET`` by the publish
    script when it finds it missing, from an id the node passes in).
``wsrelay:{<topic>}:offset``
    The last offset given (``INCR``). It and the epoch live ``max(history_ttl,
    META_TTL)`` after the topic's last publish or history read, so a quiet topic
    keeps its epoch. A topic that lost either one lost its history: the next
    publish makes a new epoch, offsets start again at 1, the stream goes. Reading
    a topic without them (never published, or lost) writes nothing: the history
    script answers Redis's time instead, for the node's *empty position*.
``wsrelay:{<topic>}:run``
    ``"<run_id> <lastsave> <checked>"``: Redis's ``run_id`` (``INFO server``) when the
    epoch was made, with ``LASTSAVE`` and Redis's time (s) when that was last verified
    (so that ``INFO`` is read again only after a save, see ``_RUN``), kept with it. A
    position whose ``run`` is not the running process's (Redis restarted, maybe from
    an older snapshot that does not hold the offsets given since; or a position
    stored before this key existed) is a lost history: read as none, and the next
    publish makes a new epoch. So every Redis restart starts new epochs.
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

One key for the whole Redis:

``wsrelay:generation``
    A hash: ``id``, a random id, and ``mark``, Redis's ``run_id``, ``evicted_keys``
    and ``master_replid`` when it was made. :data:`GENERATION` makes a new id when
    the key is missing (FLUSHALL, Redis restarted empty) or the mark changed (Redis
    restarted, even from a snapshot; keys were evicted; a replica loaded another
    master's data), so an unchanged id means that no topic's keys were lost since,
    other than by expiry. No TTL.
"""

from __future__ import annotations

from typing import Final

from wsrelay.brokers.redis_client import Script

LIVE_SUFFIX: Final = "}:live"

GENERATION_KEY: Final = "wsrelay:generation"


def keys(topic: str) -> tuple[str, str, str, str]:
    """The topic's stream, offset, epoch and run keys."""
    base = f"wsrelay:{{{topic}}}"
    return f"{base}:stream", f"{base}:offset", f"{base}:epoch", f"{base}:run"


def idempotency_key(topic: str, key: str) -> str:
    return f"wsrelay:{{{topic}}}:key:{key}"


def channel(topic: str) -> str:
    return f"wsrelay:{{{topic}{LIVE_SUFFIX}"


def topic_of(channel_name: str) -> str:
    return channel_name[len("wsrelay:{") : -len(LIVE_SUFFIX)]


# Is a topic's position from the running Redis process? Its `run` key holds
# "<run_id> <lastsave> <checked>": Redis's run_id (INFO server, ~8 us of Redis CPU) and
# LASTSAVE (~0.4 us) when it was last verified, and Redis's time then (s). LASTSAVE is set
# to the start time when Redis starts and only grows after (at each save), so while it is
# still the one recorded, and older than the check, Redis cannot have restarted since: INFO
# is read only again after a save (once per topic and save). Where a script cannot read
# INFO, run_id is '-': no restart is noticed.
_RUN = """
local function run_id()
  local text = redis.pcall('INFO', 'server')
  if type(text) ~= 'string' then return '-' end
  return string.match(text, 'run_id:(%w+)') or '-'
end
local function proof(run)
  return run .. ' ' .. redis.call('LASTSAVE') .. ' ' .. redis.call('TIME')[1]
end
-- Whether the position whose run key is `run_key` was made in this Redis process (the
-- key re-proved, keeping its TTL, when that took INFO).
local function this_run(run_key)
  local held = redis.call('GET', run_key)
  if not held then return false end
  local run, saved, checked = string.match(held, '^(%S+) (%d+) (%d+)$')
  if not run then return false end
  if tonumber(saved) == redis.call('LASTSAVE') and tonumber(saved) < tonumber(checked) then
    return true
  end
  local now = run_id()
  if run ~= now then return false end
  redis.call('SET', run_key, proof(now), 'KEEPTTL')
  return true
end
"""

# The publish script's, when it finds a topic's history lost (or never made, or made by
# another Redis process): a new epoch, offsets from 1, no stream (its entries belong to the
# lost epoch, and XADD 0-1 would be refused after them).
_POSITION = (
    _RUN
    + """
local function position(stream, offset_key, epoch_key, run_key, new_epoch, meta_ttl)
  local epoch = redis.call('GET', epoch_key)
  local offset = redis.call('GET', offset_key)
  if not epoch or not offset or not this_run(run_key) then
    epoch = new_epoch
    offset = 0
    redis.call('DEL', stream)
    redis.call('SET', epoch_key, epoch, 'PX', meta_ttl)
    redis.call('SET', offset_key, 0, 'PX', meta_ttl)
    redis.call('SET', run_key, proof(run_id()), 'PX', meta_ttl)
  else
    redis.call('PEXPIRE', epoch_key, meta_ttl)
    redis.call('PEXPIRE', offset_key, meta_ttl)
    redis.call('PEXPIRE', run_key, meta_ttl)
  end
  return epoch, tonumber(offset)
end
"""
)

PUBLISH = Script(
    _POSITION
    + """
-- KEYS: stream, offset, epoch, run[, idempotency key]
-- ARGV: payload, new epoch, history size, history ttl ms, meta ttl ms, channel, key window ms
-- Returns {"<epoch> <offset>", 1 if a repeat of an earlier publish with that key}.
if KEYS[5] then
  local seen = redis.call('GET', KEYS[5])
  if seen then return {seen, 1} end
end
local epoch, offset = position(KEYS[1], KEYS[2], KEYS[3], KEYS[4], ARGV[2], ARGV[5])
offset = redis.call('INCR', KEYS[2])
local size = tonumber(ARGV[3])
if size > 0 then
  local now = redis.call('TIME')
  local ms = now[1] .. string.format('%03d', math.floor(tonumber(now[2]) / 1000))
  redis.call('XADD', KEYS[1], 'MAXLEN', '=', size, '0-' .. offset, 'd', ARGV[1], 't', ms)
  redis.call('PEXPIRE', KEYS[1], ARGV[4])
end
local at = epoch .. ' ' .. offset
if KEYS[5] then redis.call('SET', KEYS[5], at, 'PX', ARGV[7]) end
redis.call('PUBLISH', ARGV[6], at .. ' ' .. ARGV[1])
return {at, 0}
"""
)

_NOW = """
local function now_ms()
  local now = redis.call('TIME')
  return now[1] .. string.format('%03d', math.floor(tonumber(now[2]) / 1000))
end
"""

HISTORY = Script(
    _NOW
    + _RUN
    + """
-- KEYS: stream, offset, epoch, run
-- ARGV: meta ttl ms, since, limit, reverse (1/0), history size, history ttl ms
-- Returns {epoch, offset, entries}: at most limit entries with an offset above since,
-- among the last history-size offsets and younger than history ttl. A topic without a
-- position (never published, or its position lost, or made by another Redis process: its
-- next publish starts a new epoch) is answered {false, 0, {}, Redis's time in ms}, and
-- nothing is written: reading a topic never creates its keys.
local epoch = redis.call('GET', KEYS[3])
local top = redis.call('GET', KEYS[2])
if not epoch or not top or not this_run(KEYS[4]) then
  return {false, 0, {}, now_ms()}
end
redis.call('PEXPIRE', KEYS[3], ARGV[1])
redis.call('PEXPIRE', KEYS[2], ARGV[1])
redis.call('PEXPIRE', KEYS[4], ARGV[1])
top = tonumber(top)
local limit = tonumber(ARGV[3])
if limit <= 0 or top == 0 then return {epoch, top, {}} end
-- Entries are in time order: drop the prefix older than the history ttl.
local now = redis.call('TIME')
local cutoff = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000) - tonumber(ARGV[6])
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
local low = math.max(tonumber(ARGV[2]), top - tonumber(ARGV[5])) + 1
if low > top then return {epoch, top, {}} end
local entries
if ARGV[4] == '1' then
  entries = redis.call('XREVRANGE', KEYS[1], '0-' .. top, '0-' .. low, 'COUNT', limit)
else
  entries = redis.call('XRANGE', KEYS[1], '0-' .. low, '0-' .. top, 'COUNT', limit)
end
return {epoch, top, entries}
"""
)

READ = Script(
    _RUN
    + """
-- KEYS: stream, offset, epoch, run.  ARGV: known epoch, first offset, last offset (or +), count
-- Returns {epoch or nil, offset, entries from first to last}: what a node missed. From
-- offset 1 if the epoch is not the one the node knew (the whole new epoch is new to it).
-- None if the epoch was made by another Redis process (its next publish makes a new one).
local epoch = redis.call('GET', KEYS[3])
if not epoch or not this_run(KEYS[4]) then return {false, 0, {}} end
local top = tonumber(redis.call('GET', KEYS[2]) or '0')
local first = ARGV[2]
if epoch ~= ARGV[1] then first = '1' end
local last = ARGV[3]
if last ~= '+' then last = '0-' .. last end
return {epoch, top, redis.call('XRANGE', KEYS[1], '0-' .. first, last, 'COUNT', ARGV[4])}
"""
)

GENERATION = Script(
    _NOW
    + """
-- KEYS: the generation key.  ARGV: an id for a new generation, 1 to answer Redis's time
-- Returns {generation id[, Redis's time in ms]}: the id held, or a new one (ARGV[1]) if
-- the key is missing or Redis restarted, evicted keys or loaded another master's data
-- (REPLICAOF: a new replication id) since the id was made. Where
-- INFO cannot be read, every call makes a new one (nothing can be vouched for).
local function info(section, name)
  local text = redis.pcall('INFO', section)
  if type(text) ~= 'string' then return nil end
  return string.match('\\n' .. text, '\\n' .. name .. ':(%w+)')
end
local run, evicted = info('server', 'run_id'), info('stats', 'evicted_keys')
local replid = info('replication', 'master_replid')
local mark = ARGV[1]
if run and evicted and replid then mark = run .. ' ' .. evicted .. ' ' .. replid end
local held = redis.call('HGETALL', KEYS[1])
local id, seen = nil, nil
for i = 1, #held, 2 do
  if held[i] == 'id' then id = held[i + 1] elseif held[i] == 'mark' then seen = held[i + 1] end
end
if not id or seen ~= mark then
  id = ARGV[1]
  redis.call('HSET', KEYS[1], 'id', id, 'mark', mark)
end
if ARGV[2] == '1' then return {id, now_ms()} end
return {id}
"""
)
