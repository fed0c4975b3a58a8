-- budget_v2.lua: a BATCH of budget operations in one atomic step: settles and releases
-- (each exactly once), then reservations (each all or nothing on its own, in order: a
-- refusal refuses that reservation only, and a later one sees the holds of the earlier
-- ones, so a hard cap stays exact whatever the batch size); or read or reset budgets.
--
-- Twin of proxy/store/budget_engine.py (the reference; keep them in step): reserve,
-- settle and release applied once per entry, states. It replaces reserve_v1.lua and
-- settle_v1.lua (one operation per call). The key layout and the fields of a hold are
-- those of v1, so v1 and v2 replicas share holds, done markers and counters during a
-- deploy.
--
-- Key layout. {ns} is the hash tag of the store's namespace (default {mg}); every key
-- shares it, so all the keys of one call, and every key this script derives, sit in
-- ONE hash slot and the script runs unchanged on Redis Cluster.
--   {ns}:b:<budget key>   HASH    spent, reserved       nano-USD, integers
--   {ns}:q:<rate key>     STRING  GCRA theoretical arrival time, microseconds of TIME;
--                                 PEXPIREs when the bucket is full again
--   {ns}:r:<reservation>  HASH    x -> expiry (us); b:<budget redis key> -> nano-USD held;
--                                 q:<rate redis key> -> "units:per_minute:adjustable"
--   {ns}:rx               ZSET    reservation id scored by expiry (us)
--   {ns}:d:<reservation>  STRING  "1", PX retention: the id was settled or released
--
-- op "batch":
--   KEYS: [1] {ns}:rx, then [1+k]: the distinct {ns}:b: and {ns}:q: keys the entries
--         name. An entry's own {ns}:r:<id> and {ns}:d:<id> are derived from its id (as
--         the sweep derives those of expired reservations): same tag, same slot.
--   ARGV: [1] "batch"  [2] "{ns}:r:"  [3] sweep limit  [4] "{ns}:d:"  [5] retention of
--         done markers (ms)  [6] ns (settles)  [7] nr (reservations)  [8] the numbers
--         of every entry, space-separated, settles first:
--           settle:  length of its id (bytes), kind (1 settle, 0 release), tokens (-1 =
--                    keep the estimate), nc, then nc = -1: one amount, charged to each
--                    budget the reservation holds; nc >= 0: nc (KEYS index, amount)
--           reserve: length of its id (bytes), ttl (us), nb, nr, then nb budgets: KEYS
--                    index, limit (-1 = none), amount, hard (1/0), then nr rates: KEYS
--                    index, per_minute, units, adjustable (1/0)
--         [9] the ids of every entry, concatenated, settles first
--   (The client packs every argument in Python, at over a microsecond apiece: a batch
--   is sent as nine arguments plus its distinct keys, whatever its size.)
--   Reply: one value per entry, settles first.
--     settle/release: 1 applied, 0 nothing to do (already settled or released within
--       the retention; a release with nothing held)
--     reserve: 1 held (or already held: a retried id holds once); {1, soft key...}
--       held, and these soft budgets are now over their limit; {0, 'budget', key,
--       spent, reserved} the first hard budget over its limit; {0, 'rate', key,
--       retry_us} no room in this rate limit (retry_us -1: never fits); {0,
--       'duplicate'} the id was already settled or released
-- op "state" / "reset": KEYS [1] {ns}:rx, [1+i] {ns}:b:<key>; ARGV [1] op, [2]
--   "{ns}:r:", [3] sweep limit. Reply: state {spent, reserved} per key; reset 1.
--
-- Cost: the done marker is checked and set by one SET NX; the counters and buckets of
-- a batch are read once and written once (the entries in between work on Lua copies),
-- so a batch of n costs about 3n + a few commands, not 14n. Time is the server's
-- TIME, never the client's.

-- #include budget_prelude.lua

local zkey, op, res_prefix = KEYS[1], ARGV[1], ARGV[2]
sweep(zkey, res_prefix, tonumber(ARGV[3]))

