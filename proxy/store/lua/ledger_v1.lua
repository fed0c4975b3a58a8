-- ledger_v1.lua: append ledger records, idempotently by request id, in one step.
--
-- Key layout (hash tag {ns:ledger}: the ledger has its own slot, apart from the
-- budget slot {ns}, so ledger traffic and size do not land on the budget hot slot):
--   {ns:ledger}:l:<request id>  STRING  the record as JSON
--   {ns:ledger}:lt              ZSET    request id scored by ts_ms (range reads)
--
-- KEYS: [1] {ns:ledger}:lt, then [1+i] {ns:ledger}:l:<id of record i>
-- ARGV: per record i: [2i-1] request id, [2i] ts_ms, and after them, [2n+i] the JSON
-- Reply: how many records were new. A known id is left untouched (first write wins).

local n = #KEYS - 1
local added = 0
for i = 1, n do
  if redis.call('SET', KEYS[1 + i], ARGV[2 * n + i], 'NX') then
    redis.call('ZADD', KEYS[1], ARGV[2 * i], ARGV[2 * i - 1])
    added = added + 1
  end
end
return added
