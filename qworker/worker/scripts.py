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

# KEYS: jobs, out channel, log, result
# ARGV: group, consumer, entry id, log entry id, event, ttl s, final (0/1), result
# Returns 'ok', 'lost' (fenced) or 'dup' (another delivery already wrote this seq: the
# job id is served elsewhere; our entry is acked).
PUBLISH = OWNED + """
if not owned(KEYS[1], ARGV[1], ARGV[3], ARGV[2]) then return 'lost' end
local added = redis.pcall('XADD', KEYS[3], ARGV[4], 'event', ARGV[5])
if type(added) == 'table' and added.err then
  local cur = redis.call('XRANGE', KEYS[3], ARGV[4], ARGV[4])
  if #cur == 0 or cur[1][2][2] ~= ARGV[5] then
    redis.call('XACK', KEYS[1], ARGV[1], ARGV[3])
    redis.call('XDEL', KEYS[1], ARGV[3])
    return 'dup'
  end
else
  redis.call('PUBLISH', KEYS[2], ARGV[5])
end
redis.call('EXPIRE', KEYS[3], ARGV[6])
if ARGV[7] == '1' then
  redis.call('SET', KEYS[4], ARGV[8], 'NX', 'EX', ARGV[6])
  redis.call('XACK', KEYS[1], ARGV[1], ARGV[3])
  redis.call('XDEL', KEYS[1], ARGV[3])
end
return 'ok'
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
