"""Protocol v1 (see docs/protocol.md), sans I/O: text and bytes in, typed values out.

Nothing here awaits, touches a socket, Redis or the clock. The gateway feeds each client
frame to a `ServerSession` and acts on what it returns; the client SDK and the load
tester use the same parsers and builders for the other direction.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

from shared import PROTOCOL_VERSION
from shared.envelope import AudioChunk, Closed, Transcript, Word
from shared.errors import BadRequest, Forbidden, ProtocolViolation, StreamscribeError

ENCODINGS: dict[str, int] = {"pcm_s16le": 2, "pcm_f32le": 4}  # bytes per sample
MIN_SAMPLE_RATE = 8000
MAX_SAMPLE_RATE = 48000
#: Dispatch lanes, highest first (the `priority` query parameter).
PRIORITIES: tuple[str, ...] = ("high", "normal")

QUERY_PARAMS = frozenset(
    {
        "priority",
        "sample_rate",
        "encoding",
        "channels",
        "language",
        "interim_results",
        "model",
        "session_id",
        "access_token",
    }
)


# --- connection parameters -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SessionParams:
    """What the client declared in the query string of `GET /v1/listen`."""

    sample_rate: int = 16000
    encoding: str = "pcm_s16le"
    channels: int = 1
    language: str | None = None
    interim_results: bool = True
    model: str | None = None
    session_id: str | None = None
    access_token: str | None = None
    #: Dispatch lane: `high` sessions are admitted strictly before `normal` ones.
    priority: str = "normal"

    @property
    def bytes_per_frame(self) -> int:
        """Bytes of one sample instant across all channels."""
        return ENCODINGS[self.encoding] * self.channels

    @property
    def bytes_per_second(self) -> int:
        return self.bytes_per_frame * self.sample_rate


def _single(query: Mapping[str, Sequence[str]], name: str) -> str | None:
    values = query.get(name)
    if not values:
        return None
    if len(values) > 1:
        raise BadRequest(f"query parameter {name!r} given {len(values)} times")
    return values[0]


#: A whole-number query parameter longer than this is refused before it is read.
MAX_INT_DIGITS = 18


def _int_param(query: Mapping[str, Sequence[str]], name: str, default: int) -> int:
    raw = _single(query, name)
    if raw is None:
        return default
    if not (raw.isascii() and raw.isdigit()):
        raise BadRequest(f"query parameter {name!r} must be a whole number, got {raw!r}")
    if len(raw) > MAX_INT_DIGITS:  # int() refuses past 4,300 digits, with a ValueError
        raise BadRequest(f"query parameter {name!r} has too many digits ({len(raw)})")
    return int(raw)


def valid_language(language: str) -> bool:
    """`auto`, or an ISO 639 code: 2-3 lower-case ASCII letters (the `language` parameter)."""
    return language == "auto" or (
        2 <= len(language) <= 3 and language.isascii() and language.isalpha() and language.islower()
    )


def read_query(query: str | Mapping[str, Sequence[str]]) -> Mapping[str, Sequence[str]]:
    """A query string's parameters (each with its values), at most 32 of them; an
    unreadable one raises `BadRequest`. An already parsed mapping is returned as is."""
    if not isinstance(query, str):
        return query
    try:
        return parse_qs(query, keep_blank_values=True, strict_parsing=False, max_num_fields=32)
    except ValueError as exc:
        raise BadRequest(f"unreadable query string: {exc}") from None


def parse_query(query: str | Mapping[str, Sequence[str]]) -> SessionParams:
    """Validate the query string; every problem raises `BadRequest` (close 4400)."""
    parsed = read_query(query)
    unknown = sorted(set(parsed) - QUERY_PARAMS)
    if unknown:
        raise BadRequest(f"unknown query parameter(s): {', '.join(unknown)}")
    rate = _int_param(parsed, "sample_rate", 16000)
    if not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
        raise BadRequest(f"sample_rate must be {MIN_SAMPLE_RATE}..{MAX_SAMPLE_RATE} Hz, got {rate}")
    encoding = _single(parsed, "encoding")
    encoding = "pcm_s16le" if encoding is None else encoding
    if encoding not in ENCODINGS:
        raise BadRequest(f"encoding must be one of {', '.join(ENCODINGS)}, got {encoding!r}")
    channels = _int_param(parsed, "channels", 1)
    if channels not in (1, 2):
        raise BadRequest(f"channels must be 1 or 2, got {channels}")
    language = _single(parsed, "language")
    if language is not None and not valid_language(language):
        raise BadRequest(
            f"language must be an ISO 639 code such as 'en', or 'auto', got {language!r}"
        )
    interim_raw = _single(parsed, "interim_results")
    if interim_raw is None:
        interim = True
    elif interim_raw.lower() in ("true", "1"):
        interim = True
    elif interim_raw.lower() in ("false", "0"):
        interim = False
    else:
        raise BadRequest(f"interim_results must be true or false, got {interim_raw!r}")
    model = _single(parsed, "model")
    if model is not None and not (0 < len(model) <= 200):
        raise BadRequest("model must be a non-empty name of at most 200 characters")
    session_id = _single(parsed, "session_id")
    if session_id is not None and not (len(session_id) == 32 and _is_hex(session_id)):
        raise BadRequest("session_id must be 32 lowercase hexadecimal characters")
    priority = _single(parsed, "priority")
    priority = "normal" if priority is None else priority
    if priority not in PRIORITIES:
        raise BadRequest(f"priority must be one of {', '.join(PRIORITIES)}, got {priority!r}")
    return SessionParams(
        sample_rate=rate,
        encoding=encoding,
        channels=channels,
        language=language,
        interim_results=interim,
        model=model,
        session_id=session_id,
        access_token=_single(parsed, "access_token"),
        priority=priority,
    )


def _is_hex(value: str) -> bool:
    return all(c in "0123456789abcdef" for c in value)


# --- client -> server messages ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Resume:
    session_id: str
    resume_token: str
    last_result_id: int


@dataclass(frozen=True, slots=True)
class Finalize:
    pass


@dataclass(frozen=True, slots=True)
class CloseStream:
    pass


@dataclass(frozen=True, slots=True)
class Keepalive:
    pass


ClientMessage = Resume | Finalize | CloseStream | Keepalive


def _load_object(text: str, who: str) -> dict[str, Any]:
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError):
        raise ProtocolViolation(f"{who} text frame is not valid JSON") from None
    if not isinstance(obj, dict):
        raise ProtocolViolation(f"{who} text frame must be a JSON object")
    if not isinstance(obj.get("type"), str):
        raise ProtocolViolation(f"{who} message has no string 'type' field")
    return obj


def parse_client_text(text: str) -> ClientMessage:
    """Parse a client's JSON text frame. Not JSON / unknown type: 1008; bad fields: 4400."""
    obj = _load_object(text, "client")
    kind = obj["type"]
    if kind == "finalize":
        return Finalize()
    if kind == "close_stream":
        return CloseStream()
    if kind == "keepalive":
        return Keepalive()
    if kind == "resume":
        sid, token, last = obj.get("session_id"), obj.get("resume_token"), obj.get("last_result_id")
        if not isinstance(sid, str) or not isinstance(token, str):
            raise BadRequest("resume needs string fields session_id and resume_token")
        if isinstance(last, bool) or not isinstance(last, int) or last < -1:
            raise BadRequest("resume needs an integer last_result_id >= -1")
        return Resume(session_id=sid, resume_token=token, last_result_id=last)
    raise ProtocolViolation(f"unknown message type {kind!r}")


