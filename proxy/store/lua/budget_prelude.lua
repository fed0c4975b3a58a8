-- budget_prelude.lua: shared by reserve_v1.lua and settle_v1.lua, spliced in where
-- they say `-- #include budget_prelude.lua` (Redis scripts cannot import). It reads the
-- server's clock and defines the expiry sweep; a change here is a change of both
-- scripts, and so a new version of both.

local WINDOW_US = 60000000

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

