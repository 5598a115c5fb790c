"""The shared store's state changes, each one Lua script: Redis runs a script atomically, so every change
is a compare-and-set on the job's fencing token (`fence`) and can be repeated without harm.

A job's record is a hash `<p>:job:<id>`; its upload `<p>:job:<id>:input`; its result `<p>:job:<id>:result`.
Per model: the stream `<p>:jobs:<model>` (consumer group `gendr-workers`), the queue order
`<p>:queued:<model>` (sorted set by admission sequence) and the backlog in tiles `<p>:backlog:<model>`.
Results held: `<p>:stored` (sorted set by finish time) and `<p>:stored:sizes` (bytes per job).
Per API key: `<p>:owner:<owner digest>`, its jobs (sorted set, score = created_at) for GET /v1/jobs. SUBMIT
adds to it and CANCEL removes from it; jobs that expired by their TTL are removed lazily (a look at the
two oldest at every SUBMIT, and every gone job a listing meets), and the index itself expires when its
owner submits nothing for longer than a job runs and is kept (at least the Idempotency-Key TTL).

`fence` grows by one at every start, hand-back and cancel: a write carrying an older fence is from a
replica that lost the job (its lease ran out, or the job was cancelled) and is dropped. A stream entry
is acknowledged and deleted only together with the write that finishes its job, never before.
"""

from __future__ import annotations

# KEYS: job, input, stream, queued, backlog, seq, idem, owner index
# ARGV: id, input bytes, tiles, max backlog, use idem (0/1), digest, idem ttl s, job key prefix,
#       created_at, owner index ttl s (0: no owner, no index), field/value…
SUBMIT = """
if ARGV[5] == '1' then
  local v = redis.call('GET', KEYS[7])
  if v then
    local d, jid = string.match(v, '^(%x+) (.+)$')
    if jid and redis.call('EXISTS', ARGV[8] .. jid) == 1 then
      if d == ARGV[6] then return {'same', jid} end
      return {'reused', jid}
    end
  end
end
local backlog = tonumber(redis.call('GET', KEYS[5]) or '0')
if backlog > 0 and backlog + tonumber(ARGV[3]) > tonumber(ARGV[4]) then return {'full', tostring(backlog)} end
local seq = redis.call('INCR', KEYS[6])
redis.call('HSET', KEYS[1], 'seq', seq, unpack(ARGV, 11))
redis.call('SET', KEYS[2], ARGV[2])
local entry = redis.call('XADD', KEYS[3], '*', 'id', ARGV[1])
redis.call('HSET', KEYS[1], 'entry', entry)
redis.call('ZADD', KEYS[4], seq, ARGV[1])
redis.call('INCRBY', KEYS[5], ARGV[3])
if ARGV[5] == '1' then redis.call('SET', KEYS[7], ARGV[6] .. ' ' .. ARGV[1], 'EX', ARGV[7]) end
if ARGV[10] ~= '0' then
  for _, old in ipairs(redis.call('ZRANGE', KEYS[8], 0, 1)) do
    if redis.call('EXISTS', ARGV[8] .. old) == 0 then redis.call('ZREM', KEYS[8], old) end
  end
  redis.call('ZADD', KEYS[8], ARGV[9], ARGV[1])
  redis.call('EXPIRE', KEYS[8], ARGV[10])
end
return {'ok', ARGV[1]}
"""

# KEYS: job, queued, backlog, stream   ARGV: consumer, now, max attempts, error json, entry, group
START = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('XACK', KEYS[4], ARGV[6], ARGV[5]); redis.call('XDEL', KEYS[4], ARGV[5])
  return {'gone', 0}
end
local h = redis.call('HMGET', KEYS[1], 'phase', 'entry', 'tiles_done', 'tiles_total', 'id')
if h[1] ~= 'active' or h[2] ~= ARGV[5] then
  redis.call('XACK', KEYS[4], ARGV[6], ARGV[5]); redis.call('XDEL', KEYS[4], ARGV[5])
  return {'done', 0}
end
local attempts = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
local fence = redis.call('HINCRBY', KEYS[1], 'fence', 1)
redis.call('ZREM', KEYS[2], h[5])
local done = tonumber(h[3] or '0')
if attempts > tonumber(ARGV[3]) then
  redis.call('DECRBY', KEYS[3], tonumber(h[4]) - done)
  redis.call('HSET', KEYS[1], 'phase', 'failed', 'finished_at', ARGV[2], 'worker', '', 'error', ARGV[4])
  redis.call('XACK', KEYS[4], ARGV[6], ARGV[5]); redis.call('XDEL', KEYS[4], ARGV[5])
  return {'exhausted', fence}
end
if done > 0 then redis.call('INCRBY', KEYS[3], done) end
redis.call('HSET', KEYS[1], 'worker', ARGV[1], 'started_at', ARGV[2], 'tiles_done', 0)
return {'started', fence}
"""

# KEYS: job, backlog, stream   ARGV: fence, tiles, group, consumer
# Also renews the lease: the entry's idle time restarts (XCLAIM … JUSTID to ourselves).
PROGRESS = """
local h = redis.call('HMGET', KEYS[1], 'phase', 'fence', 'entry')
if not h[1] then return 'gone' end
if h[1] ~= 'active' then return h[1] end
if h[2] ~= ARGV[1] then return 'stale' end
local n = tonumber(ARGV[2])
if n > 0 then
  redis.call('HINCRBY', KEYS[1], 'tiles_done', n)
  redis.call('DECRBY', KEYS[2], n)