if op == 'state' then
  local out = {}
  for i = 2, #KEYS do
    local v = redis.call('HMGET', KEYS[i], 'spent', 'reserved')
    out[#out + 1] = tonumber(v[1]) or 0
    out[#out + 1] = tonumber(v[2]) or 0
  end
  return out
end
if op == 'reset' then
  for i = 2, #KEYS do
    if redis.call('EXISTS', KEYS[i]) == 1 then redis.call('HSET', KEYS[i], 'spent', 0) end
  end
  return 1
end

-- op == 'batch'
local done_prefix, retention_ms = ARGV[4], tonumber(ARGV[5])
local n_settle, n_reserve, ids = tonumber(ARGV[6]), tonumber(ARGV[7]), ARGV[9]
local T = {}
for token in string.gmatch(ARGV[8], '%S+') do T[#T + 1] = token end
local reply = {}

-- Counter deltas by budget redis key, flushed once at the end (or early, to keep a sum
-- exact in a double).
local d_spent, d_reserved = {}, {}
local function add(delta, bkey, amount)
  local sum = (delta[bkey] or 0) + amount
  if sum > MAX_EXACT or sum < -MAX_EXACT then
    redis.call('HINCRBY', bkey, delta == d_spent and 'spent' or 'reserved', delta[bkey] or 0)
    sum = amount
  end
  delta[bkey] = sum
end

-- GCRA buckets by rate redis key: the theoretical arrival time, read once.
local tats = {}
local function adjust(qkey, delta, per_minute)
  if delta == 0 then return end
  local inc
  if delta > 0 then
    inc = math.ceil(delta * WINDOW_US / per_minute)
  else
    inc = -math.floor(-delta * WINDOW_US / per_minute)
  end
  local tat = tats[qkey]
  if tat == nil then tat = tonumber(redis.call('GET', qkey)) or now_us end
  if tat < now_us then tat = now_us end
  tats[qkey] = tat + inc
end

local a, id_at = 1, 1  -- the next number in T, the next id in ids

-- 1. Settles and releases, each exactly once.
local zrem = {}
for i = 1, n_settle do
  local id_end = id_at + tonumber(T[a]) - 1
  local rid = string.sub(ids, id_at, id_end)
  id_at = id_end + 1
  local hkey, dkey = res_prefix .. rid, done_prefix .. rid
  local kind, tokens, nc = T[a + 1], tonumber(T[a + 2]), tonumber(T[a + 3])
  local first = a + 4
  if nc < 0 then a = first + 1 else a = first + 2 * nc end
  -- Mark done, unless it already is: exactly once.
  if not redis.call('SET', dkey, '1', 'NX', 'PX', retention_ms) then
    reply[i] = 0
  else
    local fields = redis.call('HGETALL', hkey)
    local held_budgets, held_rates = {}, {}
    for f = 1, #fields, 2 do
      local prefix = string.sub(fields[f], 1, 2)
      if prefix == 'b:' then
        held_budgets[#held_budgets + 1] = {string.sub(fields[f], 3), tonumber(fields[f + 1])}
      elseif prefix == 'q:' then
        local units, per_minute, adjustable = string.match(fields[f + 1], '^(%d+):(%d+):(%d)$')
        held_rates[#held_rates + 1] =
          {string.sub(fields[f], 3), tonumber(units), tonumber(per_minute), adjustable == '1'}
      end
    end
    for _, b in ipairs(held_budgets) do add(d_reserved, b[1], -b[2]) end
    if kind == '0' then
      for _, r in ipairs(held_rates) do adjust(r[1], -r[2], r[3]) end
      reply[i] = #fields > 0 and 1 or 0
    else
      if tokens >= 0 then
        for _, r in ipairs(held_rates) do
          if r[4] then adjust(r[1], tokens - r[2], r[3]) end
        end
      end
      if nc < 0 then
        local amount = tonumber(T[first])
        for _, b in ipairs(held_budgets) do add(d_spent, b[1], amount) end
      else
        for c = 0, nc - 1 do
          add(d_spent, KEYS[tonumber(T[first + 2 * c])], tonumber(T[first + 2 * c + 1]))
        end
      end
      reply[i] = 1
    end
    if #fields > 0 then
      redis.call('DEL', hkey)
      zrem[#zrem + 1] = rid
    end
  end
end

-- Their counters and buckets, written before the reservations read them.
for bkey, delta in pairs(d_reserved) do
  if delta ~= 0 then redis.call('HINCRBY', bkey, 'reserved', delta) end
end
for bkey, delta in pairs(d_spent) do
  if delta ~= 0 then redis.call('HINCRBY', bkey, 'spent', delta) end
end
for qkey, tat in pairs(tats) do
  if tat > now_us then
    redis.call('SET', qkey, tat, 'PX', math.ceil((tat - now_us) / 1000) + 1)
  else
    redis.call('DEL', qkey)  -- the bucket is full: same as no key
  end
end
if #zrem > 0 then redis.call('ZREM', zkey, unpack(zrem)) end

local spent, reserved, held_delta = {}, {}, {}  -- by KEYS index
tats = {}  -- by KEYS index from here on
local tat_dirty = {}
local function load_budget(k)
  if spent[k] == nil then
    local v = redis.call('HMGET', KEYS[k], 'spent', 'reserved')
    spent[k], reserved[k], held_delta[k] = tonumber(v[1]) or 0, tonumber(v[2]) or 0, 0
  end
end
local function load_tat(k)
  local tat = tats[k]
  if tat == nil then
    tat = tonumber(redis.call('GET', KEYS[k])) or now_us
    if tat < now_us then tat = now_us end
    tats[k] = tat
  end
  return tat
end

-- 2. Reservations, each all or nothing on its own, after the settles (whose released
-- holds they may use).
local zadd = {}
for i = n_settle + 1, n_settle + n_reserve do
  local id_end = id_at + tonumber(T[a]) - 1
  local rid = string.sub(ids, id_at, id_end)
  id_at = id_end + 1
  local hkey, dkey = res_prefix .. rid, done_prefix .. rid
  local ttl_us, nb, nr = tonumber(T[a + 1]), tonumber(T[a + 2]), tonumber(T[a + 3])
  local first = a + 4
  a = first + 4 * (nb + nr)
  if redis.call('EXISTS', hkey, dkey) > 0 then
    if redis.call('EXISTS', hkey) == 1 then
      reply[i] = 1  -- a retried call: already held
    else
      reply[i] = {0, 'duplicate'}
    end
  else
    -- Read all, check all (against the copies, which include earlier holds of the batch).
    local refusal, soft = nil, nil
    for j = 0, nb - 1 do
      local p = first + 4 * j
      local k, limit = tonumber(T[p]), tonumber(T[p + 1])
      load_budget(k)
      if limit >= 0 and spent[k] + reserved[k] + tonumber(T[p + 2]) > limit then
        if T[p + 3] == '1' then
          refusal = {0, 'budget', KEYS[k], spent[k], reserved[k]}
          break
        end
        soft = soft or {1}
        soft[#soft + 1] = KEYS[k]
      end
    end
    local new_tats = {}
    if refusal == nil then
      for j = 0, nr - 1 do
        local p = first + 4 * (nb + j)
        local k = tonumber(T[p])
        local inc = math.ceil(tonumber(T[p + 2]) * WINDOW_US / tonumber(T[p + 1]))
        local new_tat = load_tat(k) + inc
        if new_tat - now_us > WINDOW_US then
          if inc > WINDOW_US then
            refusal = {0, 'rate', KEYS[k], -1}
          else
            refusal = {0, 'rate', KEYS[k], new_tat - WINDOW_US - now_us}
          end
          break
        end
        new_tats[j + 1] = new_tat
      end
    end
    if refusal ~= nil then
      reply[i] = refusal
    else
      -- Write all: the hold now, the counters and buckets once at the end.
      local expires_us = now_us + ttl_us
      local fields = {'x', expires_us}
      for j = 0, nb - 1 do
        local p = first + 4 * j
        local k, amount = tonumber(T[p]), tonumber(T[p + 2])
        reserved[k] = reserved[k] + amount
        if held_delta[k] + amount > MAX_EXACT then  -- keep the sum exact in a double
          redis.call('HINCRBY', KEYS[k], 'reserved', held_delta[k])
          held_delta[k] = 0
        end
        held_delta[k] = held_delta[k] + amount
        fields[#fields + 1] = 'b:' .. KEYS[k]
        fields[#fields + 1] = T[p + 2]
      end
      for j = 0, nr - 1 do
        local p = first + 4 * (nb + j)
        local k = tonumber(T[p])
        tats[k] = new_tats[j + 1]
        tat_dirty[k] = true
        fields[#fields + 1] = 'q:' .. KEYS[k]
        fields[#fields + 1] = T[p + 2] .. ':' .. T[p + 1] .. ':' .. T[p + 3]
      end
      redis.call('HSET', hkey, unpack(fields))
      zadd[#zadd + 1] = expires_us
      zadd[#zadd + 1] = rid
      reply[i] = soft or 1
    end
  end
end

for k, delta in pairs(held_delta) do
  if delta ~= 0 then redis.call('HINCRBY', KEYS[k], 'reserved', delta) end
end
for k in pairs(tat_dirty) do
  redis.call('SET', KEYS[k], tats[k], 'PX', math.ceil((tats[k] - now_us) / 1000) + 1)
end
if #zadd > 0 then redis.call('ZADD', zkey, unpack(zadd)) end
return reply
