"""The worker process: claims sessions, feeds their audio in order, publishes results.

Loops (all on one event loop; decoding and VAD run in threads):
- claim: XREADGROUP on the dispatch stream, only as many sessions as free slots;
- takeover: XAUTOCLAIM of dispatch entries idle for longer than a lease (their owner
  stopped renewing: it died, hangs or lost Redis), then the CLAIM script, which bumps the
  session's epoch and resumes from its last checkpoint;
- reader: one blocking XREAD over the audio streams of every owned session;
- per session: a task that feeds audio to its `SessionTranscriber` and publishes;
- keepalive: renews every owned lease and, only for leases it still holds, touches the
  pending dispatch entries (XCLAIM JUSTID resets their idle time: a live owner's entries
  never look idle);
- heartbeat: registers the worker and its capacity in `ss:workers`;
- maintenance: an arq worker running the fleet's periodic jobs (worker/maintenance.py);
- file jobs: an arq worker transcribing whole files through the same scheduler, behind
  every live decode (worker/filejobs.py).
Every publish goes through a Lua script that checks the lease token (fencing): a worker
that lost its lease cannot publish anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import functools
import logging
import math
import os
import signal
import socket
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from shared import envelope, keys
from shared.batching import GroupCommit
from shared.config import Config, host_port
from shared.envelope import AudioChunk, Closed, CloseReason, Control
from shared.errors import ConfigError, EnvelopeError
from shared.keys import SessionId, WorkerId
from shared.metrics import Histogram
from shared.store import ClaimResult, Contested, ScriptCall, SessionMeta, Store, connect
from worker.audio import AudioConverter
from worker.calibration import Calibration, auto_slots, calibrate
from worker.claimgate import ClaimGate, ClaimPolicy
from worker.endpoint import Endpoint
from worker.endpoint import render as render_metrics
from worker.engine import SAMPLE_RATE, Engine, load_engine, make_vad
from worker.filejobs import FILE_JOBS_CONNECTIONS, FileJobs
from worker.maintenance import MAINTENANCE_CONNECTIONS, Maintenance
from worker.scheduler import InterimPolicy, PackPolicy, Scheduler
from worker.stream import DecodeRequest, Final, Interim, Output, SessionTranscriber, StreamOptions

log = logging.getLogger(__name__)

#: Most publishes (interims and finals, of any sessions) in one pipeline.
PUBLISH_MAX_CALLS = 256
READ_COUNT = 200  # most entries of one stream per read
CATCHUP_AHEAD_S = 2.0  # a paced session may read this far ahead of catchup_pace
CATCHUP_POLL_S = 0.05  # how often a worker with only paced sessions reads
CLAIM_GATE_CHECK_S = 0.1  # how often a worker that stopped claiming looks again


_S = TypeVar("_S")


class LeaseLost(Exception):
    """This worker no longer owns the session: stop without publishing."""


@dataclass
class Decoded:
    request: DecodeRequest
    segments: list[Any] | None
    error: BaseException | None = None


class Fed(enum.Enum):
    """Inbox note: audio read for the session has been fed to its transcriber."""

    FED = "fed"


FED = Fed.FED


@dataclass
class Catchup:
    """Where a paced session's catch-up started, and how long its entries are."""

    taken_at: float  # loop time when the worker took it
    base_samples: int  # its samples fed by then
    entry_s: float = 0.1  # audio per stream entry, as last read (the client's frames)


@dataclass
class Owned:
    sid: SessionId
    token: str
    epoch: int
    meta: SessionMeta
    lane: str
    dispatch_id: bytes
    transcriber: SessionTranscriber
    converter: AudioConverter
    last_id: bytes
    inbox: asyncio.Queue[Decoded | Fed] = field(default_factory=asyncio.Queue)
    entries: deque[tuple[bytes, int]] = field(default_factory=deque)  # (entry id, base sample)
    close_reason: CloseReason | None = None
    # Set once `close_session` has ended the session: its lease is gone by design, so a
    # renewal that raced the close failing means nothing (`Worker._keepalive_loop`).
    closed: bool = False
    next_seq: int | None = None  # the audio seq expected next (None: from the first read)
    task: asyncio.Task[None] | None = None
    # Its decodes in flight: the one it waits for, and an interim a final went past.
    decode_tasks: set[asyncio.Task[None]] = field(default_factory=set)
    feed_error: Exception | None = None  # set by the VAD thread; raised by the session task
    fed_noted: bool = False  # a FED note is in the inbox, not yet taken
    wake: bool = False  # set by the VAD thread: the task has work after the last feed
    audio_key: bytes = b""  # keys.audio(sid), encoded once
    # Taken with stored audio to catch up on: read at most `catchup_pace` times real time
    # until it has (`Worker._read_paced`); None once it has, or when it had none.
    paced: Catchup | None = None

    def __post_init__(self) -> None:
        self.audio_key = keys.audio(self.sid).encode()


