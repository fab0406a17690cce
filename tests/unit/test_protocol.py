"""Unit tests for shared/protocol.py: query parsing, message codec, connection state machine."""

from __future__ import annotations

import json

import pytest

from shared import PROTOCOL_VERSION
from shared.envelope import AudioChunk, Closed, Transcript, Word
from shared.errors import BadRequest, Forbidden, ProtocolViolation, StreamscribeError
from shared.protocol import (
    Ack,
    CloseStream,
    ConnectionState,
    ErrorMessage,
    Finalize,
    Keepalive,
    Queued,
    Resume,
    ServerMessage,
    ServerSession,
    SessionParams,
    SessionResumed,
    SessionStarted,
    build_client_message,
    build_server_message,
    error_message,
    parse_client_text,
    parse_query,
    parse_server_text,
)

SID = "0123456789abcdef0123456789abcdef"


def bad_query(query: str) -> BadRequest:
    with pytest.raises(BadRequest) as info:
        parse_query(query)
    assert info.value.close_code == 4400
    assert info.value.code == "bad_request"
    return info.value


# --- parse_query -------------------------------------------------------------------------


def test_empty_query_gives_documented_defaults() -> None:
    """An empty query string yields every default that protocol.md lists."""
    assert parse_query("") == SessionParams(
        sample_rate=16000,
        encoding="pcm_s16le",
        channels=1,
        language=None,
        interim_results=True,
        model=None,
        session_id=None,
        access_token=None,
    )


def test_query_accepts_a_mapping_like_parse_qs_output() -> None:
    """parse_query also takes an already-parsed mapping of lists."""
    params = parse_query({"sample_rate": ["8000"], "channels": ["2"]})
    assert (params.sample_rate, params.channels) == (8000, 2)


def test_mapping_with_empty_value_list_counts_as_absent() -> None:
    """A parameter mapped to an empty list falls back to its default."""
    assert parse_query({"sample_rate": []}).sample_rate == 16000


@pytest.mark.parametrize("rate", [8000, 16000, 44100, 48000])
def test_sample_rate_inside_range_is_accepted(rate: int) -> None:
    """Rates 8000..48000 inclusive are accepted as given."""
    assert parse_query(f"sample_rate={rate}").sample_rate == rate


@pytest.mark.parametrize("rate", ["7999", "48001", "0", "96000"])
def test_sample_rate_outside_range_is_rejected(rate: str) -> None:
    """Rates just outside 8000..48000 close with 4400 and the message names the range."""
    err = bad_query(f"sample_rate={rate}")
    assert "8000" in err.message and "48000" in err.message


@pytest.mark.parametrize("raw", ["abc", "16k", "16000.0", "-16000", "+16000", "", " 16000", "1e4"])
def test_sample_rate_that_is_not_a_whole_number_is_rejected(raw: str) -> None:
    """Non-numeric, signed, decimal or blank sample rates are BadRequest, not coerced."""
    err = bad_query("sample_rate=" + raw.replace("+", "%2B").replace(" ", "%20"))
    assert "sample_rate" in err.message


def test_sample_rate_with_non_ascii_digit_is_bad_request() -> None:
    """A superscript digit in sample_rate is a BadRequest (4400), not an internal error."""
    bad_query("sample_rate=%C2%B2")


def test_sample_rate_with_fullwidth_digits_is_rejected() -> None:
    """Fullwidth digits are not silently read as an ASCII number."""
    bad_query("sample_rate=" + "%EF%BC%91%EF%BC%96%EF%BC%90%EF%BC%90%EF%BC%90")


@pytest.mark.parametrize(("encoding", "width"), [("pcm_s16le", 2), ("pcm_f32le", 4)])
def test_both_encodings_are_accepted(encoding: str, width: int) -> None:
    """pcm_s16le and pcm_f32le are accepted and set the bytes per sample."""
    params = parse_query(f"encoding={encoding}")
    assert params.encoding == encoding
    assert params.bytes_per_frame == width


