"""Load-test statistics, sans I/O: events with timestamps in, metrics, table and JSON out.

Nothing here reads the clock or touches a socket or a file. The runner
(`shared/loadtest.py`) passes every timestamp in, as seconds since the start of the run
(any monotonic origin works, as long as one run uses one origin).

Metrics (see docs/loadtest.md for the exact definitions):

- connect: connection opened -> `session.started` received (TCP + TLS + WebSocket + session).
- first interim: the session's first audio frame sent -> its first interim transcript received.
- final lag: the frame that holds a final's `end` time sent -> that final received.
- wait for text: per final, the longest stretch with nothing of its utterance on screen:
  from the frame that holds its `start` sent, through each interim of it received, to the
  final received.
- ack latency: a frame sent -> the first `ack` whose seq covers it (acks are cumulative).
- completion: `close_stream` sent -> `session.closed` received.
- send delay: how late the generator sent each frame against its real-time schedule
  (paced runs only); large values mean the load generator itself is overloaded.

Each session belongs to a priority lane (`normal` or `high`, the `priority` it asked
for); the report also gives each lane's sessions, outcomes, queueing and final lag.

Percentiles use the nearest-rank method: the p-th percentile of n sorted samples is the
sample at 1-based rank ceil(p / 100 * n). It is always an observed value, and p100 is the
maximum.
"""

from __future__ import annotations

import itertools
import json
import math
from array import array
from bisect import bisect_left, bisect_right
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

REPORT_VERSION = 1
#: Server times are rounded to milliseconds; a final `end` this close past a frame
#: boundary still belongs to the frame that ends there.
END_TOLERANCE_S = 0.0005
METRICS: tuple[tuple[str, str], ...] = (
    ("connect_s", "connect"),
    ("first_interim_s", "time to first interim"),
    ("first_text_s", "time to first text"),
    ("final_lag_s", "final lag"),
    ("final_lag_unqueued_s", "final lag, never queued"),
    ("text_wait_s", "wait for text"),
    ("ack_latency_s", "ack latency"),
    ("completion_s", "session completion"),
    ("send_delay_s", "send delay (generator)"),
)
WerFn = Callable[[Sequence[str], Sequence[str]], float]