def build_client_message(msg: ClientMessage) -> str:
    if isinstance(msg, Resume):
        return json.dumps(
            {
                "type": "resume",
                "session_id": msg.session_id,
                "resume_token": msg.resume_token,
                "last_result_id": msg.last_result_id,
            }
        )
    name = {Finalize: "finalize", CloseStream: "close_stream", Keepalive: "keepalive"}[type(msg)]
    return json.dumps({"type": name})


# --- server -> client messages ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SessionStarted:
    session_id: str
    resume_token: str
    sample_rate: int
    protocol: int = PROTOCOL_VERSION


@dataclass(frozen=True, slots=True)
class SessionResumed:
    session_id: str
    next_seq: int


@dataclass(frozen=True, slots=True)
class Ack:
    seq: int


@dataclass(frozen=True, slots=True)
class Queued:
    position: int


@dataclass(frozen=True, slots=True)
class ErrorMessage:
    code: str
    message: str


ServerMessage = SessionStarted | SessionResumed | Ack | Queued | ErrorMessage | Transcript | Closed


#: An ack's text as `build_server_message(Ack(seq))` writes it, `% seq`: the gateway sends
#: it without the JSON encoder, and the load generator reads it without the decoder.
ACK_TEXT = '{"type": "ack", "seq": %d}'