@pytest.mark.parametrize("encoding", ["pcm_s16be", "PCM_S16LE", "opus", "pcm_s24le", "mulaw"])
def test_unknown_encoding_is_rejected(encoding: str) -> None:
    """Any encoding other than the two documented names is BadRequest."""
    assert "encoding" in bad_query(f"encoding={encoding}").message


def test_blank_encoding_is_rejected() -> None:
    """`encoding=` with no value is BadRequest like every other blank parameter."""
    bad_query("encoding=")


@pytest.mark.parametrize("channels", [1, 2])
def test_one_or_two_channels_are_accepted(channels: int) -> None:
    """channels=1 and channels=2 are accepted."""
    assert parse_query(f"channels={channels}").channels == channels


@pytest.mark.parametrize("channels", ["0", "3", "-1", "two", ""])
def test_other_channel_counts_are_rejected(channels: str) -> None:
    """channels 0, 3, negative, non-numeric or blank are BadRequest."""
    assert "channels" in bad_query(f"channels={channels}").message


def test_bytes_per_second_combines_rate_encoding_and_channels() -> None:
    """bytes_per_second is rate x sample width x channels."""
    params = parse_query("sample_rate=8000&encoding=pcm_f32le&channels=2")
    assert params.bytes_per_frame == 8
    assert params.bytes_per_second == 64000


@pytest.mark.parametrize("language", ["en", "de", "yue", "haw", "auto"])
def test_iso_language_codes_and_auto_are_accepted(language: str) -> None:
    """Two- or three-letter lowercase codes and 'auto' are accepted."""
    assert parse_query(f"language={language}").language == language


@pytest.mark.parametrize("language", ["", "e", "engl", "EN", "En", "en-US", "en_us", "e1", "AUTO"])
def test_malformed_language_is_rejected(language: str) -> None:
    """Blank, wrong length, upper case or regional forms of language are BadRequest."""
    assert "language" in bad_query(f"language={language}").message


def test_non_ascii_language_is_rejected() -> None:
    """A language of non-ASCII letters is not an ISO 639 code and is rejected."""
    bad_query("language=%C3%A9%C3%A9")


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("true", True), ("TRUE", True), ("1", True), ("false", False), ("False", False), ("0", False)],
)
def test_interim_results_boolean_forms(raw: str, expected: bool) -> None:
    """interim_results accepts true/false (any case) and 1/0."""
    assert parse_query(f"interim_results={raw}").interim_results is expected


@pytest.mark.parametrize("raw", ["", "yes", "no", "on", "2", "t"])
def test_interim_results_other_values_are_rejected(raw: str) -> None:
    """Any other interim_results value is BadRequest rather than guessed."""
    assert "interim_results" in bad_query(f"interim_results={raw}").message


def test_model_name_is_passed_through() -> None:
    """A model name of up to 200 characters is kept as given."""
    assert parse_query("model=small.en").model == "small.en"
    assert parse_query("model=" + "m" * 200).model == "m" * 200


@pytest.mark.parametrize("model", ["", "m" * 201])
def test_blank_or_overlong_model_is_rejected(model: str) -> None:
    """An empty model name or one over 200 characters is BadRequest."""
    assert "model" in bad_query(f"model={model}").message


def test_session_id_of_32_lowercase_hex_is_accepted() -> None:
    """A session_id of exactly 32 lowercase hex digits is accepted."""
    assert parse_query(f"session_id={SID}").session_id == SID


@pytest.mark.parametrize(
    "sid", ["", SID[:-1], SID + "0", SID.upper(), SID[:-1] + "g", SID[:-1] + "-"]
)
def test_malformed_session_id_is_rejected(sid: str) -> None:
    """A session_id of the wrong length, case or alphabet is BadRequest."""
    assert "session_id" in bad_query(f"session_id={sid}").message


