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

    def render(self) -> str:
        lines: list[str] = []
        for kind, table in (("counter", self.counters), ("gauge", self.gauges)):
            for name in sorted(table):
                base = name.split("{", 1)[0]
                full = f"{self.prefix}_{name}"
                lines.append(f"# TYPE {self.prefix}_{base} {kind}")
                lines.append(f"{full} {table[name]:g}")
        return "\n".join(lines) + "\n"
