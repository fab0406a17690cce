"""Audio used per API key: metered whenever `api_keys` are set, bounded by `audio_budget_s`.

Sans-I/O; the gateway's connections and heartbeat drive it (gateway/connection.py).

- **What counts:** audio stored in Redis, once: a connection counts the frames each of
  its INGEST calls stored (`stored`), never those the call skipped as stored already (a
  resumed client re-sending), nor those refused or lost with a connection.
- **Windows:** usage is summed per key over fixed windows of `usage_window_s` aligned on
  the Unix epoch (with the default of 86400, UTC days); a window's budget is fresh.
  Audio counts in the window in which it was stored.
- **Across the fleet:** each gateway keeps its own running total per (key, window), in
  microseconds, and its heartbeat writes it into the key's hash in Redis under its own
  field (`ss:usage:<key_id>:<window_start>`, USAGE_SYNC), getting back the sum of all
  gateways' fields. A write is an absolute value, never an increment, so a retried sync
  cannot count anything twice; a gateway that dies loses what it stored since its last
  sync (at most `heartbeat_s` of its connections' audio), counted too little, never too
  much.
- **The budget:** a key's usage now is the fleet total at this gateway's last sync plus
  what this gateway stored since. A frame is refused once that, with the audio its
  connection has sent but not yet stored, would pass the budget; a new session once
  the key has used it all (`spent`, after a fresh sync of that key). Other gateways'
  audio since their last syncs is not seen, so the fleet may go past the budget by up to
  `heartbeat_s` of audio of the key's sessions on other gateways.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass

US = 1_000_000


@dataclass(frozen=True, slots=True)
class SyncItem:
    """One (key, window) to write: this gateway's total there, microseconds."""

    key_id: str
    window: int  # the window's start, unix seconds
    local_us: int


class UsageMeter:
    def __init__(
        self, window_s: int, budget_s: float, *, clock: Callable[[], float] = time.time
    ) -> None:
        if window_s < 1:
            raise ValueError(f"window_s must be >= 1, got {window_s}")
        self.window_s = window_s
        self.budget_us = round(budget_s * US)  # 0: no budget
        self.clock = clock
        # Per (key ID, window start): this gateway's audio stored there (us), the part of
        # it written to Redis, and the fleet's total as of that write.
        self._local: dict[tuple[str, int], int] = {}
        self._synced: dict[tuple[str, int], int] = {}
        self._fleet: dict[tuple[str, int], int] = {}
        # Keys with a connection open here: their totals are refreshed at every sync.
        self._active: Counter[str] = Counter()

    def window(self) -> int:
        """The current window's start, unix seconds."""
        return int(self.clock() // self.window_s) * self.window_s

    def used_us(self, key_id: str) -> int:
        """The key's audio in the current window, as far as this gateway knows."""
        at = (key_id, self.window())
        return self._fleet.get(at, 0) + self._local.get(at, 0) - self._synced.get(at, 0)

    def allows(self, key_id: str, more_us: int) -> bool:
        """Whether `more_us` of audio on top of the key's usage stays within the budget
        (always, without one). Reaching the budget exactly is allowed."""
        return not self.budget_us or self.used_us(key_id) + more_us <= self.budget_us

    def spent(self, key_id: str) -> bool:
        """The key has used its whole budget: a new session could not send anything."""
        return bool(self.budget_us) and self.used_us(key_id) >= self.budget_us

    def renews_at(self) -> int:
        """When the next window, and with it a fresh budget, begins (unix seconds)."""
        return self.window() + self.window_s

    def stored(self, key_id: str, us: int) -> None:
        """A connection of the key stored `us` of audio."""
        if us > 0:
            at = (key_id, self.window())
            self._local[at] = self._local.get(at, 0) + us

    def opened(self, key_id: str) -> None:
        self._active[key_id] += 1

    def closed(self, key_id: str) -> None:
        self._active[key_id] -= 1
        if self._active[key_id] <= 0:
            del self._active[key_id]

    def to_sync(self, only: str | None = None) -> list[SyncItem]:
        """What the heartbeat writes: every (key, window) whose total here moved since
        its last write, and the current window of every key with a connection here
        (to learn the other gateways' audio). `only`: that key's current window alone."""
        now = self.window()
        if only is not None:
            return [SyncItem(only, now, self._local.get((only, now), 0))]
        due = {at for at, us in self._local.items() if us != self._synced.get(at)}
        due.update((key, now) for key in self._active)
        return [SyncItem(k, w, self._local.get((k, w), 0)) for k, w in sorted(due)]

    def synced(self, items: Iterable[SyncItem], fleet_us: Iterable[int]) -> None:
        """The writes of `to_sync` were made; `fleet_us` are the totals Redis returned,
        in order. Windows that have passed are forgotten once written."""
        now = self.window()
        for item, total in zip(items, fleet_us, strict=True):
            at = (item.key_id, item.window)
            # A reply older than one already taken (two syncs of a key at once: a new
            # session's and the heartbeat's) would pair an older fleet total with a newer
            # part written here: skipped.
            if item.local_us >= self._synced.get(at, 0):
                self._synced[at] = item.local_us
                self._fleet[at] = total
        for at in [at for at in self._fleet if at[1] < now]:
            if self._local.get(at, 0) == self._synced.get(at, 0):
                for table in (self._local, self._synced, self._fleet):
                    table.pop(at, None)
