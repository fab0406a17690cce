"""`gateway.upload`: what a `/v1/jobs` client may send when, its limits at their edges,
and the JSON the server sends, without a socket or Redis."""

from __future__ import annotations

import json
from typing import Any

import pytest

from gateway.upload import (
    Keepalive,
    Submit,
    Upload,
    UploadState,
    job_created,
    job_finished,
    job_progress,
    job_queued,
    parse_job_text,
    progress_view,
)
from shared.errors import BadRequest, FrameTooLarge, ProtocolViolation
from shared.jobs import JobInfo, JobParams, JobSegment
from shared.keys import JobId

JID = JobId("ab" * 16)
SUBMIT = json.dumps({"type": "submit"})


def upload(max_audio_s: float = 1.0, **params: Any) -> Upload:
    return Upload(JobParams(**params), max_audio_s=max_audio_s, max_text_frame_bytes=64)


def info(state: str, **fields: object) -> JobInfo:
    base: dict[str, object] = {"state": state, "sample_rate": "16000", "channels": "1"}
    base.update({"audio_bytes": "32000", "done_bytes": "16000", "submitted_ms": "5"})
    base.update(fields)
    return JobInfo.from_hash(JID, {k: str(v) for k, v in base.items()})


def test_exactly_the_limit_is_accepted_and_one_byte_more_is_not() -> None:
    up = upload(1.0)
    assert up.max_bytes == 32000
    up.receive_audio(31998)
    with pytest.raises(BadRequest, match="job_max_audio_s"):
        up.receive_audio(4)
    assert up.size == 31998  # the refused message was not counted
    up.receive_audio(2)
    assert isinstance(up.receive_text(SUBMIT), Submit)
    assert up.state is UploadState.SUBMITTED and up.seconds == 1.0


def test_the_limit_follows_the_declared_format() -> None:
    """Stereo float at 48 kHz: 8 bytes per sample instant, 384000 per second."""
    up = upload(0.5, sample_rate=48000, encoding="pcm_f32le", channels=2)
    assert up.max_bytes == 192000


def test_messages_of_any_size_but_the_whole_must_be_whole_samples() -> None:
    up = upload(channels=2)  # 4 bytes per sample instant
    up.receive_audio(3)
    up.receive_audio(0)
    with pytest.raises(BadRequest, match="whole samples"):
        up.receive_text(SUBMIT)
    up.receive_audio(1)
    assert isinstance(up.receive_text(SUBMIT), Submit)


def test_submit_without_audio_is_refused() -> None:
    up = upload()
    assert isinstance(up.receive_text('{"type": "keepalive"}'), Keepalive)
    with pytest.raises(BadRequest, match="no audio"):
        up.receive_text(SUBMIT)
    assert up.state is UploadState.UPLOADING


def test_after_submit_only_keepalive_is_allowed() -> None:
    up = upload()
    up.receive_audio(2)
    up.receive_text(SUBMIT)
    assert isinstance(up.receive_text('{"type": "keepalive"}'), Keepalive)
    with pytest.raises(ProtocolViolation, match="after submit"):
        up.receive_audio(2)
    with pytest.raises(ProtocolViolation, match="submit was sent already"):
        up.receive_text(SUBMIT)


@pytest.mark.parametrize(
    "text",
    ["nope", "[1]", "{}", '{"type": 1}', '{"type": "close_stream"}', '{"type": "resume"}'],
)
def test_any_other_text_is_a_protocol_violation(text: str) -> None:
    with pytest.raises(ProtocolViolation):
        parse_job_text(text)


def test_a_text_message_over_the_limit_is_too_large() -> None:
    with pytest.raises(FrameTooLarge, match="65 bytes exceeds 64"):
        upload().receive_text('{"type": "keepalive", "x": "' + "x" * 35 + '"}')


def test_the_server_messages() -> None:
    assert json.loads(job_created(JID, 3600.0)) == {
        "type": "job.created",
        "job_id": JID,
        "max_audio_seconds": 3600.0,
    }
    assert json.loads(job_queued(JID, 1.23456, 3)) == {
        "type": "job.queued",
        "job_id": JID,
        "audio_seconds": 1.235,
        "position": 3,
    }
    view = progress_view(info("running"), 0)
    assert json.loads(job_progress(view)) == {
        "type": "job.progress",
        "job_id": JID,
        "state": "running",
        "done_seconds": 0.5,
        "audio_seconds": 1.0,
        "position": 0,
    }
    assert "position" not in progress_view(info("running"), None)


def test_done_carries_the_segments_and_failed_the_error() -> None:
    segments = [JobSegment(0.0, 1.0, " Hi.")]
    done = json.loads(job_finished(info("done", finished_ms=9), segments))
    assert (done["type"], done["text"], len(done["segments"])) == ("job.done", "Hi.", 1)
    failed = json.loads(job_finished(info("failed", error="boom"), None))
    assert (failed["type"], failed["error"]) == ("job.failed", "boom")
    assert "segments" not in failed
