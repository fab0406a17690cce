"""Every Redis key, stream, consumer group and channel streamscribe uses, in one place.

Call sites never build key strings themselves. All keys of one session share the hash tag
`{<session_id>}`, so they live in one Redis Cluster slot and one Lua script may touch them
all. Fleet-wide keys (dispatch stream, worker registry, detached set) have no session tag;
no script touches both kinds. docs/redis-layout.md describes each key with the `redis-cli`
commands that inspect it; keep the two in step.
"""

from __future__ import annotations

import re
from typing import NewType

SessionId = NewType("SessionId", str)
WorkerId = NewType("WorkerId", str)
GatewayId = NewType("GatewayId", str)
JobId = NewType("JobId", str)

PREFIX = "ss"
_SESSION_ID = re.compile(r"^[0-9a-f]{32}$")


def is_session_id(value: str) -> bool:
    """Session IDs are 32 lowercase hex characters (128 random bits)."""
    return bool(_SESSION_ID.fullmatch(value))


# --- per session (one hash slot) -------------------------------------------------------
# TTL: none while the session is live; `session_ttl_s` once it is closed, so that a late
# resume can still read its finals. Set by the worker's CLOSE script on meta, audio and
# results; the lease is deleted at close.


def meta(sid: SessionId) -> str:
    """Hash: parameters, state, next_seq, final count, owner, epoch, checkpoint."""
    return f"{PREFIX}:{{{sid}}}:meta"


def audio(sid: SessionId) -> str:
    """Stream: the session's audio frames and control marks (finalize, close), in order."""
    return f"{PREFIX}:{{{sid}}}:audio"


def results(sid: SessionId) -> str:
    """Stream: the durable record of every final result and the closing summary."""
    return f"{PREFIX}:{{{sid}}}:results"


def lease(sid: SessionId) -> str:
    """String `<worker_id>:<epoch>` with a PX expiry: who may publish for the session now."""
    return f"{PREFIX}:{{{sid}}}:lease"


def events_channel(sid: SessionId) -> str:
    """Pub/sub channel: interims, finals and the closing summary, as they happen."""
    return f"{PREFIX}:{{{sid}}}:events"


def session_keys(sid: SessionId) -> tuple[str, str, str, str]:
    """The session's keys that expire together once it is closed."""
    return meta(sid), audio(sid), results(sid), lease(sid)


# --- fleet-wide -------------------------------------------------------------------------

#: Stream: one entry per new session; workers claim entries through DISPATCH_GROUP.
#: An entry stays pending (unacknowledged) while its session is owned, and is
#: acknowledged when the session closes. A worker that dies leaves its entries pending;
#: they go idle, and another worker takes them over with XAUTOCLAIM. The maintenance job
#: trims the stream with MINID below the oldest entry still pending or undelivered, so
#: nothing a session still needs is ever trimmed.
DISPATCH = f"{PREFIX}:dispatch"
DISPATCH_GROUP = "workers"
#: The `high` priority lane: same shape and group name; workers read it strictly first.
DISPATCH_HIGH = f"{PREFIX}:dispatch:high"


def dispatch(priority: str) -> str:
    """The dispatch stream (lane) of a priority: `high` or `normal`."""
    if priority == "high":
        return DISPATCH_HIGH
    if priority == "normal":
        return DISPATCH
    raise ValueError(f"unknown priority {priority!r}")


#: Every lane, highest priority first.
DISPATCH_LANES: tuple[str, ...] = (DISPATCH_HIGH, DISPATCH)

#: Stream: sessions that kept failing (delivered to workers more than
#: `max_session_attempts` times), with the reason; appended by the maintenance job,
#: capped at DEADLETTER_MAXLEN entries (approximate).
DEADLETTER = f"{PREFIX}:deadletter"
DEADLETTER_MAXLEN = 10_000

#: The arq queue of maintenance jobs (arq adds its own `arq:job:*`, `arq:in-progress:*`,
#: `arq:result:*`, `arq:retry:*` keys; see docs/redis-layout.md).
ARQ_QUEUE = f"{PREFIX}:arq:queue"

# --- file jobs (one hash slot per job) ---------------------------------------------------
# TTL: `Config.job_upload_ttl_s` (idle_timeout_s + 60 s) from each message while the audio
# is uploaded; none once submitted (the job is in `JOBS`);
# `job_ttl_s` on the hash and segments once the job is done or failed (the audio is
# deleted then). Written by the scripts in shared/scripts.py, JOB_* (shared/jobs.py).


