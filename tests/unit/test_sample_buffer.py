"""`SampleBuffer` against the plain concatenate-and-slice it replaced, and its views
never changing (decodes read them in another thread while the VAD thread appends)."""

from __future__ import annotations

import numpy as np
import pytest

from worker.audio import SampleBuffer


def test_random_appends_views_and_drops_match_a_plain_array() -> None:
    rng = np.random.default_rng(7)
    buf = SampleBuffer(start=1000, capacity=8)
    ref = np.zeros(0, np.float32)
    ref_start = 1000
    grew = appends = most = 0
    views: list[tuple[np.ndarray, np.ndarray]] = []  # (view, its samples when taken)
    for _ in range(3000):
        op = rng.integers(0, 3)
        if op == 0:
            new = rng.standard_normal(int(rng.integers(0, 900))).astype(np.float32)
            before = buf._data
            buf.append(new)
            grew += buf._data is not before
            appends += 1
            most = max(most, len(buf))
            ref = np.concatenate([ref, new])
        elif op == 1 and ref.size:
            keep = int(rng.integers(ref_start, ref_start + ref.size + 1))
            buf.drop_before(keep)
            ref, ref_start = ref[keep - ref_start :], keep
        else:
            lo = int(rng.integers(ref_start, ref_start + ref.size + 1))
            hi = int(rng.integers(lo, ref_start + ref.size + 1))
            view = buf.view(lo, hi)
            np.testing.assert_array_equal(view, ref[lo - ref_start : hi - ref_start])
            views.append((view, view.copy()))
        assert (buf.start, buf.end, len(buf)) == (ref_start, ref_start + ref.size, ref.size)
    # Storage is replaced only now and then (when full), not on every append, and stays
    # within a small multiple of the most ever held.
    assert 0 < grew < appends / 10
    assert buf._data.size <= 4 * most
    # Every view taken along the way still shows the samples it showed then.
    assert len(views) > 500
    for view, then in views:
        np.testing.assert_array_equal(view, then)


def test_a_view_survives_drops_appends_and_a_full_storage() -> None:
    buf = SampleBuffer(start=0, capacity=100)
    buf.append(np.arange(90, dtype=np.float32))
    view = buf.view(80, 90)
    buf.drop_before(90)  # nothing live: appends still go past the newest sample
    buf.append(np.full(5, -1, np.float32))
    buf.drop_before(95)
    data = buf._data
    buf.append(np.full(20, -2, np.float32))  # does not fit after the head
    assert buf._data is not data  # fresh storage, not a move to the front of this one
    np.testing.assert_array_equal(view, np.arange(80, 90, dtype=np.float32))
    np.testing.assert_array_equal(buf.view(95, 115), np.full(20, -2, np.float32))


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
