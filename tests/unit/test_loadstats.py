"""The load tester's statistics on known inputs: no loop, no network, no clock."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence

import pytest

from shared.loadstats import (
    Distribution,
    LoadRecorder,
    LoadReport,
    RunInfo,
    SessionRecorder,
    percentile,
    text_wait,
)
from shared.scoring import wer, word_errors

RUN = RunInfo(
    url="ws://127.0.0.1:1/v1/listen",
    sessions=1,
    audio=("a.wav",),
    pace=1.0,
    ramp_s=0.0,
    duration_s=None,
    frame_ms=100,
    interim_results=True,
)


def streamed(rec: SessionRecorder, frames: int, frame_s: float = 0.1, t0: float = 0.0) -> None:
    """Frame k (k = 0..frames-1) ends at (k+1) * frame_s of audio and is sent then."""
    for k in range(frames):
        end = round((k + 1) * frame_s, 6)
        rec.frame_sent(t0 + end, end)


def complete(rec: SessionRecorder, t: float, finals: int, audio_s: float) -> None:
    rec.close_stream_sent(t)
    rec.session_closed(t + 0.5, "client_closed", audio_s, finals)
    rec.connection_closed(t + 0.6, 1000, "session closed")


# --- percentiles -----------------------------------------------------------------------


def test_nearest_rank_percentiles_on_hand_computed_data() -> None:
    """p-th percentile = sorted sample at rank ceil(p/100 * n): 1..10 gives p50=5, p95=10."""
    ten = [float(v) for v in range(1, 11)]
    assert percentile(ten, 50) == 5.0
    assert percentile(ten, 95) == 10.0  # rank ceil(9.5) = 10
    assert percentile(ten, 90) == 9.0
    assert percentile(ten, 10) == 1.0
    assert percentile(ten, 100) == 10.0
    assert percentile([1.0, 2.0, 3.0], 50) == 2.0  # rank ceil(1.5) = 2
    hundred = [float(v) for v in range(1, 101)]
    assert percentile(hundred, 99) == 99.0
    assert percentile([7.0], 1) == 7.0


@pytest.mark.parametrize(("values", "p"), [([], 50), ([1.0], 0), ([1.0], 100.5)])
def test_percentile_rejects_what_it_cannot_answer(values: list[float], p: float) -> None:
    """No samples, or p outside (0, 100], is an error rather than a made-up number."""
    with pytest.raises(ValueError):
        percentile(values, p)


def test_distribution_sorts_and_handles_empty() -> None:
    """Distribution.of sorts its input; with no samples every figure is None."""
    d = Distribution.of([0.3, 0.1, 0.2, 0.4])
    assert d == Distribution(count=4, p50=0.2, p95=0.4, p99=0.4, max=0.4)
    assert Distribution.of([]) == Distribution(0, None, None, None, None)


# --- the metrics from event timelines --------------------------------------------------


def test_final_lag_is_measured_from_the_frame_holding_the_final_end() -> None:
    """A final's lag counts from when the frame containing its `end` was sent; an end on a
    frame boundary (even rounded up by < 0.5 ms) belongs to the frame that ends there."""
    run = LoadRecorder()
    rec = run.session("a.wav")
    rec.connecting(0.0)
    rec.started(0.0, "s")
    streamed(rec, 10)  # frame k sent at (k+1)/10 s
    rec.transcript(1.5, 0, True, 0.0, 0.35, "one")  # frame 3 (0.3..0.4) sent at 0.4 -> 1.1
    rec.transcript(1.6, 1, True, 0.0, 0.6, "two")  # boundary: frame 5 (0.5..0.6) sent at 0.6 -> 1.0
    rec.transcript(1.7, 2, True, 0.0, 0.7004, "three")  # rounded: frame 6 sent at 0.7 -> 1.0
    rec.transcript(2.0, 3, True, 0.0, 1.25, "four")  # past the last frame: frame 9 at 1.0 -> 1.0
    assert list(run.final_lag.values) == pytest.approx([1.1, 1.0, 1.0, 1.0])
    assert list(run.final_lag.times) == [1.5, 1.6, 1.7, 2.0]
    assert rec.text == "one two three four"


def test_final_lag_of_sessions_never_queued_is_also_kept_apart() -> None:
    """Finals of a session that was told `queued` count in the final lag but not in the
    final lag of sessions never queued; the table shows that row only when a session
    was queued, and an older report without the metric still renders."""
    run = LoadRecorder()
    served, waited = run.session("a.wav"), run.session("b.wav")
    for i, rec in enumerate((served, waited)):
        rec.connecting(0.0)
        rec.started(0.0, f"s{i}")
        streamed(rec, 10)
    waited.queued(0.3, 1)
    served.transcript(1.1, 0, True, 0.0, 0.5, "one")  # frame 4 sent at 0.5 -> 0.6
    waited.transcript(5.0, 0, True, 0.0, 0.5, "one")  # -> 4.5, after waiting in the queue
    served.transcript(1.4, 1, True, 0.0, 1.0, "two")  # frame 9 sent at 1.0 -> 0.4
    assert list(run.final_lag.values) == pytest.approx([0.6, 4.5, 0.4])
    assert list(run.final_lag_unqueued.values) == pytest.approx([0.6, 0.4])
    for rec in (served, waited):
        complete(rec, 6.0, len(rec._finals), 1.0)
    report = run.report(RUN, 7.0)
    assert report.metrics["final_lag_unqueued_s"].max == pytest.approx(0.6)
    assert report.metrics["final_lag_s"].max == pytest.approx(4.5)
    row = next(x for x in report.render_table().splitlines() if x.startswith("final lag, never"))
    assert row.split()[-5:] == ["2", "400.0", "600.0", "600.0", "600.0"]
    assert "queued: 1 session(s), highest position 1" in report.render_table()
    older = dataclasses.replace(
        report,
        metrics={k: v for k, v in report.metrics.items() if k != "final_lag_unqueued_s"},
    )
    assert "never queued" not in older.render_table()
    alone = LoadRecorder()
    rec = alone.session("a.wav")
    rec.connecting(0.0)
    rec.started(0.0, "s")
    streamed(rec, 10)
    rec.transcript(1.1, 0, True, 0.0, 0.5, "one")
    complete(rec, 2.0, 1, 1.0)
    assert "never queued" not in alone.report(RUN, 3.0).render_table()


def test_wait_for_text_is_the_longest_stretch_without_output_in_an_utterance() -> None:
    """Per final: from the frame holding its `start` sent, through its own interims
    received, to the final received, the longest gap. Interims of another result id and
    those of an utterance that never gets a final add nothing."""
    run = LoadRecorder()
    rec = run.session("a.wav")
    rec.connecting(0.0)
    rec.started(0.0, "s")
    streamed(rec, 80)  # frame k sent at (k+1)/10 s, 8 s of audio
    # utterance 0 spans 0.25..3.0 s of audio: its first frame (0.2..0.3) went at 0.3
    rec.transcript(1.5, 0, False, 0.25, 1.0, "one")  # gap 1.2
    rec.transcript(4.5, 0, False, 0.25, 2.8, "one two")  # gap 3.0
    rec.transcript(4.9, 0, True, 0.25, 3.0, "one two three")  # gap 0.4
    # utterance 1: 4.0..5.0 s, no interims: sent at 4.1, final at 6.0 -> 1.9
    rec.transcript(5.0, 3, False, 4.0, 4.5, "stray")  # not this utterance's id
    rec.transcript(6.0, 1, True, 4.0, 5.0, "four")
    # an interim of an utterance whose final never comes is not a sample
    rec.transcript(7.0, 2, False, 6.0, 6.5, "five")
    assert list(run.text_wait.values) == pytest.approx([3.0, 1.9])
    assert text_wait(1.0, [], 2.5) == pytest.approx(1.5)
    assert text_wait(1.0, [3.0, 0.5, 1.5], 2.0) == pytest.approx(0.5)  # outside ones ignored
    complete(rec, 8.5, finals=2, audio_s=8.0)
    report = run.report(RUN, 9.5)
    row = next(x for x in report.render_table().splitlines() if "wait for" in x)
    assert row.split()[-5:] == ["2", "1900.0", "3000.0", "3000.0", "3000.0"]
    older = json.loads(report.to_json())  # a file written before the metric existed
    del older["metrics"]["text_wait_s"]
    assert "wait for text" not in LoadReport.from_dict(older).render_table()


def test_ack_latency_with_cumulative_acks() -> None:
    """One ack covers every earlier frame not yet acknowledged, each frame exactly once;
    a repeated or older ack adds nothing."""
    run = LoadRecorder()
    rec = run.session("a.wav")
    for t in (0.0, 1.0, 2.0, 3.0, 4.0):
        rec.frame_sent(t, t + 1)
    rec.ack(5.0, 2)  # frames 0, 1, 2: 5, 4, 3
    rec.ack(6.0, 2)  # nothing new
    rec.ack(6.5, 1)  # older: nothing
    rec.ack(7.0, 4)  # frames 3, 4: 4, 3
    assert list(run.ack_latency.values) == [5.0, 4.0, 3.0, 4.0, 3.0]
    assert rec.frames_acked == 5 and rec.unacked == 0
    assert run.acks == 4
    assert Distribution.of(run.ack_latency.values) == Distribution(5, 4.0, 5.0, 5.0, 5.0)


def test_ack_beyond_what_was_sent_is_an_anomaly() -> None:
    """An ack for a seq never sent is flagged, and only sent frames get samples."""
    run = LoadRecorder()
    rec = run.session("a.wav")
    rec.frame_sent(0.0, 0.1)
    rec.ack(0.5, 3)
    assert list(run.ack_latency.values) == [0.5]
    assert rec.anomalies == ["ack_beyond_sent"]


def test_first_interim_connect_completion_and_send_delay() -> None:
    """Time to first interim counts from the first frame sent, once per session; connect is
    open -> session.started; completion is close_stream -> session.closed; send delay is
    how late a frame went out against its schedule (never negative)."""
    run = LoadRecorder()
    rec = run.session("a.wav")
    rec.connecting(1.0)
    rec.started(1.25, "sid")
    rec.frame_sent(2.0, 0.1, due_t=1.5)
    rec.frame_sent(2.1, 0.2, due_t=2.5)  # early: 0
    rec.transcript(3.0, 0, False, 0.0, 0.1, "hel")
    rec.transcript(3.5, 0, False, 0.0, 0.2, "hello")
    rec.ack(3.6, 1)
    rec.transcript(3.7, 0, True, 0.0, 0.2, "hello")
    complete(rec, 4.0, finals=1, audio_s=0.2)
    assert list(run.connect.values) == [0.25]
    assert list(run.first_interim.values) == [1.0]
    assert list(run.completion.values) == [0.5]
    assert list(run.send_delay.values) == [0.5, 0.0]
    assert rec.interims == 2 and rec.status == "completed"


def test_time_to_first_text_counts_an_interim_or_a_final_whichever_comes_first() -> None:
    """Time to first text is the first frame sent -> the session's first transcript of
    either kind, once per session: a session whose utterances were all final before any
    interim was due still has one; a session with no text has none. Kept per lane too,
    and a lane written before the metric existed reads back."""
    run = LoadRecorder()
    talky, terse, mute = run.session("a.wav"), run.session("b.wav"), run.session("c.wav")
    for rec in (talky, terse, mute):
        streamed(rec, 10)  # first frame sent at 0.1
    talky.transcript(0.9, 0, False, 0.0, 0.5, "on")  # -> 0.8
    talky.transcript(1.4, 0, True, 0.0, 1.0, "one")
    terse.transcript(0.6, 0, True, 0.0, 0.4, "hi")  # a final first -> 0.5
    terse.transcript(1.2, 1, False, 0.5, 0.9, "th")  # later interims add nothing
    assert sorted(run.first_text.values) == pytest.approx([0.5, 0.8])
    assert list(run.first_interim.values) == pytest.approx([0.8, 1.1])
    report = run.report(RUN, 2.0)
    assert report.metrics["first_text_s"].count == 2
    assert report.lanes["normal"].first_text.max == pytest.approx(0.8)
    row = next(line for line in report.render_table().splitlines() if "first text" in line)
    assert row.split()[4:6] == ["2", "500.0"]  # count, p50
    older = json.loads(report.to_json())
    del older["lanes"]["normal"]["first_text"]
    del older["metrics"]["first_text_s"]
    old = LoadReport.from_dict(older)
    assert old.lanes["normal"].first_text.count == 0
    assert "first text" not in old.render_table()


def test_errors_by_close_code_and_session_outcomes() -> None:
    """Completed needs session.closed, close 1000, no error message and no anomaly; every
    other ending is counted by its close code, or as 'no connection'; sessions still
    running at report time are unfinished."""
    run = LoadRecorder()
    ok, refused, no_conn, silent, late, gap = (run.session(f"{i}.wav") for i in range(6))
    for rec in (ok, refused, silent, gap):
        rec.connecting(0.0)
    ok.started(0.1, "a")
    streamed(ok, 3)
    ok.ack(0.5, 2)
    ok.transcript(0.6, 0, True, 0.0, 0.3, "x")
    complete(ok, 1.0, finals=1, audio_s=0.3)
    refused.error_message(0.1, "unauthorized")
    refused.connection_closed(0.1, 4401, "invalid API key")
    no_conn.connect_failed(0.2, "ConnectionRefusedError: refused")
    silent.started(0.1, "b")
    silent.connection_closed(0.3, 1000, "")  # 1000 without session.closed
    late.connecting(0.5)  # still connecting when the report is made
    gap.started(0.1, "c")
    streamed(gap, 2)
    gap.ack(0.3, 1)
    gap.transcript(0.4, 0, True, 0.0, 0.1, "a")
    complete(gap, 0.5, finals=2, audio_s=0.2)  # reported 2 finals, received 1
    assert (run.live, run.completed, run.failed) == (0, 1, 4)
    report = run.report(RUN, 9.0)
    assert (report.completed, report.failed, report.unfinished) == (1, 4, 1)
    assert report.errors_by_close_code == {"1000": 2, "4401": 1, "no connection": 1}
    assert report.error_messages == {"unauthorized": 1}
    assert report.connect_errors == {"ConnectionRefusedError: refused": 1}
    assert report.anomalies == {"finals_count_mismatch": 1}
    assert [s.status for s in report.per_session] == [
        "completed", "failed", "failed", "failed", "unfinished", "failed",
    ]  # fmt: skip
    assert report.per_session[4].stage == "ended in connecting"
    assert not report.all_completed
    assert report.finals_received == 2 and report.finals_reported == 3


def test_each_priority_lane_gets_its_outcomes_queueing_and_final_lag() -> None:
    """Sessions are counted in the lane they asked for: outcomes, 1013 refusals (at
    connect or after waiting), sessions told `queued` with the lane's highest position,
    and the time to first interim and final lag of the lane's own sessions only. The
    table shows the lanes, high first; a report whose sessions were all normal shows no
    lane block."""
    run = LoadRecorder()
    fast = run.session("a.wav", priority="high")
    slow, refused, waited = (run.session(f"{i}.wav") for i in range(3))
    for i, rec in enumerate((fast, slow, waited)):
        rec.connecting(0.0)
        rec.started(0.0, f"s{i}")
        streamed(rec, 10)
        rec.ack(1.1, 9)
    fast.transcript(0.8, 0, False, 0.0, 0.5, "on")  # first frame sent at 0.1 -> 0.7
    fast.transcript(1.2, 0, True, 0.0, 1.0, "one")  # frame 9 sent at 1.0 -> 0.2
    slow.queued(0.3, 2)
    slow.transcript(2.5, 0, False, 0.0, 0.5, "on")  # -> 2.4
    slow.transcript(3.0, 0, True, 0.0, 1.0, "one")  # -> 2.0
    slow.transcript(3.5, 1, True, 0.0, 0.5, "two")  # frame 4 sent at 0.5 -> 3.0
    complete(fast, 2.0, finals=1, audio_s=1.0)
    complete(slow, 4.0, finals=2, audio_s=1.0)
    refused.connecting(0.1)
    refused.error_message(0.2, "overloaded")
    refused.connection_closed(0.2, 1013, "overloaded")
    waited.queued(0.4, 3)
    waited.error_message(30.0, "overloaded")
    waited.connection_closed(30.0, 1013, "overloaded")
    report = run.report(RUN, 31.0)
    assert list(report.lanes) == ["high", "normal"]
    high, normal = report.lanes["high"], report.lanes["normal"]
    assert (high.sessions, high.completed, high.failed, high.overloaded) == (1, 1, 0, 0)
    assert (high.queued, high.max_queue_position) == (0, 0)
    assert high.final_lag.count == 1 and high.final_lag.max == pytest.approx(0.2)
    assert high.first_interim.count == 1 and high.first_interim.max == pytest.approx(0.7)
    assert (normal.sessions, normal.completed, normal.failed, normal.overloaded) == (3, 1, 2, 2)
    assert (normal.queued, normal.max_queue_position, normal.unfinished) == (2, 3, 0)
    assert normal.final_lag.count == 2 and normal.final_lag.max == pytest.approx(3.0)
    assert normal.first_interim.count == 1 and normal.first_interim.max == pytest.approx(2.4)
    lines = report.render_table().splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("by priority"))
    assert lines[at + 1].split() == [
        "high", "1", "1", "0", "0", "0", "700.0", "/", "700.0", "200.0", "/", "200.0",
    ]  # fmt: skip
    assert lines[at + 2].split() == [
        "normal", "3", "1", "2", "2", "2", "2400.0", "/", "2400.0", "2000.0", "/", "3000.0",
    ]  # fmt: skip
    alone = LoadRecorder()
    rec = alone.session("a.wav")
    rec.connect_failed(0.1, "OSError: boom")
    plain = alone.report(RUN, 1.0)
    assert list(plain.lanes) == ["normal"]
    assert "by priority" not in plain.render_table()


def test_result_ids_out_of_order_are_flagged() -> None:
    """Finals must arrive numbered 0, 1, 2, ...; a gap fails the session."""
    run = LoadRecorder()
    rec = run.session("a.wav")
    rec.started(0.0, "s")
    streamed(rec, 2)
    rec.ack(0.3, 1)
    rec.transcript(0.4, 0, True, 0.0, 0.1, "a")
    rec.transcript(0.5, 2, True, 0.0, 0.2, "c")
    complete(rec, 1.0, finals=2, audio_s=0.2)
    assert rec.status == "failed"
    assert rec.anomalies == ["result_id_out_of_order"]


# --- WER, JSON, table -----------------------------------------------------------------


def scored_run() -> LoadRecorder:
    run = LoadRecorder()
    texts = [
        ("the cat sat down", "the cat sat town"),
        ("hello world", "hello world"),
        (None, "no reference here"),
    ]
    for i, (ref, hyp) in enumerate(texts):
        rec = run.session(f"{i}.wav", ref)
        rec.connecting(0.0)
        rec.started(0.01, f"sid{i}")
        streamed(rec, 4)
        rec.ack(0.5, 3)
        rec.transcript(0.6, 0, True, 0.0, 0.4, hyp)
        complete(rec, 1.0, finals=1, audio_s=0.4)
    failed = run.session("x.wav", "never scored")
    failed.connect_failed(0.1, "OSError: boom")
    return run


def test_wer_is_a_corpus_figure_over_completed_sessions_with_a_reference() -> None:
    """1 error in 6 reference words; sessions without a reference or not completed are
    left out; each scored session also gets its own WER."""
    seen: list[tuple[list[str], list[str]]] = []

    def spy(refs: Sequence[str], hyps: Sequence[str]) -> float:
        seen.append((list(refs), list(hyps)))
        return wer(refs, hyps)

    report = scored_run().report(RUN, 2.0, wer_fn=spy)
    assert seen[0] == (["the cat sat down", "hello world"], ["the cat sat town", "hello world"])
    assert report.wer is not None
    assert report.wer.value == pytest.approx(1 / 6)
    assert (report.wer.sessions, report.wer.reference_words) == (2, 6)
    assert [s.wer for s in report.per_session] == [pytest.approx(0.25), 0.0, None, None]


def test_word_errors_count_what_corpus_wer_adds_up() -> None:
    """One clip's share of a corpus WER: errors and reference words after normalising
    (spelled digits become one number, so a one-word reference can carry many errors)."""
    assert word_errors("the cat sat down", "The cat sat town.") == (1, 4)
    assert word_errors("the cat sat down", "the cat sat down") == (0, 4)
    assert word_errors("", "anything") == (0, 0)
    assert word_errors("one two three", "1 2 3") == (3, 1)
    errors = [word_errors("the cat sat down", "the cat sat town"), word_errors("hi", "hi")]
    assert sum(e for e, _ in errors) / sum(n for _, n in errors) == pytest.approx(
        wer(["the cat sat down", "hi"], ["the cat sat town", "hi"])
    )


def test_other_languages_are_scored_with_the_basic_normalizer() -> None:
    """English (and `auto`) text goes through Whisper's English normalizer, which also
    spells British and American alike; any other language through the basic one (lower
    case, no punctuation), which keeps its letters."""
    assert wer(["the harbour"], ["The harbor."]) == 0.0
    assert wer(["the harbour"], ["The harbor."], language="auto") == 0.0
    assert wer(["the harbour"], ["The harbor."], language="de") == pytest.approx(0.5)
    assert wer(["Der Hund, spielt!"], ["der hund spielt"], language="de") == 0.0
    assert wer(["Straße über"], ["strasse über"], language="de") == pytest.approx(0.5)


def test_the_language_of_a_run_is_shown_only_when_set() -> None:
    """`--language de` shows in the run's header line; a report written before the field
    existed (no `language` in its JSON) reads back without one."""
    report = scored_run().report(dataclasses.replace(RUN, language="de"), 2.0)
    assert ", language de" in report.render_table().splitlines()[1]
    plain = scored_run().report(RUN, 2.0)
    assert "language" not in plain.render_table().splitlines()[1]
    data = plain.to_dict()
    del data["run"]["language"]
    assert LoadReport.from_dict(data).run.language is None


def test_wer_without_references_or_scorer_says_why() -> None:
    """No reference anywhere, or the scorer's package missing, gives no number and a note."""
    run = LoadRecorder()
    rec = run.session("a.wav")
    rec.started(0.0, "s")
    complete(rec, 1.0, finals=0, audio_s=0.0)
    report = run.report(RUN, 1.0, wer_fn=wer)
    assert report.wer is None and "reference" in report.wer_note

    def missing(refs: Sequence[str], hyps: Sequence[str]) -> float:
        raise ModuleNotFoundError("No module named 'jiwer'", name="jiwer")

    report = scored_run().report(RUN, 2.0, wer_fn=missing)
    assert report.wer is None and "jiwer" in report.wer_note


