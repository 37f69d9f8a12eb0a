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

# Removes a stored batch from the buffer: every entry up to and including the batch's last id, and exactly
# those entries from the pending counters. The flush reads each stream as a contiguous prefix, so whatever is
# still there up to that id is part of the batch just committed; entries a concurrent flush removed already
# are not there, so counters move once per entry. Entries the flush could not parse are copied aside first.
# One XRANGE + one XTRIM instead of a lookup and XDEL per id. Validates everything before the first write
# (a Lua error does not roll back). KEYS: stream, malformed stream, every pending hash the batch may touch.
# ARGV: pending prefix, last id, first id after it, malformed ids...
ACK_THROUGH = LuaScript(
    """
local allowed = {}
for i = 3, #KEYS do allowed[KEYS[i]] = true end
local bad = {}
for i = 4, #ARGV do bad[ARGV[i]] = true end
local entries = redis.call('XRANGE', KEYS[1], '-', ARGV[2])
local deltas, moved = {}, {}
for n = 1, #entries do
  local id, raw = entries[n][1], entries[n][2]
  local h = {}
  for j = 1, #raw, 2 do h[raw[j]] = raw[j + 1] end
  if bad[id] then moved[#moved + 1] = entries[n] end
  local k, inp, out, cx = h['k'], h['i'], h['o'], h['x']
  if k and h['d'] and h['m'] and inp and out and cx and string.match(inp, '^%d+$')
      and string.match(out, '^%d+$') and string.match(cx, '^%d+$') then
    local key = ARGV[1] .. k
    if not allowed[key] then return redis.error_reply('ACK_THROUGH: ' .. key .. ' not in KEYS') end
    local fields = deltas[key]
    if fields == nil then fields = {}; deltas[key] = fields end
    local base = h['d'] .. '|' .. h['m'] .. '|'
    inp, out = tonumber(inp), tonumber(out)
    fields[base .. 't'] = (fields[base .. 't'] or 0) + inp + out
    fields[base .. 'r'] = (fields[base .. 'r'] or 0) + 1
    fields[base .. 'i'] = (fields[base .. 'i'] or 0) + inp
    fields[base .. 'o'] = (fields[base .. 'o'] or 0) + out
    fields[base .. 'x'] = (fields[base .. 'x'] or 0) + tonumber(cx)
  end
end
for _, entry in ipairs(moved) do
  local args = {'id', entry[1]}
  for j = 1, #entry[2] do args[#args + 1] = entry[2][j] end
  redis.call('XADD', KEYS[2], '*', unpack(args))
end
for key, fields in pairs(deltas) do
  for name, amount in pairs(fields) do
    -- Lua renders -0 as "-0", which HINCRBY refuses: a zero only removes a field left at zero.
    local left = 0
    if amount == 0 then left = tonumber(redis.call('HGET', key, name) or '0')
    else left = redis.call('HINCRBY', key, name, -amount) end
    if left <= 0 then redis.call('HDEL', key, name) end
  end
end
if #entries > 0 then redis.call('XTRIM', KEYS[1], 'MINID', '=', ARGV[3]) end
return #entries
"""
)


# The usual case of removing a stored batch: nobody removed any of it meanwhile (the stream still starts at
# its first entry; the buffer only ever loses a prefix), so the pending counters lose exactly the deltas the
# flush computed while reading it. Returns -1, changing nothing, otherwise (then ACK_THROUGH does the work).
# KEYS: stream, pending hashes. ARGV: first id of the batch, first id after it, then per pending hash in KEYS
# order: n, then n (field, amount) pairs.
ACK_FAST = LuaScript(
    """
local head = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)
if #head == 0 or head[1][1] ~= ARGV[1] then return -1 end
local a = 3
for i = 2, #KEYS do
  local n = tonumber(ARGV[a])
  a = a + 1
  for _ = 1, n do
    local name, amount, left = ARGV[a], ARGV[a + 1], 0
    if amount == '0' then  -- "-0" is not an integer to HINCRBY; a zero left by RECORD just goes
      left = tonumber(redis.call('HGET', KEYS[i], name) or '0')
    else
      left = redis.call('HINCRBY', KEYS[i], name, '-' .. amount)
    end
    if left <= 0 then redis.call('HDEL', KEYS[i], name) end
    a = a + 2
  end
end
return redis.call('XTRIM', KEYS[1], 'MINID', '=', ARGV[2])
"""
)
