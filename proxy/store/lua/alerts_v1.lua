-- alerts_v1.lua: the budget alert outbox: enqueue once, lease, ack, retry.
--
-- A new behaviour means a new file (alerts_v2.lua), never an edit of this one. Every key
-- carries the namespace's hash tag {ns}, so each call touches one hash slot on a cluster.
--
-- KEYS: [1] {ns}:al:q          ZSET    entry id -> due time (ms of TIME)
--       [2] {ns}:al:p          HASH    entry id -> payload (JSON text, opaque here)
--       [3] {ns}:al:m          HASH    entry id -> "attempts:created_ms"
--       [4] {ns}:al:d:<dedup>  STRING  dedup marker (enqueue only), PX until period end
-- ARGV: [1] op
--   enqueue: [2] marker ttl ms ('' = forever), then pairs [entry id, payload]
--            Reply 1 when written, 0 (nothing written) when the marker exists.
--   lease:   [2] limit, [3] lease ms
--            Reply: flat [id, payload, attempts, created_ms] * n, due order.
--   ack:     [2] entry id               Reply 1 when removed, 0 when absent.
--   retry:   [2] entry id, [3] delay ms Reply 1 when rescheduled, 0 when absent.
-- Time is the server's TIME, never the client's.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local op = ARGV[1]

if op == 'enqueue' then
  if redis.call('EXISTS', KEYS[4]) == 1 then
    return 0
  end
  if ARGV[2] == '' then
    redis.call('SET', KEYS[4], now)
  else
    redis.call('SET', KEYS[4], now, 'PX', ARGV[2])
  end
  for i = 3, #ARGV, 2 do
    redis.call('ZADD', KEYS[1], now, ARGV[i])
    redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1])
    redis.call('HSET', KEYS[3], ARGV[i], '0:' .. string.format('%d', now))
  end
  return 1
end

if op == 'lease' then
  local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[2]))
  local due = now + tonumber(ARGV[3])
  local out = {}
  for _, id in ipairs(ids) do
    local payload = redis.call('HGET', KEYS[2], id)
    local meta = redis.call('HGET', KEYS[3], id)
    if payload and meta then
      local sep = string.find(meta, ':', 1, true)
      local attempts = tonumber(string.sub(meta, 1, sep - 1)) + 1
      local created = string.sub(meta, sep + 1)
      redis.call('ZADD', KEYS[1], due, id)
      redis.call('HSET', KEYS[3], id, string.format('%d', attempts) .. ':' .. created)
      out[#out + 1] = id
      out[#out + 1] = payload
      out[#out + 1] = attempts
      out[#out + 1] = created
    else
      -- Half an entry (written around Metergate): drop it rather than lease it forever.
      redis.call('ZREM', KEYS[1], id)
      redis.call('HDEL', KEYS[2], id)
      redis.call('HDEL', KEYS[3], id)
    end
  end
  return out
end

if op == 'ack' then
  local removed = redis.call('ZREM', KEYS[1], ARGV[2])
  redis.call('HDEL', KEYS[2], ARGV[2])
  redis.call('HDEL', KEYS[3], ARGV[2])
  return removed
end

if op == 'retry' then
  if not redis.call('ZSCORE', KEYS[1], ARGV[2]) then
    return 0
  end
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[2])
  return 1
end

return redis.error_reply('alerts_v1.lua: unknown op ' .. tostring(op))
