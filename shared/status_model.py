"""`streamscribe status`: what it collects, as plain frozen dataclasses, and the pure
derivations from a session's meta hash and a lane's counters.

Nothing here touches Redis or the clock: `shared/status_collect.py` fills these values,
`shared/status_render.py` turns them into text and JSON (`dataclasses.asdict`).
"""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass

from shared.keys import SessionId
from shared.protocol import ENCODINGS

#: Checkpoint fields (`ckpt_sample`, `ckpt_base`) count samples at the model's rate.
MODEL_RATE_HZ = 16_000
#: The name of the section `--session` adds (its value is a `SessionInfo`).
SESSION_SECTION_NAME = "session"


# --- collected data (plain values; JSON-ready through dataclasses.asdict) ---------------


@dataclass(frozen=True, slots=True)
class ServerInfo:
    """What kind of Redis this is and whether it keeps data safe."""

    server: str  # e.g. "valkey 8.1.1" or "redis 7.2.4"
    aof_enabled: bool
    maxmemory_policy: str
    used_memory_human: str
    connected_clients: int


@dataclass(frozen=True, slots=True)
class LaneInfo:
    """One dispatch lane (a stream) and its consumer group (XLEN, XINFO GROUPS)."""

    priority: str  # `high` or `normal`
    stream: str  # the lane's key, e.g. ss:dispatch:high
    length: int
    group_exists: bool
    consumers: int
    # Sessions not yet delivered to any worker. Without a group: every entry (the group
    # starts at 0 when the first worker creates it). None: Redis cannot tell.
    lag: int | None
    pending: int  # sessions claimed and not yet closed, sessions awaiting takeover included
    entries_read: int | None
    last_delivered_id: str
    oldest_waiting_ms: int | None  # how long the oldest undelivered entry has waited


@dataclass(frozen=True, slots=True)
class DispatchInfo:
    """Every dispatch lane, highest priority first."""

    lanes: tuple[LaneInfo, ...]

    @property
    def waiting(self) -> int | None:
        """Sessions waiting for a worker in all lanes; None if a lane's lag is unknown."""
        lags = [lane.lag for lane in self.lanes]
        return None if None in lags else sum(lag or 0 for lag in lags)

    @property
    def pending(self) -> int:
        return sum(lane.pending for lane in self.lanes)


@dataclass(frozen=True, slots=True)
class WorkerRow:
    """One worker: from its heartbeat (ss:workers, ss:worker:<id>) and from XPENDING over
    every dispatch lane.

    A consumer of the dispatch group that holds sessions but has no heartbeat entry is
    listed too (`heartbeat_age_ms` None): it stopped (or unregistered at shutdown), and
    its sessions wait for another worker's takeover round.
    """

    worker_id: str
    heartbeat_age_ms: int | None
    alive: bool
    slots: int | None
    owned: int | None
    queued_decodes: int | None
    model: str
    pid: int | None
    pending: int  # dispatch entries pending for this consumer: the sessions it holds
    max_uncommitted_s: float | None  # largest received-minus-committed audio of its sessions
    #: Share of its engine's decode capacity used over the last 4 s (heartbeat `engine_busy`).
    engine_busy: float | None = None
    #: Whether it takes new sessions (heartbeat `claiming`): open, probing (one at a time)
    #: or closed (its finals wait too long for the engine).
    claiming: str | None = None
    #: While probing: the least time between two new sessions (heartbeat `claim_spacing_s`).
    claim_spacing_s: float | None = None


@dataclass(frozen=True, slots=True)
class WorkersInfo:
    alive_s: float
    rows: tuple[WorkerRow, ...]
    pending_scanned: int  # pending entries looked at for `max_uncommitted_s`
    pending_total: int

    @property
    def alive(self) -> int:
        return sum(1 for row in self.rows if row.alive)


@dataclass(frozen=True, slots=True)
class GatewayRow:
    """One gateway: its heartbeat (ss:gateways) and the sessions its clients hold
    (SCARD ss:gateway:<id>:sessions)."""

    gateway_id: str
    heartbeat_age_ms: int
    alive: bool
    sessions: int


@dataclass(frozen=True, slots=True)
class GatewaysInfo:
    """The gateway registry. A dead gateway (silent past `alive_s`) stays listed until the
    maintenance job detaches its sessions and forgets it."""

    alive_s: float
    rows: tuple[GatewayRow, ...]

    @property
    def alive(self) -> int:
        return sum(1 for row in self.rows if row.alive)


@dataclass(frozen=True, slots=True)
class QuotaRow:
    key_id: str  # the start of the API key's SHA-256 (gateway/connection.py `key_id`)
    counted: int  # its sessions that count now against max_sessions_per_key


@dataclass(frozen=True, slots=True)
class QuotasInfo:
    """Sessions counted against each API key's `max_sessions_per_key` (ss:quota:<key_id>),
    most first; empty when the limit is off."""

    keys: int  # quota keys found
    rows: tuple[QuotaRow, ...]


@dataclass(frozen=True, slots=True)
class UsageRow:
    key_id: str  # the start of the API key's SHA-256 (gateway/connection.py `key_id`)
    window: int  # the usage window's start, unix seconds
    audio_s: float  # audio the key stored in that window, all gateways together
    gateways: int  # gateways that stored some of it