def build_server_message(msg: ServerMessage) -> str:
    """The JSON text frame for a server message, exactly as protocol.md specifies."""
    body: dict[str, Any]
    if isinstance(msg, Transcript):
        body = {
            "type": "transcript",
            "result_id": msg.result_id,
            "is_final": msg.is_final,
            "start": round(msg.start, 3),
            "end": round(msg.end, 3),
            "text": msg.text,
            "words": [
                {
                    "word": w.word,
                    "start": round(w.start, 3),
                    "end": round(w.end, 3),
                    "probability": round(w.probability, 4),
                }
                for w in msg.words
            ],
        }
    elif isinstance(msg, Ack):
        body = {"type": "ack", "seq": msg.seq}
    elif isinstance(msg, SessionStarted):
        body = {
            "type": "session.started",
            "session_id": msg.session_id,
            "resume_token": msg.resume_token,
            "protocol": msg.protocol,
            "sample_rate": msg.sample_rate,
        }
    elif isinstance(msg, SessionResumed):
        body = {"type": "session.resumed", "session_id": msg.session_id, "next_seq": msg.next_seq}
    elif isinstance(msg, Queued):
        body = {"type": "queued", "position": msg.position}
    elif isinstance(msg, Closed):
        body = {
            "type": "session.closed",
            "reason": msg.reason,
            "audio_seconds": round(msg.audio_seconds, 3),
            "final_results": msg.final_results,
        }
    elif isinstance(msg, ErrorMessage):
        body = {"type": "error", "code": msg.code, "message": msg.message}
    else:  # pragma: no cover - exhaustive above
        raise TypeError(f"not a server message: {msg!r}")
    return json.dumps(body, ensure_ascii=False)


def error_message(err: StreamscribeError) -> ErrorMessage:
    return ErrorMessage(code=err.code, message=err.message)