def test_access_token_is_kept() -> None:
    """access_token is an accepted parameter and its value is kept."""
    assert parse_query("access_token=k3y").access_token == "k3y"


def test_unknown_parameter_is_rejected_and_named() -> None:
    """An unknown query parameter is BadRequest naming the parameter."""
    assert "sampel_rate" in bad_query("sampel_rate=16000").message


@pytest.mark.parametrize(
    "name",
    [
        "sample_rate",
        "encoding",
        "channels",
        "language",
        "interim_results",
        "model",
        "session_id",
        "access_token",
    ],
)
def test_repeated_parameter_is_rejected(name: str) -> None:
    """Every documented parameter given twice (even with equal values) is BadRequest."""
    value = {
        "sample_rate": "16000",
        "encoding": "pcm_s16le",
        "channels": "1",
        "language": "en",
        "interim_results": "true",
        "model": "m",
        "session_id": SID,
        "access_token": "k",
    }[name]
    err = bad_query(f"{name}={value}&{name}={value}")
    assert name in err.message and "2 times" in err.message


def test_too_many_query_fields_is_bad_request() -> None:
    """A query string with more than 32 fields is BadRequest, not an internal error."""
    bad_query("&".join(["model=x"] * 40))


# --- parse_client_text ----------------------------------------------------------------


def violation(text: str) -> ProtocolViolation:
    with pytest.raises(ProtocolViolation) as info:
        parse_client_text(text)
    assert info.value.close_code == 1008
    assert info.value.code == "protocol_violation"
    return info.value


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"type": "finalize"}', Finalize()),
        ('{"type": "close_stream"}', CloseStream()),
        ('{"type": "keepalive"}', Keepalive()),
        (
            json.dumps(
                {"type": "resume", "session_id": SID, "resume_token": "t", "last_result_id": -1}
            ),
            Resume(SID, "t", -1),
        ),
    ],
)
def test_every_client_message_type_parses(text: str, expected: object) -> None:
    """Each documented client message parses to its typed value."""
    assert parse_client_text(text) == expected


def test_extra_fields_in_client_message_are_ignored() -> None:
    """Unknown extra fields do not make a known message invalid (the protocol may grow)."""
    assert parse_client_text('{"type": "finalize", "future": 1}') == Finalize()


@pytest.mark.parametrize("text", ["", "finalize", "{", "{'type': 'finalize'}", "\x00"])
def test_client_text_that_is_not_json_is_a_violation(text: str) -> None:
    """A client text frame that is not valid JSON closes with 1008."""
    assert "JSON" in violation(text).message


@pytest.mark.parametrize("text", ['"finalize"', "[]", "1", "null", "true"])
def test_client_json_that_is_not_an_object_is_a_violation(text: str) -> None:
    """Valid JSON that is not an object closes with 1008."""
    assert "object" in violation(text).message


@pytest.mark.parametrize("text", ["{}", '{"kind": "finalize"}', '{"type": 1}', '{"type": null}'])
def test_client_message_without_string_type_is_a_violation(text: str) -> None:
    """An object without a string 'type' closes with 1008."""
    assert "type" in violation(text).message


@pytest.mark.parametrize("kind", ["Finalize", "close", "audio", "session.started", ""])
def test_unknown_client_message_type_is_a_violation(kind: str) -> None:
    """An unknown 'type' closes with 1008 and the message names it."""
    assert repr(kind) in violation(json.dumps({"type": kind})).message


def test_deeply_nested_client_json_is_a_violation() -> None:
    """A small but deeply nested JSON frame is a 1008 violation, not an internal error."""
    violation("[" * 2000)


