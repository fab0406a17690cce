"""One model, many sessions: the decode queue in front of the engine thread.

The policy is a sans-I/O object (`DecodeQueue`) with an injected clock; `Scheduler` is the
thin async shell that runs its choices on the engine threads: `concurrency` decodes at once
on the one model (`decode_threads`; on a CPU two single-threaded decodes get about twice
the work of one two-threaded decode done, since CTranslate2's intra-op threads parallelise
tiny.en's small matrices poorly).

- Finals go before interims, and among each kind the oldest request first, so no interim
  is ever started while a final waits.
- An interim that waited longer than `stale_s` is dropped without decoding: the session
  has moved on and will ask again.
- Interims adapt to load. `LoadMeter` measures the fraction of the engine's decode
  capacity (`concurrency` decodes at once) used over the last `load_window_s` (finals
  and interims). Up to `busy_target` every session gets
  an interim every `interval_s`; above it the spacing between two interim decodes of one
  session grows as `interval_s * (1 - busy_target) / (1 - busy)`; from `shed_busy` on no
  interim is decoded at all. So interims use only engine time that finals leave idle, and
  the engine keeps idle headroom, which is what lets a new final start at once instead of
  waiting behind an interim. Finals are never dropped or delayed by this policy.
- The interim floor: an interim the load would shed still runs when its utterance has gone
  `floor_s` seconds of audio with no text of it on the client's screen, as long as the
  engine is under `floor_busy` and its calls are short (`floor_max_call_s` on average over
  the load window: a slow model's interim would hold a thread long enough to delay the
  finals that come meanwhile); so a long utterance under load is not silent until its
  final. Short utterances, whose finals come first, cost nothing more.

A dropped interim is answered with None; the session asks again after more audio.

File jobs (worker/filejobs.py) decode through the same queue as a third kind, `file`,
below everything live: a file decode starts only when no final or due interim waits, no
other file decode runs, and the live decodes have kept the engine under
`file_max_busy` over the load window (`job_max_busy`). One that may not start yet stays
queued, and the shell looks again every `FILE_RECHECK_S` (nothing else would wake it
when the load falls). File decodes are left out of both load meters: they must neither
shed interims nor close the claim gate, which measure what live sessions ask. A file
decode is never packed or batched with another decode.

For the worker's claim gate (worker/claimgate.py) the queue also measures what finals
alone ask of the engine: their share of its capacity over the load window (`final_load`)
and how long they wait for it (`final_wait_s`).

Finals of several sessions are packed into one Whisper window when they wait together
(`PackPolicy`, see worker/packing.py): the encoder runs once for all of them, so a busy
engine serves k finals for little more than the price of one. At light load a final
waits for nobody and is decoded alone, with its session's previous text as prompt. A
final that the packed decode cannot attribute with certainty is decoded again alone,
before any other job. Due interims of several sessions are packed the same way (never
with finals); an interim that cannot be attributed is skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import heapq
import itertools
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, TypeVar

from shared.config import Config
from shared.metrics import Histogram
from worker.engine import SAMPLE_RATE, Audio, Engine, Segment, batch_engine
from worker.packing import MIN_GUARD_S, layout, pack_audio, packed_samples, split
from worker.stream import DecodeRequest

log = logging.getLogger(__name__)

Clock = Callable[[], float]
#: What a live session asks for (`DecodeRequest.kind`).
Kind = Literal["final", "interim"]
#: What the queue decodes: a session's final or interim, or a window of a file job.
JobKind = Literal["final", "interim", "file"]
T = TypeVar("T")
R = TypeVar("R")

LOAD_WINDOW_S = 4.0  # long enough to smooth single decodes (~0.3 s), short enough to react
# How often the shell looks again at a file decode that the live load holds back: the
# load falls as time passes, with no event to say so.
FILE_RECHECK_S = 0.25
# The queue order of each kind (lower first); -1 is a pack's final put back to go alone.
_PRIORITY: dict[JobKind, int] = {"final": 0, "interim": 1, "file": 2}


@dataclass(frozen=True, slots=True)
class InterimPolicy:
    """When an interim may be decoded, given how busy the engine has been."""

    interval_s: float = 1.0  # spacing between one session's interims when the engine is idle
    stale_s: float = 1.0  # an interim that waited longer is dropped
    busy_target: float = 0.5  # busy fraction up to which interims run at full rate
    shed_busy: float = 0.9  # busy fraction from which no interim runs
    # A session whose open utterance has gone this many seconds of audio without any
    # text on the client's screen gets its interim despite the load, while the engine is
    # under floor_busy. 0: off.
    floor_s: float = 0.0
    floor_busy: float = 0.9
    # ... and while the engine's calls take at most this long on average (seconds): a
    # running interim holds its thread, and a final that comes meanwhile waits for it.
    floor_max_call_s: float = 0.4

    @classmethod
    def from_config(cls, config: Config) -> InterimPolicy:
        """The worker's policy: its interim settings (the stale limit is one interval)."""
        return cls(
            interval_s=config.interim_interval_s,
            stale_s=config.interim_interval_s,
            busy_target=config.interim_busy_target,
            shed_busy=config.interim_shed_busy,
            floor_s=config.interim_floor_s,
            floor_busy=config.interim_floor_busy,
            floor_max_call_s=config.interim_floor_max_call_s,
        )

    def __post_init__(self) -> None:
        if not (self.interval_s > 0 and self.stale_s > 0):
            raise ValueError("interval_s and stale_s must be positive")
        if not (self.floor_s >= 0 and math.isfinite(self.floor_s)):
            raise ValueError(f"floor_s must be >= 0, got {self.floor_s}")
        if not 0 < self.floor_busy <= 1:
            raise ValueError(f"need 0 < floor_busy <= 1, got {self.floor_busy}")
        if not self.floor_max_call_s > 0:
            raise ValueError(f"floor_max_call_s must be positive, got {self.floor_max_call_s}")
        if not 0 < self.busy_target <= self.shed_busy <= 1:
            raise ValueError(
                f"need 0 < busy_target <= shed_busy <= 1, got "
                f"{self.busy_target} and {self.shed_busy}"
            )

    @property
    def adaptive(self) -> bool:
        return self.busy_target < 1

    def spacing_s(self, busy: float) -> float | None:
        """Least time between two interim decodes of one session; None: no interims now."""
        if busy <= self.busy_target:
            return self.interval_s
        if busy >= self.shed_busy:
            return None
        return self.interval_s * (1 - self.busy_target) / (1 - busy)

    def floor_due(self, unseen_s: float, busy: float, call_s: float | None) -> bool:
        """Whether an interim the load would shed runs anyway: its utterance has gone
        `unseen_s` seconds of audio without text on screen, the engine has room, and its
        calls (`call_s` on average, None: none lately) are short."""
        return (
            0 < self.floor_s <= unseen_s
            and busy < self.floor_busy
            and (call_s is None or call_s <= self.floor_max_call_s)
        )


