-- keys_v1.lua: create or update one issued Metergate key and bump the key version.
--
-- A new behaviour means a new file (keys_v2.lua), never an edit of this one. Every key
-- carries the namespace's hash tag {ns}, so the call touches one hash slot on a
-- cluster, and the document, its revision, the name index and the version change
-- together: a replica that sees the new version always reads the new document.
--
-- KEYS: [1] {ns}:keys        HASH    key id -> JSON document (never the key itself)
--       [2] {ns}:keys:rev    HASH    key id -> revision (1 at creation, +1 per update)
--       [3] {ns}:keys:names  HASH    name -> key id, for active (not revoked) keys
--       [4] {ns}:keys:v      STRING  version, INCR on every change (absent = 0)
-- ARGV: [1] op: "create" | "update" | "read"  [2] key id  [3] name  [4] document
--       update only: [5] expected revision  [6] "1" the key stays active, "0" release
--       its name
-- Reply: the new version; -1 create: an active key holds the name; -2 create: the id
-- exists; -3 update: unknown id or the revision moved (nothing changed in any case).
-- "read" (no other ARGV) replies {HGETALL documents, HGETALL revisions}, read together
-- so that a document is never paired with another write's revision.

if ARGV[1] == 'read' then
  return {redis.call('HGETALL', KEYS[1]), redis.call('HGETALL', KEYS[2])}
end

if ARGV[1] == 'create' then
  if redis.call('HEXISTS', KEYS[2], ARGV[2]) == 1 then
    return -2
  end
  if redis.call('HEXISTS', KEYS[3], ARGV[3]) == 1 then
    return -1
  end
  redis.call('HSET', KEYS[1], ARGV[2], ARGV[4])
  redis.call('HSET', KEYS[2], ARGV[2], 1)
  redis.call('HSET', KEYS[3], ARGV[3], ARGV[2])
  return redis.call('INCR', KEYS[4])
end

local rev = redis.call('HGET', KEYS[2], ARGV[2])
if not rev or tonumber(rev) ~= tonumber(ARGV[5]) then
  return -3
end
redis.call('HSET', KEYS[1], ARGV[2], ARGV[4])
redis.call('HINCRBY', KEYS[2], ARGV[2], 1)
if ARGV[6] == '0' and redis.call('HGET', KEYS[3], ARGV[3]) == ARGV[2] then
  redis.call('HDEL', KEYS[3], ARGV[3])
end
return redis.call('INCR', KEYS[4])
