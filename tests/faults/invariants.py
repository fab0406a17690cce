"""The invariants every fault scenario must keep (architecture spec, "Invariants").

`check_session` compares what one client sent and received with what Redis holds:
- the client got `session.closed` and no error; its finals are result_ids 0..n-1, each
  once, in order, and `final_results == n`;
- every frame the client sent is stored exactly once, in order, with its own content
  (seen by the `AudioRecorder` before trimming), and `audio_bytes`/`next_seq` in the meta
  hash match what was sent;
- the results stream holds exactly n finals (0..n-1 in order) and one closing summary,
  with the same texts the client got;
- the transcript is within `wer_tolerance` of the no-fault run of the same audio.
`check_fencing` checks that no owner published after a newer one had taken over.
"""

from __future__ import annotations

import itertools
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from typing import cast

import redis.asyncio as aioredis

from shared import envelope, keys
from shared.envelope import Closed, Transcript
from shared.errors import EnvelopeError
from shared.scoring import wer
from tests.faults.recording import AudioRecorder, ClientRun, Event, digest

WER_TOLERANCE = 0.10


@dataclass
class ResultEntry:
    entry_id: str
    kind: str  # "final" or "closed"
    result_id: int
    epoch: int  # from the entry's `by` field (worker:epoch); 0 when absent
    item: Transcript | Closed | None


@dataclass
class SessionVerdict:
    name: str
    session_id: str
    frames_sent: int
    frames_stored: int = 0
    lost: int = 0
    duplicated: int = 0
    reordered: int = 0  # out-of-order positions plus frames stored with other content
    finals: int = 0
    results_entries: int = 0
    reconnects: int = 0
    wer_vs_clean: float | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def frame_accounting(run: ClientRun, audio: AudioRecorder) -> tuple[int, int, int, int]:
    """(stored, lost, duplicated, reordered) of the client's frames in the audio stream."""
    seqs = [e.seq for e in audio.entries if e.seq >= 0]
    unique = set(seqs)
    lost = sum(1 for seq in range(run.sent) if seq not in unique)
    duplicated = len(seqs) - len(unique)
    reordered = sum(1 for a, b in itertools.pairwise(seqs) if b != a + 1)
    if seqs and seqs[0] != 0:
        reordered += 1
    wrong = sum(
        1
        for e in audio.entries
        if 0 <= e.seq < len(run.frames) and e.digest != digest(run.frames[e.seq])
    )
    return len(unique), lost, duplicated, reordered + wrong


async def read_results(redis: aioredis.Redis, sid: str) -> list[ResultEntry]:
    out: list[ResultEntry] = []
    for entry_id, fields in await redis.xrange(keys.results(keys.SessionId(sid))):
        kind = fields.get(b"t", b"").decode()
        by = fields.get(b"by", b"").decode()
        epoch = int(by.rsplit(":", 1)[1]) if ":" in by else 0
        try:
            item = envelope.decode_entry(fields)
        except EnvelopeError:
            item = None
        rid = item.result_id if isinstance(item, Transcript) else -1
        out.append(
            ResultEntry(
                entry_id.decode(),
                kind,
                rid,
                epoch,
                item if isinstance(item, Transcript | Closed) else None,
            )
        )
    return out