class LoadMeter:
    """The fraction of the engine's decode capacity (`capacity` decodes at once) used over
    the last `window_s` seconds."""

    def __init__(self, window_s: float = LOAD_WINDOW_S, capacity: int = 1) -> None:
        if window_s <= 0:
            raise ValueError("window_s must be positive")
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.window_s = window_s
        self.capacity = capacity
        self._spans: deque[tuple[float, float]] = deque()  # finished decodes (start, end)
        self._running: list[float] = []  # start times of the decodes running now
        # Kept as spans come and go, so that a reading costs the spans at the window's
        # edge, not all of them (a null engine makes thousands of spans per window):
        self._spans_total = 0.0  # sum of the spans' durations
        self._longest = 0.0  # no span in `_spans` is longer than this

    def started(self, now: float) -> float:
        """A decode starts; returns its start time, to hand back to `finished`."""
        if len(self._running) >= self.capacity:
            raise RuntimeError(
                f"{self.capacity} decode(s) already running: the engine runs at most that many"
            )
        self._running.append(now)
        return now

    def finished(self, now: float, started_at: float | None = None) -> None:
        if not self._running:
            raise RuntimeError("finished() without started()")
        if started_at is None:
            started_at = self._running[0]
        self._running.remove(started_at)
        self._spans.append((started_at, now))
        self._spans_total += now - started_at
        self._longest = max(self._longest, now - started_at)

    def _trim(self, lo: float) -> None:
        """Forget the decodes that ended at or before `lo`."""
        # Spans are appended as decodes finish, so they are in order of their ends (their
        # starts may not be, with several decodes at once): the oldest ends go first.
        spans = self._spans
        while spans and spans[0][1] <= lo:
            start, end = spans.popleft()
            self._spans_total -= end - start
        if not spans:
            self._spans_total = self._longest = 0.0

    def mean_call_s(self, now: float) -> float | None:
        """How long the engine calls that ended in the window took, on average (a batched
        call counts once); None when none ended there."""
        self._trim(now - self.window_s)
        return self._spans_total / len(self._spans) if self._spans else None

    def busy_fraction(self, now: float) -> float:
        lo = now - self.window_s
        self._trim(lo)
        spans = self._spans
        # Only a span that ends before lo + its length can start before lo; spans are in
        # order of their ends, so the scan stops at the first that ends later than any could.
        busy = self._spans_total
        for start, end in spans:
            if end >= lo + self._longest:
                break
            if start < lo:
                busy -= lo - start
        if spans and spans[-1][1] > now:  # asked about a time before the latest span ended
            busy -= sum(max(0.0, end - max(start, now)) for start, end in spans)
        busy += sum(now - max(start, lo) for start in self._running)
        return min(1.0, max(0.0, busy / (self.window_s * self.capacity)))