end
redis.call('XCLAIM', KEYS[3], ARGV[3], ARGV[4], 0, h[3], 'JUSTID')
return 'ok'
"""

_EVICT = """
local function evict(stored, sizes, bytes_key, prefix, keep, max_bytes)
  local total = tonumber(redis.call('GET', bytes_key) or '0')
  local guard = 0
  while total > max_bytes and guard < 1000 do
    guard = guard + 1
    local oldest = redis.call('ZRANGE', stored, 0, 0)[1]
    if not oldest or oldest == keep then break end
    local b = tonumber(redis.call('HGET', sizes, oldest) or '0')
    redis.call('ZREM', stored, oldest); redis.call('HDEL', sizes, oldest)
    total = tonumber(redis.call('DECRBY', bytes_key, b))
    redis.call('DEL', prefix .. oldest .. ':result')
    if redis.call('HGET', prefix .. oldest, 'phase') == 'succeeded' then
      redis.call('HSET', prefix .. oldest, 'phase', 'expired')
    end
  end
end
"""

# KEYS: job, result, input, backlog, stored, stream, sizes, bytes
# ARGV: fence, phase, error json, headers json, body, ttl s, now, group, max bytes, job key prefix, extra json
FINISH = (
    _EVICT
    + """
local h = redis.call('HMGET', KEYS[1], 'phase', 'fence', 'tiles_total', 'tiles_done', 'entry', 'id')
if not h[1] then return 'gone' end
if h[1] ~= 'active' then return h[1] end
if h[2] ~= ARGV[1] then return 'stale' end
local total, done = tonumber(h[3]), tonumber(h[4] or '0')
if total - done > 0 then redis.call('DECRBY', KEYS[4], total - done) end
local nbytes = string.len(ARGV[5])
if ARGV[2] == 'succeeded' then done = total end
redis.call('HSET', KEYS[1], 'phase', ARGV[2], 'finished_at', ARGV[7], 'error', ARGV[3], 'headers', ARGV[4],
  'result_bytes', nbytes, 'tiles_done', done, 'worker', '', 'extra', ARGV[11])
redis.call('DEL', KEYS[3])
redis.call('EXPIRE', KEYS[1], ARGV[6])
if h[5] then redis.call('XACK', KEYS[6], ARGV[8], h[5]); redis.call('XDEL', KEYS[6], h[5]) end
if ARGV[2] == 'succeeded' and nbytes > 0 then
  redis.call('SET', KEYS[2], ARGV[5], 'EX', ARGV[6])
  redis.call('ZADD', KEYS[5], ARGV[7], h[6])
  redis.call('HSET', KEYS[7], h[6], nbytes)
  redis.call('INCRBY', KEYS[8], nbytes)
  evict(KEYS[5], KEYS[7], KEYS[8], ARGV[10], h[6], tonumber(ARGV[9]))
end
return 'ok'
"""
)

# KEYS: job, queued, backlog, input, result, stream, stored, sizes, bytes
# ARGV: now, group, error json, owner index prefix → the phase the job had; the job is forgotten (DELETE),
# result and place in its owner's list included
CANCEL = """
local h = redis.call('HMGET', KEYS[1], 'phase', 'tiles_total', 'tiles_done', 'entry', 'id', 'worker', 'owner')
if not h[1] then return 'gone' end
if h[7] and h[7] ~= '' then redis.call('ZREM', ARGV[4] .. h[7], h[5]) end
if h[1] == 'active' then
  local left = tonumber(h[2]) - tonumber(h[3] or '0')
  if left > 0 then redis.call('DECRBY', KEYS[3], left) end
  redis.call('ZREM', KEYS[2], h[5])
  -- A delivered entry is acknowledged and deleted here; one never delivered stays until a replica reads
  -- it and finds no job (deleting it now would make the group's lag unknown to KEDA).
  if h[4] and h[6] and h[6] ~= '' then
    redis.call('XACK', KEYS[6], ARGV[2], h[4]); redis.call('XDEL', KEYS[6], h[4])
  end
end
local b = tonumber(redis.call('HGET', KEYS[8], h[5]) or '0')
if b > 0 then redis.call('DECRBY', KEYS[9], b) end
redis.call('HDEL', KEYS[8], h[5]); redis.call('ZREM', KEYS[7], h[5])
redis.call('DEL', KEYS[1], KEYS[4], KEYS[5])
return h[1]
"""

# KEYS: job, stream, queued, backlog   ARGV: fence, group
# A replica that drains gives a job it cannot finish back to the stream (not counted as an attempt).
HAND_BACK = """
local h = redis.call('HMGET', KEYS[1], 'phase', 'fence', 'tiles_done', 'entry', 'id', 'seq')
if not h[1] or h[1] ~= 'active' or h[2] ~= ARGV[1] then return 'stale' end
local done = tonumber(h[3] or '0')
if done > 0 then redis.call('INCRBY', KEYS[4], done) end
redis.call('HINCRBY', KEYS[1], 'attempts', -1)
redis.call('HINCRBY', KEYS[1], 'fence', 1)
if h[4] then redis.call('XACK', KEYS[2], ARGV[2], h[4]); redis.call('XDEL', KEYS[2], h[4]) end
local entry = redis.call('XADD', KEYS[2], '*', 'id', h[5])
redis.call('HSET', KEYS[1], 'worker', '', 'tiles_done', 0, 'entry', entry)
redis.call('ZADD', KEYS[3], h[6], h[5])
return 'ok'
"""

# KEYS: job   ARGV: field, value  — set once (the first tile's time), never on a job that is gone
SET_ONCE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
return redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2])
"""

# KEYS: job   ARGV: field, json  — a delivery's state, kept while the record lives
SET_FIELD = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return 1
"""
