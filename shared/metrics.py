"""Tiny Prometheus-text metrics: counters and gauges kept in process memory."""

from __future__ import annotations

from collections import defaultdict


class Metrics:
    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.counters: dict[str, float] = defaultdict(float)
        self.gauges: dict[str, float] = {}

    def inc(self, name: str, value: float = 1.0) -> None:
        self.counters[name] += value

    def set(self, name: str, value: float) -> None:
        self.gauges[name] = value

    def total(self, name: str, value: float) -> None:
        """A counter whose running total is kept elsewhere (the worker's own counts)."""
        self.counters[name] = value

    def render(self) -> str:
        """Prometheus text: one `# TYPE` line per metric, before all of its samples (the
        series of one metric with different labels sort next to each other)."""
        lines: list[str] = []
        for kind, table in (("counter", self.counters), ("gauge", self.gauges)):
            typed = ""
            for name in sorted(table):
                base = name.split("{", 1)[0]
                if base != typed:
                    lines.append(f"# TYPE {self.prefix}_{base} {kind}")
                    typed = base
                lines.append(f"{self.prefix}_{name} {table[name]:g}")
        return "\n".join(lines) + "\n"
