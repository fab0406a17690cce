"""When a `language=auto` session stops detecting its language, sans I/O.

Whisper detects a language from the first window of each decode, so a session that asks
for `auto` pays for a detection on every utterance (an encoder pass of its own, plus a
decoder step), cannot share a batched call (one call decodes one language), and can be
taken for another language on any one short utterance. `LanguageLock` gathers the
detections of a session's finals, each weighted by the utterance's length, and once
`lock_s` seconds of speech have been judged and one language holds at least `share` of
the weight, fixes the session on it: from then on its decodes name that language.

A session whose utterances do not agree (a speaker who switches languages) never reaches
the share, so it keeps detecting every utterance, as without the lock.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

#: Detected languages kept per decode (the most probable first). The rest of Whisper's
#: 99 carry next to no weight and would only cost memory.
TOP_LANGUAGES = 5


@dataclass
class LanguageLock:
    """One session's language evidence. `lock_s` 0 never locks."""

    lock_s: float
    share: float
    locked: str | None = None
    seconds: float = 0.0  # speech judged so far
    weights: dict[str, float] = field(default_factory=dict)  # language: probability x seconds

    def observe(self, probabilities: Sequence[tuple[str, float]], seconds: float) -> str | None:
        """Take one final's detection (language, probability pairs) over `seconds` of
        audio. Returns the language if this observation locks it, else None."""
        if self.locked is not None or self.lock_s <= 0 or seconds <= 0 or not probabilities:
            return None
        self.seconds += seconds
        for language, p in probabilities[:TOP_LANGUAGES]:
            self.weights[language] = self.weights.get(language, 0.0) + float(p) * seconds
        if self.seconds < self.lock_s:
            return None
        best = max(self.weights, key=self.weights.__getitem__)
        if self.weights[best] < self.share * self.seconds:
            return None
        self.locked = best
        return best

    @property
    def best_share(self) -> float:
        """The leading language's share of the weight so far (0 before any detection)."""
        if not self.weights or self.seconds <= 0:
            return 0.0
        return max(self.weights.values()) / self.seconds