@pytest.mark.parametrize(
    "fields",
    [
        {"resume_token": "t", "last_result_id": 0},
        {"session_id": 5, "resume_token": "t", "last_result_id": 0},
        {"session_id": SID, "last_result_id": 0},
        {"session_id": SID, "resume_token": None, "last_result_id": 0},
        {"session_id": SID, "resume_token": "t"},
        {"session_id": SID, "resume_token": "t", "last_result_id": "0"},
        {"session_id": SID, "resume_token": "t", "last_result_id": 1.0},
        {"session_id": SID, "resume_token": "t", "last_result_id": True},
        {"session_id": SID, "resume_token": "t", "last_result_id": -2},
    ],
)
def test_resume_with_bad_fields_is_bad_request(fields: dict[str, object]) -> None:
    """A resume with a missing or mistyped field, or last_result_id < -1, closes with 4400."""
    with pytest.raises(BadRequest) as info:
        parse_client_text(json.dumps({"type": "resume", **fields}))
    assert info.value.close_code == 4400


@pytest.mark.parametrize("msg", [Finalize(), CloseStream(), Keepalive(), Resume(SID, "tok", 7)])
def test_client_messages_round_trip(msg: object) -> None:
    """build_client_message output parses back to the same message."""
    assert parse_client_text(build_client_message(msg)) == msg  # type: ignore[arg-type]


# --- server messages -------------------------------------------------------------------

TRANSCRIPT = Transcript(
    result_id=3,
    is_final=True,
    start=1.25,
    end=2.5,
    text="héllo world",
    words=(Word("héllo", 1.25, 1.75, 0.9), Word("world", 1.8, 2.5, 0.75)),
)

WIRE_CASES: list[tuple[ServerMessage, dict[str, object]]] = [
    (
        SessionStarted(SID, "tok", 44100),
        {
            "type": "session.started",
            "session_id": SID,
            "resume_token": "tok",
            "protocol": 1,
            "sample_rate": 44100,
        },
    ),
    (SessionResumed(SID, 12), {"type": "session.resumed", "session_id": SID, "next_seq": 12}),
    (Ack(9), {"type": "ack", "seq": 9}),
    (
        TRANSCRIPT,
        {
            "type": "transcript",
            "result_id": 3,
            "is_final": True,
            "start": 1.25,
            "end": 2.5,
            "text": "héllo world",
            "words": [
                {"word": "héllo", "start": 1.25, "end": 1.75, "probability": 0.9},
                {"word": "world", "start": 1.8, "end": 2.5, "probability": 0.75},
            ],
        },
    ),
    (
        Transcript(4, False, 0.0, 0.5, "partial"),
        {
            "type": "transcript",
            "result_id": 4,
            "is_final": False,
            "start": 0.0,
            "end": 0.5,
            "text": "partial",
            "words": [],
        },
    ),
    (Queued(2), {"type": "queued", "position": 2}),
    (
        Closed("idle_timeout", 12.5, 4),
        {
            "type": "session.closed",
            "reason": "idle_timeout",
            "audio_seconds": 12.5,
            "final_results": 4,
        },
    ),
    (
        ErrorMessage("bad_request", "nope"),
        {"type": "error", "code": "bad_request", "message": "nope"},
    ),
]


@pytest.mark.parametrize(("msg", "wire"), WIRE_CASES, ids=lambda v: type(v).__name__)
def test_server_message_wire_form_matches_protocol_md(
    msg: ServerMessage, wire: dict[str, object]
) -> None:
    """build_server_message emits exactly the fields and values protocol.md documents."""
    assert json.loads(build_server_message(msg)) == wire


@pytest.mark.parametrize(("msg", "wire"), WIRE_CASES, ids=lambda v: type(v).__name__)
def test_server_message_round_trips(msg: ServerMessage, wire: dict[str, object]) -> None:
    """parse_server_text(build_server_message(m)) gives back m for every message type."""
    assert parse_server_text(build_server_message(msg)) == msg


def test_session_started_carries_protocol_version() -> None:
    """session.started carries the protocol version constant (1)."""
    assert SessionStarted(SID, "t", 16000).protocol == PROTOCOL_VERSION == 1


