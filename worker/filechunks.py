"""Where to cut a file job's audio into windows for the engine, sans I/O.

Whisper decodes at most 30 s at once, so a file is decoded window by window
(worker/filejobs.py). `plan` takes a block of 16 kHz audio, as per-window speech
probabilities of the VAD (one per `VAD_WINDOW` samples), and returns the windows to
decode:

- each at most `max_s` long, in order, never overlapping, together covering every
  stretch of speech (`threshold` or more) that has at least `min_speech_s` of speech in
  its window: audio with less (a click, a cough) is not decoded at all, and neither is
  the silence between windows;
- with `pad_s` of audio kept around the speech (less where two stretches of speech are
  closer than twice that: the pause is then shared);
- one window holds speech with pauses of at most `max_gap_s`; a longer pause ends it;
- where speech goes on past `max_s`, the window is cut in a pause: the longest one that
  reaches into the second half of the allowed length (the latest of equals), so windows
  stay long and end at a sentence's end rather than between two words; a stretch of
  speech with no pause there at all is cut at its least speech-like VAD window of the
  last `cut_search_s`, leaving at least `min_speech_s` of that speech on either side.

All decisions are made in whole VAD windows. A block that is not the end of the file
(`final=False`) may end in the middle of a word: `plan` then returns only the windows
that audio after the block cannot change, and `Plan.handled`, the sample up to which the
block is done with. The caller starts the next block there (keeping the samples and
probabilities from it on), so no word is ever cut in two at a block's end.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from shared.config import Config
from worker.engine import SAMPLE_RATE, VAD_WINDOW

#: Most audio in one window: Whisper's 30 s, less a margin (as `PackPolicy.window_s`).
MAX_WINDOW_S = 28.0
#: Less speech than this in a window: a noise blip, never decoded (as worker/stream.py).
MIN_SPEECH_S = 0.15


@dataclass(frozen=True, slots=True)
class ChunkPolicy:
    """How file audio is cut into windows (see the module docstring)."""

    threshold: float = 0.5
    pad_s: float = 0.4
    max_s: float = MAX_WINDOW_S
    min_speech_s: float = MIN_SPEECH_S
    max_gap_s: float = 2.0
    cut_search_s: float = 2.0

    @classmethod
    def from_config(cls, config: Config) -> ChunkPolicy:
        """The worker's: its VAD threshold and speech padding."""
        return cls(threshold=config.vad_threshold, pad_s=config.speech_pad_s)

    def __post_init__(self) -> None:
        if not 0 < self.threshold <= 1:
            raise ValueError(f"threshold must be in (0, 1], got {self.threshold}")
        for name in ("pad_s", "min_speech_s", "max_gap_s", "cut_search_s"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be >= 0, got {value}")
        if not 0 < self.max_s <= 30:
            raise ValueError(f"max_s must be in (0, 30], got {self.max_s}")
        if self.max_w // 2 <= self.pad_w + 2 * self.min_speech_w:
            raise ValueError(
                f"max_s {self.max_s} is too short for pad_s {self.pad_s} and "
                f"min_speech_s {self.min_speech_s}"
            )

    # In VAD windows:
    @property
    def pad_w(self) -> int:
        return _windows(self.pad_s)

    @property
    def max_w(self) -> int:
        return int(self.max_s * SAMPLE_RATE) // VAD_WINDOW

    @property
    def min_speech_w(self) -> int:
        return max(1, _windows(self.min_speech_s))

    @property
    def max_gap_w(self) -> int:
        # At least room for the padding after one stretch and before the next.
        return max(_windows(self.max_gap_s), 2 * self.pad_w)

    @property
    def cut_w(self) -> int:
        return max(_windows(self.cut_search_s), self.min_speech_w + 1)


@dataclass(frozen=True, slots=True)
class Plan:
    """What to decode of a block: sample ranges [start, end) of it, in order; and the
    sample (a whole number of VAD windows into the block; its end if it was the file's
    end) before which the block is done with: the next block starts there."""

    windows: tuple[tuple[int, int], ...]
    handled: int


def _windows(seconds: float) -> int:
    return math.ceil(seconds * SAMPLE_RATE / VAD_WINDOW - 1e-9)


def speech_runs(speech: npt.NDArray[np.bool_]) -> list[tuple[int, int]]:
    """Maximal runs of True, as [start, end) indices."""
    if speech.size == 0:
        return []
    edges = np.flatnonzero(np.diff(np.concatenate([[False], speech, [False]]).astype(np.int8)))
    return [(int(s), int(e)) for s, e in zip(edges[::2], edges[1::2], strict=True)]


def plan(
    probs: Sequence[float] | npt.NDArray[np.float32],
    total_samples: int,
    policy: ChunkPolicy,
    *,
    final: bool,
) -> Plan:
    """The windows to decode of a block of `total_samples` samples whose VAD windows had
    speech probabilities `probs` (the last may cover a partial window at the file's
    end). `final`: the block ends the file, so everything in it is decided now."""
    p = np.asarray(probs, dtype=np.float64)
    n = p.size
    if n != -(-total_samples // VAD_WINDOW):
        raise ValueError(f"{n} VAD windows for {total_samples} samples")
    regions = speech_runs(p >= policy.threshold)
    speech_total = np.concatenate([[0], np.cumsum(p >= policy.threshold)])
    pad, max_w, min_speech = policy.pad_w, policy.max_w, policy.min_speech_w
    out: list[tuple[int, int]] = []
    floor = 0  # windows before this are decided
    k = 0  # the first region that may still have speech at or after `floor`

    def samples(w: int) -> int:
        return min(w * VAD_WINDOW, total_samples)

    while True:
        while k < len(regions) and regions[k][1] <= floor:
            k += 1
        if k == len(regions):
            handled = total_samples if final else max(floor, n - pad) * VAD_WINDOW
            return Plan(tuple(out), handled)
        start = max(regions[k][0] - pad, floor)
        end = _window_end(p, regions, k, start, policy, n=n, final=final)
        if end is None:  # audio after the block could still change it
            return Plan(tuple(out), start * VAD_WINDOW)
        if speech_total[end] - speech_total[start] >= min_speech:
            out.append((samples(start), samples(end)))
        assert start < end <= start + max_w
        floor = end


def _window_end(
    p: npt.NDArray[np.float64],
    regions: list[tuple[int, int]],
    k: int,
    start: int,
    policy: ChunkPolicy,
    *,
    n: int,
    final: bool,
) -> int | None:
    """Where the window that starts at `start` (its first speech: region `k`) ends, in
    VAD windows; None when that is not known without audio after the block."""
    pad, max_gap = policy.pad_w, policy.max_gap_w
    limit = start + policy.max_w
    # Every later decision looks at most this far: a block that reaches past it decides.
    known = final or n > limit + max(max_gap, policy.min_speech_w)
    last = None  # the last region wholly in the window
    j = k
    while j < len(regions):
        s, e = regions[j]
        if last is not None and s - regions[last][1] > max_gap:
            break
        if e > limit:
            return _cut(p, regions, k, j, last, start, policy) if known else None
        last, j = j, j + 1
    assert last is not None
    e_last = regions[last][1]
    # The pause after the window's speech is long enough to end it: the next region is
    # past it, or silence runs past it to the end of the block (or of the file).
    if final or j < len(regions) or n - e_last > max_gap:
        return min(e_last + pad, limit, n)
    return None


def _cut(
    p: npt.NDArray[np.float64],
    regions: list[tuple[int, int]],
    k: int,
    over: int,
    last: int | None,
    start: int,
    policy: ChunkPolicy,
) -> int:
    """The end of a window whose speech goes on past its limit (region `over` does not
    fit; regions `k` to `last` do): in the longest pause reaching into the second half,
    else at the least speech-like VAD window of `over` near the limit."""
    limit = start + policy.max_w
    half = start + policy.max_w // 2
    pauses = []
    if last is not None:
        for a_region, b_region in zip(
            regions[k : last + 1], regions[k + 1 : over + 1], strict=True
        ):
            pauses.append((a_region[1], b_region[0]))
    candidates = [(b - a, a, b) for a, b in pauses if b > half]
    if candidates:
        _, a, b = max(candidates)
        return min(a + min(policy.pad_w, (b - a) // 2), limit)
    # No pause there: `over` runs from before the second half to past the limit. Both
    # of its pieces keep `min_speech_w` of its speech, so neither is taken for a blip.
    lo = max(limit - policy.cut_w, half, regions[over][0] + policy.min_speech_w)
    hi = min(limit, regions[over][1] - policy.min_speech_w)
    window = p[lo:hi]
    m = lo + int(window.size - 1 - np.argmin(window[::-1]))  # the least; the latest of equals
    return m + 1