def percentile(sorted_values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile of already sorted, non-empty values; 0 < p <= 100."""
    if not sorted_values:
        raise ValueError("percentile of no values")
    if not 0 < p <= 100:
        raise ValueError(f"percentile must be in (0, 100], got {p}")
    rank = math.ceil(p / 100 * len(sorted_values))
    return sorted_values[max(rank, 1) - 1]


@dataclass(frozen=True, slots=True)
class Distribution:
    """count, nearest-rank p50/p95/p99 and max of a metric, in seconds (None when empty)."""

    count: int = 0
    p50: float | None = None
    p95: float | None = None
    p99: float | None = None
    max: float | None = None

    @classmethod
    def of(cls, values: Iterable[float]) -> Distribution:
        ordered = sorted(values)
        if not ordered:
            return cls()
        return cls(
            count=len(ordered),
            p50=percentile(ordered, 50),
            p95=percentile(ordered, 95),
            p99=percentile(ordered, 99),
            max=ordered[-1],
        )


class Series:
    """(time, value) samples of one metric, compact: two arrays of doubles."""

    __slots__ = ("times", "values")

    def __init__(self) -> None:
        self.times = array("d")
        self.values = array("d")

    def add(self, t: float, value: float) -> None:
        self.times.append(t)
        self.values.append(value)

    def __len__(self) -> int:
        return len(self.values)


# --- per-session recording -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SessionSummary:
    index: int
    audio: str
    status: str  # completed | failed | unfinished
    session_id: str | None
    close_code: int | None
    close_reason: str
    stage: str  # where the session was when it ended
    frames_sent: int
    frames_acked: int
    audio_s_sent: float
    audio_s_reported: float | None
    finals_received: int
    finals_reported: int | None
    interims_received: int
    errors: tuple[str, ...]
    anomalies: tuple[str, ...]
    wer: float | None
    text: str
    priority: str = "normal"  # the lane it asked for (reports before lanes: normal)


class SessionRecorder:
    """Every event of one session. Times are seconds since the run's origin."""

    def __init__(
        self,
        run: LoadRecorder,
        index: int,
        audio: str,
        reference: str | None,
        priority: str = "normal",
    ) -> None:
        self._run = run
        self.index = index
        self.audio = audio
        self.reference = reference
        self.priority = priority
        self.stage = "pending"  # pending, connecting, streaming, closing, ended
        self.status: str | None = None
        self.session_id: str | None = None
        self.close_code: int | None = None
        self.close_reason = ""
        self._opened_t: float | None = None
        self._send_t = array("d")  # per frame: when it was sent
        self._audio_end = array("d")  # per frame: session audio seconds at its last sample
        self._acked = 0  # frames [0, _acked) are acknowledged
        self._first_interim_seen = False
        self._first_text_seen = False
        self._close_stream_t: float | None = None
        self._finals: list[str] = []
        self.interims = 0
        self._interim_t: list[float] = []  # when the open utterance's interims came
        self.closed: tuple[str, float, int] | None = None  # reason, audio_seconds, finals
        self.errors: list[str] = []

    # events, in the order a session sees them
    def connecting(self, t: float) -> None:
        self.stage, self._opened_t = "connecting", t

    def started(self, t: float, session_id: str) -> None:
        self.stage, self.session_id = "streaming", session_id
        if self._opened_t is not None:
            self._run.connect.add(t, t - self._opened_t)
        self._run.live += 1

    def frame_sent(self, t: float, audio_end_s: float, due_t: float | None = None) -> int:
        """Record one audio frame; returns its seq. `due_t` is its paced schedule, if any."""
        self._send_t.append(t)
        self._audio_end.append(audio_end_s)
        self._run.frames_sent += 1
        if due_t is not None:
            self._run.send_delay.add(t, max(0.0, t - due_t))
        return len(self._send_t) - 1

    @property
    def frames_sent(self) -> int:
        return len(self._send_t)

    @property
    def frames_acked(self) -> int:
        return self._acked

    @property
    def unacked(self) -> int:
        return len(self._send_t) - self._acked

    def ack(self, t: float, seq: int) -> None:
        """A cumulative ack: every frame up to `seq` not acked before gets one latency sample."""
        self._run.acks += 1
        upto = min(seq + 1, len(self._send_t))
        if seq + 1 > len(self._send_t):
            self.anomaly("ack_beyond_sent")
        for i in range(self._acked, upto):
            self._run.ack_latency.add(t, t - self._send_t[i])
        self._acked = max(self._acked, upto)

    def transcript(
        self, t: float, result_id: int, is_final: bool, start: float, end: float, text: str
    ) -> None:
        if not self._first_text_seen and self._send_t:
            self._first_text_seen = True
            self._run.first_text.add(t, t - self._send_t[0])
            self._run.lane_series("first_text", self.priority).add(t, t - self._send_t[0])
        if not is_final:
            self.interims += 1
            if not self._first_interim_seen and self._send_t:
                self._first_interim_seen = True
                self._run.first_interim.add(t, t - self._send_t[0])
                self._run.lane_series("first_interim", self.priority).add(t, t - self._send_t[0])
            if result_id == len(self._finals):
                self._interim_t.append(t)
            return
        self._run.finals += 1
        if result_id != len(self._finals):
            self.anomaly("result_id_out_of_order")
        self._finals.append(text)
        interims, self._interim_t = self._interim_t, []
        if not self._send_t:
            return
        lag = t - self._send_t[self._frame_at(end)]
        self._run.final_lag.add(t, lag)
        self._run.lane_series("final_lag", self.priority).add(t, lag)
        if self.index not in self._run.queued_sessions:
            self._run.final_lag_unqueued.add(t, lag)
        first = self._frame_at(start, starts=True)
        self._run.text_wait.add(t, text_wait(self._send_t[first], interims, t))

    def _frame_at(self, audio_s: float, *, starts: bool = False) -> int:
        """The frame that holds the audio ending at `audio_s` or, with `starts`, the audio
        starting there (the last frame, past the end)."""
        if starts:
            frame = bisect_right(self._audio_end, audio_s + END_TOLERANCE_S)
        else:
            frame = bisect_left(self._audio_end, audio_s - END_TOLERANCE_S)
        return min(frame, len(self._send_t) - 1)

    def queued(self, t: float, position: int) -> None:
        self._run.queued_sessions.add(self.index)
        self._run.max_queue_position = max(self._run.max_queue_position, position)
        lane = self._run.lane_max_position
        lane[self.priority] = max(lane.get(self.priority, 0), position)

    def close_stream_sent(self, t: float) -> None:
        self.stage, self._close_stream_t = "closing", t

    def session_closed(self, t: float, reason: str, audio_seconds: float, finals: int) -> None:
        self.closed = (reason, audio_seconds, finals)
        if self._close_stream_t is not None:
            self._run.completion.add(t, t - self._close_stream_t)

    def error_message(self, t: float, code: str) -> None:
        self.errors.append(code)
        self._run.error_count += 1

    def connection_closed(self, t: float, code: int, reason: str) -> None:
        """The WebSocket ended (close frame or abnormal end): the session's last event."""
        self.close_code, self.close_reason = code, reason
        if self.closed is not None and self.closed[2] != len(self._finals):
            self.anomaly("finals_count_mismatch")
        if self.closed is not None and self._acked < len(self._send_t):
            self.anomaly("frames_unacked")
        ok = code == 1000 and self.closed is not None and not self.errors
        self._end("completed" if ok and not self.anomalies else "failed")

    def connect_failed(self, t: float, description: str) -> None:
        """The session never got a WebSocket (refused, TLS, HTTP status, timeout) or the
        client itself failed; `description` groups the failures in the report."""
        self.close_reason = description
        self._run.connect_errors[description] += 1
        self._end("failed")

    def unfinished(self, t: float) -> None:
        """The run's deadline passed (or it was interrupted) before this session ended."""
        if self.status is None:
            self._end("unfinished")

    # helpers
    @property
    def anomalies(self) -> list[str]:
        return self._run.anomalies_of.get(self.index, [])

    def anomaly(self, name: str) -> None:
        found = self._run.anomalies_of.setdefault(self.index, [])
        if name not in found:
            found.append(name)

    def _end(self, status: str) -> None:
        if self.status is not None:
            return
        if self.stage in ("streaming", "closing"):
            self._run.live -= 1
        self.status = status
        self.stage = f"ended in {self.stage}"
        if status == "completed":
            self._run.completed += 1
        else:
            self._run.failed += 1

    @property
    def text(self) -> str:
        return " ".join(t.strip() for t in self._finals if t.strip())

    def summary(self) -> SessionSummary:
        return SessionSummary(
            index=self.index,
            audio=self.audio,
            status=self.status or "unfinished",
            session_id=self.session_id,
            close_code=self.close_code,
            close_reason=self.close_reason,
            stage=self.stage,
            frames_sent=len(self._send_t),
            frames_acked=self._acked,
            audio_s_sent=self._audio_end[-1] if self._audio_end else 0.0,
            audio_s_reported=self.closed[1] if self.closed else None,
            finals_received=len(self._finals),
            finals_reported=self.closed[2] if self.closed else None,
            interims_received=self.interims,
            errors=tuple(self.errors),
            anomalies=tuple(self.anomalies),
            wer=None,
            text=self.text,
            priority=self.priority,
        )

    def audio_s_acked(self) -> float:
        return self._audio_end[self._acked - 1] if self._acked else 0.0


def text_wait(spoken_t: float, interims: Iterable[float], final_t: float) -> float:
    """The longest stretch with nothing of an utterance on screen: from `spoken_t` (its
    first audio sent) through each interim of it received to its final received."""
    marks = sorted(x for x in interims if spoken_t < x < final_t)
    edges = [spoken_t, *marks, final_t]
    return max(0.0, *(b - a for a, b in itertools.pairwise(edges)))


# --- the whole run ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RunInfo:
    """What was run; copied into the report as is."""

    url: str
    sessions: int
    audio: tuple[str, ...]
    pace: float
    ramp_s: float
    duration_s: float | None
    frame_ms: int
    interim_results: bool
    language: str | None = None  # the sessions' `language` parameter; None: the service's
    high_share: float = 0.0  # share of the sessions that asked for priority=high


@dataclass(frozen=True, slots=True)
class LaneReport:
    """One priority lane's sessions: how they ended, how many waited, how soon they saw
    text and their finals' lag."""

    sessions: int
    completed: int
    failed: int
    unfinished: int
    overloaded: int  # refused or cancelled with close code 1013 (no worker in time)
    queued: int  # told `queued` at least once
    max_queue_position: int
    final_lag: Distribution
    first_interim: Distribution = field(default_factory=Distribution)
    first_text: Distribution = field(default_factory=Distribution)  # interim or final


@dataclass(frozen=True, slots=True)
class WerResult:
    value: float
    sessions: int
    reference_words: int


@dataclass(frozen=True)
class LoadReport:
    run: RunInfo
    elapsed_s: float
    interrupted: bool
    sessions_total: int
    completed: int
    failed: int
    unfinished: int
    metrics: dict[str, Distribution]
    frames_sent: int
    frames_acked: int
    audio_s_sent: float
    audio_s_acked: float
    audio_s_reported: float
    finals_received: int
    finals_reported: int
    errors_by_close_code: dict[str, int]
    error_messages: dict[str, int]
    connect_errors: dict[str, int]
    anomalies: dict[str, int]
    queued_sessions: int
    max_queue_position: int
    wer: WerResult | None
    wer_note: str
    per_session: tuple[SessionSummary, ...] = field(default_factory=tuple)
    #: Per priority lane that had sessions, `high` first (reports before lanes: empty).
    lanes: dict[str, LaneReport] = field(default_factory=dict)

    @property
    def all_completed(self) -> bool:
        return self.completed == self.sessions_total and not self.interrupted

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["version"] = REPORT_VERSION
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LoadReport:
        if data.get("version") != REPORT_VERSION:
            raise ValueError(f"unknown load report version {data.get('version')!r}")
        body = {k: v for k, v in data.items() if k != "version"}
        run = dict(body["run"])
        run["audio"] = tuple(run["audio"])
        body["run"] = RunInfo(**run)
        body["metrics"] = {k: Distribution(**v) for k, v in body["metrics"].items()}
        body["wer"] = WerResult(**body["wer"]) if body["wer"] is not None else None
        body["lanes"] = {
            name: LaneReport(
                **{
                    **lane,
                    **{
                        k: Distribution(**lane[k])
                        for k in ("final_lag", "first_interim", "first_text")
                        if k in lane  # first_text: not in older reports
                    },
                }
            )
            for name, lane in body.get("lanes", {}).items()
        }
        body["per_session"] = tuple(
            SessionSummary(
                **{**s, "errors": tuple(s["errors"]), "anomalies": tuple(s["anomalies"])}
            )
            for s in body["per_session"]
        )
        return cls(**body)

    def render_table(self) -> str:
        return render_table(self)


class LoadRecorder:
    """The run: every session's recorder, the shared metric series and live counters."""

    def __init__(self) -> None:
        self.connect = Series()
        self.first_interim = Series()
        self.first_text = Series()
        self.final_lag = Series()
        #: The finals of sessions never told `queued` (served at once; `queued` always
        #: comes before a session's first final).
        self.final_lag_unqueued = Series()
        self.text_wait = Series()
        self.ack_latency = Series()
        self.completion = Series()
        self.send_delay = Series()
        self.sessions: list[SessionRecorder] = []
        # live counters, read by the progress line
        self.live = 0
        self.completed = 0
        self.failed = 0
        self.frames_sent = 0
        self.acks = 0
        self.finals = 0
        self.error_count = 0
        self.connect_errors: Counter[str] = Counter()
        self.anomalies_of: dict[int, list[str]] = {}
        self.queued_sessions: set[int] = set()
        self.max_queue_position = 0
        self.lane_max_position: dict[str, int] = {}
        self._lane_series: dict[tuple[str, str], Series] = {}

    def session(
        self, audio: str, reference: str | None = None, priority: str = "normal"
    ) -> SessionRecorder:
        rec = SessionRecorder(self, len(self.sessions), audio, reference, priority)
        self.sessions.append(rec)
        return rec

    def lane_series(self, metric: str, priority: str) -> Series:
        """One metric's samples (`final_lag`, `first_interim`, `first_text`) of one priority
        lane."""
        return self._lane_series.setdefault((metric, priority), Series())

    def series(self) -> dict[str, Series]:
        return {
            "connect_s": self.connect,
            "first_interim_s": self.first_interim,
            "first_text_s": self.first_text,
            "final_lag_s": self.final_lag,
            "final_lag_unqueued_s": self.final_lag_unqueued,
            "text_wait_s": self.text_wait,
            "ack_latency_s": self.ack_latency,
            "completion_s": self.completion,
            "send_delay_s": self.send_delay,
        }

    def report(
        self,
        run: RunInfo,
        elapsed_s: float,
        *,
        interrupted: bool = False,
        wer_fn: WerFn | None = None,
    ) -> LoadReport:
        """Summarise the run. `wer_fn(references, hypotheses)` scores completed sessions."""
        for rec in self.sessions:
            rec.unfinished(elapsed_s)
        summaries = [rec.summary() for rec in self.sessions]
        wer, note, per_wer = _score(self.sessions, wer_fn)
        summaries = [
            s if s.index not in per_wer else _with_wer(s, per_wer[s.index]) for s in summaries
        ]
        codes: Counter[str] = Counter()
        messages: Counter[str] = Counter()
        anomalies: Counter[str] = Counter()
        for s in summaries:
            messages.update(s.errors)
            anomalies.update(s.anomalies)
            if s.status == "failed" and s.close_code is not None:
                codes[str(s.close_code)] += 1
            elif s.status == "failed":
                codes["no connection"] += 1
        return LoadReport(
            run=run,
            elapsed_s=elapsed_s,
            interrupted=interrupted,
            sessions_total=len(summaries),
            completed=sum(s.status == "completed" for s in summaries),
            failed=sum(s.status == "failed" for s in summaries),
            unfinished=sum(s.status == "unfinished" for s in summaries),
            metrics={name: Distribution.of(self.series()[name].values) for name, _ in METRICS},
            frames_sent=sum(s.frames_sent for s in summaries),
            frames_acked=sum(s.frames_acked for s in summaries),
            audio_s_sent=sum(s.audio_s_sent for s in summaries),
            audio_s_acked=sum(rec.audio_s_acked() for rec in self.sessions),
            audio_s_reported=sum(s.audio_s_reported or 0.0 for s in summaries),
            finals_received=sum(s.finals_received for s in summaries),
            finals_reported=sum(s.finals_reported or 0 for s in summaries),
            errors_by_close_code=dict(sorted(codes.items())),
            error_messages=dict(sorted(messages.items())),
            connect_errors=dict(sorted(self.connect_errors.items())),
            anomalies=dict(sorted(anomalies.items())),
            queued_sessions=len(self.queued_sessions),
            max_queue_position=self.max_queue_position,
            wer=wer,
            wer_note=note,
            per_session=tuple(summaries),
            lanes=self._lanes(summaries),
        )

    def _lanes(self, summaries: Sequence[SessionSummary]) -> dict[str, LaneReport]:
        out: dict[str, LaneReport] = {}
        for lane in sorted({s.priority for s in summaries}, key=_lane_order):
            mine = [s for s in summaries if s.priority == lane]
            out[lane] = LaneReport(
                sessions=len(mine),
                completed=sum(s.status == "completed" for s in mine),
                failed=sum(s.status == "failed" for s in mine),
                unfinished=sum(s.status == "unfinished" for s in mine),
                overloaded=sum(s.status == "failed" and s.close_code == 1013 for s in mine),
                queued=sum(s.index in self.queued_sessions for s in mine),
                max_queue_position=self.lane_max_position.get(lane, 0),
                final_lag=Distribution.of(self.lane_series("final_lag", lane).values),
                first_interim=Distribution.of(self.lane_series("first_interim", lane).values),
                first_text=Distribution.of(self.lane_series("first_text", lane).values),
            )
        return out


def _lane_order(lane: str) -> tuple[int, str]:
    """`high` first, then `normal`, then anything else by name."""
    return ({"high": 0, "normal": 1}.get(lane, 2), lane)


def _with_wer(s: SessionSummary, value: float) -> SessionSummary:
    return SessionSummary(**{**asdict(s), "wer": value})


def _score(
    sessions: Sequence[SessionRecorder], wer_fn: WerFn | None
) -> tuple[WerResult | None, str, dict[int, float]]:
    """Corpus WER over completed sessions that have a reference transcript."""
    scored = [r for r in sessions if r.reference is not None and r.status == "completed"]
    if not scored:
        return None, "no completed session with a reference transcript", {}
    if wer_fn is None:
        return None, "WER not computed", {}
    refs = [r.reference or "" for r in scored]
    hyps = [r.text for r in scored]
    try:
        value = wer_fn(refs, hyps)
        per = {r.index: wer_fn([r.reference or ""], [r.text]) for r in scored}
    except ImportError as exc:
        return None, f"WER needs the bench extra ({exc.name} missing)", {}
    words = sum(len(ref.split()) for ref in refs)
    return WerResult(value, len(scored), words), "", per


# --- rendering -------------------------------------------------------------------------


def _files(paths: Sequence[str], most: int = 4) -> str:
    """The files' names, the first few of a long list and how many more."""
    names = [p.replace("\\", "/").rsplit("/", 1)[-1] for p in paths]
    if len(names) > most:
        names = [*names[: most - 1], f"and {len(names) - most + 1} more"]
    return ", ".join(names)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.1f}"


