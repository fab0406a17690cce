"""File jobs' shared pieces without Redis: the upload's query, segments' encoding, the
public view of a job."""

from __future__ import annotations

import pytest

from shared.envelope import Word
from shared.errors import BadRequest
from shared.jobs import (
    MAX_NAME_CHARS,
    JobInfo,
    JobParams,
    JobSegment,
    decode_segment,
    encode_segment,
    is_job_id,
    new_job_id,
    parse_job_query,
    transcript_text,
)
from shared.keys import JobId


def test_query_takes_the_listen_endpoints_audio_parameters_and_a_name() -> None:
    params = parse_job_query("sample_rate=8000&encoding=pcm_f32le&channels=2&language=de&name=a b")
    assert params == JobParams(8000, "pcm_f32le", 2, "de", "a b")
    assert params.bytes_per_second == 8000 * 4 * 2
    assert params.seconds(64_000) == 1.0
    assert parse_job_query("") == JobParams()


@pytest.mark.parametrize(
    ("query", "words"),
    [
        ("session_id=" + "a" * 32, "unknown query parameter"),
        ("interim_results=false", "unknown query parameter"),
        ("priority=high", "unknown query parameter"),
        ("sample_rate=7999", "sample_rate"),
        ("encoding=mp3", "encoding"),
        ("name=a&name=b", "'name' given 2 times"),
        ("name=" + "x" * (MAX_NAME_CHARS + 1), "at most 200"),
        ("name=%0a", "printable"),
    ],
)
def test_bad_queries_are_refused_with_the_reason(query: str, words: str) -> None:
    with pytest.raises(BadRequest, match=words):
        parse_job_query(query)


def test_a_name_of_the_most_characters_is_allowed() -> None:
    assert parse_job_query("name=" + "x" * MAX_NAME_CHARS).name == "x" * MAX_NAME_CHARS


def test_segments_round_trip_through_their_encoding() -> None:
    seg = JobSegment(1.5, 3.25, " Hello there.", (Word(" Hello", 1.5, 2.0, 0.875),))
    assert decode_segment(encode_segment(seg)) == seg
    assert decode_segment(encode_segment(JobSegment(0, 1, ""))) == JobSegment(0.0, 1.0, "")
    assert transcript_text([seg, JobSegment(4, 5, "  "), JobSegment(5, 6, " Bye.")]) == (
        "Hello there. Bye."
    )


def test_job_ids_are_random_hex() -> None:
    a, b = new_job_id(), new_job_id()
    assert a != b and is_job_id(a) and not is_job_id(a.upper()) and not is_job_id(a[:-1])


def test_the_public_view_of_a_job() -> None:
    jid = JobId("ab" * 16)
    fields = {
        "state": "failed",
        "sample_rate": "16000",
        "encoding": "pcm_s16le",
        "channels": "1",
        "language": "",
        "name": "call.wav",
        "audio_bytes": "64000",
        "done_bytes": "32000",
        "epoch": "2",
        "runs": "2",
        "submitted_ms": "1000",
        "key_id": "abc",
        "error": "boom",
    }
    info = JobInfo.from_hash(jid, fields)
    view = info.to_json(position=3, segments=[JobSegment(0, 1, " hi")])
    assert view["state"] == "failed" and view["error"] == "boom" and view["position"] == 3
    assert view["audio_seconds"] == 2.0 and view["done_seconds"] == 1.0
    assert view["started_ms"] is None and view["submitted_ms"] == 1000
    assert view["text"] == "hi" and view["segments"][0]["text"] == " hi"
    assert "key_id" not in view  # never shown
    with pytest.raises(ValueError, match="no valid state"):
        JobInfo.from_hash(jid, {**fields, "state": "lost"})