class Worker:
    def __init__(
        self, config: Config, redis: aioredis.Redis | None = None, engine: Engine | None = None
    ) -> None:
        self.config = config
        self.worker_id = WorkerId(config.worker_id or f"{socket.gethostname()}-{os.getpid()}")
        self.redis = (
            redis
            if redis is not None
            else connect(
                config.require_redis_url(),
                keys.client_name("worker", self.worker_id),
                max_connections=self.redis_connections()[0],
                pool_wait_s=config.redis_pool_wait_s,
            )
        )
        self.store = Store(self.redis)
        # Every session's interims and finals, sent together (one pipeline per batch).
        self.publisher: GroupCommit[ScriptCall, Any] = GroupCommit(
            self.store.publish_many, name="publish", max_calls=PUBLISH_MAX_CALLS
        )
        self.engine = engine
        self.scheduler: Scheduler | None = None
        self.owned: dict[SessionId, Owned] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._slot_freed = asyncio.Event()
        self._session_added = asyncio.Event()
        self._fed = asyncio.Event()  # clear while a feed job runs on the VAD thread
        self._fed.set()
        self._stopping = asyncio.Event()
        self._closing = asyncio.Event()
        self._cpu = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vad")
        # Takeover candidates whose old lease was still live: entry id -> (fields, retry at).
        self._contested: dict[bytes, tuple[str, dict[bytes, bytes], float]] = {}
        self._takeover_cursor: dict[str, bytes] = {}
        self.maintenance: Maintenance | None = None
        self.filejobs: FileJobs | None = None
        self.endpoint: Endpoint | None = None
        self.takeovers = 0
        self.early_decodes = 0  # early finals decoded (see worker/stream.py)
        self.early_finals = 0  # of those, the ones that became their utterance's final
        # Interims a due final went past (worker/stream.py, `set_interim_aside`); the
        # scheduler counts those withdrawn before they started (`interims_withdrawn`).
        self.interims_set_aside = 0
        # Each published final, from when it fell due (`Final.due_at`) to when its
        # publish returned (`/metrics` only: the heartbeat holds no histograms).
        self.final_seconds = Histogram()
        self.options = StreamOptions.from_config(config)
        # Sessions this worker serves at once: `slots`, or measured by `start` (slots 0).
        self.slots = config.slots
        self.calibration: Calibration | None = None
        self._probing_told = -60.0  # when the gate's probing was last logged at INFO
        # Whether to take new sessions, from how long finals wait (worker/claimgate.py).
        self.gate = ClaimGate(
            ClaimPolicy(
                config.claim_max_final_wait_s,
                config.claim_probe_busy,
                config.claim_probe_ramp_s,
            )
        )

    # --- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Load and warm the model first; only then register and claim work."""
        loop = asyncio.get_running_loop()
        if self.engine is None:
            cfg = self.config
            self.engine = await loop.run_in_executor(
                None,
                load_engine,
                cfg.engine,
                cfg.model,
                cfg.device,
                cfg.compute_type,
                cfg.cpu_threads,
                cfg.encode_min_s,
                cfg.decode_threads,
                cfg.state_dir,
            )
        await loop.run_in_executor(None, getattr(self.engine, "warm_up", lambda: None))
        await loop.run_in_executor(None, make_vad, self.config.vad)  # load the VAD model once
        self.scheduler = Scheduler(
            self.engine,
            beam_size=self.config.beam_size,
            policy=InterimPolicy.from_config(self.config),
            pack=PackPolicy(
                max_items=self.config.pack_finals,
                window_s=self.config.pack_window_s,
                guard_s=self.config.pack_guard_s,
            ),
            batch=self.config.batch_decodes,
            # decode_threads, but no more than the engine was built for (an engine handed
            # in, as tests and benchmarks do, may have been built for fewer).
            concurrency=min(
                self.config.decode_threads,
                getattr(self.engine, "workers", self.config.decode_threads),
            ),
            file_max_busy=self.config.job_max_busy,
        )
        if self.slots == 0:
            await self._calibrate_slots()
        self.scheduler.start()
        if self.config.worker_metrics:
            # Before anything is claimed: a port in use stops the worker with nothing held.
            host, port = host_port(self.config.worker_metrics, "worker_metrics")
            self.endpoint = Endpoint(
                host,
                port,
                lambda: render_metrics(self.worker_id, self.stats(), self.histograms()),
                lambda: not self._closing.is_set(),
            )
            try:
                await self.endpoint.start()
            except OSError as exc:
                await self.scheduler.close()
                raise ConfigError(
                    f"--worker-metrics {self.config.worker_metrics}: cannot listen there "
                    f"({exc.strerror or exc})"
                ) from exc
        await self.store.ensure_group()
        await self._heartbeat_once()
        for coro in (
            self._claim_loop(),
            self._takeover_loop(),
            self._read_loop(),
            self._keepalive_loop(),
            self._heartbeat_loop(),
        ):
            self._tasks.append(asyncio.create_task(coro))
        if self.config.maintenance == "on":
            self.maintenance = Maintenance(
                self.config,
                self.config.require_redis_url(),
                keys.client_name("maintenance", self.worker_id),
                self.redis_connections()[1],
            )
            self.maintenance.start()
        if self.config.file_jobs == "on":
            self.filejobs = FileJobs(
                self.config,
                self.config.require_redis_url(),
                self.scheduler,
                self.worker_id,
                keys.client_name("filejobs", self.worker_id),
                self.redis_connections()[2],
            )
            self.filejobs.start()
        log.info(
            "worker %s ready: engine %s, %d slots",
            self.worker_id,
            self.engine.name,
            self.slots,
        )

    def redis_connections(self) -> tuple[int, int, int]:
        """The most Redis connections of the worker's own pool, of its maintenance pool
        and of its file jobs' pool (0: no limit): together at most
        `redis_max_connections`."""
        limit = self.config.redis_max_connections
        if limit == 0:
            return 0, 0, 0
        maintenance = MAINTENANCE_CONNECTIONS if self.config.maintenance == "on" else 0
        files = FILE_JOBS_CONNECTIONS if self.config.file_jobs == "on" else 0
        return limit - maintenance - files, maintenance, files

    def slots_text(self) -> str:
        """How many sessions this worker serves at once, and where the number comes from."""
        if self.calibration is None:
            return f"{self.slots} slots"
        return (
            f"{self.slots} slots (measured at start-up: {self.calibration.rate:.1f} audio s/s "
            f"x auto_slots_factor {self.config.auto_slots_factor:g}; --slots N sets a number)"
        )

    async def _calibrate_slots(self) -> None:
        """`slots` auto: time the engine on the shipped utterances (worker/calibration.py)."""
        assert self.engine is not None and self.scheduler is not None
        cfg = self.config
        found = await asyncio.get_running_loop().run_in_executor(
            None,
            functools.partial(
                calibrate,
                self.engine,
                threads=self.scheduler.concurrency,
                batch=self.scheduler.batch,
                beam_size=cfg.beam_size,
            ),
        )
        self.calibration = found
        self.slots = auto_slots(found.rate, cfg.auto_slots_factor, cfg.auto_slots_max)
        log.info(
            "worker %s: slots auto: %.1f s of speech decoded at %.1f audio s/s "
            "(%d at once, batches of %d; rounds %s s) -> %d slots (auto_slots_factor %g%s)",
            self.worker_id,
            found.round_audio_s,
            found.rate,
            found.threads,
            found.batch,
            "/".join(f"{t:.2f}" for t in found.rounds_s),
            self.slots,
            cfg.auto_slots_factor,
            f", capped at auto_slots_max {cfg.auto_slots_max}"
            if self.slots == cfg.auto_slots_max
            else "",
        )
        if found.words == 0:
            log.warning(
                "worker %s: the calibration heard no words in its speech clips: the model "
                "may be broken, and %d slots measured on it may be too many",
                self.worker_id,
                self.slots,
            )

    async def serve_forever(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stopping.set)
        await self._stopping.wait()
        await self.shutdown()

    async def shutdown(self) -> None:
        """Stop claiming, stop sessions, release their leases and hand them back.

        Every session's committed point is already in Redis (the checkpoint moves with each
        final), so stopping loses nothing: the next owner re-reads the audio after the
        checkpoint. Releasing the lease and marking the dispatch entries long idle lets
        another worker's takeover loop claim them on its next round instead of waiting
        out a lease.
        """
        log.info("worker %s stopping", self.worker_id)
        self._closing.set()  # loops finish their current Redis call and return
        # A file job's run ends at its window's end meanwhile (it needs the scheduler).
        files_stopped = (
            asyncio.create_task(self.filejobs.stop()) if self.filejobs is not None else None
        )
        if self.maintenance is not None:
            await self.maintenance.stop()
        _done, pending = await asyncio.wait(self._tasks, timeout=2.0) if self._tasks else ((), ())
        for task in pending:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        owned = list(self.owned.values())
        for s in owned:
            if s.task is not None:
                s.task.cancel()
        await asyncio.gather(*(s.task for s in owned if s.task), return_exceptions=True)
        await self.publisher.close()
        with contextlib.suppress(RedisError, OSError):
            released = [s for s in owned if await self.store.release(s.sid, s.token)]
            for lane in keys.DISPATCH_LANES:
                await self.store.hand_back(
                    self.worker_id,
                    lane,
                    [s.dispatch_id for s in released if s.lane == lane],
                    idle_ms=self._idle_ms * 10,
                )
            for s in released:
                log.info("session %s released for another worker", s.sid)
            await self.store.unregister(self.worker_id)
        if files_stopped is not None:
            await files_stopped
        if self.scheduler is not None:
            await self.scheduler.close()
        self._cpu.shutdown(wait=True, cancel_futures=True)
        await self.redis.aclose()
        if self.endpoint is not None:  # /healthz said 503 while the worker stopped
            await self.endpoint.stop()
        log.info("worker %s stopped", self.worker_id)

    # --- claiming ----------------------------------------------------------------------

    async def _pause(self, seconds: float) -> None:
        """Sleep, but wake at once when the worker shuts down."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._closing.wait(), seconds)

    async def _claim_loop(self) -> None:
        """Claim new sessions, the `high` lane strictly before `normal`, never more than
        the free slots, and only as many as the claim gate allows (worker/claimgate.py)."""
        while not self._closing.is_set():
            free = self.slots - len(self.owned)
            if free <= 0:
                self._slot_freed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._slot_freed.wait(), 0.5)
                continue
            allowed = self._allowed_claims()
            if allowed == 0:
                await self._pause(CLAIM_GATE_CHECK_S)
                continue
            if allowed is not None:
                free = min(free, allowed)
            try:
                taken = await self._read_lanes(free)
            except (RedisError, OSError) as exc:
                await self._redis_trouble("claim", exc)
                continue
            for lane, entry_id, fields in taken:
                try:
                    if len(self.owned) < self.slots:
                        held = len(self.owned)
                        await self._take(lane, entry_id, fields)
                        if len(self.owned) > held:  # a session started (not one gone)
                            self.gate.took(time.monotonic())
                    else:  # two lanes answered one blocking read: let another worker take it
                        await self.store.hand_back(
                            self.worker_id, lane, [entry_id], idle_ms=self._idle_ms * 10
                        )
                except (RedisError, OSError) as exc:
                    await self._redis_trouble("claim", exc)

    def _allowed_claims(self) -> int | None:
        """New sessions the gate lets this worker take now (None: as many as slots allow);
        logs each change of the gate's state."""
        before = self.gate.state
        wait = busy = 0.0
        if self.scheduler is not None:
            wait, busy = self.scheduler.final_wait_s(), self.scheduler.final_busy_fraction()
        allowed = self.gate.allowed(time.monotonic(), wait, busy, len(self.owned))
        if self.gate.state != before:
            # Closing and reopening are news; probing comes and goes with the load, so it
            # is told at most once a minute.
            level = logging.DEBUG
            now = time.monotonic()
            if "closed" in (before, self.gate.state):
                level = logging.WARNING if self.gate.state == "closed" else logging.INFO
            elif self.gate.state == "probing" and now - self._probing_told >= 60.0:
                level, self._probing_told = logging.INFO, now
            log.log(
                level,
                "worker %s: new sessions %s (a final waited %.1f s for the engine, finals "
                "used %.0f%% of it; %d of %d slots in use)",
                self.worker_id,
                {
                    "open": "taken again",
                    "probing": f"taken one at a time, one per {self.gate.spacing_s:.1f} s",
                    "closed": "not taken",
                }[self.gate.state],
                wait,
                100 * busy,
                len(self.owned),
                self.slots,
            )
        return allowed

    async def _read_lanes(self, free: int) -> list[tuple[str, bytes, dict[bytes, bytes]]]:
        """New dispatch entries for up to `free` slots, highest lane first.

        Non-blocking reads lane by lane; only when every lane is empty, one blocking read
        over all lanes (which may return one entry from each)."""
        out: list[tuple[str, bytes, dict[bytes, bytes]]] = []
        for lane in keys.DISPATCH_LANES:
            reply = await self.redis.xreadgroup(
                keys.DISPATCH_GROUP, self.worker_id, {lane: ">"}, count=free - len(out)
            )
            out += [(lane, eid, f) for _s, entries in reply or [] for eid, f in entries]
            if len(out) >= free:
                return out
        if out:
            return out
        reply = await self.redis.xreadgroup(
            keys.DISPATCH_GROUP,
            self.worker_id,
            dict.fromkeys(keys.DISPATCH_LANES, ">"),
            count=1,
            block=500,
        )
        found = {_str(stream): entries for stream, entries in reply or []}
        return [(lane, eid, f) for lane in keys.DISPATCH_LANES for eid, f in found.get(lane, [])]

    @property
    def _idle_ms(self) -> int:
        return int(self.config.lease_s * 1000)

    async def _take(self, lane: str, entry_id: bytes, fields: dict[bytes, bytes]) -> None:
        """Claim the session of a dispatch entry that is now pending on this worker."""
        try:
            item = envelope.decode_entry(fields)
        except EnvelopeError as exc:
            log.error("dispatch entry %s unreadable (%s); acknowledged and skipped", entry_id, exc)
            await self.store.ack_dispatch(lane, entry_id)
            return
        if not isinstance(item, envelope.Dispatch):
            await self.store.ack_dispatch(lane, entry_id)
            return
        sid = SessionId(item.session_id)
        if sid in self.owned:
            return  # ours already (a late touch raced a takeover round)
        claim = await self.store.claim(sid, self.worker_id, self.config.lease_s)
        if isinstance(claim, Contested):
            # Its owner's lease is still live: retry once when it runs out. If the owner
            # is alive it renews meanwhile and takes the entry back with its next touch.
            retry_at = asyncio.get_running_loop().time() + claim.pttl_ms / 1000 + 0.05
            self._contested[entry_id] = (lane, fields, retry_at)
            return
        meta = await self.store.load_meta(sid) if claim else None
        if claim is None or meta is None:
            log.info("session %s no longer needs a worker; dispatch entry acknowledged", sid)
            await self.store.ack_dispatch(lane, entry_id)
            return
        self._start_session(sid, claim, meta, lane, entry_id)

    async def _takeover_loop(self) -> None:
        """Take over sessions whose owner stopped renewing (XAUTOCLAIM + CLAIM)."""
        loop = asyncio.get_running_loop()
        while not self._closing.is_set():
            await self._pause(self.config.takeover_interval_s)
            try:
                now = loop.time()
                for entry_id, (lane, fields, retry_at) in list(self._contested.items()):
                    if retry_at <= now and self.slots > len(self.owned):
                        del self._contested[entry_id]
                        await self._take_over(lane, entry_id, fields, retry=True)
                for lane in keys.DISPATCH_LANES:
                    await self._autoclaim(lane)
            except (RedisError, OSError) as exc:
                await self._redis_trouble("takeover", exc)

    async def _autoclaim(self, lane: str) -> None:
        free = self.slots - len(self.owned)
        if free <= 0:
            return
        cursor = self._takeover_cursor.get(lane, b"0-0")
        reply = await self.redis.xautoclaim(
            lane, keys.DISPATCH_GROUP, self.worker_id, self._idle_ms, start_id=cursor, count=free
        )
        next_cursor, entries = reply[0], reply[1]
        self._takeover_cursor[lane] = next_cursor if _str(next_cursor) != "0-0" else b"0-0"
        for entry_id, fields in entries:
            if fields is not None:  # None: deleted from the stream meanwhile
                await self._take_over(lane, entry_id, fields, retry=False)

    async def _take_over(
        self, lane: str, entry_id: bytes, fields: dict[bytes, bytes], retry: bool
    ) -> None:
        before = len(self.owned)
        await self._take(lane, entry_id, fields)
        if len(self.owned) > before:
            self.takeovers += 1
        elif retry:
            self._contested.pop(entry_id, None)  # still held: its owner is alive

    def _start_session(
        self, sid: SessionId, claim: ClaimResult, meta: SessionMeta, lane: str, dispatch_id: bytes
    ) -> None:
        language = meta.language_locked or meta.params.language or self.config.language
        options = dataclasses.replace(
            self.options,
            interim_results=meta.params.interim_results,
            language=None if language == "auto" else language,
        )
        transcriber = SessionTranscriber(
            options,
            make_vad(self.config.vad),
            start_sample=claim.ckpt_base,
            finals=claim.finals,
            clock=time.monotonic,  # Final.due_at, for final_seconds (`_publish`)
        )
        transcriber.committed = max(claim.ckpt_sample, claim.ckpt_base)
        last_id = _before(claim.ckpt_entry) if claim.ckpt_entry != "0-0" else b"0-0"
        owned = Owned(
            sid=sid,
            token=f"{self.worker_id}:{claim.epoch}",
            epoch=claim.epoch,
            meta=meta,
            lane=lane,
            dispatch_id=dispatch_id,
            transcriber=transcriber,
            converter=AudioConverter(meta.params),
            last_id=last_id,
        )
        pace = self.config.catchup_pace
        if pace and claim.epoch == 1 and meta.audio_seconds > CATCHUP_AHEAD_S:
            owned.paced = Catchup(asyncio.get_running_loop().time(), transcriber.total_samples)
            log.info(
                "session %s has %.1f s of stored audio: read at most %gx real time until "
                "it has caught up",
                sid,
                meta.audio_seconds,
                pace,
            )
        self.owned[sid] = owned
        owned.task = asyncio.create_task(self._session_main(owned), name=f"session-{sid}")
        self._session_added.set()
        log.info("session %s claimed (epoch %d, from final %d)", sid, claim.epoch, claim.finals)

    # --- reading audio -----------------------------------------------------------------

    async def _read_loop(self) -> None:
        """Read the audio of every owned session and feed each reply's audio to its
        sessions in one job on the VAD thread.

        A pass reads every session once, at most `read_streams_per_s` streams a second
        and at most once per `read_interval_ms` (`read_spacing_s`). More sessions than
        `read_chunk_streams` are read in chunks of that many, one `XREAD` each, spread
        evenly over the pass and each fed before the next is read: Redis runs one
        command at a time, and one `XREAD` over every stream held the gateways' appends
        (and so their acks) for its whole length; a whole pass fed at once also took
        most of a core for a tenth of a second, and the gateway waited for the CPU. Only
        a pass of one chunk blocks (`read_block_ms`) for audio to come; chunks are paced
        instead, so an idle worker reads each stream once per pass.

        One job per reply, not one per session: at real time a session has about one
        frame per read, and a thread hand-off per frame cost more than the frame's own
        conversion and VAD (null engine, hundreds of sessions). While the job runs, the
        session tasks wait at `_fed` before touching their transcriber (see `_may_touch`),
        so a transcriber is never used from two threads at once."""
        loop = asyncio.get_running_loop()
        started, spacing = -1.0, 0.0
        while not self._closing.is_set():
            targets = {s.audio_key: s for s in self.owned.values() if s.close_reason is None}
            streams = [(key, o.last_id) for key, o in targets.items() if o.paced is None]
            if await self._read_paced(loop, targets):
                continue  # pacing: the next pass reads their next part
            if not streams:
                self._session_added.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._session_added.wait(), 0.5)
                continue
            size = self.config.read_chunk_streams
            chunks = [streams[i : i + size] for i in range(0, len(streams), size)]
            block = self.config.read_block_ms if len(chunks) == 1 else None
            pass_s = read_spacing_s(
                len(streams), self.config.read_interval_ms, self.config.read_streams_per_s
            )
            for chunk in chunks:
                wait = started + spacing - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)  # pacing: let the next read find more per session
                spacing = pass_s / len(chunks)
                started = loop.time()
                try:
                    reply = await self.store.read_audio(chunk, READ_COUNT, block)
                except (RedisError, OSError) as exc:
                    await self._redis_trouble("read", exc)
                    break  # a new pass, from the sessions owned then
                await self._feed_reply(loop, reply, targets)

    async def _read_paced(
        self, loop: asyncio.AbstractEventLoop, targets: dict[bytes, Owned]
    ) -> bool:
        """Read the next part of every paced session: as many entries as `catchup_budget_s`
        allows now (one at least, when it allows any). One whose read brought fewer than
        asked is at the live edge: read with the others from then on; one whose read
        reached its close has nothing more to read. True when every session is paced:
        the caller pauses briefly before the next pass."""
        paced = [o for o in targets.values() if o.paced is not None]
        if not paced:
            return False
        now = loop.time()
        asks: list[tuple[Owned, Catchup, int, int]] = []  # (session, catch-up, count, fed)
        for o in paced:
            c = o.paced
            assert c is not None
            fed = o.transcriber.total_samples
            budget = catchup_budget_s(
                (fed - c.base_samples) / SAMPLE_RATE, now - c.taken_at, self.config.catchup_pace
            )
            if budget > 0:
                asks.append((o, c, min(READ_COUNT, math.ceil(budget / c.entry_s)), fed))
        for o, c, count, fed in asks:  # one XREAD each: COUNT is per command
            try:
                reply = await self.store.read_audio([(o.audio_key, o.last_id)], count, None)
            except (RedisError, OSError) as exc:
                await self._redis_trouble("read", exc)
                return True
            got = sum(len(entries) for _key, entries in reply)
            await self._feed_reply(loop, reply, targets)
            if got and o.transcriber.total_samples > fed:
                c.entry_s = (o.transcriber.total_samples - fed) / SAMPLE_RATE / got
            if o.paced is c and (got < count or o.close_reason is not None):
                o.paced = None  # at the live edge, or at the end of its stream
                if o.close_reason is None:
                    log.info("session %s has caught up", o.sid)
        if len(paced) < len(targets):
            return False
        await self._pause(CATCHUP_POLL_S)
        return True

    async def _feed_reply(
        self,
        loop: asyncio.AbstractEventLoop,
        reply: list[tuple[bytes, list[tuple[bytes, list[bytes]]]]],
        targets: dict[bytes, Owned],
    ) -> None:
        """Feed one read's audio (one job on the VAD thread), then wake each session
        that has something to do."""
        work = self._route(reply, targets)
        if not work:
            return
        self._fed.clear()
        job = loop.run_in_executor(self._cpu, self._feed_all, work)
        try:
            await asyncio.shield(job)
        finally:
            # Cancelled (shutdown) while the job runs: the session tasks stay held
            # until it has finished, not just until this task has stopped.
            if job.done():
                self._fed.set()
            else:
                job.add_done_callback(lambda _: self._fed.set())
        for owned, _ in work:
            # Woken only with something to do: at real time most reads bring a
            # session one frame that starts no decode, and a wake-up per session per
            # read was a tenth of the worker's CPU (null engine, 500 sessions).
            if owned.wake and not owned.fed_noted:  # one note covers any number of reads
                owned.fed_noted = True
                owned.inbox.put_nowait(FED)

    def _route(
        self,
        reply: list[tuple[bytes, list[tuple[bytes, list[bytes]]]]],
        targets: dict[bytes, Owned],
    ) -> list[tuple[Owned, list[tuple[bytes, envelope.Envelope]]]]:
        """The entries of one XREAD reply, decoded, for the sessions they were read for.

        Entries go only to the `Owned` whose `last_id` the read was made from. While the
        read was in flight that session may have stopped, or stopped and been claimed
        again by this worker (a lost lease, then a takeover): its new `Owned` starts from
        its own checkpoint, and entries read after the old one's position would make it
        skip the audio in between."""
        work: list[tuple[Owned, list[tuple[bytes, envelope.Envelope]]]] = []
        for key, entries in reply:
            owned = targets.get(key)
            if owned is None or not entries or self.owned.get(owned.sid) is not owned:
                continue
            owned.last_id = entries[-1][0]
            batch: list[tuple[bytes, envelope.Envelope]] = []
            for entry_id, fields in entries:
                try:
                    batch.append((entry_id, envelope.decode_fields(fields)))
                except EnvelopeError as exc:
                    log.error(
                        "session %s: unreadable audio entry %s skipped: %s",
                        owned.sid,
                        entry_id,
                        exc,
                    )
            work.append((owned, batch))
        return work

    async def _may_touch(self) -> None:
        """Return once no feed job is running (at once if none is): from then until its
        next `await`, a session task may use its transcriber."""
        if not self._fed.is_set():
            await self._fed.wait()

    def _feed_all(self, work: list[tuple[Owned, list[tuple[bytes, envelope.Envelope]]]]) -> None:
        """`_feed` for each session of one read (runs in the VAD thread). A session whose
        audio cannot be fed is failed by its own task, not by the others'."""
        for owned, batch in work:
            owned.wake = True
            if owned.feed_error is not None:
                continue
            try:
                self._feed(owned, batch)
                owned.wake = owned.transcriber.has_work()
            except Exception as exc:
                owned.feed_error = exc

    # --- one session -------------------------------------------------------------------

    async def _session_main(self, s: Owned) -> None:
        try:
            await self._session_loop(s)
        except LeaseLost:
            log.warning("session %s: lease lost; stopped without publishing", s.sid)
        except asyncio.CancelledError:
            raise
        except (RedisError, OSError) as exc:
            log.warning("session %s: redis error %s; releasing its lease", s.sid, exc)
            with contextlib.suppress(RedisError, OSError):
                await self.store.release(s.sid, s.token)
        except Exception as exc:
            log.exception("session %s failed; releasing it", s.sid)
            with contextlib.suppress(RedisError, OSError):
                await self.store.record_failure(s.sid, f"{type(exc).__name__}: {exc}")
                await self.store.release(s.sid, s.token)
        finally:
            for task in s.decode_tasks:
                task.cancel()
            if self.scheduler is not None:
                self.scheduler.forget(s.sid)
            if self.owned.get(s.sid) is s:  # never another claim's state of the session
                del self.owned[s.sid]
                self.gate.ended()
            self._slot_freed.set()

    async def _session_loop(self, s: Owned) -> None:
        tr = s.transcriber
        assert self.scheduler is not None
        decoding: DecodeRequest | None = None  # the request the transcriber waits for
        while True:
            await self._may_touch()
            if tr.done:
                break
            if decoding is None and (req := tr.next_request()) is not None:
                decoding = req
                task = asyncio.create_task(self._decode(s, req))
                s.decode_tasks.add(task)
                task.add_done_callback(s.decode_tasks.discard)
            item = await s.inbox.get()
            await self._may_touch()
            if s.feed_error is not None:
                raise s.feed_error
            if isinstance(item, Decoded):
                if item.request is decoding:
                    decoding = None
                if item.error is not None or item.segments is None:
                    tr.abandon_request(item.request)
                    if item.error is not None and item.request.kind == "final":
                        raise RuntimeError("final decode failed") from item.error
                    continue
                self.early_decodes += item.request.early
                outs = tr.complete(item.request, item.segments)
            else:  # FED: its audio was fed; early finals whose utterance has now ended
                s.fed_noted = False
                outs = tr.take_ready()
                if tr.interim_in_the_way():  # a final is due behind the session's interim
                    tr.set_interim_aside()
                    self.interims_set_aside += 1
                    decoding = None
                    self.scheduler.withdraw_interim(s.sid)  # answered None if not started
            for out in outs:
                await self._publish(s, out)
        await self._close(s)

    def _feed(self, s: Owned, batch: Iterable[tuple[bytes, envelope.Envelope]]) -> None:
        """Convert and VAD a batch of entries (runs in the VAD thread).

        Consecutive audio frames whose sample count is known up front
        (`AudioConverter.samples_in`) are converted and pushed together: a read spaced
        by `read_streams_per_s` brings a session several frames, and numpy's cost per
        call, not per sample, was most of the conversion and VAD (null engine)."""
        tr = s.transcriber
        run: list[bytes] = []  # audio not yet pushed, in order
        run_samples = 0
        for entry_id, item in batch:
            if tr.closing:
                break
            if isinstance(item, AudioChunk):
                if s.next_seq is not None and item.seq < s.next_seq:
                    # Seen already: Redis lost its last writes (a crash under AOF everysec)
                    # and the client re-sent them with new entry IDs. Never feed twice.
                    log.warning("session %s: audio seq %d again; skipped", s.sid, item.seq)
                    continue
                s.next_seq = item.seq + 1
                n = s.converter.samples_in(len(item.pcm))
                if n is not None:
                    s.entries.append((entry_id, tr.total_samples + run_samples))
                    run.append(item.pcm)
                    run_samples += n
                    continue
            if run:
                tr.push_audio(s.converter.convert(b"".join(run)))
                run, run_samples = [], 0
            s.entries.append((entry_id, tr.total_samples))
            if isinstance(item, AudioChunk):
                tr.push_audio(s.converter.convert(item.pcm))
            elif isinstance(item, Control) and item.kind == "finalize":
                tr.finalize()
            elif isinstance(item, Control) and item.kind == "close":
                s.close_reason = item.reason or "client_closed"
                tr.close(s.converter.flush())
        if run:
            tr.push_audio(s.converter.convert(b"".join(run)))

    async def _decode(self, s: Owned, req: DecodeRequest) -> None:
        assert self.scheduler is not None
        try:
            segments = await self.scheduler.decode(req, req.language, session=s.sid)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            s.inbox.put_nowait(Decoded(req, None, exc))
            return
        s.inbox.put_nowait(Decoded(req, segments))

    async def _publish(self, s: Owned, out: Output) -> None:
        if isinstance(out, Interim):
            interim = dataclasses.replace(out.transcript, epoch=s.epoch)
            if not await self.publisher.call(self.store.interim_call(s.sid, s.token, interim)):
                raise LeaseLost()
            return
        assert isinstance(out, Final)
        self.early_finals += out.early
        entry, base = self._checkpoint(s, out.commit_sample)
        if out.transcript is None:
            return
        final = dataclasses.replace(out.transcript, epoch=s.epoch)
        rc = int(
            await self.publisher.call(
                self.store.final_call(
                    s.sid,
                    s.token,
                    final,
                    entry,
                    out.commit_sample,
                    base,
                    out.locked_language or "",
                )
            )
        )
        if rc == -1:
            raise LeaseLost()
        if rc == -2:
            raise RuntimeError(
                f"final numbering out of step at result_id {out.transcript.result_id}"
            )
        self.final_seconds.observe(time.monotonic() - out.due_at)
        if out.locked_language is not None:
            lock = s.transcriber.language_lock
            log.info(
                "session %s: language fixed on %s (%.0f%% of %.1f s of detected speech)",
                s.sid,
                out.locked_language,
                100 * lock.best_share,
                lock.seconds,
            )

    def _checkpoint(self, s: Owned, sample: int) -> tuple[str, int]:
        """The first stored entry still needed to rebuild everything after `sample`."""
        while len(s.entries) > 1 and s.entries[1][1] <= sample:
            s.entries.popleft()
        if not s.entries:
            return s.last_id.decode(), s.transcriber.total_samples
        entry_id, base = s.entries[0]
        return entry_id.decode(), base

    async def _close(self, s: Owned) -> None:
        meta = await self.store.load_meta(s.sid)
        audio_s = meta.audio_seconds if meta else s.transcriber.total_samples / 16000
        summary = Closed(
            reason=s.close_reason or "client_closed",
            audio_seconds=audio_s,
            final_results=s.transcriber.finals,
        )
        if not await self.store.close_session(s.sid, s.token, summary, self.config.session_ttl_s):
            raise LeaseLost()
        s.closed = True
        await self.store.ack_dispatch(s.lane, s.dispatch_id)
        log.info(
            "session %s closed (%s): %.1fs audio, %d finals",
            s.sid,
            summary.reason,
            audio_s,
            summary.final_results,
        )

    # --- keeping ownership and registration alive ----------------------------------------

    async def _keepalive_loop(self) -> None:
        interval = self.config.lease_s / 3
        while not self._closing.is_set():
            await self._pause(interval)
            owned = list(self.owned.values())
            try:
                # One round trip for all: renewing one by one took a round trip per
                # session, hundreds of them in a row with a null engine.
                renewed = await self.store.renew_many(
                    [(s.sid, s.token) for s in owned], self.config.lease_s
                )
                held, lost = split_renewals(owned, renewed, self._still_open)
                for s in lost:
                    log.warning(
                        "session %s: lease lost (it ran out, or another worker holds it)",
                        s.sid,
                    )
                    if s.task is not None:
                        s.task.cancel()
                # Only for leases still held: touching an entry moves it into this
                # worker's pending list, which must never steal it back from a new owner.
                # The touch resets the idle time: a silent pending entry means a dead owner.
                for lane in keys.DISPATCH_LANES:
                    ids: list[Any] = [s.dispatch_id for s in held if s.lane == lane]
                    if ids:
                        await self.redis.xclaim(
                            lane, keys.DISPATCH_GROUP, self.worker_id, 0, ids, justid=True
                        )
            except (RedisError, OSError) as exc:
                await self._redis_trouble("keepalive", exc)

    def _still_open(self, s: Owned) -> bool:
        """Whether `s` is still this worker's open session: not closed meanwhile, and
        not ended and replaced by another claim of the same session."""
        return not s.closed and self.owned.get(s.sid) is s

    async def _heartbeat_loop(self) -> None:
        while not self._closing.is_set():
            await self._pause(self.config.heartbeat_s)
            if self._closing.is_set():
                return
            try:
                await self._heartbeat_once()
            except (RedisError, OSError) as exc:
                await self._redis_trouble("heartbeat", exc)

    async def _heartbeat_once(self) -> None:
        await self.store.heartbeat(self.worker_id, self.stats(), self.config.worker_alive_s)

    def stats(self) -> dict[str, Any]:
        """What the heartbeat hash holds (docs/redis-layout.md) and `/metrics` shows."""
        return {
            "model": self.config.model if self.config.engine == "whisper" else "null",
            "slots": self.slots,
            "slots_auto_rate": round(self.calibration.rate, 1) if self.calibration else "",
            "claiming": self.gate.state,
            "claim_spacing_s": round(self.gate.spacing_s, 2),
            "owned": len(self.owned),
            "queued_decodes": self.scheduler.queued if self.scheduler else 0,
            **(self._decode_stats() if self.scheduler else {}),
            "pid": os.getpid(),
        }

    def histograms(self) -> dict[str, Histogram]:
        """The latency histograms `/metrics` shows besides `stats` (docs/architecture.md,
        *Worker metrics*), by name and labels."""
        out = {
            "final_seconds": self.final_seconds,
            "publish_pipeline_seconds": self.publisher.round_trip,
        }
        if self.scheduler is not None:
            timings = self.scheduler.timings
            for kind, histogram in timings.engine_call.items():
                out[f'engine_call_seconds{{kind="{kind}"}}'] = histogram
            out["final_queue_wait_seconds"] = timings.final_queue_wait
        return out

    def _decode_stats(self) -> dict[str, Any]:
        """Decode counts since start and the engine's recent busy fraction (heartbeat)."""
        assert self.scheduler is not None
        c = self.scheduler.counters
        return {
            "engine_busy": round(self.scheduler.busy_fraction(), 3),
            "final_wait_s": round(self.scheduler.final_wait_s(), 3),
            "engine_busy_finals": round(self.scheduler.final_busy_fraction(), 3),
            "engine_busy_s": round(self.scheduler.busy_s, 3),
            "engine_call_s": round(self.scheduler.mean_call_s() or 0.0, 3),
            "decodes_final": c.final,
            "decodes_interim": c.interim,
            "decodes_file": c.file,
            "interims_dropped_stale": c.interim_stale,
            "interims_dropped_load": c.interim_shed,
            "interims_set_aside": self.interims_set_aside,
            "interims_withdrawn": c.interim_withdrawn,
            "interims_floor": c.interim_floor,
            "packs": c.packs,
            "packed_finals": c.packed_finals,
            "packed_interims": c.packed_interims,
            "pack_retries": c.pack_retries,
            "batches": c.batches,
            "batched": c.batched,
            "early_decodes": self.early_decodes,
            "early_finals": self.early_finals,
            "window_retries": getattr(self.engine, "window_retries", 0),
            "encodes_saved": getattr(self.engine, "encodes_saved", 0),
        }

    async def _redis_trouble(self, where: str, exc: BaseException) -> None:
        if "NOGROUP" in str(exc):
            # Redis came back without its data (no persistence, or a flush): the dispatch
            # groups are gone. Recreate them so new sessions are claimed again.
            log.warning("%s: dispatch consumer group missing; recreating it", where)
            with contextlib.suppress(RedisError, OSError):
                await self.store.ensure_group()
                return
        log.warning("%s: redis unavailable (%s); retrying", where, exc)
        await self._pause(0.5)


