"""One Redis round trip for the audio of many connections: the INGEST group commit.

Every `ingest` made while the previous pipeline was in flight (or during the same
event-loop turn) goes out together as one pipeline of INGEST calls (`Store.ingest_many`),
with the guarantees of `shared.batching.GroupCommit`: a connection's call returns only
after its frames are stored (so the `ack` still means stored); a writer awaits each call
before making the next, so one session never has two calls in flight; `SessionGone`,
`SeqGap` and script errors reach the one caller they belong to; a connection error
reaches every caller of that pipeline, and each retries (INGEST is idempotent on seq).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from shared.batching import BatcherClosed, GroupCommit
from shared.envelope import AudioChunk
from shared.keys import SessionId
from shared.store import IngestResult, Store

__all__ = ["MAX_BYTES_PER_PIPELINE", "MAX_CALLS_PER_PIPELINE", "BatcherClosed", "IngestBatcher"]

#: Calls per pipeline, at most: bounds one reply's size and the time Redis spends on one
#: pipeline before it serves other clients (workers, pub/sub) again.
MAX_CALLS_PER_PIPELINE = 256
#: Audio bytes per pipeline, at most (a single call may exceed it alone): after a stall
#: every connection may come back with a full batch, and one write of all of them would
#: be tens of MB in one buffer.
MAX_BYTES_PER_PIPELINE = 4 * 2**20

_Call = tuple[SessionId, Sequence[AudioChunk]]


def _audio_bytes(call: _Call) -> int:
    return sum(len(chunk.pcm) for chunk in call[1])


class IngestBatcher(GroupCommit[_Call, IngestResult]):
    def __init__(
        self,
        store: Store,
        *,
        max_calls_per_pipeline: int = MAX_CALLS_PER_PIPELINE,
        max_bytes_per_pipeline: int = MAX_BYTES_PER_PIPELINE,
    ) -> None:
        if max_calls_per_pipeline < 1:
            raise ValueError(f"max_calls_per_pipeline must be >= 1, got {max_calls_per_pipeline}")
        if max_bytes_per_pipeline < 1:
            raise ValueError(f"max_bytes_per_pipeline must be >= 1, got {max_bytes_per_pipeline}")
        super().__init__(
            store.ingest_many,
            name="ingest",
            max_calls=max_calls_per_pipeline,
            weight=_audio_bytes,
            max_weight=max_bytes_per_pipeline,
        )

    async def ingest(self, sid: SessionId, chunks: Sequence[AudioChunk]) -> IngestResult:
        """`Store.ingest`, sent with whatever other connections store meanwhile."""
        return await self.call((sid, chunks))

    def start_ingest(
        self, sid: SessionId, chunks: Sequence[AudioChunk]
    ) -> asyncio.Future[IngestResult]:
        """`ingest` as a future, for a caller that goes on in a done-callback."""
        return self.submit((sid, chunks))