def test_interims_line_counts_the_sessions_that_had_none() -> None:
    """Time to first interim leaves out sessions that never had one; the interims line says
    how many completed sessions that was. Not shown with interim results off."""
    run = LoadRecorder()
    talky, quiet, gone = (run.session(f"{i}.wav") for i in range(3))
    for rec in (talky, quiet, gone):
        rec.connecting(0.0)
        rec.started(0.01, "sid")
        streamed(rec, 10)  # 1 s of audio each
        rec.ack(1.05, 9)
    talky.transcript(0.5, 0, False, 0.0, 0.4, "hel")
    talky.transcript(0.8, 0, False, 0.0, 0.7, "hello")
    gone.transcript(0.5, 0, False, 0.0, 0.4, "x")
    for rec in (talky, quiet):
        rec.transcript(1.1, 0, True, 0.0, 1.0, "hello")
        complete(rec, 1.2, finals=1, audio_s=1.0)
    gone.connection_closed(1.2, 1011, "worker failed")
    report = run.report(RUN, 2.0)
    line = next(x for x in report.render_table().splitlines() if x.startswith("interims:"))
    assert line.split("; ") == [
        "interims: 3 received, 1.00 per second of audio sent",
        "1 of 2 completed session(s) had none",
    ]
    assert report.metrics["first_interim_s"].count == 2  # talky and gone; quiet not
    off = run.report(dataclasses.replace(RUN, interim_results=False), 2.0)
    assert "interims:" not in off.render_table()