@dataclass(frozen=True, slots=True)
class PackPolicy:
    """Which waiting finals may share one engine call."""

    max_items: int = 8  # most utterances in one window; 1: never pack
    window_s: float = 28.0  # most audio in one window, guards included (Whisper: 30 s)
    guard_s: float = 1.0  # silence between two utterances

    def __post_init__(self) -> None:
        if self.max_items < 1:
            raise ValueError("max_items must be at least 1")
        if not 0 < self.window_s <= 30:
            raise ValueError("window_s must be in (0, 30]")
        if self.guard_s < MIN_GUARD_S:
            raise ValueError(f"guard_s must be at least {MIN_GUARD_S}")

    @property
    def enabled(self) -> bool:
        return self.max_items > 1

    def fits(self, lengths: list[int]) -> bool:
        guard = int(self.guard_s * SAMPLE_RATE)
        return (
            len(lengths) <= self.max_items
            and packed_samples(lengths, guard) <= self.window_s * SAMPLE_RATE
        )


@dataclass(order=True)
class Job(Generic[T]):
    priority: int  # -1: a pack's final to decode alone, 0: final, 1: interim, 2: file
    order: int  # arrival order among all jobs
    kind: JobKind = field(compare=False)
    session: str = field(compare=False)
    queued_at: float = field(compare=False)
    payload: T = field(compare=False)
    alone: bool = field(default=False, compare=False)  # never packed (a pack's retry)
    started_at: float = field(default=0.0, compare=False)  # when its decode began
    unseen_s: float = field(default=0.0, compare=False)  # an interim's audio not yet shown


@dataclass
class QueueCounters:
    final: int = 0
    interim: int = 0
    interim_stale: int = 0  # dropped: waited longer than stale_s
    interim_shed: int = 0  # dropped: the session had one too recently for the current load
    interim_floor: int = 0  # decoded despite the load: its utterance had no text for floor_s
    interim_withdrawn: int = 0  # taken off the queue unstarted: its session's final was due
    packs: int = 0  # engine calls that decoded several sessions' finals at once
    packed_finals: int = 0  # finals decoded in those calls
    packed_interims: int = 0  # interims decoded in calls with other sessions' interims
    pack_retries: int = 0  # finals of a pack that had to be decoded again alone
    batches: int = 0  # batched engine calls: several sessions' windows stacked
    batched: int = 0  # finals and interims decoded in those calls
    file: int = 0  # file jobs' windows decoded (worker/filejobs.py)


@dataclass
class QueueTimings:
    """Latency histograms of the decodes, seconds of the queue's clock (the worker's
    `/metrics`: docs/architecture.md, *Worker metrics*)."""

    # Each engine call, start to end, by its kind: a packed or batched call counts once.
    engine_call: dict[JobKind, Histogram] = field(
        default_factory=lambda: {"final": Histogram(), "interim": Histogram(), "file": Histogram()}
    )
    # Each final, from its push to the start of its first decode (a pack's final decoded
    # again alone is not counted twice).
    final_queue_wait: Histogram = field(default_factory=Histogram)


