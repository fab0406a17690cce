"""Bad input never crashes the sans-I/O cores: on any input, each parser returns a value
or raises the one error type its caller turns into a clear error (hypothesis).

- the gateway's query parser and connection state machine (shared/protocol.py): a
  `StreamscribeError`, which `Connection._fail` maps to an `error` message and a close
  code of protocol.md;
- the stream entry decoder (shared/envelope.py): an `EnvelopeError`, which the worker
  logs and skips (`Worker._route`, `Worker._take`).

An exception of any other type would reach the connection's or the worker's catch-all
(1011, or a session task failing) instead.
"""

from __future__ import annotations

from typing import Any

import msgpack
from hypothesis import example, given
from hypothesis import strategies as st

from shared import envelope
from shared.envelope import VERSION
from shared.errors import EnvelopeError, StreamscribeError
from shared.protocol import QUERY_PARAMS, ServerSession, SessionParams, parse_query

PROTOCOL_CLOSE_CODES = {1008, 1009, 4400, 4403}

QUERY_NAMES = [*sorted(QUERY_PARAMS), "other"]
query_values = st.one_of(
    st.text(max_size=20),
    st.integers(-(2**70), 2**70).map(str),
    st.sampled_from([18, 19, 4301, 6000]).map(lambda n: "9" * n),  # int(): <= 4,300 digits
    st.sampled_from(["16000", "8000", "48000", "0", "-1", "1e3", "nan", "pcm_s16le"]),
    st.sampled_from(["pcm_f32le", "true", "false", "en", "auto", "high", "normal", "a" * 32]),
)
queries = st.one_of(
    st.text(max_size=200),
    st.lists(st.tuples(st.sampled_from(QUERY_NAMES), query_values), max_size=8).map(
        lambda pairs: "&".join(f"{k}={v}" for k, v in pairs)
    ),
)


@given(queries)
@example("sample_rate=" + "9" * 4301)  # found by this test: int() refuses past 4,300 digits
def test_any_query_string_gives_params_or_a_bad_request(query: str) -> None:
    try:
        params = parse_query(query)
    except StreamscribeError as err:
        assert err.close_code == 4400, err
        return
    assert 8000 <= params.sample_rate <= 48000
    assert params.bytes_per_frame > 0


def values(ints: st.SearchStrategy[int]) -> st.SearchStrategy[Any]:
    """JSON-like values (msgpack's too, with `ints` in its 64-bit range)."""
    return st.recursive(
        st.none()
        | st.booleans()
        | ints
        | st.floats(allow_nan=True, allow_infinity=True)
        | st.text(max_size=40),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner),
        max_leaves=12,
    )


json_values = values(st.integers(-(2**70), 2**70))
msgpack_values = values(st.integers(-(2**63), 2**64 - 1))
message_fields = st.dictionaries(
    st.sampled_from(["type", "session_id", "resume_token", "last_result_id", "x"]),
    st.one_of(
        st.sampled_from(["resume", "finalize", "close_stream", "keepalive", "audio", ""]),
        json_values,
    ),
    max_size=5,
)
texts = st.one_of(
    st.text(max_size=200),
    message_fields.map(lambda fields: _json(fields)),
    json_values.map(lambda value: _json(value)),
)


def _json(value: Any) -> str:
    import json

    return json.dumps(value)


@given(st.lists(texts, min_size=1, max_size=4), st.booleans())
def test_any_text_messages_give_a_message_or_a_protocol_error(
    messages: list[str], resuming: bool
) -> None:
    session = ServerSession(SessionParams(), resuming=resuming)
    for text in messages:
        try:
            session.receive_text(text)
        except StreamscribeError as err:
            assert err.close_code in PROTOCOL_CLOSE_CODES, err
            return


@given(st.lists(st.binary(max_size=64), min_size=1, max_size=6))
def test_any_audio_frames_give_chunks_in_order_or_a_protocol_error(frames: list[bytes]) -> None:
    session = ServerSession(SessionParams(), resuming=False)
    seq = 0
    for data in frames:
        try:
            chunk = session.receive_audio(data)
        except StreamscribeError as err:
            assert err.close_code in PROTOCOL_CLOSE_CODES, err
            return
        assert chunk is not None and chunk.seq == seq and chunk.pcm == data
        seq += 1


ENVELOPE_NAMES = "v t seq pcm kind reason sid rid final start end text words ep audio_s finals conn"
envelope_fields = st.dictionaries(
    st.sampled_from([*ENVELOPE_NAMES.split(), "x"]),
    st.one_of(
        st.sampled_from(
            ["audio", "control", "dispatch", "transcript", "closed", "replaced", "close"]
        ),
        st.just(VERSION),
        st.binary(max_size=8),
        msgpack_values,
        st.lists(
            st.tuples(msgpack_values, msgpack_values, msgpack_values, msgpack_values), max_size=3
        ),
    ),
    max_size=10,
)


#: One well-formed envelope of each tag, as `envelope.encode` writes them.
WELL_FORMED: list[dict[str, Any]] = [
    {"v": VERSION, "t": "audio", "seq": 3, "pcm": b"\x00\x00"},
    {"v": VERSION, "t": "control", "kind": "close", "reason": "client_closed"},
    {"v": VERSION, "t": "dispatch", "sid": "ab" * 16},
    {
        "v": VERSION,
        "t": "transcript",
        "rid": 0,
        "final": True,
        "start": 0.0,
        "end": 1.0,
        "text": "hi",
        "words": [["hi", 0.0, 1.0, 0.9]],
        "ep": 2,
    },
    {"v": VERSION, "t": "closed", "reason": "client_closed", "audio_s": 1.0, "finals": 1},
    {"v": VERSION, "t": "replaced", "conn": "gw/1"},
]


@st.composite
def damaged(draw: st.DrawFn) -> bytes:
    """A well-formed envelope with some fields replaced by anything, or taken out."""
    body = dict(draw(st.sampled_from(WELL_FORMED)))
    for name in draw(st.lists(st.sampled_from(sorted(body)), max_size=3)):
        if draw(st.booleans()):
            body[name] = draw(
                st.one_of(
                    st.sampled_from([float("inf"), float("-inf"), float("nan"), 2**64 - 1]),
                    msgpack_values,
                    st.binary(max_size=8),
                )
            )
        else:
            body.pop(name, None)
    return bytes(msgpack.packb(body))


@given(st.one_of(damaged(), st.binary(max_size=64), envelope_fields.map(msgpack.packb)))
@example(msgpack.packb({"v": VERSION, "t": "audio", "seq": float("inf"), "pcm": b""}))  # found
def test_any_stream_entry_gives_an_envelope_or_an_envelope_error(data: bytes) -> None:
    try:
        envelope.decode(data)
    except EnvelopeError:
        pass
