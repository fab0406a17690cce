"""bench/soak.py: how it names key kinds and measures growth, on known inputs."""

from __future__ import annotations

import pytest

from bench.soak import growth_per_1000, key_kind

SID = "0123456789abcdef0123456789abcdef"


@pytest.mark.parametrize(
    ("key", "kind"),
    [
        (f"ss:{{{SID}}}:meta", "ss:{*}:meta"),
        (f"ss:{{{SID}}}:results", "ss:{*}:results"),
        ("ss:dispatch:high", "ss:dispatch:high"),
        ("ss:worker:vm-2903", "ss:worker:*"),
        ("ss:gateway:vm-2898-03c883:sessions", "ss:gateway:*:sessions"),
        (
            "arq:in-progress:streamscribe:maintain:1765075200000",
            "arq:in-progress:streamscribe:maintain:*",
        ),
        ("ss:arq:queue", "ss:arq:queue"),
    ],
)
def test_key_kinds_hide_session_and_other_ids(key: str, kind: str) -> None:
    """A session id in braces becomes `{*}`; a worker, gateway or job id (a part with a
    digit) becomes `*`; fixed names stay as they are."""
    assert key_kind(key) == kind


def test_growth_is_measured_over_the_second_half() -> None:
    """Growth runs from the middle sample (warm-up left out) to the last, per 1,000
    sessions started in between."""
    samples = [(0.0, 100.0), (10.0, 150.0), (20.0, 151.0), (30.0, 152.0), (40.0, 154.0)]
    started = [(0.0, 0), (5.0, 500), (15.0, 1000), (25.0, 1500), (35.0, 2000)]
    grown = growth_per_1000(samples, started)
    assert grown is not None
    # middle sample: index 5 // 2 = 2 (t 20, 151 MiB, 1,000 started); last: t 40, 2,000
    assert grown[0] == pytest.approx(3.0)
    assert grown[1] == pytest.approx(3.0)
    assert growth_per_1000(samples[:3], started) is None
    assert growth_per_1000([(0.0, 1.0)] * 4, [(0.0, 0)]) == (0.0, 0.0)
