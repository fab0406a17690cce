"""Cross-session packing of decodes (finals, or interims) into one Whisper window, sans I/O.

Every faster-whisper call encodes a padded 30 s window whatever the audio length, so a
final of 2 s costs nearly what 25 s costs. When several sessions' finals wait at once,
the scheduler lays their utterances end to end in one window, `guard` samples of
silence between two of them, decodes the window once with word timestamps, and `split`
hands each word back to the utterance it came from.

Each utterance is scaled to the same peak level first (see `pack_audio`).

Attribution is by position only, and only where it is unambiguous:

- slot i covers [start_i, end_i) of the window; the guards between slots hold nothing
  but zeros, so no word can truly start there;
- a word belongs to slot i when it starts in [start_i - margin, end_i) and ends no later
  than start_{i+1} (its end may run into the guard: Whisper's alignment often stretches
  a last word over the silence after it);
- a word that starts in a guard (before the next slot's margin), starts after the last
  slot, or ends inside the next slot belongs to no slot with certainty: the slots on
  both sides of it are decoded again alone (the caller does that);
- words that go back in time make the whole window suspect: every slot alone;
- a slot that got no word at all is decoded again alone too, so nothing a slot said can
  hide in a neighbour's output without a second look;
- a slot with a word from a segment the engine flagged as unreliable (below its
  confidence floor) is decoded again alone, where the engine's single-utterance rules
  apply.

Nothing here decides *whether* to pack; that is the scheduler's choice.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from shared.envelope import Word
from worker.engine import SAMPLE_RATE, Audio, RawWord, Segment

#: How far before its slot a word may start (Whisper's alignment runs a little early).
LEAD_MARGIN_S = 0.3
#: Peak level every utterance is scaled to in a packed window.
PACK_PEAK = 0.5
#: Shortest guard that keeps the rules above meaningful: a margin and as much again of
#: silence where no word may start.
MIN_GUARD_S = 0.6


@dataclass(frozen=True, slots=True)
class Slot:
    start: int  # window sample index of the utterance's first sample
    end: int  # one past its last sample


@dataclass(frozen=True, slots=True)
class Layout:
    slots: tuple[Slot, ...]
    guard: int  # samples of silence between two slots
    total: int  # samples in the packed window

    @property
    def seconds(self) -> float:
        return self.total / SAMPLE_RATE


def packed_samples(lengths: Sequence[int], guard: int) -> int:
    """Window samples that utterances of these lengths need, guards included."""
    return sum(lengths) + guard * max(0, len(lengths) - 1)


def layout(lengths: Sequence[int], guard: int) -> Layout:
    if not lengths:
        raise ValueError("nothing to pack")
    if any(n <= 0 for n in lengths):
        raise ValueError("every utterance needs audio")
    if guard < int(MIN_GUARD_S * SAMPLE_RATE):
        raise ValueError(f"guard must be at least {MIN_GUARD_S} s")
    slots = []
    pos = 0
    for n in lengths:
        slots.append(Slot(pos, pos + n))
        pos += n + guard
    return Layout(tuple(slots), guard, pos - guard)


def pack_audio(audios: Sequence[Audio], lay: Layout) -> Audio:
    """The window: each utterance at its slot, scaled to one peak level; guards zero.

    Whisper's log-mel features are clamped at (loudest value of the window - 8 log10
    units), so a quiet session next to a loud one would lose its quiet detail (measured:
    a FLEURS clip peaking at 0.006 beside one peaking at 0.78 came back as garbage).
    Scaling every utterance to the same peak gives each the range it has alone.
    """
    window = np.zeros(lay.total, dtype=np.float32)  # guards stay exact zeros
    for audio, slot in zip(audios, lay.slots, strict=True):
        if audio.size != slot.end - slot.start:
            raise ValueError("audio does not match its slot")
        peak = float(np.max(np.abs(audio))) if audio.size else 0.0
        gain = PACK_PEAK / peak if peak > 0 else 1.0
        window[slot.start : slot.end] = audio * np.float32(gain)
    return window


def split(lay: Layout, words: Sequence[RawWord]) -> list[list[Segment] | None]:
    """Each slot's segments (times relative to the slot), or None: decode that slot alone."""
    n = len(lay.slots)
    bounds = [(s.start / SAMPLE_RATE, s.end / SAMPLE_RATE) for s in lay.slots]
    lead = LEAD_MARGIN_S
    alone = [False] * n
    owned: list[list[RawWord]] = [[] for _ in range(n)]
    previous = float("-inf")
    for w in words:
        if w.start < previous or w.end < w.start:
            return [None] * n  # out of order: no position can be trusted
        previous = w.start
        i = _slot_of(bounds, w.start, lead)
        if i is None:
            for j in _neighbours(bounds, w.start):
                alone[j] = True
            continue
        next_start = bounds[i + 1][0] if i + 1 < n else float("inf")
        if w.end > next_start:
            alone[i] = True  # reaches into the next slot: whose is it?
            if i + 1 < n:
                alone[i + 1] = True
            continue
        if not w.reliable:
            alone[i] = True
        owned[i].append(w)
    out: list[list[Segment] | None] = []
    for i, ws in enumerate(owned):
        if alone[i] or not ws:
            out.append(None)
        else:
            out.append(_segments(ws, bounds[i]))
    return out


def _slot_of(bounds: list[tuple[float, float]], start: float, lead: float) -> int | None:
    for i, (lo, hi) in enumerate(bounds):
        if lo - lead <= start < hi:
            return i
    return None


def _neighbours(bounds: list[tuple[float, float]], t: float) -> list[int]:
    """The slots on both sides of time t (which lies in no slot)."""
    before = [i for i, (_, hi) in enumerate(bounds) if hi <= t]
    after = [i for i, (lo, _) in enumerate(bounds) if lo > t]
    return ([before[-1]] if before else []) + ([after[0]] if after else [])


def _segments(words: list[RawWord], bounds: tuple[float, float]) -> list[Segment]:
    lo, hi = bounds
    length = hi - lo
    groups: list[list[RawWord]] = []
    for w in words:
        if groups and groups[-1][-1].segment == w.segment:
            groups[-1].append(w)
        else:
            groups.append([w])
    out = []
    for group in groups:
        text = "".join(w.text for w in group).strip()
        if not text:
            continue
        ws = tuple(
            Word(
                w.text.strip(),
                _clamp(w.start - lo, length),
                _clamp(w.end - lo, length),
                w.probability,
            )
            for w in group
        )
        out.append(Segment(ws[0].start, ws[-1].end, text, ws))
    return out


def _clamp(t: float, length: float) -> float:
    return round(min(max(t, 0.0), length), 3)
