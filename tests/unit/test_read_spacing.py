"""How far apart the worker starts its reads of the audio streams (`read_spacing_s`)."""

from __future__ import annotations

import pytest

from worker.service import read_spacing_s


@pytest.mark.parametrize(
    ("streams", "interval_ms", "per_s", "expected"),
    [
        (10, 20, 10_000, 0.020),  # few sessions: read_interval_ms decides
        (200, 20, 10_000, 0.020),  # the edge: 200 streams every 20 ms is 10,000 a second
        (201, 20, 10_000, 0.0201),  # one more stream: spaced so as not to exceed the cap
        (500, 20, 10_000, 0.050),
        (1000, 20, 10_000, 0.100),
        (1000, 20, 0, 0.020),  # 0: no cap
        (1000, 0, 0, 0.0),  # read again at once
        (50_000, 20, 10_000, 1.0),  # never more than 1 s apart
        (2000, 500, 10_000, 0.5),  # a longer interval stays the floor
    ],
)
def test_read_spacing(streams: int, interval_ms: int, per_s: int, expected: float) -> None:
    assert read_spacing_s(streams, interval_ms, per_s) == pytest.approx(expected)