class DecodeQueue(Generic[T]):
    """The scheduling policy without I/O: jobs in, the next job to decode out."""

    def __init__(
        self,
        policy: InterimPolicy,
        clock: Clock,
        *,
        load_window_s: float = LOAD_WINDOW_S,
        concurrency: int = 1,
        file_max_busy: float = 0.5,
    ) -> None:
        if not 0 < file_max_busy <= 1:
            raise ValueError(f"need 0 < file_max_busy <= 1, got {file_max_busy}")
        self.policy = policy
        self.clock = clock
        # A file decode starts only while the live load is under this (`job_max_busy`).
        self.file_max_busy = file_max_busy
        self.files_running = 0  # file decodes in the engine now (at most one)
        self.load = LoadMeter(load_window_s, concurrency)
        # The same for finals alone: the work the engine must do (interims fill what is
        # left), and so the measure of how close the worker is to its capacity.
        self.final_load = LoadMeter(load_window_s, concurrency)
        self.counters = QueueCounters()
        self.timings = QueueTimings()
        self._heap: list[Job[T]] = []
        self._order = itertools.count()
        # Per session: when its last decoded interim was requested. A session's first
        # interim request sets it to one interval before that request, so the first
        # interim is due at once unless the engine is busy.
        self._last_interim: dict[str, float] = {}
        # Finals whose decode started within the last load window: (start, wait in queue).
        self._final_waits: deque[tuple[float, float]] = deque()

    def __len__(self) -> int:
        return len(self._heap)

    @property
    def finals_waiting(self) -> int:
        return sum(1 for job in self._heap if job.kind == "final")

    @property
    def files_waiting(self) -> int:
        return sum(1 for job in self._heap if job.kind == "file")

    def push(self, kind: JobKind, session: str, payload: T, *, unseen_s: float = 0.0) -> Job[T]:
        """Queue a decode. `unseen_s`, for an interim: seconds of its utterance's audio
        since the client last saw text of it (see `InterimPolicy.floor_s`)."""
        now = self.clock()
        if kind == "interim":
            self._last_interim.setdefault(session, now - self.policy.interval_s)
        priority = _PRIORITY[kind]
        job = Job(priority, next(self._order), kind, session, now, payload, unseen_s=unseen_s)
        heapq.heappush(self._heap, job)
        return job

    def pop(self) -> tuple[Job[T] | None, list[Job[T]]]:
        """The next job to decode (None: nothing to do), and the interims dropped on the way.

        Call it only when the engine is free; the caller then reports `started`/`finished`.
        """
        now = self.clock()
        dropped: list[Job[T]] = []
        while self._heap:
            job = heapq.heappop(self._heap)
            if job.kind == "final":
                return job, dropped
            if job.kind == "file":
                # Files come last: no final and no due interim is left (those not due
                # were dropped on the way).
                if self.file_may_start(now):
                    return job, dropped
                heapq.heappush(self._heap, job)  # not yet: it keeps its place
                return None, dropped
            if self._interim_due(job, now, dropped):
                self._last_interim[job.session] = job.queued_at
                return job, dropped
        return None, dropped

    def file_may_start(self, now: float) -> bool:
        """Whether a file decode may start now (no final or due interim waiting aside):
        no other file decode runs, and live decodes keep the engine under
        `file_max_busy`."""
        return self.files_running == 0 and self.load.busy_fraction(now) < self.file_max_busy

    def withdraw(self, job: Job[T]) -> bool:
        """Take `job` off the queue if it has not started; whether it was there."""
        kept = [j for j in self._heap if j is not job]
        if len(kept) == len(self._heap):
            return False
        self._heap = kept
        heapq.heapify(self._heap)
        return True

    def _interim_due(self, job: Job[T], now: float, dropped: list[Job[T]]) -> bool:
        """Whether a popped interim may run now; if not it is counted and put in `dropped`."""
        if now - job.queued_at > self.policy.stale_s:
            self.counters.interim_stale += 1
            dropped.append(job)
            return False
        busy = self.load.busy_fraction(now)
        spacing = self.policy.spacing_s(busy)
        last = self._last_interim.get(job.session, job.queued_at - self.policy.interval_s)
        # At or under the target the session's own pace (one request per interval of
        # new audio) is the spacing; only above it are requests thinned out. Spacing
        # is measured between request times, which do not jitter with queueing.
        if spacing is None or (spacing > self.policy.interval_s and job.queued_at - last < spacing):
            if self.policy.floor_due(job.unseen_s, busy, self.load.mean_call_s(now)):
                self.counters.interim_floor += 1
                return True
            self.counters.interim_shed += 1
            dropped.append(job)
            return False
        return True

    def take_interims(
        self, fits: Callable[[list[Job[T]]], bool], limit: int
    ) -> tuple[list[Job[T]], list[Job[T]]]:
        """More due interims to decode with one just popped (no final waits then), and
        the interims dropped on the way. One that is due but does not fit stays queued."""
        now = self.clock()
        taken: list[Job[T]] = []
        dropped: list[Job[T]] = []
        while self._heap and self._heap[0].kind == "interim" and len(taken) < limit:
            job = heapq.heappop(self._heap)
            if not self._interim_due(job, now, dropped):
                continue
            if not fits([*taken, job]):
                heapq.heappush(self._heap, job)
                break
            self._last_interim[job.session] = job.queued_at
            taken.append(job)
        return taken, dropped

    def withdraw_interims(self, session: str) -> list[Job[T]]:
        """The session's interims still queued, taken off the queue: its final is due, and
        the session decodes one request at a time, so a queued interim would hold the
        final back until a thread had popped (and likely dropped) it."""
        gone = [j for j in self._heap if j.session == session and j.kind == "interim"]
        if gone:
            self._heap = [
                j for j in self._heap if not (j.session == session and j.kind == "interim")
            ]
            heapq.heapify(self._heap)
            self.counters.interim_withdrawn += len(gone)
        return gone

    def take_finals(self, fits: Callable[[list[Job[T]]], bool], limit: int) -> list[Job[T]]:
        """More waiting finals to decode with one just popped, oldest first.

        `fits(jobs)` says whether the popped final plus `jobs` fit one call; a final that
        does not fit stays queued (in its place) for the next call.
        """
        taken: list[Job[T]] = []
        skipped: list[Job[T]] = []
        while self._heap and self._heap[0].kind == "final" and len(taken) < limit:
            job = heapq.heappop(self._heap)
            if not job.alone and fits([*taken, job]):
                taken.append(job)
            else:
                skipped.append(job)
        for job in skipped:
            heapq.heappush(self._heap, job)
        return taken

    def requeue_first(self, jobs: list[Job[T]]) -> None:
        """Put finals back ahead of everything else (a pack's slots to decode alone)."""
        for job in jobs:
            job.priority = -1
            job.alone = True
            heapq.heappush(self._heap, job)

    def started(self, job: Job[T], others: Sequence[Job[T]] = ()) -> None:
        """`job` (with `others` in the same engine call) starts decoding."""
        if job.kind == "file":  # not live work: in neither load meter
            job.started_at = self.clock()
            self.files_running += 1
            return
        job.started_at = self.load.started(self.clock())
        if job.kind == "final":
            self.final_load.started(job.started_at)
        for j in (job, *others):
            if j.kind == "final":
                wait = job.started_at - j.queued_at
                self._final_waits.append((job.started_at, wait))
                if not j.alone:  # `alone`: a pack's retry, whose first start was counted
                    self.timings.final_queue_wait.observe(wait)

    def final_wait_s(self) -> float:
        """How long finals wait for the engine now: the longest time in the queue of the
        finals whose decode started within the last load window, or of a final still
        waiting, whichever is longer. Seconds; 0 when no final waited."""
        now = self.clock()
        waits = self._final_waits
        while waits and waits[0][0] <= now - self.load.window_s:
            waits.popleft()
        queued = (now - job.queued_at for job in self._heap if job.kind == "final")
        return max([0.0, *(w for _, w in waits), *queued])

    def finished(self, job: Job[T], count: int = 1) -> None:
        """`job`'s engine call (with `count` jobs in all) ended, in success or failure."""
        now = self.clock()
        self.timings.engine_call[job.kind].observe(now - job.started_at)
        if job.kind == "file":
            self.files_running -= 1
            self.counters.file += count
            return
        self.load.finished(now, job.started_at)
        if job.kind == "final":
            self.final_load.finished(now, job.started_at)
            self.counters.final += count
        else:
            self.counters.interim += count

    def forget(self, session: str) -> None:
        """The session ended: drop what the policy remembers about it."""
        self._last_interim.pop(session, None)

    def drain(self) -> list[Job[T]]:
        jobs, self._heap = self._heap, []
        return jobs