def test_server_message_json_keeps_non_ascii_text() -> None:
    """Transcript text is sent as UTF-8 characters, not \\u escapes."""
    assert "héllo" in build_server_message(TRANSCRIPT)


def test_transcript_times_are_rounded_on_the_wire() -> None:
    """Times are rounded to milliseconds and probabilities to 4 decimals."""
    msg = Transcript(0, True, 1.23456, 2.34567, "a", (Word("a", 1.23456, 2.34567, 0.123456),))
    body = json.loads(build_server_message(msg))
    assert (body["start"], body["end"]) == (1.235, 2.346)
    assert body["words"][0] == {"word": "a", "start": 1.235, "end": 2.346, "probability": 0.1235}


def test_error_message_comes_from_the_exception() -> None:
    """error_message copies the error's code and message."""
    err = Forbidden("wrong token")
    assert error_message(err) == ErrorMessage("forbidden", "wrong token")
    assert error_message(StreamscribeError("x")).code == "internal"


def test_unknown_server_message_type_is_a_violation() -> None:
    """A server frame of an unknown type raises ProtocolViolation naming it."""
    with pytest.raises(ProtocolViolation, match=r"'session\.paused'"):
        parse_server_text('{"type": "session.paused"}')


@pytest.mark.parametrize(
    "text",
    [
        '{"type": "ack"}',
        '{"type": "ack", "seq": "x"}',
        '{"type": "transcript", "result_id": 0}',
        '{"type": "transcript", "result_id": 0, "is_final": true, "start": 0, "end": 1,'
        ' "text": "a", "words": [1]}',
        '{"type": "session.closed", "reason": "client_closed"}',
        '{"type": "session.started", "session_id": "s"}',
    ],
)
def test_malformed_server_message_is_a_violation(text: str) -> None:
    """A known server message with missing or mistyped fields raises ProtocolViolation."""
    with pytest.raises(ProtocolViolation, match="malformed"):
        parse_server_text(text)


def test_server_text_that_is_not_json_is_a_violation() -> None:
    """parse_server_text rejects text that is not JSON."""
    with pytest.raises(ProtocolViolation, match="server"):
        parse_server_text("not json")


# --- ServerSession -----------------------------------------------------------------------


def new_session(query: str = "", *, resuming: bool = False, next_seq: int = 0) -> ServerSession:
    return ServerSession(parse_query(query), resuming=resuming, next_seq=next_seq)


def test_new_session_starts_streaming() -> None:
    """A connection without session_id starts in STREAMING."""
    assert new_session().state is ConnectionState.STREAMING


def test_audio_frames_are_numbered_from_zero() -> None:
    """Audio frames of a new session get seq 0, 1, 2 and keep their bytes."""
    session = new_session()
    chunks = [session.receive_audio(b"\x01\x00" * n) for n in (1, 2, 3)]
    assert chunks == [
        AudioChunk(0, b"\x01\x00"),
        AudioChunk(1, b"\x01\x00" * 2),
        AudioChunk(2, b"\x01\x00" * 3),
    ]
    assert session.next_seq == 3
    assert session.bytes_received == 12


def test_audio_numbering_continues_from_resumed_next_seq() -> None:
    """After resumed(next_seq=41) the next audio frame is seq 41, then 42."""
    session = new_session(f"session_id={SID}", resuming=True)
    session.receive_text(build_client_message(Resume(SID, "t", -1)))
    session.resumed(41)
    assert session.state is ConnectionState.STREAMING
    first, second = session.receive_audio(b"\0\0"), session.receive_audio(b"\0\0")
    assert (first, second) == (AudioChunk(41, b"\0\0"), AudioChunk(42, b"\0\0"))


