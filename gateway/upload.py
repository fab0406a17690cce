"""A file job's upload over `GET /v1/jobs`, sans I/O: what the client may send when, and
the JSON the server sends (docs/protocol.md, *File jobs*).

Nothing here awaits or touches a socket, Redis or the clock: gateway/jobs.py feeds each
client message to an `Upload` and acts on what it returns, as gateway/connection.py does
with `shared.protocol.ServerSession`.

The client sends the file's audio as binary messages of any size, then `submit`;
`keepalive` may come at any time and is ignored. Only the whole upload must hold whole
sample frames, and at most `job_max_audio_s` of audio (exactly that much is allowed).
"""

from __future__ import annotations

import enum
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from shared.errors import BadRequest, FrameTooLarge, ProtocolViolation
from shared.jobs import JobInfo, JobParams, JobSegment
from shared.keys import JobId


class UploadState(enum.Enum):
    UPLOADING = "uploading"  # audio, submit and keepalive accepted
    SUBMITTED = "submitted"  # only keepalive: the job is queued


@dataclass(frozen=True, slots=True)
class Submit:
    """The upload is complete: queue the job."""


@dataclass(frozen=True, slots=True)
class Keepalive:
    """Nothing to do; allowed in every state."""


JobClientMessage = Submit | Keepalive


def parse_job_text(text: str) -> JobClientMessage:
    """A client's JSON text message on `/v1/jobs`. Not JSON, not an object, no type, or a
    type other than `submit` and `keepalive`: ProtocolViolation (1008)."""
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError):
        raise ProtocolViolation("client text frame is not valid JSON") from None
    if not isinstance(obj, dict):
        raise ProtocolViolation("client text frame must be a JSON object")
    kind = obj.get("type")
    if not isinstance(kind, str):
        raise ProtocolViolation("client message has no string 'type' field")
    if kind == "submit":
        return Submit()
    if kind == "keepalive":
        return Keepalive()
    raise ProtocolViolation(
        f"unknown message type {kind!r} on /v1/jobs (expected 'submit' or 'keepalive')"
    )


class Upload:
    """One upload's state: the bytes received so far, checked against the limits."""

    def __init__(self, params: JobParams, *, max_audio_s: float, max_text_frame_bytes: int) -> None:
        self.params = params
        self.max_audio_s = max_audio_s
        #: `max_audio_s` of audio in the declared format; exactly this many is allowed.
        self.max_bytes = math.floor(max_audio_s * params.bytes_per_second)
        self.max_text_frame_bytes = max_text_frame_bytes
        self.size = 0
        self.state = UploadState.UPLOADING

    @property
    def seconds(self) -> float:
        return self.params.seconds(self.size)

    def receive_audio(self, nbytes: int) -> None:
        """A binary message of `nbytes` arrived: counted, or refused (nothing counted)."""
        if self.state is not UploadState.UPLOADING:
            raise ProtocolViolation(
                f"audio is not allowed after submit (state: {self.state.value})"
            )
        if self.size + nbytes > self.max_bytes:
            raise BadRequest(
                f"the audio passes the most a file job may hold, {self.max_audio_s:g} s "
                f"({self.max_bytes} bytes of {self.params.encoding} x {self.params.channels} "
                f"at {self.params.sample_rate} Hz; job_max_audio_s)"
            )
        self.size += nbytes

    def receive_text(self, text: str) -> JobClientMessage:
        """A text message: `Submit` (once, with a valid upload) or `Keepalive`."""
        size = len(text.encode())
        if size > self.max_text_frame_bytes:
            raise FrameTooLarge(f"text message of {size} bytes exceeds {self.max_text_frame_bytes}")
        msg = parse_job_text(text)
        if isinstance(msg, Keepalive):
            return msg
        if self.state is not UploadState.UPLOADING:
            raise ProtocolViolation(f"submit was sent already (state: {self.state.value})")
        if not self.size:
            raise BadRequest("submit with no audio: send the file's audio as binary messages first")
        frame = self.params.bytes_per_frame
        if self.size % frame:
            raise BadRequest(
                f"the audio's {self.size} bytes do not hold whole samples ({frame} bytes per "
                f"sample instant for {self.params.encoding} x {self.params.channels} channel(s))"
            )
        self.state = UploadState.SUBMITTED
        return msg


# --- server -> client -------------------------------------------------------------------


def _dump(body: dict[str, Any]) -> str:
    return json.dumps(body, ensure_ascii=False)


def job_created(jid: JobId, max_audio_s: float) -> str:
    return _dump({"type": "job.created", "job_id": jid, "max_audio_seconds": max_audio_s})


def job_queued(jid: JobId, audio_seconds: float, position: int) -> str:
    return _dump(
        {
            "type": "job.queued",
            "job_id": jid,
            "audio_seconds": round(audio_seconds, 3),
            "position": position,
        }
    )


#: What a `job.progress` carries, besides its type; the gateway sends one when any of
#: them changed since the last message it sent about the job.
PROGRESS_FIELDS = ("job_id", "state", "done_seconds", "audio_seconds", "position")


def progress_view(info: JobInfo, position: int | None) -> dict[str, Any]:
    """The fields of a `job.progress` (`position` only while the job has one)."""
    view = info.to_json(position=position)
    return {name: view[name] for name in PROGRESS_FIELDS if name in view}


def job_progress(view: dict[str, Any]) -> str:
    return _dump({"type": "job.progress", **view})


def job_finished(info: JobInfo, segments: Sequence[JobSegment] | None) -> str:
    """`job.done` with every segment, or `job.failed` (with the error, no segments)."""
    if info.state == "done":
        return _dump({"type": "job.done", **info.to_json(segments=segments or ())})
    return _dump({"type": "job.failed", **info.to_json()})