def parse_server_text(text: str) -> ServerMessage:
    """Parse a server's JSON text frame (client side). Unknown types raise ProtocolViolation."""
    obj = _load_object(text, "server")
    kind = obj["type"]
    try:
        if kind == "transcript":
            return Transcript(
                result_id=int(obj["result_id"]),
                is_final=bool(obj["is_final"]),
                start=float(obj["start"]),
                end=float(obj["end"]),
                text=str(obj["text"]),
                words=tuple(
                    Word(
                        str(w["word"]), float(w["start"]), float(w["end"]), float(w["probability"])
                    )
                    for w in obj["words"]
                ),
            )
        if kind == "ack":
            return Ack(seq=int(obj["seq"]))
        if kind == "session.started":
            return SessionStarted(
                session_id=str(obj["session_id"]),
                resume_token=str(obj["resume_token"]),
                sample_rate=int(obj["sample_rate"]),
                protocol=int(obj["protocol"]),
            )
        if kind == "session.resumed":
            return SessionResumed(session_id=str(obj["session_id"]), next_seq=int(obj["next_seq"]))
        if kind == "queued":
            return Queued(position=int(obj["position"]))
        if kind == "session.closed":
            return Closed(
                reason=obj["reason"],
                audio_seconds=float(obj["audio_seconds"]),
                final_results=int(obj["final_results"]),
            )
        if kind == "error":
            return ErrorMessage(code=str(obj["code"]), message=str(obj["message"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise ProtocolViolation(f"malformed {kind!r} message from server: {exc!r}") from None
    raise ProtocolViolation(f"unknown server message type {kind!r}")


# --- the server's view of one connection -----------------------------------------------


class ConnectionState(enum.Enum):
    AWAITING_RESUME = "awaiting_resume"  # opened with session_id; only `resume` may come
    STREAMING = "streaming"  # audio and control messages accepted
    CLOSING = "closing"  # close_stream received: waiting for the last finals
    CLOSED = "closed"


class ServerSession:
    """State of one client connection: numbers audio frames and checks message order.

    Every operation checks the state; a call in the wrong state raises an error whose
    message names the state. The caller turns errors into `error` + close frames.
    """

    def __init__(self, params: SessionParams, *, resuming: bool, next_seq: int = 0) -> None:
        self.params = params
        self.state = ConnectionState.AWAITING_RESUME if resuming else ConnectionState.STREAMING
        self.next_seq = next_seq
        self.bytes_received = 0
        #: Set when the server ended the stream (idle timeout, max duration): audio that
        #: was already in flight is dropped unacknowledged instead of being an error.
        self.server_ended = False

    def receive_text(self, text: str) -> ClientMessage:
        if self.state is ConnectionState.AWAITING_RESUME:
            try:
                msg = parse_client_text(text)
            except StreamscribeError as err:  # anything but a valid resume first: 4403
                raise Forbidden(f"expected a valid 'resume' message first: {err.message}") from None
        else:
            msg = parse_client_text(text)
        if self.state is ConnectionState.AWAITING_RESUME:
            if not isinstance(msg, Resume):
                raise Forbidden(
                    f"connection opened with session_id must send 'resume' first, not {_name(msg)}"
                )
            return msg
        if isinstance(msg, Resume):
            raise ProtocolViolation(f"'resume' is only allowed first (state: {self.state.value})")
        if isinstance(msg, Keepalive) or (self.server_ended and not isinstance(msg, Resume)):
            return msg
        self._require_streaming(_name(msg))
        if isinstance(msg, CloseStream):
            self.state = ConnectionState.CLOSING
        return msg

    def receive_audio(self, data: bytes) -> AudioChunk | None:
        """Number one audio frame; None if the server already ended the stream."""
        if self.state is ConnectionState.AWAITING_RESUME:
            raise Forbidden("connection opened with session_id must send 'resume' before audio")
        if self.server_ended and self.state is ConnectionState.CLOSING:
            return None
        self._require_streaming("audio")
        if not data:
            raise BadRequest("empty audio frame")
        if len(data) % self.params.bytes_per_frame:
            raise BadRequest(
                f"audio frame of {len(data)} bytes does not hold whole samples "
                f"({self.params.bytes_per_frame} bytes per sample instant for "
                f"{self.params.encoding} x {self.params.channels} channel(s))"
            )
        chunk = AudioChunk(seq=self.next_seq, pcm=data)
        self.next_seq += 1
        self.bytes_received += len(data)
        return chunk

    def resumed(self, next_seq: int, *, open_: bool = True) -> None:
        """Resume accepted; `open_` False when the session no longer takes audio."""
        if self.state is not ConnectionState.AWAITING_RESUME:
            raise ProtocolViolation(f"not awaiting resume (state: {self.state.value})")
        self.state = ConnectionState.STREAMING if open_ else ConnectionState.CLOSING
        # A session that no longer takes audio: re-sent audio and a repeated close_stream
        # from a resuming client are dropped, not errors.
        self.server_ended = not open_
        self.next_seq = next_seq

    def mark_closing(self) -> None:
        """The server ended the stream itself (idle timeout, max duration)."""
        if self.state is ConnectionState.STREAMING:
            self.state = ConnectionState.CLOSING
            self.server_ended = True

    def mark_closed(self) -> None:
        self.state = ConnectionState.CLOSED

    def _require_streaming(self, what: str) -> None:
        if self.state is not ConnectionState.STREAMING:
            raise ProtocolViolation(
                f"{what} is not allowed after close_stream (state: {self.state.value})"
                if self.state is ConnectionState.CLOSING
                else f"{what} is not allowed in state {self.state.value}"
            )


def _name(msg: ClientMessage) -> str:
    return {
        Resume: "resume",
        Finalize: "finalize",
        CloseStream: "close_stream",
        Keepalive: "keepalive",
    }[type(msg)]