def split_renewals(
    owned: Sequence[_S], renewed: Sequence[bool], still_open: Callable[[_S], bool]
) -> tuple[list[_S], list[_S]]:
    """Sort one keepalive round's sessions into (held, lost) by their renewals.

    A failed renewal means the lease is lost (it ran out, or another claim holds it) only
    for a session that is still open once the reply is in: one that closed while the
    renewals were in flight deleted its own lease (its task may be acknowledging the
    dispatch entry, and must not be cancelled), and one already replaced is another
    claim's business. Those are in neither list."""
    held: list[_S] = []
    lost: list[_S] = []
    for s, ok in zip(owned, renewed, strict=True):
        if ok:
            held.append(s)
        elif still_open(s):
            lost.append(s)
    return held, lost


def catchup_budget_s(fed_s: float, elapsed_s: float, pace: float) -> float:
    """How much more audio a session taken with stored audio may read now, seconds (0 or
    less: none): `pace` times the `elapsed_s` since it was taken, plus `CATCHUP_AHEAD_S`
    ahead, less the `fed_s` of its audio fed since."""
    return CATCHUP_AHEAD_S + pace * elapsed_s - fed_s


def read_spacing_s(streams: int, interval_ms: int, streams_per_s: int) -> float:
    """Seconds from the start of one read of `streams` audio streams to the next: at
    least `interval_ms`, longer where that would name more than `streams_per_s` streams a
    second (0: no such limit), and never more than 1 s."""
    spacing = interval_ms / 1000
    if streams_per_s:
        spacing = max(spacing, min(1.0, streams / streams_per_s))
    return spacing


def _str(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _before(entry_id: str) -> bytes:
    """The stream ID just before `entry_id`, so an exclusive read starts at it."""
    ms, _, seq = entry_id.partition("-")
    if int(seq) > 0:
        return f"{ms}-{int(seq) - 1}".encode()
    return f"{int(ms) - 1}-18446744073709551615".encode() if int(ms) > 0 else b"0-0"


async def run_worker(config: Config) -> None:
    worker = Worker(config)
    await worker.start()
    where = f", metrics on {worker.endpoint.url}" if worker.endpoint is not None else ""
    print(
        f"streamscribe worker {worker.worker_id}: ready, {worker.slots_text()}{where}",
        flush=True,
    )
    await worker.serve_forever()
