"""Lua scripts: each touches keys of one hash slot only, all passed in KEYS."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from string import Template
from typing import Any

from redis.exceptions import NoScriptError

from aikit.metering.record import COST, FIELD_ORDER, FIELDS, PENDING_COUNTERS


@dataclass(frozen=True)
class LuaScript:
    source: str
    sha: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sha", hashlib.sha1(self.source.encode()).hexdigest())  # noqa: S324

    async def run_async(self, client: Any, keys: Sequence[str], args: Sequence[Any]) -> Any:
        try:
            return await client.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            return await client.eval(self.source, len(keys), *keys, *args)

    def run(self, client: Any, keys: Sequence[str], args: Sequence[Any]) -> Any:
        try:
            return client.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            return client.eval(self.source, len(keys), *keys, *args)


# The usage record's wire schema (aikit.metering.record) is written into the scripts, not copied: `$name` in a
# script's text is the stream field holding `name` ('$api_key_id' -> 'k'), and the lists below are built from it
# (a Lua `$` is written `$$` there).
_FIELD = {name: letter for letter, name in FIELDS.items()}
_ARGV_DEFAULTS = {COST: "'0'"}  # RECORD's trailing arguments a caller may leave out


def _usage_script(source: str, **parts: str) -> LuaScript:
    return LuaScript(Template(source).substitute(_FIELD, **parts))


def _pending_updates(line: str, value_of: Callable[[str], str], number_of: Callable[[str], str]) -> str:
    """One `line` per pending counter, {suffix} and {amount} filled in: the amount is one field's value, the
    sum of several (as numbers), or 1 (a request)."""
    lines = []
    for suffix, (_, fields) in PENDING_COUNTERS.items():
        amount = value_of(fields[0]) if len(fields) == 1 else " + ".join(map(number_of, fields)) or "1"
        lines.append(line.format(suffix=suffix, amount=amount))
    return "\n".join(lines)


# Every limit decision uses Redis' own clock (TIME), so instances whose clocks disagree share one minute, one
# day and one expiry time for reservations.

# Before a metered LLM call: check (and, once per HTTP request, count) requests per minute/day, and reserve
# the call's worst case against the monthly quota, so parallel calls cannot all spend the same remaining
# budget. A call is admitted while used + held < quota and then reserves its whole worst case: the overshoot
# is bounded by one call.
# KEYS: minute, day, quota, inflight, usage stream (the key's shard), quota_catchup.
# ARGV: rpm, rpd, quota_limit (-1 = none), reserve, call_id, count_request (1/0), reservation_ttl,
#       api_key_id, period_start (Unix seconds), catchup_ttl.
# Returns {allowed, limit_hit, minute_count, day_count, quota_used, quota_held, now}. allowed is -1 when the
# quota counter of this period is missing (first call of the period, or evicted): nothing was counted, the
# catch-up counter was started, and quota_used is the key's unflushed usage since the period start (its
# entries in the shard's stream from that time on), which the caller adds to what the database holds for
# the period to seed the counter (SEED_QUOTA).
ADMIT = _usage_script(
    """
local now = tonumber(redis.call('TIME')[1])
local minute, day = math.floor(now / 60), math.floor(now / 86400)
local rpm, rpd, qlim = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local reserve, count = tonumber(ARGV[4]), ARGV[6] == '1'
local function current(key, bucket)
  local b, c = string.match(redis.call('GET', key) or '', '^(%d+):(%d+)$$')
  if b and tonumber(b) == bucket then return tonumber(c) end
  return 0
end
local m, d = current(KEYS[1], minute), current(KEYS[2], day)
local used = tonumber(redis.call('GET', KEYS[3]) or '-1')
local held = 0
if qlim >= 0 then
  local all = redis.call('HGETALL', KEYS[4])
  for i = 1, #all, 2 do
    local amount, expires = string.match(all[i + 1], '^(%d+):(%d+)$$')
    if amount == nil or tonumber(expires) < now then
      redis.call('HDEL', KEYS[4], all[i])
    else
      held = held + tonumber(amount)
    end
  end
