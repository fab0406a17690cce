"""The audio rate limit at its edges, on a clock the test controls."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared.ratelimit import AudioRateLimit

BPS = 32000  # 16 kHz, 16-bit mono


def test_a_whole_burst_passes_at_once_and_one_sample_more_does_not() -> None:
    limit = AudioRateLimit(rate=2.0, burst_s=1.0, bytes_per_second=BPS, now=100.0)
    assert all(limit.take(3200, 100.0) for _ in range(10))  # exactly 1.0 s
    assert not limit.take(2, 100.0)  # one sample over the burst
    assert not limit.take(2, 100.0)  # a refused frame counts nothing, refill does not


def test_it_refills_at_the_rate_and_never_past_the_burst() -> None:
    limit = AudioRateLimit(rate=2.0, burst_s=1.0, bytes_per_second=BPS, now=0.0)
    assert limit.take(BPS, 0.0)
    assert not limit.take(6402, 0.1)  # 0.1 s at 2x refilled 6400 bytes
    assert limit.take(6400, 0.1)
    assert not limit.take(2, 0.1)
    assert limit.take(BPS, 100.0)  # an hour later: still one burst, no more
    assert not limit.take(2, 100.0)


def test_a_clock_going_backwards_refills_nothing() -> None:
    limit = AudioRateLimit(rate=1.0, burst_s=1.0, bytes_per_second=BPS, now=10.0)
    assert limit.take(BPS, 10.0)
    assert not limit.take(2, 9.0)
    assert not limit.take(2, 10.0)


def test_real_time_streaming_is_never_refused_at_rate_one() -> None:
    """A client sending 100 ms frames on time, with jitter inside the burst, passes."""
    rng = random.Random(7)
    limit = AudioRateLimit(rate=1.0, burst_s=0.5, bytes_per_second=BPS, now=0.0)
    for k in range(1, 3001):
        sent_at = k * 0.1 + rng.uniform(-0.2, 0.2)  # early or late by up to 200 ms
        assert limit.take(3200, max(0.0, sent_at)), k


def test_the_long_run_average_is_the_rate() -> None:
    limit = AudioRateLimit(rate=3.0, burst_s=2.0, bytes_per_second=BPS, now=0.0)
    accepted, now = 0, 0.0
    for _ in range(20000):
        now += 0.001
        if limit.take(640, now):  # a client trying 20x real time
            accepted += 640
    assert accepted <= (2.0 + 3.0 * now) * BPS
    assert accepted >= (3.0 * now) * BPS - 640


@pytest.mark.parametrize(("rate", "burst"), [(0, 1), (-1, 1), (float("inf"), 1), (1, 0)])
def test_bad_settings_are_refused(rate: float, burst: float) -> None:
    with pytest.raises(ValueError):
        AudioRateLimit(rate=rate, burst_s=burst, bytes_per_second=BPS, now=0.0)


def test_a_resumed_session_starts_with_what_it_has_left() -> None:
    """burst + rate * age - stored, to the byte: reconnecting never refills the bucket."""
    # 5 s old, 2x, 1 s burst: 11 s allowed so far; 10.5 s stored leaves 0.5 s.
    limit = AudioRateLimit(2.0, 1.0, BPS, now=0.0, age_s=5.0, stored_bytes=int(10.5 * BPS))
    assert limit.take(BPS // 2, 0.0)
    assert not limit.take(2, 0.0)
    # Stored more than allowed (it was sent before the limit was turned on): starts empty
    # and refills at the rate, as any connection does.
    over = AudioRateLimit(2.0, 1.0, BPS, now=0.0, age_s=1.0, stored_bytes=100 * BPS)
    assert not over.take(2, 0.0)
    assert over.take(6400, 0.1)
    # Idle for long: no more than one burst, as for a new connection.
    idle = AudioRateLimit(2.0, 1.0, BPS, now=0.0, age_s=3600.0, stored_bytes=BPS)
    assert idle.take(BPS, 0.0)
    assert not idle.take(2, 0.0)


@given(
    st.floats(1.0, 4.0),
    st.floats(0.5, 20.0),
    st.floats(0.0, 30.0),
    st.floats(0.0, 1.0),
    st.lists(st.tuples(st.floats(0.0, 2.0), st.integers(1, 64_000)), max_size=80),
)
def test_a_session_never_stores_more_than_burst_plus_rate_times_age(
    rate: float, burst_s: float, age_s: float, used: float, arrivals: list[tuple[float, int]]
) -> None:
    """Any arrivals (gaps and sizes), on a new connection or a resumed one that stored
    `used` of what its age allowed: the audio taken up to any moment is at most
    burst + rate * (age + elapsed) less what was stored before."""
    stored = int(used * (burst_s + rate * age_s) * BPS)
    limit = AudioRateLimit(rate, burst_s, BPS, 0.0, age_s=age_s, stored_bytes=stored)
    now, taken = 0.0, 0
    for gap, nbytes in arrivals:
        now += gap
        if limit.take(nbytes, now):
            taken += nbytes
            assert stored + taken <= (burst_s + rate * (age_s + now)) * BPS + 1e-6


@given(
    st.floats(1.0, 4.0),
    st.floats(0.5, 20.0),
    st.lists(st.tuples(st.floats(0.01, 1.0), st.floats(0.0, 1.0)), max_size=80),
)
def test_audio_paced_within_the_rate_is_never_refused(
    rate: float, burst_s: float, frames: list[tuple[float, float]]
) -> None:
    """A client that sends each frame no faster than `rate` allows since the one before
    (and none longer than the burst) is never refused, however irregular its frames."""
    limit = AudioRateLimit(rate, burst_s, BPS, 0.0)
    now = 0.0
    for gap, share in frames:
        now += gap
        nbytes = max(1, int(share * min(gap * rate, burst_s) * BPS))
        assert limit.take(nbytes, now), (gap, nbytes)
