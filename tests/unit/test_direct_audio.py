"""`Connection._direct_audio`: when the gateway may take an audio frame in the protocol
callback, and when it must leave it to the reader task (gateway/connection.py). The
connection is built without a socket: only the state this decision reads."""

from __future__ import annotations

import asyncio
from collections import deque
from types import SimpleNamespace
from typing import Any, cast

from gateway.connection import Connection
from gateway.pending import PendingQueue
from shared.errors import BadRequest
from shared.metrics import Metrics
from shared.protocol import ServerSession, SessionParams
from tests.helpers import audio_chunk

FRAME = b"\x00\x00" * 1600


def connection(pending: int) -> Connection:
    conn = Connection.__new__(Connection)
    conn.pending = PendingQueue(pending, asyncio.get_running_loop())
    conn.session = ServerSession(SessionParams(), resuming=False)
    conn.ctx = cast(Any, SimpleNamespace(metrics=Metrics("test")))
    conn.loop = asyncio.get_running_loop()
    conn._limit = None
    conn.usage_key = None  # no API keys: nothing metered
    conn._arrivals = deque()
    conn._direct_error = None
    conn._reader_busy = False
    conn._writer_wake = None  # the writer task is busy: frames wait in `pending`
    conn._ingesting = None
    return conn


async def test_a_frame_is_taken_while_the_queue_has_room_and_the_reader_is_idle() -> None:
    conn = connection(pending=2)
    assert conn._direct_audio(FRAME)
    assert conn._direct_audio(FRAME)
    assert [audio_chunk(conn.pending.get_nowait()).seq for _ in range(2)] == [0, 1]
    assert conn.ctx.metrics.counters["audio_frames_total"] == 2


async def test_a_full_queue_leaves_the_frame_to_the_reader_unnumbered() -> None:
    conn = connection(pending=1)
    assert conn._direct_audio(FRAME)
    assert not conn._direct_audio(FRAME)  # the reader waits for room: back-pressure
    assert conn._session().next_seq == 1  # the declined frame got no seq


async def test_no_frame_passes_a_message_the_reader_is_putting() -> None:
    """The reader got a message before this frame and waits for room for it: when room
    appears, the frame must not take it first (order of audio and text)."""
    conn = connection(pending=1)
    conn._reader_busy = True
    assert not conn._direct_audio(FRAME)  # room, but the reader's message goes first
    assert conn.pending.empty() and conn._session().next_seq == 0


async def test_a_failing_frame_is_left_to_the_reader_with_its_error() -> None:
    conn = connection(pending=4)
    assert not conn._direct_audio(b"\x00")  # not whole s16 samples
    assert isinstance(conn._direct_error, BadRequest)
    assert not conn._direct_audio(FRAME)  # nothing more, until the reader raises it
    assert conn.pending.empty()