async def check_session(
    redis: aioredis.Redis,
    run: ClientRun,
    audio: AudioRecorder | None,
    clean_text: str | None,
    *,
    wer_tolerance: float = WER_TOLERANCE,
) -> SessionVerdict:
    v = SessionVerdict(run.name, run.session_id, run.sent, reconnects=run.reconnects)
    p = v.problems
    if run.error:
        p.append(f"client error: {run.error}")
    if run.sent != len(run.frames):
        p.append(f"client sent {run.sent} of {len(run.frames)} frames")
    n = len(run.finals)
    v.finals = n
    rids = [f.result_id for f in run.finals]
    if rids != list(range(n)):
        p.append(f"client finals out of order / with gaps / duplicated: {rids}")
    if run.closed is None:
        p.append("client got no session.closed")
    elif run.closed.final_results != n:
        p.append(f"session.closed says {run.closed.final_results} finals, client got {n}")
    if run.acked_seq != run.sent - 1:
        p.append(f"last ack {run.acked_seq}, expected {run.sent - 1}")

    meta = await cast(
        Awaitable[list[bytes | None]],
        redis.hmget(keys.meta(run.sid), ["audio_bytes", "next_seq", "state", "finals"]),
    )
    audio_bytes, next_seq, state, finals = (x.decode() if x else "" for x in meta)
    if audio_bytes != str(run.bytes_sent):
        p.append(f"meta audio_bytes {audio_bytes}, client sent {run.bytes_sent} bytes")
    if next_seq != str(run.sent):
        p.append(f"meta next_seq {next_seq}, client sent {run.sent} frames")
    if state != "closed":
        p.append(f"meta state {state!r}, expected 'closed'")
    if finals != str(n):
        p.append(f"meta finals {finals}, client got {n}")

    if audio is not None:
        stored, lost, dup, reordered = frame_accounting(run, audio)
        v.frames_stored, v.lost, v.duplicated, v.reordered = stored, lost, dup, reordered
        if lost or dup or reordered:
            p.append(f"frames lost {lost}, duplicated {dup}, reordered/wrong {reordered}")
        if audio.undecodable:
            p.append(f"{audio.undecodable} undecodable audio entries")
        marks = [e.control for e in audio.entries if e.control == "close"]
        if len(marks) != 1 or audio.entries[-1].control != "close":
            p.append(f"close marks in the audio stream: {len(marks)} (expected 1, last)")

    entries = await read_results(redis, run.session_id)
    v.results_entries = len(entries)
    stream_rids = [e.result_id for e in entries if e.kind == "final"]
    closes = [e for e in entries if e.kind == "closed"]
    if stream_rids != list(range(n)):
        p.append(f"results stream finals {stream_rids}, expected 0..{n - 1}")
    if len(closes) != 1 or entries[-1].kind != "closed":
        p.append(f"results stream has {len(closes)} closing summaries (expected 1, last)")
    stream_texts = [e.item.text for e in entries if isinstance(e.item, Transcript)]
    if stream_texts != [f.text for f in run.finals]:
        p.append("client finals differ from the results stream")

    if clean_text is not None:
        v.wer_vs_clean = wer([clean_text], [run.text]) if clean_text.strip() else 0.0
        if v.wer_vs_clean > wer_tolerance:
            p.append(
                f"WER vs the no-fault run {v.wer_vs_clean:.3f} > {wer_tolerance}: "
                f"{run.text!r} vs {clean_text!r}"
            )
    return v


def check_fencing(
    events: Sequence[Event], entries: Sequence[ResultEntry], *, require_epochs: bool = True
) -> list[str]:
    """No owner publishes once a newer owner (higher epoch) has published: the epochs of a
    session's transcript events, in arrival order, and of its results entries never go
    down. With `require_epochs`, every transcript event must carry its owner's epoch."""
    problems: list[str] = []
    seen = 0
    for e in events:
        if not isinstance(e.item, Transcript):
            if e.item is None:
                problems.append(f"undecodable event at {e.at_ms}")
            continue
        if e.item.epoch == 0 and require_epochs:
            problems.append("a transcript event carries no epoch")
            break
        if e.item.epoch < seen:
            problems.append(
                f"epoch {e.item.epoch} published result {e.item.result_id} after epoch {seen}"
            )
        seen = max(seen, e.item.epoch)
    seen = 0
    for r in entries:
        if r.kind != "final":
            continue
        if r.epoch == 0 and require_epochs:
            problems.append(f"results entry {r.entry_id} names no owner epoch")
            break
        if r.epoch < seen:
            problems.append(f"results entry {r.entry_id} by epoch {r.epoch} after epoch {seen}")
        seen = max(seen, r.epoch)
    return problems


def epochs_after(events: Sequence[Event], since_ms: int) -> set[int]:
    """Owner epochs of transcript events that arrived at or after `since_ms`."""
    return {e.item.epoch for e in events if isinstance(e.item, Transcript) and e.at_ms >= since_ms}


def describe(verdicts: Sequence[SessionVerdict]) -> str:
    lines = []
    for v in verdicts:
        status = "ok" if v.ok else "FAIL: " + "; ".join(v.problems)
        wer_text = "-" if v.wer_vs_clean is None else f"{v.wer_vs_clean:.3f}"
        lines.append(
            f"{v.name} {v.session_id[:8]} frames {v.frames_sent} finals {v.finals} "
            f"reconnects {v.reconnects} wer {wer_text}: {status}"
        )
    return "\n".join(lines)
