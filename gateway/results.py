"""One Redis round trip for the results re-reads of many connections.

A connection re-reads its session's results stream (`XRANGE` after the last entry it has
seen) on a resume, on a gap in `result_id`s and when the relay says `RECONCILE` (no
pub/sub message for a whole `reconcile_interval_s`). A gateway with hundreds of quiet or
queued sessions makes hundreds of those a second; alone, each cost a pooled connection's
checks and a round trip. Batched like the audio (`shared.batching.GroupCommit`), they go
out as pipelines of `XRANGE`s (`Store.read_results_many`).
"""

from __future__ import annotations

from shared.batching import GroupCommit
from shared.envelope import Closed, Transcript
from shared.keys import SessionId
from shared.store import Store

#: XRANGEs per pipeline, at most. Each reads at most 500 entries (a session's finals
#: since its last read: usually none or one).
MAX_READS_PER_PIPELINE = 128

_Read = tuple[SessionId, bytes]
_Entries = list[tuple[bytes, Transcript | Closed]]


class ResultsReader(GroupCommit[_Read, _Entries]):
    def __init__(self, store: Store, *, max_reads_per_pipeline: int = MAX_READS_PER_PIPELINE):
        super().__init__(store.read_results_many, name="results", max_calls=max_reads_per_pipeline)

    async def read(self, sid: SessionId, after_id: bytes) -> _Entries:
        """`Store.read_results(sid, after_id)`, sent with other connections' re-reads."""
        return await self.call((sid, after_id))
