"""The Lua scripts that make ownership checks and writes atomic (fencing).

Each script first checks that the job's stream entry is still pending for this consumer
(``XPENDING key group id id 1``). A worker that lost the lease (another worker reclaimed
the entry, or it was acked) is refused and stops publishing for that job.
"""

from __future__ import annotations

OWNED = """
local function owned(stream, group, id, consumer)
  local p = redis.call('XPENDING', stream, group, id, id, 1)
  return #p == 1 and p[1][2] == consumer
end
"""

# One step's events for many jobs in one call (the publisher's hot path).
# ARGV: prefix, group, consumer, ttl s, msgpack array (non-bin encoding) of one item per
#       event, either [entry id, job id, log entry id, event bytes, final 0/1, result bytes]
#       (an event encoded by the worker: finals, errors, cancellations) or
#       [entry id, job id, seq, token ids, text] (a step's delta, encoded here).
# Key names follow keys.py: {prefix}:jobs, :out:{id}, :log:{id}, :result:{id}.
# Returns one character per item, in order (a string, so that the client parses one reply,
# not one per job): 'o' ok, 'l' lost (fenced: the entry is not ours) or 'd' dup (another
# delivery already wrote a different event at this seq: the job id is served elsewhere;
# our entry is acked). Re-sending an identical event is a no-op, so a cut-off batch can be
# resent.
#
# A delta's event is built here, so that the worker's Python (under the GIL of the loop
# feeding the GPU) does not encode one map per job per step. Its bytes are exactly what
# msgpack-python packs for ``Event(id, seq, token_ids, text).to_map()`` (same key order,
# same encodings: Redis's cmsgpack picks the smallest form as msgpack-python does), so a
# replay-log entry compares equal whichever side encoded it; tests/test_publisher.py checks.
# (A raw string: the \ddd escapes are Lua's, decimal byte values.)
PUBLISH = OWNED + r"""
local prefix, group, consumer, ttl = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local jobs = prefix .. ':jobs'
local pack = cmsgpack.pack
local out = {}
for i, it in ipairs(cmsgpack.unpack(ARGV[5])) do
  local entry, id, logid, ev, final = it[1], it[2], it[3], it[4], it[5] == 1
  if type(ev) == 'table' then     -- a delta: {entry, id, seq, token ids, text}
    final = false
    logid = '0-' .. string.format('%d', it[3] + 1)
    -- fixmap(7): id, seq, token_ids, text, finished=false, finish_reason=nil, error=nil
    ev = '\135\162id' .. pack(id) .. '\163seq' .. pack(it[3]) .. '\169token_ids' .. pack(ev)
      .. '\164text' .. pack(it[5]) .. '\168finished\194\173finish_reason\192\165error\192'
  end
  local log = prefix .. ':log:' .. id
  local status = 'o'
  if not owned(jobs, group, entry, consumer) then
    status = 'l'
  else
    local added = redis.pcall('XADD', log, logid, 'event', ev)
    if type(added) == 'table' and added.err then
      local cur = redis.call('XRANGE', log, logid, logid)
      if #cur == 0 or cur[1][2][2] ~= ev then
        redis.call('XACK', jobs, group, entry)
        redis.call('XDEL', jobs, entry)
        status = 'd'
      end
    else
      redis.call('PUBLISH', prefix .. ':out:' .. id, ev)
    end
    if status == 'o' then
      redis.call('EXPIRE', log, ttl)
      if final then
        redis.call('SET', prefix .. ':result:' .. id, it[6], 'NX', 'EX', ttl)
        redis.call('XACK', jobs, group, entry)
        redis.call('XDEL', jobs, entry)
      end
    end
  end
  out[i] = status
end
return table.concat(out)
"""

# KEYS: jobs, dead.  ARGV: group, consumer, entry id, ack (0/1), maxlen, field, value, ...
# Appends a dead letter; with ack=1 also acks and deletes the entry. 1, or 0 when fenced.
DEAD_LETTER = OWNED + """
if not owned(KEYS[1], ARGV[1], ARGV[3], ARGV[2]) then return 0 end
local fields = {}
for i = 6, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[5], '*', unpack(fields))
if ARGV[4] == '1' then
  redis.call('XACK', KEYS[1], ARGV[1], ARGV[3])
  redis.call('XDEL', KEYS[1], ARGV[3])
end
return 1
"""

# KEYS: jobs.  ARGV: group, consumer, entry id, job bytes, from worker
# SIGTERM handoff: re-enqueue the job (its progress is in its replay log) and ack the
# old entry in one step. 1, or 0 when fenced.
HANDOFF = OWNED + """
if not owned(KEYS[1], ARGV[1], ARGV[3], ARGV[2]) then return 0 end
redis.call('XADD', KEYS[1], '*', 'job', ARGV[4], 'handoff_from', ARGV[5])
redis.call('XACK', KEYS[1], ARGV[1], ARGV[3])
redis.call('XDEL', KEYS[1], ARGV[3])
return 1
"""

# KEYS: jobs.  ARGV: group, consumer, entry ids...
# Lease renewal: reset the idle time of the entries still ours (XCLAIM ... JUSTID does
# not count a delivery); returns the ids we no longer own.
RENEW = OWNED + """
local lost = {}
for i = 3, #ARGV do
  if owned(KEYS[1], ARGV[1], ARGV[i], ARGV[2]) then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
  else
    lost[#lost + 1] = ARGV[i]
  end
end
return lost
"""

# KEYS: jobs.  ARGV: group, consumer, entry id.  Ack + delete if still ours.
ACK = OWNED + """
if not owned(KEYS[1], ARGV[1], ARGV[3], ARGV[2]) then return 0 end
redis.call('XACK', KEYS[1], ARGV[1], ARGV[3])
redis.call('XDEL', KEYS[1], ARGV[3])
return 1
"""
