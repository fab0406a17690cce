"""The load generator reads each server message with `_parse`: acks in the gateway's
own layout without the JSON decoder, everything else (other layouts included) in full,
with the same result or the same anomaly."""

from __future__ import annotations

import json

import pytest

from gateway.connection import ack_text
from shared.envelope import Transcript
from shared.loadstats import LoadRecorder
from shared.loadtest import _parse
from shared.protocol import Ack, build_server_message, parse_server_text


def _read(raw: str | bytes) -> tuple[object, dict[int, list[str]]]:
    run = LoadRecorder()
    rec = run.session("a.wav")
    return _parse(raw, rec), run.anomalies_of


@pytest.mark.parametrize("seq", [0, 7, 123456789012])
def test_the_gateways_acks_read_as_json_would(seq: int) -> None:
    text = ack_text(seq)
    assert _read(text) == (Ack(seq), {})
    assert _read(text) == (parse_server_text(text), {})
    assert text == build_server_message(Ack(seq))


@pytest.mark.parametrize(
    "text",
    [
        '{"type":"ack","seq":5}',  # another layout: the full parse
        '{"type": "ack", "seq": 5 }',
        '{"seq": 5, "type": "ack"}',
    ],
)
def test_other_layouts_of_an_ack_are_parsed_in_full(text: str) -> None:
    assert _read(text) == (Ack(5), {})


@pytest.mark.parametrize(
    "text",
    [
        '{"type": "ack", "seq": -1}',
        '{"type": "ack", "seq": 1_0}',  # int() would take it; JSON does not
        '{"type": "ack", "seq": ١٢}',  # Unicode digits: str.isdigit() would take them
        '{"type": "ack", "seq": }',
        '{"type": "ack", "seq": 5',
    ],
)
def test_what_only_looks_like_an_ack_is_not_taken_as_one(text: str) -> None:
    msg, anomalies = _read(text)
    if msg is None:
        assert anomalies == {0: ["malformed_server_message"]}
    else:  # what JSON itself makes of it
        assert msg == parse_server_text(text)
    assert msg != Ack(10) and msg != Ack(12)


def test_other_messages_and_binary_frames() -> None:
    text = json.dumps(
        {"type": "transcript", "result_id": 0, "is_final": True, "start": 0.0, "end": 1.0,
         "text": "hi", "words": []}
    )  # fmt: skip
    msg, anomalies = _read(text)
    assert isinstance(msg, Transcript) and msg.text == "hi" and anomalies == {}
    assert _read(b"\x00") == (None, {0: ["binary_server_frame"]})
