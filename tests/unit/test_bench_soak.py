"""bench/soak.py: how it names key kinds and measures growth, on known inputs."""

from __future__ import annotations

from typing import Any

import pytest

from bench.soak import Sample, growth_per_1000, key_kind, progress_line, wave_line, wave_result

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


def test_progress_line_shows_each_process_and_valkey() -> None:
    s = Sample(
        t=600.4,
        sessions_started=300,
        rss_mib={"worker": 353.72, "gateway": 48.06, "valkey": 15.5},
        cpu_s={},
        used_memory_mib=2.24,
        keys=12,
    )
    assert progress_line(s) == (
        "t 600 s, 300 sessions started: RSS MiB gateway 48.1, valkey 15.5, worker 353.7; "
        "Valkey used 2.2 MiB, 12 keys"
    )


def _report(
    lag: dict[str, float], unqueued: dict[str, float] | None, queued: int
) -> dict[str, Any]:
    metrics: dict[str, dict[str, float]] = {"final_lag_s": lag}
    if unqueued is not None:
        metrics["final_lag_unqueued_s"] = unqueued
    return {
        "sessions_total": 16,
        "completed": 15,
        "failed": 1,
        "unfinished": 0,
        "queued_sessions": queued,
        "metrics": metrics,
        "errors_by_close_code": {"1013": 1},
        "error_messages": {"overloaded": 1},
    }


def test_a_wave_tells_queued_sessions_apart() -> None:
    """A wave whose sessions queued reports the p95 final lag of the others as well."""
    wave = wave_result(3, 120.0, _report({"p50": 1.0, "p95": 14.2}, {"p95": 1.9}, queued=4))
    assert (wave.completed, wave.failed, wave.queued) == (15, 1, 4)
    assert wave.final_lag_p95_s == 14.2
    assert wave.final_lag_unqueued_p95_s == 1.9
    assert wave_line(wave) == (
        "wave 4: 15/16 completed, final lag p95 14.20 s; 4 queued, the others' p95 1.90 s"
    )


def test_a_wave_without_queued_sessions_reads_as_before() -> None:
    """No session queued: one lag figure; an older report without the unqueued series
    falls back to the whole wave's."""
    wave = wave_result(0, 0.0, _report({"p50": 0.8, "p95": 1.4}, None, queued=0))
    assert wave.final_lag_unqueued_p95_s == 1.4
    assert wave_line(wave) == "wave 1: 15/16 completed, final lag p95 1.40 s"
