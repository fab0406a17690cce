"""Exactly-once, in-order delivery of a session's results to one connection (sans I/O).

Results reach a gateway twice over: live on the session's pub/sub channel (fast, but
at-most-once) and durably in the session's results stream. `Delivery` decides what to
forward: each final once, in `result_id` order; interims only for the utterance that is
still open; the closing summary only after every final. When it sees a gap it asks its
caller to read the results stream (`needs_catch_up`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from shared.envelope import Closed, Transcript

Result = Transcript | Closed


@dataclass
class Delivery:
    next_result_id: int = 0
    interim_results: bool = True
    needs_catch_up: bool = False
    closed: Closed | None = None
    _done: bool = field(default=False, repr=False)

    @property
    def done(self) -> bool:
        """True once the closing summary has been handed out."""
        return self._done

    def offer(self, item: Result) -> list[Result]:
        """What to send for one live or replayed result, in order (possibly nothing)."""
        if self._done:
            return []
        if isinstance(item, Closed):
            self.closed = item
            return self._maybe_close()
        if not item.is_final:
            if self.interim_results and item.result_id == self.next_result_id:
                return [item]
            return []
        if item.result_id < self.next_result_id:
            return []  # already delivered (replay overlap, duplicate publish)
        if item.result_id > self.next_result_id:
            self.needs_catch_up = True  # missed one on pub/sub: read the stream
            return []
        self.next_result_id += 1
        return [item, *self._maybe_close()]

    def _maybe_close(self) -> list[Result]:
        if self.closed is None:
            return []
        if self.next_result_id < self.closed.final_results:
            self.needs_catch_up = True
            return []
        self._done = True
        return [self.closed]
