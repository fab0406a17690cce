"""Lua scripts: every multi-key write is atomic and each script touches one session's keys.

Return conventions are documented per script; `shared.store` wraps them in typed methods.
"""

from __future__ import annotations

# KEYS: meta, audio. ARGV: first_seq, then pairs (envelope, pcm_bytes) per frame.
# Appends frames with seq == next_seq, skips already stored ones (idempotent on seq).
# Returns {next_seq, stored, audio_bytes}; next_seq -1: unknown session,
# -2: session no longer open, -3: gap (first_seq > next_seq; third value = next_seq).
INGEST = """
local m = redis.call('HMGET', KEYS[1], 'state', 'next_seq', 'audio_bytes')
if not m[1] then return {-1, 0, 0} end
if m[1] ~= 'open' then return {-2, 0, 0} end
local next_seq = tonumber(m[2])
local total = tonumber(m[3] or '0')
local first = tonumber(ARGV[1])
if first > next_seq then return {-3, 0, next_seq} end
local stored = 0
for i = 2, #ARGV, 2 do
  local seq = first + (i - 2) / 2
  if seq == next_seq then
    redis.call('XADD', KEYS[2], '*', 'seq', seq, 'm', ARGV[i])
    next_seq = next_seq + 1
    stored = stored + 1
    total = total + tonumber(ARGV[i + 1])
  end
end
if stored > 0 then
  redis.call('HSET', KEYS[1], 'next_seq', next_seq, 'audio_bytes', total)
end
return {next_seq, stored, total}
"""

# KEYS: meta, audio. ARGV: envelope, new_state ('' keeps it).
# Appends a control mark after the audio stored so far. Returns 1, or -1 unknown
# session, -2 session no longer open.
CONTROL = """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return -1 end
if state ~= 'open' then return -2 end
redis.call('XADD', KEYS[2], '*', 't', 'control', 'm', ARGV[1])
if ARGV[2] ~= '' then redis.call('HSET', KEYS[1], 'state', ARGV[2]) end
return 1
"""

# KEYS: meta, lease. ARGV: worker_id, lease_ms.
# Takes ownership if the session is not closed and nobody else holds a live lease.
# Bumps the epoch (fencing token) and records when (`claimed_ms`, server time).
# Returns {epoch, ckpt_entry, ckpt_sample, finals, ckpt_base},
# or {0, pttl} if another worker holds it (pttl: ms until its lease runs out),
# or {-1} if the session is unknown or closed.
CLAIM = """
local state = redis.call('HGET', KEYS[1], 'state')
if not state or state == 'closed' then return {-1} end
local holder = redis.call('GET', KEYS[2])
if holder and string.sub(holder, 1, #ARGV[1] + 1) ~= ARGV[1] .. ':' then
  return {0, redis.call('PTTL', KEYS[2])}
end
local epoch = redis.call('HINCRBY', KEYS[1], 'epoch', 1)
redis.call('SET', KEYS[2], ARGV[1] .. ':' .. epoch, 'PX', ARGV[2])
local t = redis.call('TIME')
redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'claimed_ms',
           tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
local m = redis.call('HMGET', KEYS[1], 'ckpt_entry', 'ckpt_sample', 'finals', 'ckpt_base')
return {epoch, m[1] or '0-0', tonumber(m[2] or '0'), tonumber(m[3] or '0'), tonumber(m[4] or '0')}
"""

# KEYS: lease. ARGV: token, lease_ms. Returns 1 if renewed, 0 if the lease is lost.
RENEW = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""

# KEYS: lease. ARGV: token, channel, envelope. Publishes an interim if the lease holds.
# Returns 1, or 0 when fenced.
PUBLISH_INTERIM = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('PUBLISH', ARGV[2], ARGV[3])
return 1
"""

# KEYS: meta, lease, results, audio.
# ARGV: token, result_id, envelope, channel, ckpt_entry, ckpt_sample, ckpt_base
# [, language_locked].
# (ckpt_entry: first audio entry still needed; ckpt_base: its first sample's index;
# ckpt_sample: everything before it is transcribed. All indices at 16 kHz.
# language_locked: the language this final's detection fixed an `auto` session on.)
# Records a final durably, numbers it, moves the checkpoint, trims committed audio and
# publishes. The entry's `by` field names the lease token (worker:epoch) that wrote it.
# Returns the new final count, -1 when fenced, -2 when result_id is not the
# next number (the worker's state is stale).
PUBLISH_FINAL = """
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return -1 end
local finals = tonumber(redis.call('HGET', KEYS[1], 'finals') or '0')
if tonumber(ARGV[2]) ~= finals then return -2 end
redis.call('XADD', KEYS[3], '*', 't', 'final', 'rid', ARGV[2], 'by', ARGV[1], 'm', ARGV[3])
redis.call('HSET', KEYS[1], 'finals', finals + 1, 'ckpt_entry', ARGV[5], 'ckpt_sample', ARGV[6],
           'ckpt_base', ARGV[7])