end
if count and rpm >= 0 and m >= rpm then return {0, 'minute', m, d, math.max(used, 0), held, now} end
if count and rpd >= 0 and d >= rpd then return {0, 'day', m, d, math.max(used, 0), held, now} end
if qlim >= 0 and used < 0 then
  redis.call('SET', KEYS[6], '0', 'NX', 'EX', ARGV[10])
  local unflushed = 0
  for _, entry in ipairs(redis.call('XRANGE', KEYS[5], ARGV[9] .. '000', '+')) do
    local f = entry[2]
    local k, i, o = nil, nil, nil
    for j = 1, #f, 2 do
      if f[j] == '$api_key_id' then k = f[j + 1]
      elseif f[j] == '$input_tokens' then i = f[j + 1]
      elseif f[j] == '$output_tokens' then o = f[j + 1] end
    end
    if k == ARGV[8] and tonumber(i) and tonumber(o) then unflushed = unflushed + tonumber(i) + tonumber(o) end
  end
  return {-1, 'seed', m, d, unflushed, held, now}
end
if qlim >= 0 and used + held >= qlim then return {0, 'tokens', m, d, used, held, now} end
if count then
  m = m + 1
  redis.call('SET', KEYS[1], minute .. ':' .. m, 'EX', 120)
  d = d + 1
  redis.call('SET', KEYS[2], day .. ':' .. d, 'EX', 2 * 86400)
end
if qlim >= 0 and reserve > 0 then
  redis.call('HSET', KEYS[4], ARGV[5], reserve .. ':' .. (now + tonumber(ARGV[7])))
  redis.call('EXPIRE', KEYS[4], ARGV[7])
  held = held + reserve
end
return {1, '', m, d, math.max(used, 0), held, now}
"""
)

# Seed a missing quota counter: what the database holds for the period plus what was unflushed when ADMIT
# found the counter missing (ARGV[1]), plus what was recorded since (the catch-up counter). Whoever seeds
# first wins. A flush that commits between ADMIT and the database read counts twice: the seed errs high,
# never low. KEYS: quota, quota_catchup. ARGV: tokens, ttl.
SEED_QUOTA = LuaScript(
    """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local since = tonumber(redis.call('GET', KEYS[2]) or '0')
redis.call('SET', KEYS[1], tonumber(ARGV[1]) + since, 'EX', ARGV[2])
redis.call('DEL', KEYS[2])
return 1
"""
)

# Give a reservation back when the call produced nothing. KEYS: inflight. ARGV: request_id.
RELEASE = LuaScript("return redis.call('HDEL', KEYS[1], ARGV[1])")

# What is left of each limit, on Redis' clock. KEYS: minute, day, quota. Returns {minute, day, quota_used}.
PEEK = LuaScript(
    """
local now = tonumber(redis.call('TIME')[1])
local function current(key, bucket)
  local b, c = string.match(redis.call('GET', key) or '', '^(%d+):(%d+)$')
  if b and tonumber(b) == bucket then return tonumber(c) end
  return 0
end
return {current(KEYS[1], math.floor(now / 60)), current(KEYS[2], math.floor(now / 86400)),
        tonumber(redis.call('GET', KEYS[3]) or '0')}
"""
)

# Invalid API keys from one address in the current minute; ARGV[1] = 1 counts one more. KEYS: the counter.
AUTH_FAILURES = LuaScript(
    """
local minute = math.floor(tonumber(redis.call('TIME')[1]) / 60)
local b, c = string.match(redis.call('GET', KEYS[1]) or '', '^(%d+):(%d+)$')
local n = 0
if b and tonumber(b) == minute then n = tonumber(c) end
if ARGV[1] == '1' then
  n = n + 1
  redis.call('SET', KEYS[1], minute .. ':' .. n, 'EX', 120)
