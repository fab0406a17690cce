"""`split` (worker/packing.py) on arbitrary input: whatever words a packed decode returns,
and wherever it puts them, no word is handed to an utterance it could not have come from.

The examples in tests/unit/test_packing.py put words in each awkward place one at a time;
here hypothesis generates layouts (2-8 utterances of 0.1-12 s, guards from the least
allowed to 2 s) and words anywhere in and around the window, in and out of order, of any
length, reliable or not, and checks the rule the module's docstring states for every
output:

- a word handed to slot i started in slot i's audio or in the lead margin just before it
  (silence: the guard holds zeros), and ended before the next slot's audio began, so it
  cannot be a word of any other slot's audio;
- each word is handed to at most one slot, in the order the engine gave, with times
  relative to its slot and inside it;
- a slot next to a word that could be either neighbour's is decoded again alone (None),
  and so is every slot when the engine's times go backwards;
- a slot that got no word is decoded again alone.
"""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from worker.engine import SAMPLE_RATE, RawWord
from worker.packing import LEAD_MARGIN_S, MIN_GUARD_S, Layout, layout, split

SR = SAMPLE_RATE


@st.composite
def layouts(draw: st.DrawFn) -> Layout:
    lengths = draw(st.lists(st.integers(SR // 10, 12 * SR), min_size=2, max_size=8))
    guard = draw(st.integers(int(MIN_GUARD_S * SR), 2 * SR))
    return layout(lengths, guard)


@st.composite
def words_for(draw: st.DrawFn, lay: Layout) -> list[RawWord]:
    """Words anywhere from a second before the window to a second after it."""
    total_s = lay.total / SR
    times = st.floats(-1.0, total_s + 1.0, allow_nan=False)
    out = []
    for i in range(draw(st.integers(0, 30))):
        start = draw(times)
        end = start + draw(st.floats(-0.2, 3.0, allow_nan=False))
        reliable = draw(st.booleans()) if draw(st.integers(0, 9)) == 0 else True
        out.append(RawWord(f" w{i}", start, end, 0.9, i // 3, reliable))
    if draw(st.booleans()):
        out.sort(key=lambda w: w.start)  # mostly in order, as a decode gives them
    return out


@st.composite
def cases(draw: st.DrawFn) -> tuple[Layout, list[RawWord]]:
    lay = draw(layouts())
    return lay, draw(words_for(lay))


@given(cases())
def test_no_word_is_ever_handed_to_an_utterance_it_could_not_come_from(
    case: tuple[Layout, list[RawWord]],
) -> None:
    lay, words = case
    out = split(lay, words)
    n = len(lay.slots)
    assert len(out) == n
    bounds = [(s.start / SR, s.end / SR) for s in lay.slots]
    by_text = {w.text.strip(): w for w in words}
    backwards = any(b.start < a.start for a, b in itertools.pairwise(words)) or any(
        w.end < w.start for w in words
    )
    if backwards:
        assert out == [None] * n
        return
    handed: list[str] = []
    for i, segments in enumerate(out):
        if segments is None:
            continue
        lo, hi = bounds[i]
        next_lo = bounds[i + 1][0] if i + 1 < n else float("inf")
        got = [w for s in segments for w in s.words]
        assert got, "a slot is returned only with words"
        for w in got:
            raw = by_text[w.word]
            assert lo - LEAD_MARGIN_S <= raw.start < hi, (i, raw, bounds)
            assert raw.end <= next_lo, (i, raw, bounds)
            assert raw.reliable  # a slot with an unreliable word goes alone
            assert 0.0 <= w.start <= w.end <= round(hi - lo, 3)
            handed.append(w.word)
    assert len(handed) == len(set(handed)), "a word was handed to two slots"
    order = [w.text.strip() for w in words]
    assert handed == [t for t in order if t in set(handed)], "the engine's order changed"


@given(cases())
def test_a_word_between_two_slots_sends_both_alone(case: tuple[Layout, list[RawWord]]) -> None:
    """Whenever a word starts in a guard outside the lead margin, or runs into the next
    slot, neither neighbour is trusted with the window's words."""
    lay, words = case
    words.sort(key=lambda w: w.start)
    words = [w for w in words if w.end >= w.start]
    out = split(lay, words)
    bounds = [(s.start / SR, s.end / SR) for s in lay.slots]
    for w in words:
        for i in range(len(bounds) - 1):
            hi, next_lo = bounds[i][1], bounds[i + 1][0]
            in_guard = hi <= w.start < next_lo - LEAD_MARGIN_S
            runs_over = bounds[i][0] - LEAD_MARGIN_S <= w.start < hi and w.end > next_lo
            if in_guard or runs_over:
                assert out[i] is None and out[i + 1] is None, (w, bounds)
