"""Whether a worker with free slots takes another session now, from what its engine does.

Slots bound how many sessions a worker holds (worker/calibration.py measures them). Under
overload the issue's order of shedding is interims first (the scheduler does that), then
new admissions, so that the sessions already admitted keep real-time finals. This gate is
the second step, with no I/O and an injected time:

- **Probing.** Once finals use `probe_busy` of the engine's capacity over the last load
  window (4 s), new sessions are taken one at a time, spaced by what one session costs:
  the spacing is one session's share of the engine (the finals' share over the sessions
  held) times `probe_ramp_s`, so that probing adds new sessions worth at most the whole
  engine per `probe_ramp_s`, whatever the model and hardware (300 s: about 10 s per
  tiny.en session and 15-22 s per base session on 2 CPU cores, a fraction of a second on a
  GPU that holds hundreds). A session's cost shows only when its first utterances end,
  seconds after it was taken: taking every waiting session at once near capacity
  overshoots before the wait below can react (measured: with 46 sessions arriving over
  40 s on a worker that serves about 32, the wait alone held back 0-2 of them, and every
  session's p95 final lag was 5 s).
  A session that ended while probing leaves a credit: one waiting session may replace it
  at once, since a replacement does not add load. Credits are dropped when the gate is
  open (not needed) or closed (the engine needs the room).
- **Closed.** While finals wait longer than `max_final_wait_s` for the engine (the longest
  wait of the finals started within the window, or of one still queued), none at all.

`max_final_wait_s` 0 turns the gate off: slots alone decide. A session taken over from a
dead worker is not asked: it was admitted already, and its client is waiting for it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

State = Literal["open", "probing", "closed"]


@dataclass(frozen=True, slots=True)
class ClaimPolicy:
    max_final_wait_s: float = 1.0  # finals waiting longer: take no new session (0: off)
    probe_busy: float = 0.7  # finals' share of the engine from which sessions come singly
    # Then sessions worth at most the whole engine per this many seconds (0: no spacing).
    probe_ramp_s: float = 300.0

    def __post_init__(self) -> None:
        if not 0 <= self.max_final_wait_s < math.inf:
            raise ValueError("max_final_wait_s must be >= 0 (0: off)")
        if not 0 < self.probe_busy <= 1:
            raise ValueError("probe_busy must be in (0, 1]")
        if not 0 <= self.probe_ramp_s < math.inf:
            raise ValueError("probe_ramp_s must be >= 0")

    def spacing_s(self, final_busy: float, sessions: int) -> float:
        """Least time between two new sessions while probing: one session's share of the
        engine (`final_busy` over the `sessions` held; all of it with none) times
        `probe_ramp_s`."""
        return self.probe_ramp_s * final_busy / max(1, sessions)


class ClaimGate:
    """The policy's verdicts, remembering when the last session was taken."""

    def __init__(self, policy: ClaimPolicy) -> None:
        self.policy = policy
        self.state: State = "open"
        self._last_take = -math.inf
        self.credits = 0  # sessions that ended while probing: replaced without spacing
        self.spacing_s = 0.0  # the probing spacing at the last verdict (0 unless probing)

    def allowed(
        self, now: float, final_wait_s: float, final_busy: float, sessions: int
    ) -> int | None:
        """How many sessions may be taken now by a worker that holds `sessions`: None for
        as many as there are free slots, else 0, 1 or the credits. Sets `state`."""
        p = self.policy
        if p.max_final_wait_s <= 0:
            self._set("open")
            return None
        if final_wait_s > p.max_final_wait_s:
            self._set("closed")
            return 0
        if final_busy >= p.probe_busy:
            self._set("probing")
            self.spacing_s = p.spacing_s(final_busy, sessions)
            return max(self.credits, 1 if now - self._last_take >= self.spacing_s else 0)
        self._set("open")
        return None

    def took(self, now: float) -> None:
        """A new session was taken at `now` (a replacement, if a credit was left)."""
        if self.credits:
            self.credits -= 1
        else:
            self._last_take = now

    def ended(self) -> None:
        """One of the worker's sessions ended."""
        if self.state == "probing":
            self.credits += 1

    def _set(self, state: State) -> None:
        self.state = state
        if state != "probing":
            self.credits = 0
            self.spacing_s = 0.0