def job(jid: JobId) -> str:
    """Hash: a file job's parameters, state, progress (`done_bytes`), epoch, error."""
    return f"{PREFIX}:job:{{{jid}}}"


def job_audio(jid: JobId) -> str:
    """String: the job's uploaded audio, raw bytes in its declared format."""
    return f"{PREFIX}:job:{{{jid}}}:audio"


def job_segments(jid: JobId) -> str:
    """List: the job's transcribed segments so far (msgpack, in order)."""
    return f"{PREFIX}:job:{{{jid}}}:segments"


def job_keys(jid: JobId) -> tuple[str, str, str]:
    """Every key of one job: hash, audio, segments (the order the JOB_* scripts take)."""
    return job(jid), job_audio(jid), job_segments(jid)


#: Sorted set: job_id -> unix ms of its submission, for every file job submitted and not
#: yet done or failed; its size is what `job_max_queued` bounds, a job's rank its
#: position.
JOBS = f"{PREFIX}:jobs"

#: The arq queue of file jobs (separate from maintenance's, so that a long file never
#: holds up a maintenance tick); its arq job IDs are `file:<job_id>:<done_bytes>:<epoch>`.
JOBS_ARQ_QUEUE = f"{PREFIX}:arq:jobs"

#: Sorted set: worker_id -> last heartbeat (unix ms). Entries older than
#: `worker_alive_s` are dead workers; the heartbeat removes very old ones.
WORKERS = f"{PREFIX}:workers"

#: Sorted set: session_id -> unix ms when its resume grace ends. A session is in here
#: while no client is connected to it and it is not closed.
DETACHED = f"{PREFIX}:detached"


#: Sorted set: gateway_id -> last heartbeat (unix ms). A gateway silent for longer
#: than `worker_alive_s` is dead: the maintenance job detaches its sessions (starting
#: their resume grace) and forgets it.
GATEWAYS = f"{PREFIX}:gateways"

#: Pub/sub channel every gateway subscribes to (fleet-wide notices; keeps the
#: gateway's subscriber connection subscribed even with no sessions).
GATEWAYS_CHANNEL = f"{PREFIX}:gateway-notices"


def gateway_sessions(gid: GatewayId) -> str:
    """Set: sessions with a client connected to gateway `gid`. Lets the maintenance job
    find the sessions of a gateway that died without detaching them; expires a day
    after the gateway's last heartbeat."""
    return f"{PREFIX}:gateway:{gid}:sessions"


def quota(key_id: str) -> str:
    """Sorted set: the sessions counted against one API key's `max_sessions_per_key`,
    each scored with the unix ms until which it counts (renewed by the gateway holding
    it); `key_id` is the start of the key's SHA-256, never the key itself."""
    return f"{PREFIX}:quota:{key_id}"


def usage(key_id: str, window: int) -> str:
    """Hash: gateway_id -> that gateway's running total of one API key's stored audio in
    one usage window (microseconds); `window` is the window's start in unix seconds."""
    return f"{PREFIX}:usage:{key_id}:{window}"


#: SCAN pattern of every usage hash.
USAGE_PATTERN = f"{PREFIX}:usage:*"


def parse_usage_key(key: str) -> tuple[str, int]:
    """(API key ID, window start) of a `usage` key."""
    key_id, _, window = key.removeprefix(f"{PREFIX}:usage:").rpartition(":")
    return key_id, int(window)


def worker_info(wid: WorkerId) -> str:
    """Hash: a worker's model, slots, owned-session count, queued decodes, pid; expires
    unless heartbeats renew it."""
    return f"{PREFIX}:worker:{wid}"


def client_name(role: str, process_id: str = "") -> str:
    """The client name (`CLIENT SETNAME`) of every Redis connection a process opens:
    `ss-gateway:<gateway_id>`, `ss-worker:<worker_id>`, `ss-status`. Redis refuses a name
    with spaces or characters outside printable ASCII: those become `_`."""
    name = f"{PREFIX}-{role}:{process_id}" if process_id else f"{PREFIX}-{role}"
    return "".join(c if "!" <= c <= "~" else "_" for c in name)


def parse_session_from_key(key: str) -> SessionId | None:
    """The session ID inside a per-session key, or None."""
    match = re.match(rf"^{PREFIX}:\{{([0-9a-f]{{32}})\}}:", key)
    return SessionId(match.group(1)) if match else None
