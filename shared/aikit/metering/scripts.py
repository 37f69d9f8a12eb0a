"""Lua scripts: each touches keys of one hash slot only, all passed in KEYS."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

from redis.exceptions import NoScriptError


@dataclass(frozen=True)
class LuaScript:
    source: str
    sha: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sha", hashlib.sha1(self.source.encode()).hexdigest())  # noqa: S324

    async def run_async(self, client: Any, keys: list[str], args: list[Any]) -> Any:
        try:
            return await client.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            return await client.eval(self.source, len(keys), *keys, *args)

    def run(self, client: Any, keys: list[str], args: list[Any]) -> Any:
        try:
            return client.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            return client.eval(self.source, len(keys), *keys, *args)


# Before the LLM call: check and count requests per minute/day, and reserve tokens against the monthly
# quota so that parallel requests cannot all slip through the same remaining budget.
# KEYS: minute, day, quota, inflight, quota_seeded. ARGV: rpm, rpd, quota_limit (-1 = unlimited), reserve,
# request_id, minute_ttl, day_ttl, now, reservation_ttl.
# Returns {allowed, limit_hit, minute_count, day_count, quota_used, quota_held}; allowed is -1 when the quota
# counter of this period has not been seeded from the database yet (nothing was counted then).
ADMIT = LuaScript(
    """
local rpm, rpd, qlim = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local reserve, now = tonumber(ARGV[4]), tonumber(ARGV[8])
local m = tonumber(redis.call('GET', KEYS[1]) or '0')
local d = tonumber(redis.call('GET', KEYS[2]) or '0')
local used = tonumber(redis.call('GET', KEYS[3]) or '0')
local held = 0
if qlim >= 0 then
  local all = redis.call('HGETALL', KEYS[4])
  for i = 1, #all, 2 do
    local amount, expires = string.match(all[i + 1], '^(%d+):(%d+)$')
    if amount == nil or tonumber(expires) < now then
      redis.call('HDEL', KEYS[4], all[i])
    else
      held = held + tonumber(amount)
    end
  end
end
if rpm >= 0 and m >= rpm then return {0, 'minute', m, d, used, held} end
if rpd >= 0 and d >= rpd then return {0, 'day', m, d, used, held} end
if qlim >= 0 and redis.call('EXISTS', KEYS[5]) == 0 then return {-1, 'seed', m, d, used, held} end
if qlim >= 0 and used + held >= qlim then return {0, 'tokens', m, d, used, held} end
m = redis.call('INCR', KEYS[1])
if m == 1 then redis.call('EXPIRE', KEYS[1], ARGV[6]) end
d = redis.call('INCR', KEYS[2])
if d == 1 then redis.call('EXPIRE', KEYS[2], ARGV[7]) end
if qlim >= 0 and reserve > 0 then
  reserve = math.min(reserve, qlim - used - held)
  redis.call('HSET', KEYS[4], ARGV[5], reserve .. ':' .. (now + tonumber(ARGV[9])))
  redis.call('EXPIRE', KEYS[4], ARGV[9])
  held = held + reserve
end
return {1, '', m, d, used, held}
"""
)

# Seed a period's quota counter with the usage the database already holds for it, once.
# KEYS: quota, quota_seeded. ARGV: tokens, ttl.
SEED_QUOTA = LuaScript(
    """
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
redis.call('INCRBY', KEYS[1], ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[2])
redis.call('SET', KEYS[2], '1', 'EX', ARGV[2])
return 1
"""
)

# Give a reservation back when the call produced nothing. KEYS: inflight. ARGV: request_id.
RELEASE = LuaScript("return redis.call('HDEL', KEYS[1], ARGV[1])")

# After the LLM call: append the event to the durable buffer and move the live counters, atomically.
# KEYS: stream, pending, quota, inflight.
# ARGV: request_id, api_key_id, customer_id, model, input, output, cached, ts, date, quota_ttl.
RECORD = LuaScript(
    """
local tokens = tonumber(ARGV[5]) + tonumber(ARGV[6])
local id = redis.call('XADD', KEYS[1], '*', 'r', ARGV[1], 'k', ARGV[2], 'c', ARGV[3], 'm', ARGV[4],
  'i', ARGV[5], 'o', ARGV[6], 'x', ARGV[7], 't', ARGV[8], 'd', ARGV[9])
local f = ARGV[9] .. '|' .. ARGV[4] .. '|'
redis.call('HINCRBY', KEYS[2], f .. 't', tokens)
redis.call('HINCRBY', KEYS[2], f .. 'r', 1)
redis.call('HINCRBY', KEYS[2], f .. 'i', ARGV[5])
redis.call('HINCRBY', KEYS[2], f .. 'o', ARGV[6])
redis.call('HINCRBY', KEYS[2], f .. 'x', ARGV[7])
local q = redis.call('INCRBY', KEYS[3], tokens)
if redis.call('TTL', KEYS[3]) < 0 then redis.call('EXPIRE', KEYS[3], ARGV[10]) end
redis.call('HDEL', KEYS[4], ARGV[1])
return {id, q}
"""
)

# After the flush made a batch durable in Postgres: delete exactly those entries and take them out of
# the pending counters. Entries already gone (a concurrent flush acked them) are skipped, so the counters
# move once per entry. KEYS: stream, then every pending hash the batch touches. ARGV: pending prefix, ids...
ACK = LuaScript(
    """
local deltas = {}
local acked = 0
for i = 2, #ARGV do
  local entry = redis.call('XRANGE', KEYS[1], ARGV[i], ARGV[i])
  if #entry > 0 then
    local raw, h = entry[1][2], {}
    for j = 1, #raw, 2 do h[raw[j]] = raw[j + 1] end
    local key = ARGV[1] .. h['k']
    local base = h['d'] .. '|' .. h['m'] .. '|'
    local fields = deltas[key]
    if fields == nil then fields = {}; deltas[key] = fields end
    local inp, out = tonumber(h['i']), tonumber(h['o'])
    fields[base .. 't'] = (fields[base .. 't'] or 0) + inp + out
    fields[base .. 'r'] = (fields[base .. 'r'] or 0) + 1
    fields[base .. 'i'] = (fields[base .. 'i'] or 0) + inp
    fields[base .. 'o'] = (fields[base .. 'o'] or 0) + out
    fields[base .. 'x'] = (fields[base .. 'x'] or 0) + tonumber(h['x'])
    redis.call('XDEL', KEYS[1], ARGV[i])
    acked = acked + 1
  end
end
for key, fields in pairs(deltas) do
  for name, amount in pairs(fields) do
    -- Lua renders -0 as "-0", which HINCRBY refuses: zeros only read the field, so it can be dropped too.
    local left
    if amount ~= 0 then
      left = redis.call('HINCRBY', key, name, -amount)
    else
      left = tonumber(redis.call('HGET', key, name) or '0')
    end
    if left <= 0 then redis.call('HDEL', key, name) end
  end
end
return acked
"""
)
