"""Tiny Prometheus-text metrics: counters, gauges and histograms kept in process memory."""

from __future__ import annotations

import bisect
import itertools
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence

#: Upper bounds (seconds) for latencies from ~10 ms (a null engine's decode) to 10 s (a
#: long utterance on a slow CPU); slower ones still count in `+Inf`, `_sum` and `_count`.
LATENCY_BOUNDS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)
#: Upper bounds (seconds) for Redis round trips: a pipeline on loopback takes a fraction of
#: a millisecond, one stuck behind a slow command or a failover seconds.
ROUND_TRIP_BOUNDS_S = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
)  # fmt: skip


class Histogram:
    """Counts of observed values by bucket (Prometheus `le`: a value equal to a bound is in
    that bound's bucket), with their sum and count. `observe` is a binary search and three
    additions: cheap enough to run once per decode on the event loop."""

    __slots__ = ("bounds", "count", "counts", "sum")

    def __init__(self, bounds: Sequence[float] = LATENCY_BOUNDS_S) -> None:
        bounds = tuple(float(b) for b in bounds)
        if not bounds:
            raise ValueError("a histogram needs at least one bucket bound")
        if not all(math.isfinite(b) for b in bounds):
            raise ValueError(f"bucket bounds must be finite (+Inf is implied): {bounds}")
        if any(lo >= hi for lo, hi in itertools.pairwise(bounds)):
            raise ValueError(f"bucket bounds must be strictly increasing: {bounds}")
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # per bucket, not cumulative; last: +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, observations at or below it), the last bound `inf` (all of them)."""
        out: list[tuple[float, int]] = []
        total = 0
        for bound, n in zip((*self.bounds, math.inf), self.counts, strict=True):
            total += n
            out.append((bound, total))
        return out


class Metrics:
    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.counters: dict[str, float] = defaultdict(float)
        self.gauges: dict[str, float] = {}
        self.histograms: dict[str, Histogram] = {}

    def inc(self, name: str, value: float = 1.0) -> None:
        self.counters[name] += value

    def set(self, name: str, value: float) -> None:
        self.gauges[name] = value

    def total(self, name: str, value: float) -> None:
        """A counter whose running total is kept elsewhere (the worker's own counts)."""
        self.counters[name] = value

    def histogram(self, name: str, histogram: Histogram) -> None:
        """A histogram kept elsewhere; `name` may carry labels (`x{kind="final"}`)."""
        self.histograms[name] = histogram

    def render(self) -> str:
        """Prometheus text: one `# TYPE` line per metric, before all of its samples (the
        series of one metric with different labels go together)."""
        lines: list[str] = []
        for kind, table in (("counter", self.counters), ("gauge", self.gauges)):
            for base, names in _by_metric(table):
                lines.append(f"# TYPE {self.prefix}_{base} {kind}")
                lines.extend(f"{self.prefix}_{name} {_number(table[name])}" for name in names)
        for base, names in _by_metric(self.histograms):
            lines.append(f"# TYPE {self.prefix}_{base} histogram")
            for name in names:
                lines.extend(_histogram_lines(f"{self.prefix}_{base}", name, self.histograms[name]))
        return "\n".join(lines) + "\n"


def _by_metric(names: Iterable[str]) -> list[tuple[str, list[str]]]:
    """`names` (labels included) grouped by metric name (labels left out), sorted."""
    groups: dict[str, list[str]] = defaultdict(list)
    for name in sorted(names):
        groups[name.split("{", 1)[0]].append(name)
    return sorted(groups.items())


def _histogram_lines(metric: str, name: str, histogram: Histogram) -> list[str]:
    """The samples of one histogram series: cumulative `_bucket`s up to `le="+Inf"`, then
    `_sum` and `_count`, each with the series' labels (`name`'s, if any)."""
    labels = name[name.index("{") + 1 : -1] if "{" in name else ""
    sep = "," if labels else ""
    lines = [
        f'{metric}_bucket{{{labels}{sep}le="{_number(bound)}"}} {n}'
        for bound, n in histogram.cumulative()
    ]
    tail = f"{{{labels}}}" if labels else ""
    lines.append(f"{metric}_sum{tail} {_number(histogram.sum)}")
    lines.append(f"{metric}_count{tail} {histogram.count}")
    return lines


def _number(value: float) -> str:
    """A sample value or `le` bound as Prometheus clients write it: "+Inf", "0.05", "1",
    every digit kept (`:g` would write 1234567 as 1.23457e+06)."""
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    text = repr(float(value))
    return text.removesuffix(".0")
