"""`SampleBuffer` against the plain concatenate-and-slice it replaced."""

from __future__ import annotations

import numpy as np
import pytest

from worker.audio import SampleBuffer


def test_random_appends_views_and_drops_match_a_plain_array() -> None:
    rng = np.random.default_rng(7)
    buf = SampleBuffer(start=1000, capacity=8)
    ref = np.zeros(0, np.float32)
    ref_start = 1000
    grew = 0
    for _ in range(3000):
        op = rng.integers(0, 3)
        if op == 0:
            new = rng.standard_normal(int(rng.integers(0, 900))).astype(np.float32)
            before = buf._data
            buf.append(new)
            grew += buf._data is not before
            ref = np.concatenate([ref, new])
        elif op == 1 and ref.size:
            keep = int(rng.integers(ref_start, ref_start + ref.size + 1))
            buf.drop_before(keep)
            ref, ref_start = ref[keep - ref_start :], keep
        else:
            lo = int(rng.integers(ref_start, ref_start + ref.size + 1))
            hi = int(rng.integers(lo, ref_start + ref.size + 1))
            np.testing.assert_array_equal(buf.view(lo, hi), ref[lo - ref_start : hi - ref_start])
        assert (buf.start, buf.end, len(buf)) == (ref_start, ref_start + ref.size, ref.size)
    # Storage is reallocated only now and then (doubling), not on every append.
    assert 0 < grew < 40


def test_in_place_compaction_keeps_the_samples() -> None:
    buf = SampleBuffer(start=0, capacity=100)
    buf.append(np.arange(90, dtype=np.float32))
    buf.drop_before(80)  # 10 live samples at storage offset 80
    data = buf._data
    buf.append(np.arange(90, 110, dtype=np.float32))  # does not fit after the head
    assert buf._data is data  # moved to the front of the same storage, not reallocated
    np.testing.assert_array_equal(buf.view(80, 110), np.arange(80, 110, dtype=np.float32))


def test_views_outside_what_is_held_raise() -> None:
    buf = SampleBuffer(start=50)
    buf.append(np.ones(10, np.float32))
    buf.drop_before(55)
    with pytest.raises(IndexError):
        buf.view(54, 56)
    with pytest.raises(IndexError):
        buf.view(55, 61)
    assert buf.view(60, 60).size == 0
    buf.drop_before(10**9)  # clamped to what is held
    assert (buf.start, len(buf)) == (60, 0)
