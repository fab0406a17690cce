"""Cutting a file job's audio into windows (worker/filechunks.py), from VAD probabilities.

Property tests (hypothesis) draw runs of speech and silence (probabilities on either side
of the threshold), any padding, window length and longest pause, and plan them whole or
block by block as the runner does (each block restarting at the previous one's
`handled`). Whatever they draw:

- windows are in order, never overlap, lie inside the audio and are at most `max_s`;
- every VAD window of a run of speech at least `min_speech_s` long is inside exactly one
  window; no window has less than `min_speech_s` of speech.

The examples after them pin the choices: padding, where a long stretch is cut, what is
skipped, and where a block that is not the file's end leaves off.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from worker.engine import SAMPLE_RATE, VAD_WINDOW
from worker.filechunks import ChunkPolicy, Plan, plan

W = VAD_WINDOW
WPS = SAMPLE_RATE / W  # VAD windows per second (31.25)


def windows_of(seconds: float) -> int:
    return round(seconds * WPS)


@st.composite
def policies(draw: st.DrawFn) -> ChunkPolicy:
    return ChunkPolicy(
        pad_s=draw(st.sampled_from([0.0, 0.1, 0.4])),
        max_s=draw(st.sampled_from([5.0, 12.0, 28.0])),
        max_gap_s=draw(st.sampled_from([0.3, 2.0])),
        cut_search_s=draw(st.sampled_from([0.5, 2.0])),
    )


@st.composite
def audio(draw: st.DrawFn) -> tuple[np.ndarray, int]:
    """(speech probability per VAD window, samples): runs of speech (at or over the
    0.5 threshold) and of silence, of any length, the last window maybe partial."""
    runs = draw(
        st.lists(st.tuples(st.booleans(), st.integers(1, 400), st.floats(0.0, 0.49)), max_size=14)
    )
    probs: list[float] = []
    for loud, n, level in runs:
        probs += [1.0 - level if loud else level] * n
    if draw(st.booleans()) and probs:  # a dip inside the speech: where a long run is cut
        at = draw(st.integers(0, len(probs) - 1))
        probs[at] = max(0.5, probs[at] - 0.3) if probs[at] >= 0.5 else probs[at]
    short = draw(st.integers(0, W - 1)) if probs else 0
    return np.asarray(probs, np.float32), len(probs) * W - short


def in_blocks(
    probs: np.ndarray, total: int, policy: ChunkPolicy, block_w: int
) -> list[tuple[int, int]]:
    """Plan as the runner does: read `block_w` more VAD windows at a time, plan what has
    been read since the last `handled`, and start there next time."""
    out: list[tuple[int, int]] = []
    base = read = 0
    while True:
        read = min(read + block_w, probs.size)
        final = read == probs.size
        samples = total - base * W if final else (read - base) * W
        found = plan(probs[base:read], samples, policy, final=final)
        out += [(base * W + a, base * W + b) for a, b in found.windows]
        if final:
            assert found.handled == samples
            return out
        assert found.handled % W == 0
        assert all(b <= found.handled for _, b in found.windows)
        base += found.handled // W


def check(
    windows: list[tuple[int, int]], probs: np.ndarray, total: int, policy: ChunkPolicy
) -> None:
    speech = probs >= policy.threshold
    # In order, no overlap, inside the audio, at most max_s.
    assert all(0 <= a < b <= total for a, b in windows)
    assert all(b1 <= a2 for (_, b1), (a2, _) in itertools.pairwise(windows))
    assert all(b - a <= policy.max_s * SAMPLE_RATE for a, b in windows)
    covered = np.zeros(probs.size, np.int32)
    for a, b in windows:
        covered[a // W : -(-b // W)] += 1
        inside = speech[a // W : -(-b // W)]
        assert inside.sum() >= policy.min_speech_w, "a window of less speech than a blip"
    assert covered.max(initial=0) <= 1
    # Every window of a run of speech long enough not to be a blip is decoded.
    edges = np.flatnonzero(np.diff(np.concatenate([[0], speech.astype(np.int8), [0]])))
    for s, e in zip(edges[::2], edges[1::2], strict=True):
        if e - s >= policy.min_speech_w:
            assert covered[s:e].all(), f"speech in windows [{s}, {e}) not decoded"


@given(policies(), audio())
def test_a_whole_file_is_cut_into_ordered_windows_that_cover_its_speech(
    policy: ChunkPolicy, drawn: tuple[np.ndarray, int]
) -> None:
    """Planned at once (the file's end): the invariants of the module docstring."""
    probs, total = drawn
    check(list(plan(probs, total, policy, final=True).windows), probs, total, policy)


@given(policies(), audio(), st.integers(1, 1200))
def test_planned_block_by_block_the_windows_still_cover_the_speech_once(
    policy: ChunkPolicy, drawn: tuple[np.ndarray, int], block_w: int
) -> None:
    """Blocks of any size, each restarting at the last one's `handled`: no word is cut
    at a block's end, none decoded twice, none lost."""
    probs, total = drawn
    check(in_blocks(probs, total, policy, block_w), probs, total, policy)


# --- examples ------------------------------------------------------------------------------


def probs_of(*runs: tuple[float, float]) -> np.ndarray:
    """VAD probabilities from (probability, seconds) runs."""
    return np.concatenate([np.full(windows_of(s), p, np.float32) for p, s in runs])


def whole(probs: np.ndarray, policy: ChunkPolicy | None = None) -> Plan:
    return plan(probs, probs.size * W, policy or ChunkPolicy(), final=True)


def test_speech_gets_its_padding_and_silence_no_window() -> None:
    """One utterance in silence: one window, `pad_s` (in whole VAD windows) each side."""
    policy = ChunkPolicy(pad_s=0.4)
    probs = probs_of((0.0, 5.0), (0.9, 3.0), (0.0, 5.0))
    s, e = windows_of(5.0), windows_of(8.0)
    assert whole(probs, policy).windows == ((W * (s - policy.pad_w), W * (e + policy.pad_w)),)
    assert whole(probs_of((0.1, 60.0))).windows == ()


def test_blips_alone_are_not_decoded() -> None:
    """Noises shorter than 0.15 s, far from any speech, give no window; next to speech
    they are in its window."""
    blip = (0.9, 0.1)
    assert whole(probs_of((0.0, 3.0), blip, (0.0, 3.0), blip, (0.0, 3.0))).windows == ()
    near = whole(probs_of((0.0, 3.0), blip, (0.0, 0.5), (0.9, 2.0), (0.0, 3.0)))
    assert len(near.windows) == 1 and near.windows[0][0] < windows_of(3.1) * W


def test_a_long_pause_ends_a_window_and_short_ones_do_not() -> None:
    """Two sentences 1 s apart share a window; 3 s apart (more than max_gap_s) they do not."""
    close = whole(probs_of((0.9, 4.0), (0.0, 1.0), (0.9, 4.0)))
    apart = whole(probs_of((0.9, 4.0), (0.0, 3.0), (0.9, 4.0)))
    assert len(close.windows) == 1 and len(apart.windows) == 2


def test_speech_past_the_limit_is_cut_in_the_longest_pause_of_the_second_half() -> None:
    """Speech with pauses at 8 s (1.5 s long: first half), 18 s (0.6 s) and 25 s (0.3 s)
    and on past 28 s: the first window ends in the 0.6 s pause, not the longer one in
    the first half nor the later, shorter one."""
    runs = [(0.9, 8.0), (0.0, 1.5), (0.9, 8.5), (0.0, 0.6), (0.9, 6.4), (0.0, 0.3), (0.9, 10.0)]
    first, second = whole(probs_of(*runs), ChunkPolicy(pad_s=0.0)).windows
    before = sum(windows_of(seconds) for _, seconds in runs[:3])
    pause = before * W, (before + windows_of(0.6)) * W
    assert pause[0] <= first[1] <= second[0] <= pause[1]


def test_speech_with_no_pause_is_cut_at_its_least_speech_like_window() -> None:
    """60 s of speech with no pause: windows of at most 28 s, the first cut right after
    the one window (in its last 2 s) where the VAD was least sure."""
    probs = probs_of((0.95, 60.0))
    dip = windows_of(27.0)
    probs[dip] = 0.55
    windows = whole(probs, ChunkPolicy(pad_s=0.0)).windows
    assert windows[0] == (0, (dip + 1) * W)
    assert all(b - a <= 28 * SAMPLE_RATE for a, b in windows)
    assert windows[-1][1] == probs.size * W and len(windows) == 3


def test_a_block_that_is_not_the_end_leaves_off_before_open_speech() -> None:
    """Not the file's end: a window whose speech may go on after the block is not
    planned; `handled` is where it starts (the next block begins there). After speech
    that ended, silence is handled up to the padding the next speech may need."""
    policy = ChunkPolicy(pad_s=0.4)
    probs = probs_of((0.9, 3.0), (0.0, 4.0), (0.9, 2.0))
    found = plan(probs, probs.size * W, policy, final=False)
    assert found.windows == ((0, (windows_of(3.0) + policy.pad_w) * W),)
    assert found.handled == (windows_of(7.0) - policy.pad_w) * W
    quiet = plan(probs_of((0.9, 3.0), (0.0, 5.0)), windows_of(8.0) * W, policy, final=False)
    assert len(quiet.windows) == 1
    assert quiet.handled == (windows_of(8.0) - policy.pad_w) * W


def test_bad_policies_and_inputs_are_refused() -> None:
    for bad in (
        {"threshold": 0.0},
        {"pad_s": -1.0},
        {"max_s": 31.0},
        {"max_s": 1.0, "pad_s": 0.4},
        {"max_gap_s": float("nan")},
    ):
        with pytest.raises(ValueError):
            ChunkPolicy(**bad)
    with pytest.raises(ValueError, match="VAD windows"):
        plan(np.zeros(3, np.float32), 5 * W, ChunkPolicy(), final=True)