if ARGV[8] and ARGV[8] ~= '' then redis.call('HSET', KEYS[1], 'language_locked', ARGV[8]) end
redis.call('XTRIM', KEYS[4], 'MINID', ARGV[5])
redis.call('PUBLISH', ARGV[4], ARGV[3])
return finals + 1
"""

# KEYS: meta, lease, results, audio. ARGV: token, envelope, channel, ttl_s, reason.
# Ends the session: summary into the results stream, state closed, keys expire, lease
# dropped, summary published. Returns 1, or -1 when fenced.
CLOSE = """
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return -1 end
redis.call('XADD', KEYS[3], '*', 't', 'closed', 'm', ARGV[2])
redis.call('HSET', KEYS[1], 'state', 'closed', 'closed_reason', ARGV[5])
redis.call('DEL', KEYS[2])
for i = 1, 4 do
  if i ~= 2 then redis.call('EXPIRE', KEYS[i], ARGV[4]) end
end
redis.call('PUBLISH', ARGV[3], ARGV[2])
return 1
"""

# KEYS: lease. ARGV: token. Gives the session up (worker shutdown): 1 if released.
RELEASE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
return 1
"""

# KEYS: meta. ARGV: connection id.
# Marks a client connection as attached; returns the previous connection id or ''.
ATTACH = """
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
local prev = redis.call('HGET', KEYS[1], 'conn') or ''
redis.call('HSET', KEYS[1], 'conn', ARGV[1])
return prev
"""

# KEYS: quota set. ARGV: session id, now ms, until ms, most sessions.
# Forgets members whose time has passed, then counts the session until `until` if it is
# counted already or fewer than `most` are. Returns {1 if counted, members now}. The key
# expires with its last member.
QUOTA_TAKE = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[2])
local n = redis.call('ZCARD', KEYS[1])
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  if n >= tonumber(ARGV[4]) then return {0, n} end
  n = n + 1
end
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
redis.call('PEXPIREAT', KEYS[1], last[2])
return {1, n}
"""

# KEYS: usage hash. ARGV: gateway id, its total there (us), ttl seconds.
# Writes the gateway's running total of the key's audio in the window under its own field
# (only ever upward: a retried or late write changes nothing) and returns the sum of all
# gateways' fields. The hash expires `ttl` after its last write.
USAGE_SYNC = """
local old = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
if tonumber(ARGV[2]) > old then redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) end
local total = 0
for _, v in ipairs(redis.call('HVALS', KEYS[1])) do total = total + tonumber(v) end
if total > 0 then redis.call('EXPIRE', KEYS[1], ARGV[3]) end
return total
"""

# KEYS: quota set. ARGV: until ms, renew flag, then session ids. Counts those sessions
# until `until` whatever the limit (a resume, a detach). With the renew flag `1` (the
# holding gateway's heartbeat) it only moves members still there forward (ZADD XX GT): a
# session that ended, or was detached for longer, while the heartbeat's call was on its
# way is not counted again nor cut short. The key expires with its last member.
QUOTA_HOLD = """
for i = 3, #ARGV do
  if ARGV[2] == '1' then
    redis.call('ZADD', KEYS[1], 'XX', 'GT', ARGV[1], ARGV[i])
  else
    redis.call('ZADD', KEYS[1], ARGV[1], ARGV[i])
  end