@pytest.mark.parametrize(
    ("query", "good", "bad"),
    [
        ("", [2, 4, 640], [1, 3, 641]),
        ("channels=2", [4, 8, 640], [2, 6, 642]),
        ("encoding=pcm_f32le", [4, 8, 640], [2, 6, 642]),
        ("encoding=pcm_f32le&channels=2", [8, 640], [4, 12, 644]),
    ],
)
def test_frames_must_hold_whole_samples_for_every_channel(
    query: str, good: list[int], bad: list[int]
) -> None:
    """Frames sized to whole sample instants pass; others are BadRequest (4400) and unnumbered."""
    session = new_session(query)
    for size in good:
        assert session.receive_audio(bytes(size)) is not None
    seq = session.next_seq
    for size in bad:
        with pytest.raises(BadRequest, match="whole samples") as info:
            session.receive_audio(bytes(size))
        assert info.value.close_code == 4400
    assert session.next_seq == seq


def test_empty_audio_frame_is_bad_request() -> None:
    """A zero-length binary frame is BadRequest and uses up no seq."""
    session = new_session()
    with pytest.raises(BadRequest, match="empty"):
        session.receive_audio(b"")
    assert session.next_seq == 0


def test_control_messages_while_streaming_are_returned() -> None:
    """finalize and keepalive are accepted while streaming and keep the state."""
    session = new_session()
    assert session.receive_text('{"type": "finalize"}') == Finalize()
    assert session.receive_text('{"type": "keepalive"}') == Keepalive()
    assert session.state is ConnectionState.STREAMING


def test_close_stream_moves_to_closing() -> None:
    """close_stream is returned and moves the connection to CLOSING."""
    session = new_session()
    assert session.receive_text('{"type": "close_stream"}') == CloseStream()
    assert session.state is ConnectionState.CLOSING


@pytest.mark.parametrize("text", ['{"type": "finalize"}', '{"type": "close_stream"}'])
def test_control_after_close_stream_is_a_violation_naming_the_state(text: str) -> None:
    """finalize or a second close_stream after close_stream is 1008 naming state 'closing'."""
    session = new_session()
    session.receive_text('{"type": "close_stream"}')
    with pytest.raises(ProtocolViolation, match=r"state: closing") as info:
        session.receive_text(text)
    assert info.value.close_code == 1008


def test_audio_after_close_stream_is_a_violation_naming_the_state() -> None:
    """Audio after the client's close_stream is 1008 naming state 'closing'."""
    session = new_session()
    session.receive_text('{"type": "close_stream"}')
    with pytest.raises(ProtocolViolation, match=r"audio .*state: closing"):
        session.receive_audio(b"\0\0")


def test_keepalive_after_close_stream_is_accepted() -> None:
    """keepalive stays harmless while the connection waits for its last finals."""
    session = new_session()
    session.receive_text('{"type": "close_stream"}')
    assert session.receive_text('{"type": "keepalive"}') == Keepalive()


def test_anything_after_mark_closed_is_a_violation_naming_the_state() -> None:
    """Audio or finalize in state CLOSED is 1008 naming 'closed'."""
    session = new_session()
    session.mark_closed()
    with pytest.raises(ProtocolViolation, match="closed"):
        session.receive_audio(b"\0\0")
    with pytest.raises(ProtocolViolation, match="closed"):
        session.receive_text('{"type": "finalize"}')


def test_resume_while_streaming_is_a_violation() -> None:
    """A resume message on a new session's connection is 1008 naming the state."""
    session = new_session()
    with pytest.raises(ProtocolViolation, match="state: streaming"):
        session.receive_text(build_client_message(Resume(SID, "t", -1)))


def test_resuming_connection_waits_for_resume() -> None:
    """A connection opened with session_id starts AWAITING_RESUME and accepts resume first."""
    session = new_session(f"session_id={SID}", resuming=True)
    assert session.state is ConnectionState.AWAITING_RESUME
    msg = session.receive_text(build_client_message(Resume(SID, "t", 2)))
    assert msg == Resume(SID, "t", 2)
    assert session.state is ConnectionState.AWAITING_RESUME  # until the server accepts it