_Future = asyncio.Future[list[Segment] | None]


@dataclass(frozen=True, slots=True)
class _Work:
    audio: Audio
    prompt: str
    language: str | None
    future: _Future


class Scheduler:
    """Runs the queue's choices on `concurrency` engine threads (decodes at once on the one
    model); decoding never blocks the loop."""

    def __init__(
        self,
        engine: Engine,
        *,
        beam_size: int,
        policy: InterimPolicy,
        pack: PackPolicy | None = None,
        batch: int = 1,
        clock: Clock = time.monotonic,
        load_window_s: float = LOAD_WINDOW_S,
        concurrency: int = 1,
        file_max_busy: float = 0.5,
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self.engine = engine
        self.beam_size = beam_size
        self.concurrency = concurrency
        self.pack = pack or PackPolicy(max_items=1)
        if batch < 1:
            raise ValueError("batch must be at least 1")
        # Packing (several utterances in one window) is off unless asked for, and then
        # takes precedence over batching (separate windows stacked in one call), which is
        # on by default (batch_decodes 2).
        self._packs = self.pack.enabled and bool(getattr(engine, "can_pack", False))
        self._batcher = None if self._packs else batch_engine(engine)
        self.batch = batch if self._batcher is not None else 1
        self.queue: DecodeQueue[_Work] = DecodeQueue(
            policy,
            clock,
            load_window_s=load_window_s,
            concurrency=concurrency,
            file_max_busy=file_max_busy,
        )
        self._clock = clock
        self._wake = asyncio.Event()
        self._free = asyncio.Semaphore(concurrency)
        self._inflight: set[asyncio.Task[None]] = set()
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="engine")
        self._task: asyncio.Task[None] | None = None
        self.busy_s = 0.0  # decode-seconds, summed over the engine threads

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="scheduler")

    @property
    def queued(self) -> int:
        return len(self.queue)

    @property
    def counters(self) -> QueueCounters:
        return self.queue.counters

    @property
    def timings(self) -> QueueTimings:
        return self.queue.timings

    def busy_fraction(self) -> float:
        return self.queue.load.busy_fraction(self._clock())

    def mean_call_s(self) -> float | None:
        """See `LoadMeter.mean_call_s`."""
        return self.queue.load.mean_call_s(self._clock())

    def final_busy_fraction(self) -> float:
        """The share of the engine's capacity that finals used over the load window."""
        return self.queue.final_load.busy_fraction(self._clock())

    def final_wait_s(self) -> float:
        """See `DecodeQueue.final_wait_s`."""
        return self.queue.final_wait_s()

    async def decode(
        self, request: DecodeRequest, language: str | None, session: str = ""
    ) -> list[Segment] | None:
        """Segments of the request's audio; None when an interim was dropped."""
        future: _Future = asyncio.get_running_loop().create_future()
        work = _Work(request.audio, request.prompt, language, future)
        self.queue.push(request.kind, session, work, unseen_s=request.unseen_s)
        self._wake.set()
        return await future

    async def decode_file(
        self,
        audio: Audio,
        *,
        language: str | None,
        prompt: str,
        timeout_s: float,
        give_up: asyncio.Event | None = None,
    ) -> list[Segment] | None:
        """Segments of one window of a file job, decoded at the lowest priority (see the
        module docstring), alone, with word times and the worker's beam. None when it
        could not start within `timeout_s`, or before `give_up` was set: it is then taken
        off the queue. Once started it runs to its end, however long that takes.
        Cancelled while queued, it is withdrawn."""
        future: _Future = asyncio.get_running_loop().create_future()
        job = self.queue.push("file", "", _Work(audio, prompt, language, future))
        self._wake.set()
        stop = asyncio.ensure_future(give_up.wait()) if give_up is not None else None
        try:
            waits: set[asyncio.Future[Any]] = {future} if stop is None else {future, stop}
            first = asyncio.FIRST_COMPLETED
            await asyncio.wait(waits, timeout=max(0.0, timeout_s), return_when=first)
            if not future.done() and self.queue.withdraw(job):
                future.cancel()
                return None
            return await future  # done, or started meanwhile: its end is not far
        finally:
            if stop is not None:
                stop.cancel()
            if self.queue.withdraw(job):  # cancelled while queued
                future.cancel()

    def withdraw_interim(self, session: str) -> bool:
        """Answer the session's queued interim None at once, if it has not started; whether
        there was one (see `DecodeQueue.withdraw_interims`)."""
        gone = self.queue.withdraw_interims(session)
        for job in gone:
            if not job.payload.future.done():
                job.payload.future.set_result(None)
        return bool(gone)

    def forget(self, session: str) -> None:
        self.queue.forget(session)

    async def _run(self) -> None:
        while True:
            await self._free.acquire()  # an engine thread is free
            try:
                job = await self._next_job()
            except BaseException:
                self._free.release()
                raise
            if job.kind == "file":  # never shares a call
                decode = self._decode_file(job)
            elif self.batch > 1:
                more = self._batch_with(job)
                decode = self._decode_batch([job, *more]) if more else self._decode_one(job)
            else:
                more = self._pack_with(job)
                decode = self._decode_pack([job, *more]) if more else self._decode_one(job)
            task = asyncio.create_task(decode, name="decode")
            self._inflight.add(task)
            task.add_done_callback(self._decoded)

    async def _next_job(self) -> Job[_Work]:
        """The next job to decode, waiting for one if the queue has none."""
        while True:
            job, dropped = self.queue.pop()
            for gone in dropped:
                if not gone.payload.future.done():
                    gone.payload.future.set_result(None)
            if job is None:
                self._wake.clear()
                if self.queue.files_waiting:  # held back by the load: look again soon
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), FILE_RECHECK_S)
                else:
                    await self._wake.wait()
                continue
            if job.payload.future.done():  # the session went away
                continue
            return job

    def _decoded(self, task: asyncio.Task[None]) -> None:
        self._inflight.discard(task)
        self._free.release()
        if not task.cancelled() and task.exception() is not None:
            log.error("decode task failed", exc_info=task.exception())

    def _pack_with(self, job: Job[_Work]) -> list[Job[_Work]]:
        """Jobs of other sessions to decode in one window with `job`: finals with a
        final, interims with an interim (never mixed: a final does not wait for the
        decoder to write interims)."""
        if not (self._packs and not job.alone):
            return []
        language = job.payload.language

        def fits(more: list[Job[_Work]]) -> bool:
            return all(j.payload.language == language for j in more) and self.pack.fits(
                [len(j.payload.audio) for j in (job, *more)]
            )

        return self._take_more(job, fits, self.pack.max_items - 1)

    def _batch_with(self, job: Job[_Work]) -> list[Job[_Work]]:
        """Jobs of other sessions to decode in one batched call with `job`: of its kind
        (a final does not wait for interims), its language and its prompt (one call has
        one of each), oldest first, up to `batch` in all."""
        first = job.payload

        def fits(more: list[Job[_Work]]) -> bool:
            return all(
                j.payload.language == first.language and j.payload.prompt == first.prompt
                for j in more
            )

        return self._take_more(job, fits, self.batch - 1)

    def _take_more(
        self, job: Job[_Work], fits: Callable[[list[Job[_Work]]], bool], limit: int
    ) -> list[Job[_Work]]:
        """Up to `limit` waiting jobs of `job`'s kind that `fits` accepts, to decode in one
        call with it (interims dropped on the way are answered None)."""
        if job.kind == "final":
            more = self.queue.take_finals(fits, limit)
        else:
            more, dropped = self.queue.take_interims(fits, limit)
            for gone in dropped:
                if not gone.payload.future.done():
                    gone.payload.future.set_result(None)
        return [j for j in more if not j.payload.future.done()]

    async def _decode_batch(self, jobs: list[Job[_Work]]) -> None:
        """One batched engine call for several sessions' finals (or interims): each gets
        the segments of its own window."""
        final = jobs[0].kind == "final"
        assert self._batcher is not None  # batches are made only with a batching engine
        call = functools.partial(
            self._batcher.transcribe_batch,
            [j.payload.audio for j in jobs],
            language=jobs[0].payload.language,
            word_timestamps=final,
            beam_size=self.beam_size if final else 1,  # as `_decode_one`
            prompt=jobs[0].payload.prompt,
        )
        results = await self._run_engine(jobs[0], call, len(jobs), others=jobs[1:])
        if results is None:
            return
        for job, segments in zip(jobs, results, strict=True):
            if not job.payload.future.done():
                job.payload.future.set_result(segments)
        self.queue.counters.batches += 1
        self.queue.counters.batched += len(jobs)

    async def _decode_one(self, job: Job[_Work]) -> None:
        work = job.payload
        final = job.kind == "final"
        call = functools.partial(
            self.engine.transcribe,
            work.audio,
            language=work.language,
            word_timestamps=final,
            beam_size=self.beam_size if final else 1,
            prompt=work.prompt,
        )
        segments = await self._run_engine(job, call, 1)
        if segments is not None and not work.future.done():
            work.future.set_result(segments)

    async def _decode_file(self, job: Job[_Work]) -> None:
        """A file job's window: alone, with word times and the full beam (as a final)."""
        work = job.payload
        call = functools.partial(
            self.engine.transcribe,
            work.audio,
            language=work.language,
            word_timestamps=True,
            beam_size=self.beam_size,
            prompt=work.prompt,
        )
        segments = await self._run_engine(job, call, 1)
        if segments is not None and not work.future.done():
            work.future.set_result(segments)

    async def _decode_pack(self, jobs: list[Job[_Work]]) -> None:
        """One engine call for several sessions' finals (or interims). A final that cannot
        be attributed goes again alone; such an interim is skipped (answered None)."""
        audios = [j.payload.audio for j in jobs]
        lay = layout([len(a) for a in audios], int(self.pack.guard_s * SAMPLE_RATE))
        call = functools.partial(
            self.engine.transcribe_words,
            pack_audio(audios, lay),
            language=jobs[0].payload.language,
            beam_size=self.beam_size if jobs[0].kind == "final" else 1,  # as `_decode_one`
        )
        words = await self._run_engine(jobs[0], call, len(jobs), others=jobs[1:])
        if words is None:
            return
        retry = []
        final = jobs[0].kind == "final"
        for job, segments in zip(jobs, split(lay, words), strict=True):
            if segments is None and final:
                retry.append(job)
            elif not job.payload.future.done():
                job.payload.future.set_result(segments)  # an unplaced interim: None, skipped
        c = self.queue.counters
        c.packs += 1
        if final:
            c.packed_finals += len(jobs) - len(retry)
            c.pack_retries += len(retry)
            c.final -= len(retry)  # counted again when decoded alone
            self.queue.requeue_first(retry)
        else:
            c.packed_interims += len(jobs)
        log.debug(
            "packed %d %ss (%.1f s window), %d to decode alone",
            len(jobs),
            jobs[0].kind,
            lay.seconds,
            len(retry),
        )

    async def _run_engine(
        self,
        job: Job[_Work],
        call: Callable[[], R],
        count: int,
        others: list[Job[_Work]] | None = None,
    ) -> R | None:
        """Run one engine call on the engine thread; on failure every waiting job gets it."""
        started = time.monotonic()
        self.queue.started(job, others or ())
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, call)
        except Exception as exc:  # engine failure: the sessions decide what to do
            log.exception("decode failed")
            for j in (job, *(others or ())):
                if not j.payload.future.done():
                    j.payload.future.set_exception(exc)
            return None
        finally:
            self.queue.finished(job, count)
            self.busy_s += time.monotonic() - started

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        for task in list(self._inflight):
            task.cancel()
        if self._inflight:
            await asyncio.gather(*self._inflight, return_exceptions=True)
        for job in self.queue.drain():
            if not job.payload.future.done():
                job.payload.future.cancel()
        self._pool.shutdown(wait=True, cancel_futures=True)