end
local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
if last[2] then redis.call('PEXPIREAT', KEYS[1], last[2]) end
return #ARGV - 2
"""

# KEYS: meta. ARGV: connection id. Clears the attachment if this connection still holds it.
# Returns 1 if detached, 0 if a newer connection holds the session.
DETACH = """
if redis.call('HGET', KEYS[1], 'conn') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'conn', '')
return 1
"""

# KEYS: meta, audio. ARGV: envelope.
# Ends an abandoned session: only if it is still open and no client is attached.
# Returns 1 if the close mark was appended, 0 otherwise.
ABANDON = """
local m = redis.call('HMGET', KEYS[1], 'state', 'conn')
if m[1] ~= 'open' or (m[2] and m[2] ~= '') then return 0 end
redis.call('XADD', KEYS[2], '*', 't', 'control', 'm', ARGV[1])
redis.call('HSET', KEYS[1], 'state', 'closing')
return 1
"""

# KEYS: meta. ARGV: connection-id prefix (`<gateway_id>/`).
# Detaches the session if its connection belongs to that (dead) gateway: 1, else 0.
DETACH_GATEWAY = """
local conn = redis.call('HGET', KEYS[1], 'conn')
if not conn or string.sub(conn, 1, #ARGV[1]) ~= ARGV[1] then return 0 end
if redis.call('HGET', KEYS[1], 'state') == 'closed' then return 0 end
redis.call('HSET', KEYS[1], 'conn', '')
return 1
"""

# KEYS: meta, lease, results, audio. ARGV: envelope (Closed, reason failed), channel,
# ttl_s, why. Ends a session that keeps failing: the summary goes into its results
# stream, the state becomes closed (closed_reason failed, failure why), the lease is
# dropped (fencing off any worker still at it) and the keys expire.
# Returns 1, or 0 if the session is unknown or already closed.
DEAD_LETTER = """
local state = redis.call('HGET', KEYS[1], 'state')
if not state or state == 'closed' then return 0 end
redis.call('XADD', KEYS[3], '*', 't', 'closed', 'm', ARGV[1])
redis.call('HSET', KEYS[1], 'state', 'closed', 'closed_reason', 'failed', 'failure', ARGV[4])
redis.call('DEL', KEYS[2])
for i = 1, 4 do
  if i ~= 2 then redis.call('EXPIRE', KEYS[i], ARGV[3]) end
end
redis.call('PUBLISH', ARGV[2], ARGV[1])
return 1
"""

# KEYS: meta, audio, results. Cancels a session no worker has claimed yet (epoch 0): its
# keys are deleted, so a worker that reads its dispatch entry later just acknowledges it.
# Returns 1 if cancelled, 0 if a worker claimed it meanwhile (or it is gone already).
CANCEL_QUEUED = """
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if not epoch or epoch ~= '0' then return 0 end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
return 1
"""

# KEYS: lane. ARGV: sid, envelope.
# Appends a new session's dispatch entry. Returns {entry ID, the lane's entries-added
# just after it} (0 on a Redis without that counter): the session's place in its lane.
DISPATCH = """
local id = redis.call('XADD', KEYS[1], '*', 'sid', ARGV[1], 'm', ARGV[2])
local info = redis.call('XINFO', 'STREAM', KEYS[1])
for i = 1, #info, 2 do
  if info[i] == 'entries-added' then return {id, info[i + 1]} end
end
return {id, 0}
"""

# KEYS: lane (a dispatch stream). ARGV: group. Read-only: one lane's state as the group
# sees it, in one round trip (shared/admission.py's LaneState).
# Returns {added, read, head_id}: entries ever added that count for the queue, entries
# the group has read, and the ID of the oldest unread entry ('' when none). Without the
# group (no worker has started yet), or before the group's first read, every entry in the
# lane waits: XLEN counts them, with no walk however long the queue (Redis has no
# `entries-read` for the group then). When Redis cannot tell the lag otherwise (entries
# deleted out of order), the unread entries are counted, up to 10,000.
LANE_STATE = """
local info = redis.pcall('XINFO', 'GROUPS', KEYS[1])
local group = nil
if type(info) == 'table' and not info.err then
  for _, entry in ipairs(info) do
    local fields = {}
    for i = 1, #entry, 2 do fields[entry[i]] = entry[i + 1] end
    if fields['name'] == ARGV[1] then group = fields break end
  end
end
if not group or group['last-delivered-id'] == '0-0' then
  local size = redis.call('XLEN', KEYS[1])
  if size == 0 then return {0, 0, ''} end
  local first = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)
  return {size, 0, first[1] and first[1][1] or ''}