@dataclass(frozen=True, slots=True)
class UsageInfo:
    """Audio stored per API key and usage window (ss:usage:<key_id>:<window>, written by
    the gateways' heartbeats): the latest window first, then the most audio."""

    hashes: int  # (key, window) hashes found
    rows: tuple[UsageRow, ...]


@dataclass(frozen=True, slots=True)
class JobRow:
    job_id: str
    state: str  # queued or running
    name: str
    audio_s: float  # the job's audio
    done_s: float  # of which transcribed
    waited_ms: int  # since it was submitted
    worker: str  # the worker of its latest run ("" before the first)
    runs: int


@dataclass(frozen=True, slots=True)
class JobsInfo:
    """File jobs waiting or running (ss:jobs, oldest first, each job's ss:job:{<id>}
    hash) and the arq runs queued for them (ss:arq:jobs)."""

    unfinished: int  # jobs in ss:jobs
    arq_queued: int  # arq runs queued (one per waiting job or continuation)
    rows: tuple[JobRow, ...]


@dataclass(frozen=True, slots=True)
class DetachedRow:
    session_id: str
    deadline_in_ms: int  # negative: overdue, the next maintenance run abandons it


@dataclass(frozen=True, slots=True)
class DetachedInfo:
    """Sessions waiting for their client to resume (ss:detached), soonest deadline first."""

    total: int
    rows: tuple[DetachedRow, ...]


@dataclass(frozen=True, slots=True)
class DeadLetterRow:
    """One entry of ss:deadletter (fields written by the maintenance job)."""

    entry_id: str
    session_id: str  # empty if the dispatch entry named no readable session
    dispatch_id: str
    attempts: int | None  # times the session was delivered to workers
    reason: str  # includes the worker's last error, when one was recorded
    age_ms: int | None  # since it was dead-lettered (`at_ms`)


@dataclass(frozen=True, slots=True)
class DeadLetterInfo:
    """Sessions that kept failing (ss:deadletter), newest first."""

    total: int  # XLEN; the stream is capped near keys.DEADLETTER_MAXLEN
    rows: tuple[DeadLetterRow, ...]


@dataclass(frozen=True, slots=True)
class SessionInfo:
    """One session: its meta hash, lease, dispatch entry, stream lengths and expiry."""

    session_id: str
    exists: bool
    meta: dict[str, str]
    lease_holder: str | None  # worker ID holding the lease now; None: nobody
    lease_epoch: int | None
    lease_ttl_ms: int | None
    ttl_s: int | None  # meta's TTL; None while the session lives (no expiry)
    audio_entries: int
    results_entries: int
    detached_deadline_in_ms: int | None
    received_s: float | None
    committed_s: float | None
    # Its dispatch entry (meta `priority`, `dispatch_id`): the lane, and from XPENDING the
    # worker it is pending on, its idle time and how often it was delivered. Consumer
    # None: the entry is not pending (not yet read, or acknowledged).
    dispatch_lane: str | None = None
    dispatch_consumer: str | None = None
    dispatch_idle_ms: int | None = None
    dispatch_deliveries: int | None = None
    # While no worker has claimed it (epoch 0): its place in the fleet's queue, as the
    # gateway computes it (shared/admission.py); 0: a worker has read it and is claiming.
    queue_position: int | None = None


@dataclass(frozen=True, slots=True)
class SectionError:
    """A section whose collection failed with a Redis error (e.g. WRONGTYPE, NOPERM)."""

    error: str


@dataclass(frozen=True, slots=True)
class Query:
    """What the operator asked for."""

    url: str
    alive_s: float = 15.0
    session_id: SessionId | None = None
    limit: int = 20  # rows per list (detached and dead-lettered sessions, API keys)


@dataclass(frozen=True, slots=True)
class Report:
    """Everything `status` prints. `error` set: Redis could not be reached at all."""

    url: str  # password removed
    now_ms: int
    sections: dict[str, object]
    error: str | None = None

    @property
    def ok(self) -> bool:
        if self.error is not None:
            return False
        session = self.sections.get(SESSION_SECTION_NAME)
        return not (isinstance(session, SessionInfo) and not session.exists)


# --- pure derivations --------------------------------------------------------------------


def redact_url(url: str) -> str:
    """The URL without its password (user names stay: they help tell ACL users apart)."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def received_seconds(meta: dict[str, str]) -> float | None:
    """Seconds of audio stored for the session, from its meta hash; None if unreadable."""
    try:
        per_second = (
            ENCODINGS[meta.get("encoding", "pcm_s16le")]
            * int(meta.get("channels", "1"))
            * int(meta.get("sample_rate", "16000"))
        )
        return int(meta.get("audio_bytes", "0")) / per_second
    except (KeyError, ValueError, ZeroDivisionError):
        return None


def committed_seconds(meta: dict[str, str]) -> float:
    """Seconds before the checkpoint: everything earlier has been transcribed for good."""
    try:
        return int(meta.get("ckpt_sample", "0")) / MODEL_RATE_HZ
    except ValueError:
        return 0.0


def countable_lane(lane: LaneInfo) -> bool:
    """Whether the lane's counters give queue positions: its lag is known, and so is how
    many entries were read (Redis reports entries-read as null until the first read, or
    after entries were deleted out of order; only the first case means none was read)."""
    if lane.lag is None:
        return False
    return lane.entries_read is not None or lane.last_delivered_id in ("-", "0-0")
