"""How fast one connection may send audio: a token bucket over audio bytes (sans I/O).

A connection may send `burst_s` seconds of audio at once (a reconnecting client re-sends
what was not acknowledged, plus what it recorded meanwhile), then `rate` seconds of
audio per second of wall time: 1.0 is real time. The caller passes the clock.

A connection that resumes a session starts with no more than the session as a whole has
left: `burst_s` plus `rate` times the session's age, less the audio already stored. So
reconnecting does not refill the bucket, and over its whole life a session stores at
most `burst_s + rate * age` seconds of audio however many connections it uses.
"""

from __future__ import annotations

import math


class AudioRateLimit:
    __slots__ = ("_at", "_burst", "_per_s", "_tokens", "burst_s", "rate")

    def __init__(
        self,
        rate: float,
        burst_s: float,
        bytes_per_second: int,
        now: float,
        *,
        age_s: float = 0.0,
        stored_bytes: int = 0,
    ) -> None:
        """`age_s` and `stored_bytes`: the session's age and the audio it has stored
        (both 0 for a new session)."""
        if not (rate > 0 and math.isfinite(rate)):
            raise ValueError(f"rate must be a positive number, got {rate!r}")
        if not (burst_s > 0 and math.isfinite(burst_s)):
            raise ValueError(f"burst_s must be a positive number, got {burst_s!r}")
        self.rate, self.burst_s = rate, burst_s
        self._per_s = rate * bytes_per_second
        self._burst = burst_s * bytes_per_second
        # A new session may send a whole burst at once; a resumed one what it has left.
        left = self._burst + max(0.0, age_s) * self._per_s - stored_bytes
        self._tokens = min(self._burst, max(0.0, left))
        self._at = now

    def take(self, nbytes: int, now: float) -> bool:
        """Count `nbytes` of audio arriving at `now`: False if over the limit (then
        nothing is counted)."""
        if now > self._at:
            self._tokens = min(self._burst, self._tokens + (now - self._at) * self._per_s)
            self._at = now
        if nbytes > self._tokens:
            return False
        self._tokens -= nbytes
        return True