def _counts(items: Mapping[str, int]) -> str:
    return ", ".join(f"{k}: {v}" for k, v in items.items()) if items else "none"


def _interims_line(r: LoadReport) -> list[str]:
    """How many interims came, per second of audio, and how many completed sessions had
    none (time to first interim counts only the sessions that had one)."""
    if not r.run.interim_results or not r.per_session:
        return []
    done = [s for s in r.per_session if s.status == "completed"]
    received = sum(s.interims_received for s in r.per_session)
    audio_s = sum(s.audio_s_sent for s in r.per_session)
    rate = f"{received / audio_s:.2f}" if audio_s else "-"
    none = sum(s.interims_received == 0 for s in done)
    return [
        f"interims: {received} received, {rate} per second of audio sent; "
        f"{none} of {len(done)} completed session(s) had none"
    ]


def _lanes_block(r: LoadReport) -> list[str]:
    """Each priority lane's sessions and final lag, when the run used more than one lane
    or any lane but `normal`."""
    if not r.lanes or set(r.lanes) == {"normal"}:
        return []
    lines = [
        f"{'by priority':<12}{'sessions':>9}{'completed':>10}{'failed':>7}{'1013':>6}"
        f"{'queued':>7}{'first interim p50/p95 (ms)':>28}{'final lag p50/p95 (ms)':>24}"
    ]
    for name, lane in r.lanes.items():
        first = f"{_ms(lane.first_interim.p50)} / {_ms(lane.first_interim.p95)}"
        lag = f"{_ms(lane.final_lag.p50)} / {_ms(lane.final_lag.p95)}"
        lines.append(
            f"{name:<12}{lane.sessions:>9}{lane.completed:>10}{lane.failed:>7}"
            f"{lane.overloaded:>6}{lane.queued:>7}{first:>28}{lag:>24}"
        )
    return lines


