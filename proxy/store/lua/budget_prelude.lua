-- budget_prelude.lua: the server's clock and the expiry sweep of the budget scripts
-- (budget_v2.lua), spliced in where they say `-- #include budget_prelude.lua` (Redis
-- scripts cannot import). A change here changes every script that includes it, and so
-- is a new version of each.

local WINDOW_US = 60000000
local MAX_EXACT = 9007199254740991  -- 2^53 - 1: the largest integer a double holds exactly

local t = redis.call('TIME')
local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])

-- Sweep: release up to `limit` reservations whose expiry has passed. Their ids are not
-- marked done, so a late settle still charges what the request really cost.
local function sweep(zkey, res_prefix, limit)
  local ids = redis.call('ZRANGEBYSCORE', zkey, '-inf', now_us, 'LIMIT', 0, limit)
  for _, id in ipairs(ids) do
    local h = res_prefix .. id
    local fields = redis.call('HGETALL', h)
    for i = 1, #fields, 2 do
      if string.sub(fields[i], 1, 2) == 'b:' then
        redis.call('HINCRBY', string.sub(fields[i], 3), 'reserved', -tonumber(fields[i + 1]))
      end
    end
    redis.call('DEL', h)
    redis.call('ZREM', zkey, id)
  end
end

