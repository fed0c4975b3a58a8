-- settle_v1.lua: settle or release a reservation exactly once; read or reset budgets.
--
-- Twin of proxy/store/budget_engine.py:settle, release and states (the reference; keep
-- them in step). The key layout is documented in reserve_v1.lua; every key carries the
-- namespace's hash tag {ns}, so one call touches one hash slot.
--
-- KEYS: [1] {ns}:rx  [2] {ns}:r:<id>  [3] {ns}:d:<id>  [3+i] {ns}:b:<key>, i = 1..n
--       (op "state"/"reset": [2] and [3] are unused placeholders in the same slot)
-- ARGV: [1] op: "settle" | "release" | "state" | "reset"
--       [2] id  [3] "{ns}:r:"  [4] sweep limit  [5] retention (ms)
--       settle only: [6] tokens ("" = keep the estimate)  [7] mode: "held" (charge
--       [8] to each budget the reservation holds) or "keys" (charge [7+i] to KEYS[3+i])
--       [8..] amounts (nano-USD)
-- Reply: settle/release: 1 applied, 0 nothing to do (already done, or nothing held to
--        release). state: {spent, reserved} per KEYS[3+i]. reset: 1.
--
-- Phases: sweep expired reservations; read the reservation and the done marker; write.

-- #include budget_prelude.lua

-- Move a GCRA bucket by `delta` units: positive takes more, negative gives back.
local function adjust(qkey, delta, per_minute)
  if delta == 0 then return end
  local inc
  if delta > 0 then
    inc = math.ceil(delta * WINDOW_US / per_minute)
  else
    inc = -math.floor(-delta * WINDOW_US / per_minute)
  end
  local tat = tonumber(redis.call('GET', qkey)) or now_us
  if tat < now_us then tat = now_us end
  local new_tat = tat + inc
  if new_tat > now_us then
    redis.call('SET', qkey, new_tat, 'PX', math.ceil((new_tat - now_us) / 1000) + 1)
  else
    redis.call('DEL', qkey)  -- the bucket is full: same as no key
  end
end

local zkey, hkey, dkey = KEYS[1], KEYS[2], KEYS[3]
local op, rid = ARGV[1], ARGV[2]
sweep(zkey, ARGV[3], tonumber(ARGV[4]))

if op == 'state' then
  local out = {}
  for i = 4, #KEYS do
    local v = redis.call('HMGET', KEYS[i], 'spent', 'reserved')
    out[#out + 1] = tonumber(v[1]) or 0
    out[#out + 1] = tonumber(v[2]) or 0
  end
  return out
end
if op == 'reset' then
  for i = 4, #KEYS do
    if redis.call('EXISTS', KEYS[i]) == 1 then redis.call('HSET', KEYS[i], 'spent', 0) end
  end
  return 1
end

if redis.call('EXISTS', dkey) == 1 then
  return 0  -- already settled or released: exactly once
end
local fields = redis.call('HGETALL', hkey)
local held_budgets, held_rates = {}, {}
for i = 1, #fields, 2 do
  local prefix = string.sub(fields[i], 1, 2)
  if prefix == 'b:' then
    held_budgets[#held_budgets + 1] = {string.sub(fields[i], 3), tonumber(fields[i + 1])}
  elseif prefix == 'q:' then
    local units, per_minute, adjustable = string.match(fields[i + 1], '^(%d+):(%d+):(%d)$')
    held_rates[#held_rates + 1] =
      {string.sub(fields[i], 3), tonumber(units), tonumber(per_minute), adjustable == '1'}
  end
end
local retention_ms = tonumber(ARGV[5])

if op == 'release' then
  redis.call('SET', dkey, '1', 'PX', retention_ms)
  if #fields == 0 then return 0 end
  for _, b in ipairs(held_budgets) do redis.call('HINCRBY', b[1], 'reserved', -b[2]) end
  for _, r in ipairs(held_rates) do adjust(r[1], -r[2], r[3]) end
  redis.call('DEL', hkey)
  redis.call('ZREM', zkey, rid)
  return 1
end

-- op == 'settle'
for _, b in ipairs(held_budgets) do redis.call('HINCRBY', b[1], 'reserved', -b[2]) end
if ARGV[6] ~= '' then
  local tokens = tonumber(ARGV[6])
  for _, r in ipairs(held_rates) do
    if r[4] then adjust(r[1], tokens - r[2], r[3]) end
  end
end
if ARGV[7] == 'held' then
  for _, b in ipairs(held_budgets) do redis.call('HINCRBY', b[1], 'spent', ARGV[8]) end
else
  for i = 4, #KEYS do redis.call('HINCRBY', KEYS[i], 'spent', ARGV[4 + i]) end
end
if #fields > 0 then
  redis.call('DEL', hkey)
  redis.call('ZREM', zkey, rid)
end
redis.call('SET', dkey, '1', 'PX', retention_ms)
return 1