@pytest.mark.parametrize(
    "text", ['{"type": "finalize"}', '{"type": "keepalive"}', '{"type": "close_stream"}']
)
def test_resuming_connection_rejects_other_messages_first(text: str) -> None:
    """Anything but resume as the first message of a resuming connection is Forbidden (4403)."""
    session = new_session(f"session_id={SID}", resuming=True)
    with pytest.raises(Forbidden, match="resume") as info:
        session.receive_text(text)
    assert info.value.close_code == 4403


def test_resuming_connection_rejects_audio_first() -> None:
    """Audio before resume on a resuming connection is Forbidden (4403)."""
    session = new_session(f"session_id={SID}", resuming=True)
    with pytest.raises(Forbidden) as info:
        session.receive_audio(b"\0\0")
    assert info.value.close_code == 4403


def test_resumed_twice_is_a_violation() -> None:
    """resumed() outside AWAITING_RESUME raises naming the state."""
    session = new_session(f"session_id={SID}", resuming=True)
    session.resumed(3)
    with pytest.raises(ProtocolViolation, match="streaming"):
        session.resumed(4)


def test_resumed_on_a_closed_session_moves_to_closing() -> None:
    """resumed(open_=False) puts the connection in CLOSING and refuses finalize."""
    session = new_session(f"session_id={SID}", resuming=True)
    session.resumed(5, open_=False)
    assert session.state is ConnectionState.CLOSING
    assert session.next_seq == 5


def test_audio_after_resuming_a_closed_session_is_dropped() -> None:
    """Audio re-sent after resuming a session the server already closed is dropped quietly."""
    session = new_session(f"session_id={SID}", resuming=True)
    session.resumed(5, open_=False)
    assert session.receive_audio(b"\0\0") is None


def test_audio_after_server_side_close_is_dropped() -> None:
    """After mark_closing (idle timeout, max duration) in-flight audio returns None."""
    session = new_session()
    session.receive_audio(b"\0\0")
    session.mark_closing()
    assert session.state is ConnectionState.CLOSING
    assert session.server_ended
    assert session.receive_audio(b"\0\0") is None
    assert session.receive_audio(b"\0") is None  # not even checked for whole samples
    assert session.next_seq == 1


def test_control_after_server_side_close_is_tolerated() -> None:
    """finalize and close_stream racing a server-side close are returned, not errors."""
    session = new_session()
    session.mark_closing()
    assert session.receive_text('{"type": "finalize"}') == Finalize()
    assert session.receive_text('{"type": "close_stream"}') == CloseStream()
    assert session.state is ConnectionState.CLOSING


def test_mark_closing_after_client_close_stream_keeps_audio_an_error() -> None:
    """mark_closing after the client's own close_stream does not excuse later audio."""
    session = new_session()
    session.receive_text('{"type": "close_stream"}')
    session.mark_closing()
    assert not session.server_ended
    with pytest.raises(ProtocolViolation):
        session.receive_audio(b"\0\0")


def test_mark_closing_while_awaiting_resume_changes_nothing() -> None:
    """mark_closing before resume leaves the connection awaiting resume."""
    session = new_session(f"session_id={SID}", resuming=True)
    session.mark_closing()
    assert session.state is ConnectionState.AWAITING_RESUME
    assert not session.server_ended


def test_invalid_json_awaiting_resume_is_forbidden() -> None:
    """Awaiting resume, anything but a valid resume (even non-JSON) is 4403 per protocol.md."""
    session = new_session(f"session_id={SID}", resuming=True)
    with pytest.raises(Forbidden):
        session.receive_text("{")


def test_a_whole_number_parameter_has_at_most_max_int_digits() -> None:
    """18 digits are read (then range-checked); 19 are refused before int() sees them."""
    assert parse_query("sample_rate=" + "0" * 13 + "16000").sample_rate == 16000
    with pytest.raises(BadRequest, match="too many digits"):
        parse_query("sample_rate=" + "0" * 14 + "16000")
