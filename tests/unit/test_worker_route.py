"""An XREAD reply's entries go only to the session state the read was made for.

Found by the Redis-restart fault test: a session's lease was lost while a read was in
flight, the same worker claimed the session again (a new `Owned`, reading from its
checkpoint), and the late reply, read from the old owner's position, was fed to the new
one, which then skipped the audio in between and transcribed only the tail."""

from __future__ import annotations

from typing import Any, cast

from shared import envelope, keys
from shared.config import Config
from shared.envelope import AudioChunk
from shared.keys import SessionId
from shared.protocol import SessionParams
from shared.store import SessionMeta
from worker.engine import NullEngine
from worker.service import Owned, Worker

SID = SessionId("a" * 32)
KEY = keys.audio(SID).encode()


def owned(last_id: bytes, epoch: int) -> Owned:
    meta = SessionMeta(SID, "open", SessionParams(), "", 0, 0, 0, epoch, "", "")
    # The transcriber and converter are not touched by routing.
    return Owned(SID, f"w:{epoch}", epoch, meta, "normal", b"1-0", cast(Any, None),
                 cast(Any, None), last_id)  # fmt: skip


def reply(*ids: bytes) -> list[tuple[bytes, list[tuple[bytes, list[bytes]]]]]:
    """An XREAD reply as `Store.read_audio` returns it (flat field lists)."""
    entries = [(i, [b"seq", b"%d" % n, envelope.FIELD, envelope.encode(AudioChunk(n, b"\0\0"))])
               for n, i in enumerate(ids)]  # fmt: skip
    return [(keys.audio(SID).encode(), entries)]


async def test_a_reply_for_a_replaced_session_is_dropped() -> None:
    worker = Worker(Config(redis_url="redis://127.0.0.1:1/0"), engine=NullEngine())
    try:
        old, new = owned(b"5-0", epoch=1), owned(b"0-0", epoch=2)
        worker.owned[SID] = new  # lease lost, claimed again while the read was in flight
        assert worker._route(reply(b"6-0", b"7-0"), {KEY: old}) == []
        assert new.last_id == b"0-0"  # the new owner still reads from its checkpoint
        # The same reply for the state it was read for is delivered, and moves it on.
        work = worker._route(reply(b"6-0", b"7-0"), {KEY: new})
        assert [(o, [i for i, _ in batch]) for o, batch in work] == [(new, [b"6-0", b"7-0"])]
        assert new.last_id == b"7-0"
        # A session no longer held at all gets nothing either.
        del worker.owned[SID]
        assert worker._route(reply(b"8-0"), {KEY: new}) == []
        assert new.last_id == b"7-0"
    finally:
        worker._cpu.shutdown()
        await worker.redis.aclose()
