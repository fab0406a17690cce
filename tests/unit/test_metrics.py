"""Unit tests for shared/metrics.py: `Histogram` and the Prometheus text `Metrics` renders,
checked line by line and with prometheus_client's parser."""

from __future__ import annotations

import math

import pytest
from prometheus_client.parser import text_string_to_metric_families

from shared.metrics import LATENCY_BOUNDS_S, Histogram, Metrics


def test_a_value_on_a_bound_is_in_that_bucket_and_above_the_last_in_inf_only() -> None:
    """`le` is inclusive: 1.0 counts under le=1, 1.0000001 under le=2; a value past the
    highest bound counts only in +Inf; sum and count take every value."""
    h = Histogram((1.0, 2.0))
    for value in (0.0, 1.0, 1.0000001, 2.0, 7.5):
        h.observe(value)
    assert h.counts == [2, 2, 1]
    assert h.cumulative() == [(1.0, 2), (2.0, 4), (math.inf, 5)]
    assert h.count == 5 and h.sum == pytest.approx(11.5000001)


def test_an_empty_histogram_has_zero_everywhere() -> None:
    h = Histogram()
    assert h.bounds == LATENCY_BOUNDS_S
    assert h.cumulative() == [*((b, 0) for b in LATENCY_BOUNDS_S), (math.inf, 0)]
    assert (h.count, h.sum) == (0, 0.0)


@pytest.mark.parametrize(
    "bounds",
    [(), (1.0, 1.0), (2.0, 1.0), (0.5, math.inf), (math.nan,), (-math.inf, 1.0)],
    ids=["empty", "repeated", "descending", "inf", "nan", "minus-inf"],
)
def test_bounds_must_be_finite_and_strictly_increasing(bounds: tuple[float, ...]) -> None:
    """Bad bounds are refused, not sorted or deduplicated behind the caller's back."""
    with pytest.raises(ValueError):
        Histogram(bounds)


def test_a_histogram_renders_cumulative_buckets_then_sum_and_count() -> None:
    m = Metrics("p")
    h = Histogram((0.05, 1.0, 2.5))
    for value in (0.05, 0.3, 0.7, 3.0):
        h.observe(value)
    m.histogram("wait_seconds", h)
    assert m.render().splitlines() == [
        "# TYPE p_wait_seconds histogram",
        'p_wait_seconds_bucket{le="0.05"} 1',
        'p_wait_seconds_bucket{le="1"} 3',
        'p_wait_seconds_bucket{le="2.5"} 3',
        'p_wait_seconds_bucket{le="+Inf"} 4',
        "p_wait_seconds_sum 4.05",
        "p_wait_seconds_count 4",
    ]


def test_labelled_histograms_share_one_type_line_and_carry_their_labels_everywhere() -> None:
    """Two series of one histogram: one `# TYPE`, and each series' labels stand before
    `le` on its buckets and alone on its `_sum` and `_count`."""
    m = Metrics("p")
    final, interim = Histogram((1.0,)), Histogram((1.0,))
    final.observe(0.5)
    interim.observe(2.0)
    interim.observe(3.0)
    m.histogram('call_seconds{kind="interim"}', interim)
    m.histogram('call_seconds{kind="final"}', final)
    assert m.render().splitlines() == [
        "# TYPE p_call_seconds histogram",
        'p_call_seconds_bucket{kind="final",le="1"} 1',
        'p_call_seconds_bucket{kind="final",le="+Inf"} 1',
        'p_call_seconds_sum{kind="final"} 0.5',
        'p_call_seconds_count{kind="final"} 1',
        'p_call_seconds_bucket{kind="interim",le="1"} 0',
        'p_call_seconds_bucket{kind="interim",le="+Inf"} 2',
        'p_call_seconds_sum{kind="interim"} 5',
        'p_call_seconds_count{kind="interim"} 2',
    ]


def test_one_type_line_per_metric_even_when_another_name_sorts_between_its_series() -> None:
    """`x_y` sorts between `x` and `x{...}` ('_' < '{'): the series of `x` still go
    together under one `# TYPE`."""
    m = Metrics("p")
    m.set("x", 1)
    m.set("x_y", 2)
    m.set('x{a="1"}', 3)
    lines = m.render().splitlines()
    assert lines == [
        "# TYPE p_x gauge",
        "p_x 1",
        'p_x{a="1"} 3',
        "# TYPE p_x_y gauge",
        "p_x_y 2",
    ]


def test_numbers_keep_every_digit() -> None:
    """Counters past a million are written whole (`:g` would round them), floats as the
    shortest text that reads back exactly."""
    m = Metrics("p")
    m.total("decodes_total", 1234567)
    m.set("busy", 0.123456789)
    m.set("slots", 8)
    text = m.render()
    assert "p_decodes_total 1234567\n" in text
    assert "p_busy 0.123456789\n" in text
    assert "p_slots 8\n" in text


def test_prometheus_client_parses_counters_gauges_and_histograms() -> None:
    """The whole text parses into one family per metric, each with its type (a sample
    outside its family would come back as an untyped family of its own), and each
    histogram's buckets rise to its count."""
    m = Metrics("p")
    m.inc('errors_total{code="internal"}')
    m.inc('errors_total{code="rate_limited"}', 2)
    m.set("slots", 4)
    for kind, values in (("final", (0.2, 0.01)), ("interim", (12.0,))):
        h = Histogram()
        for v in values:
            h.observe(v)
        m.histogram(f'call_seconds{{kind="{kind}"}}', h)
    m.histogram("wait_seconds", Histogram())
    families = list(text_string_to_metric_families(m.render()))
    types = {f.name: f.type for f in families}
    assert len(types) == len(families)  # no family twice
    assert types == {
        "p_errors": "counter",
        "p_slots": "gauge",
        "p_call_seconds": "histogram",
        "p_wait_seconds": "histogram",
    }
    calls = next(f for f in families if f.name == "p_call_seconds")
    for kind, count in (("final", 2), ("interim", 1)):
        buckets = [
            (s.labels["le"], s.value)
            for s in calls.samples
            if s.name == "p_call_seconds_bucket" and s.labels["kind"] == kind
        ]
        assert [le for le, _ in buckets][-1] == "+Inf"
        assert len(buckets) == len(LATENCY_BOUNDS_S) + 1
        cumulative = [v for _, v in buckets]
        assert cumulative == sorted(cumulative) and cumulative[-1] == count
        (total,) = [
            s.value
            for s in calls.samples
            if s.name == "p_call_seconds_count" and s.labels == {"kind": kind}
        ]
        assert total == count