end
local read, lag = group['entries-read'], group['lag']
local after = '(' .. group['last-delivered-id']
if not read or not lag then
  local unread = redis.call('XRANGE', KEYS[1], after, '+', 'COUNT', 10000)
  return {#unread, 0, unread[1] and unread[1][1] or ''}
end
if lag == 0 then return {read, read, ''} end
local first = redis.call('XRANGE', KEYS[1], after, '+', 'COUNT', 1)
return {read + lag, read, first[1] and first[1][1] or ''}
"""

# --- file jobs (shared/jobs.py) ---------------------------------------------------------
# Each touches one job's keys only: KEYS = job hash, audio, segments (keys.job_keys).

# ARGV: data, max_bytes, ttl_ms. Appends uploaded audio while the job is `uploading`,
# renewing the upload's expiry. Returns the audio's new size, -1 if it would pass
# max_bytes (nothing appended), -2 if the job is not being uploaded.
JOB_APPEND = """
if redis.call('HGET', KEYS[1], 'state') ~= 'uploading' then return -2 end
local size = redis.call('STRLEN', KEYS[2])
if size + string.len(ARGV[1]) > tonumber(ARGV[2]) then return -1 end
size = redis.call('APPEND', KEYS[2], ARGV[1])
redis.call('HSET', KEYS[1], 'audio_bytes', size)
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
return size
"""

# ARGV: now_ms. Ends the upload: state `queued`, and no expiry until the job is finished.
# Returns 1, or -1 if the job is not being uploaded.
JOB_SUBMIT = """
if redis.call('HGET', KEYS[1], 'state') ~= 'uploading' then return -1 end
redis.call('HSET', KEYS[1], 'state', 'queued', 'submitted_ms', ARGV[1])
redis.call('PERSIST', KEYS[1])
redis.call('PERSIST', KEYS[2])
return 1
"""

# ARGV: worker, now_ms. A run takes the job: state `running`, a new epoch (fencing
# token), one more run. Returns {epoch, done_bytes}, or {0, 0} if the job is unknown,
# still uploading, or finished.
JOB_START = """
local m = redis.call('HMGET', KEYS[1], 'state', 'done_bytes')
if m[1] ~= 'queued' and m[1] ~= 'running' then return {0, 0} end
local epoch = redis.call('HINCRBY', KEYS[1], 'epoch', 1)
redis.call('HINCRBY', KEYS[1], 'runs', 1)
redis.call('HSET', KEYS[1], 'state', 'running', 'worker', ARGV[1])
redis.call('HSETNX', KEYS[1], 'started_ms', ARGV[2])
return {epoch, tonumber(m[2] or '0')}
"""

# ARGV: epoch, from_bytes, to_bytes, then each segment (msgpack). Records the segments of
# audio [from_bytes, to_bytes) if the run still holds the job (its epoch) and the job's
# progress is at from_bytes. Returns 1, or 0 (nothing written).
JOB_PROGRESS = """
local m = redis.call('HMGET', KEYS[1], 'state', 'epoch', 'done_bytes')
if m[1] ~= 'running' or m[2] ~= ARGV[1] or m[3] ~= ARGV[2] then return 0 end
for i = 4, #ARGV do redis.call('RPUSH', KEYS[3], ARGV[i]) end
redis.call('HSET', KEYS[1], 'done_bytes', ARGV[3])
return 1
"""

# KEYS: job hash. ARGV: arq job ID. Records the job's latest queued run, if the job exists.
JOB_QUEUED_RUN = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'queued_run', ARGV[1])
return 1
"""

# ARGV: epoch (-1: any run), state (`done` or `failed`), error, now_ms, ttl_ms. Finishes
# the job: drops its audio; the hash and segments expire after ttl_ms. Returns 1, or 0
# if the job is unknown, finished already, or held by another epoch.
JOB_FINISH = """
local m = redis.call('HMGET', KEYS[1], 'state', 'epoch')
if not m[1] or m[1] == 'done' or m[1] == 'failed' or m[1] == 'uploading' then return 0 end
if ARGV[1] ~= '-1' and m[2] ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'state', ARGV[2], 'finished_ms', ARGV[4])
if ARGV[3] ~= '' then redis.call('HSET', KEYS[1], 'error', ARGV[3]) end
redis.call('DEL', KEYS[2])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
redis.call('PEXPIRE', KEYS[3], ARGV[5])
return 1
"""
