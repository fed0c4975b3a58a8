-- reserve_v1.lua: hold money on budgets and take units from rate limits, all or nothing.
--
-- Twin of proxy/store/budget_engine.py:reserve (the reference; keep them in step). A new
-- behaviour means a new file, reserve_v2.lua, never an edit of this one: replicas of
-- different versions may run side by side during a deploy, each with its own script.
--
-- Key layout. {ns} is the hash tag of the store's namespace (default {mg}); every key
-- shares it, so all the keys of one call, and every key a sweep derives, sit in ONE
-- hash slot and this script runs unchanged on Redis Cluster.
--   {ns}:b:<budget key>   HASH    spent, reserved       nano-USD, integers
--   {ns}:q:<rate key>     STRING  GCRA theoretical arrival time, microseconds of TIME;
--                                 PEXPIREs when the bucket is full again
--   {ns}:r:<reservation>  HASH    x -> expiry (us); b:<budget redis key> -> nano-USD held;
--                                 q:<rate redis key> -> "units:per_minute:adjustable"
--   {ns}:rx               ZSET    reservation id scored by expiry (us)
--   {ns}:d:<reservation>  STRING  "1", PX retention: the id was settled or released
--
-- KEYS: [1] {ns}:rx  [2] {ns}:r:<id>  [3] {ns}:d:<id>
--       [3+i] {ns}:b:<key> for i = 1..nb, then [3+nb+j] {ns}:q:<key> for j = 1..nr
-- ARGV: [1] id  [2] ttl (us)  [3] nb  [4] nr  [5] "{ns}:r:" (prefix to derive swept
--       reservations)  [6] sweep limit, then per budget: limit ("" = none), amount,
--       hard ("1"/"0"), then per rate: per_minute, units, adjustable ("1"/"0")
-- Reply: {ok, kind, key, spent, reserved, retry_us, soft keys...}
--   ok 1: held (or already held). ok 0: refused; kind "budget" (key, spent, reserved
--   of the first hard budget over its limit), "rate" (retry_us, -1 = never fits) or
--   "duplicate" (the id was already settled or released).
--
-- Phases: sweep expired reservations; read all; check all; write all. Nothing is
-- written before every check has passed. Time is the server's TIME, never the client's.

-- #include budget_prelude.lua

local zkey, hkey, dkey = KEYS[1], KEYS[2], KEYS[3]
local rid, ttl_us = ARGV[1], tonumber(ARGV[2])
local nb, nr = tonumber(ARGV[3]), tonumber(ARGV[4])
sweep(zkey, ARGV[5], tonumber(ARGV[6]))

if redis.call('EXISTS', hkey) == 1 then
  return {1, '', '', 0, 0, 0}  -- a retried call: already held
end
if redis.call('EXISTS', dkey) == 1 then
  return {0, 'duplicate', '', 0, 0, 0}
end

-- Read all, check all.
local soft = {}
local amounts = {}
local a = 7
for i = 1, nb do
  local bkey, limit, amount = KEYS[3 + i], ARGV[a], tonumber(ARGV[a + 1])
  local hard = ARGV[a + 2] == '1'
  a = a + 3
  amounts[i] = amount
  if limit ~= '' then
    local v = redis.call('HMGET', bkey, 'spent', 'reserved')
    local spent, reserved = tonumber(v[1]) or 0, tonumber(v[2]) or 0
    if spent + reserved + amount > tonumber(limit) then
      if hard then
        return {0, 'budget', bkey, spent, reserved, 0}
      end
      soft[#soft + 1] = bkey
    end
  end
end
local tats, rate_fields = {}, {}
for j = 1, nr do
  local qkey, per_minute, units = KEYS[3 + nb + j], tonumber(ARGV[a]), tonumber(ARGV[a + 1])
  local adjustable = ARGV[a + 2]
  a = a + 3
  local inc = math.ceil(units * WINDOW_US / per_minute)
  local tat = tonumber(redis.call('GET', qkey)) or now_us
  if tat < now_us then tat = now_us end
  local new_tat = tat + inc
  if new_tat - now_us > WINDOW_US then
    if inc > WINDOW_US then
      return {0, 'rate', qkey, 0, 0, -1}
    end
    return {0, 'rate', qkey, 0, 0, new_tat - WINDOW_US - now_us}
  end
  tats[j] = new_tat
  rate_fields[j] = units .. ':' .. per_minute .. ':' .. adjustable
end

-- Write all.
local expires_us = now_us + ttl_us
redis.call('HSET', hkey, 'x', expires_us)
for i = 1, nb do
  redis.call('HINCRBY', KEYS[3 + i], 'reserved', amounts[i])
  redis.call('HSET', hkey, 'b:' .. KEYS[3 + i], amounts[i])
end
for j = 1, nr do
  local qkey = KEYS[3 + nb + j]
  redis.call('SET', qkey, tats[j], 'PX', math.ceil((tats[j] - now_us) / 1000) + 1)
  redis.call('HSET', hkey, 'q:' .. qkey, rate_fields[j])
end
redis.call('ZADD', zkey, expires_us, rid)

local reply = {1, '', '', 0, 0, 0}
for _, k in ipairs(soft) do reply[#reply + 1] = k end
return reply