end
return n
"""
)

# After the LLM call: append the event to the durable buffer and move the live counters, atomically. The
# quota counter moves only if it exists (else the catch-up counter of a seeding in progress, if any): a
# missing counter is re-seeded from the rollups plus the unflushed usage, never restarted from this event.
# KEYS: stream, pending, quota, inflight[, quota_catchup].
# ARGV: request_id, api_key_id, customer_id, model, input, output, cached, ts, date, cost (1e-12 currency units,
#       aikit.pricing; "0" when absent).
RECORD = _usage_script(
    """
local $locals = unpack(ARGV, 1, $count)
local tokens = tonumber(input_tokens) + tonumber(output_tokens)
local id = redis.call('XADD', KEYS[1], '*', $xadd)
local f = date .. '|' .. model .. '|'
$pending
local q = -1
if redis.call('EXISTS', KEYS[3]) == 1 then
  q = redis.call('INCRBY', KEYS[3], tokens)  -- keeps the TTL SEED_QUOTA gave it
elseif KEYS[5] and redis.call('EXISTS', KEYS[5]) == 1 then
  redis.call('INCRBY', KEYS[5], tokens)
end
redis.call('HDEL', KEYS[4], request_id)
return {id, q}
""",
    locals=", ".join(FIELDS.values()),
    count=str(len(FIELDS)),
    xadd=", ".join(f"'{letter}', {FIELDS[letter]}" + (f" or {_ARGV_DEFAULTS[letter]}" if letter in _ARGV_DEFAULTS
                                                     else "") for letter in FIELD_ORDER),
    pending=_pending_updates("redis.call('HINCRBY', KEYS[2], f .. '{suffix}', {amount})",
                             lambda f: FIELDS[f], lambda f: f"tonumber({FIELDS[f]})"),
)

# Removes a stored batch from the buffer: every entry up to and including the batch's last id, and exactly
# those entries from the pending counters. The flush reads each stream as a contiguous prefix, so whatever is
# still there up to that id is part of the batch just committed; entries a concurrent flush removed already
# are not there, so counters move once per entry. Entries the flush could not parse are copied aside first.
# One XRANGE + one XTRIM instead of a lookup and XDEL per id. Validates everything before the first write
# (a Lua error does not roll back). KEYS: stream, malformed stream, every pending hash the batch may touch.
# ARGV: pending prefix, last id, first id after it, malformed ids...
ACK_THROUGH = _usage_script(
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
  local k, inp, out, cx = h['$api_key_id'], h['$input_tokens'], h['$output_tokens'], h['$cached_tokens']
  if k and h['$date'] and h['$model'] and inp and out and cx and string.match(inp, '^%d+$$')
      and string.match(out, '^%d+$$') and string.match(cx, '^%d+$$') then
    local key = ARGV[1] .. k
    if not allowed[key] then return redis.error_reply('ACK_THROUGH: ' .. key .. ' not in KEYS') end
    local fields = deltas[key]
    if fields == nil then fields = {}; deltas[key] = fields end
    local base = h['$date'] .. '|' .. h['$model'] .. '|'
$pending
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
""",
    pending=_pending_updates("    fields[base .. '{suffix}'] = (fields[base .. '{suffix}'] or 0) + {amount}",
                             *[lambda f: f"tonumber(h['{f}'])"] * 2),
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

# The embedded setup's meter (metering/embedded.py) writes each event to the database itself; the live counters
# move as RECORD moves them, without the stream and the pending counters (nothing waits for a flush).
# KEYS: quota, inflight[, quota_catchup]. ARGV: request_id, tokens.
COUNT_RECORDED = LuaScript(
    """
local q = -1
if redis.call('EXISTS', KEYS[1]) == 1 then
  q = redis.call('INCRBY', KEYS[1], ARGV[2])
elseif KEYS[3] and redis.call('EXISTS', KEYS[3]) == 1 then
  redis.call('INCRBY', KEYS[3], ARGV[2])
end
redis.call('HDEL', KEYS[2], ARGV[1])
return q
"""
)
