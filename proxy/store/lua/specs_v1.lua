-- specs_v1.lua: write or delete one run-time budget spec and bump the spec version.
--
-- A new behaviour means a new file (specs_v2.lua), never an edit of this one. Both keys
-- carry the namespace's hash tag {ns}, so the call touches one hash slot on a cluster,
-- and the document and the version change together: a replica that sees the new
-- version always reads the new document.
--
-- KEYS: [1] {ns}:specs    HASH    budget name -> JSON document (a config budgets: entry)
--       [2] {ns}:specs:v  STRING  version, INCR on every change (absent = 0)
-- ARGV: [1] op: "put" | "delete"  [2] budget name  [3] document (put only)
-- Reply: the new version; delete of a name that is not there: 0, nothing changed.

if ARGV[1] == 'put' then
  redis.call('HSET', KEYS[1], ARGV[2], ARGV[3])
  return redis.call('INCR', KEYS[2])
end
if redis.call('HDEL', KEYS[1], ARGV[2]) == 1 then
  return redis.call('INCR', KEYS[2])
end
return 0