def render_table(report: LoadReport) -> str:
    """The human-readable summary printed at the end of a run."""
    r = report
    run = r.run
    lines = [
        f"streamscribe loadtest: {run.sessions} session(s) against {run.url}",
        f"  pace {run.pace:g}x, ramp {run.ramp_s:g} s, "
        + (f"duration {run.duration_s:g} s" if run.duration_s else "each file once")
        + f", {run.frame_ms} ms frames, interim results {'on' if run.interim_results else 'off'}"
        + (f", language {run.language}" if run.language else "")
        + (f", {run.high_share:g} of sessions priority=high" if run.high_share else ""),
        f"  audio: {_files(run.audio)}",
        f"  elapsed {r.elapsed_s:.1f} s{' (interrupted)' if r.interrupted else ''}",
        "",
        f"sessions: {r.completed} completed, {r.failed} failed, {r.unfinished} unfinished "
        f"(of {r.sessions_total})",
        "",
        f"{'latency (ms)':<26}{'count':>8}{'p50':>10}{'p95':>10}{'p99':>10}{'max':>10}",
    ]
    for name, label in METRICS:
        d = r.metrics.get(name)
        if d is None or (name == "final_lag_unqueued_s" and not r.queued_sessions):
            continue  # not in an older report; or, with no session queued, the final lag
        lines.append(
            f"{label:<26}{d.count:>8}{_ms(d.p50):>10}{_ms(d.p95):>10}{_ms(d.p99):>10}"
            f"{_ms(d.max):>10}"
        )
    lines += [
        "",
        f"audio seconds: {r.audio_s_sent:.1f} sent, {r.audio_s_acked:.1f} acknowledged, "
        f"{r.audio_s_reported:.1f} processed (session.closed)",
        f"frames: {r.frames_sent} sent, {r.frames_acked} acknowledged",
        f"finals: {r.finals_received} received, {r.finals_reported} reported in session.closed",
        *_interims_line(r),
        f"errors by close code: {_counts(r.errors_by_close_code)}",
        f"error messages: {_counts(r.error_messages)}",
    ]
    if r.connect_errors:
        lines.append(f"connection failures: {_counts(r.connect_errors)}")
    if r.anomalies:
        lines.append(f"anomalies: {_counts(r.anomalies)}")
    if r.queued_sessions:
        lines.append(
            f"queued: {r.queued_sessions} session(s), highest position {r.max_queue_position}"
        )
    lines += _lanes_block(r)
    if r.wer is not None:
        lines.append(
            f"WER: {r.wer.value * 100:.1f}% over {r.wer.sessions} completed session(s), "
            f"{r.wer.reference_words} reference words"
        )
    else:
        lines.append(f"WER: - ({r.wer_note})")
    return "\n".join(lines) + "\n"