def test_json_round_trip() -> None:
    """A report written as JSON reads back into an equal report, per-session details
    included; a report of another version is refused."""
    report = scored_run().report(RUN, 2.0, wer_fn=wer)
    data = json.loads(report.to_json())
    assert data["version"] == 1
    assert data["metrics"]["ack_latency_s"]["count"] == 12
    assert data["per_session"][0]["text"] == "the cat sat town"
    back = LoadReport.from_dict(data)
    assert back == report
    assert data["lanes"]["normal"]["sessions"] == 4
    assert back.lanes["normal"].final_lag == report.lanes["normal"].final_lag
    with pytest.raises(ValueError, match="version"):
        LoadReport.from_dict({**data, "version": 99})
    # A report written before priority lanes: no `lanes`, no per-session `priority`.
    older = {k: v for k, v in data.items() if k != "lanes"}
    older["per_session"] = [
        {k: v for k, v in s.items() if k != "priority"} for s in data["per_session"]
    ]
    del older["run"]["high_share"]
    old = LoadReport.from_dict(older)
    assert old.lanes == {} and {s.priority for s in old.per_session} == {"normal"}
    assert "by priority" not in old.render_table()


def test_table_contents() -> None:
    """The table shows the files streamed, outcomes, each metric's count and percentiles
    in ms, audio, frames, finals, errors by close code and WER."""
    report = scored_run().report(RUN, 2.0, wer_fn=wer)
    table = report.render_table()
    assert "  audio: a.wav\n" in table
    many = dataclasses.replace(RUN, audio=tuple(f"/clips/f{i}.wav" for i in range(6)))
    assert (
        "  audio: f0.wav, f1.wav, f2.wav, and 3 more\n"
        in scored_run().report(many, 2.0).render_table()
    )
    assert "sessions: 3 completed, 1 failed, 0 unfinished (of 4)" in table
    ack = next(line for line in table.splitlines() if line.startswith("ack latency"))
    # 12 samples, three each of 100, 200, 300, 400 ms (frames sent at 0.1..0.4, acked at
    # 0.5): p50 = rank 6 = 200, p95 = rank ceil(11.4) = 12 = 400
    assert ack.split() == ["ack", "latency", "12", "200.0", "400.0", "400.0", "400.0"]
    first = next(line for line in table.splitlines() if line.startswith("time to first"))
    assert first.split()[-5:] == ["0", "-", "-", "-", "-"]
    assert "audio seconds: 1.2 sent, 1.2 acknowledged, 1.2 processed" in table
    assert "frames: 12 sent, 12 acknowledged" in table
    assert "finals: 3 received, 3 reported in session.closed" in table
    assert "interims: 0 received, 0.00 per second of audio sent; 3 of 3 completed" in table
    assert "errors by close code: no connection: 1" in table
    assert "connection failures: OSError: boom: 1" in table
    assert "WER: 16.7% over 2 completed session(s), 6 reference words" in table
