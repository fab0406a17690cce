"""`streamscribe loadtest --plot`: latency over time and its distribution, with matplotlib.

matplotlib is optional (the `bench` extra) and imported only here, only when asked for.
"""

from __future__ import annotations

from typing import Any

from shared.loadstats import LoadRecorder, LoadReport, Series

MAX_POINTS = 20_000  # per scatter: beyond this, every n-th sample (the CDF uses all)
FLOOR_MS = 0.01  # log axes: a sample below this is drawn at it
COLOURS = ("tab:blue", "tab:orange")


def require_matplotlib() -> None:
    """Raise the usage error the command prints when matplotlib is missing."""
    from shared.loadtest import UsageError

    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UsageError(
            "--plot needs matplotlib: pip install matplotlib (or pip install 'streamscribe[bench]')"
        ) from None


def _thin(series: Series) -> tuple[list[float], list[float]]:
    step = max(1, len(series) // MAX_POINTS)
    return list(series.times[::step]), [v * 1000 for v in series.values[::step]]


def _log_bins(lo: float, hi: float, n: int) -> list[float]:
    hi = max(hi, lo * 1.01)
    return [lo * (hi / lo) ** (i / n) for i in range(n + 1)]


def _cdf(ax: Any, series: Series, label: str) -> None:
    values = sorted(max(v * 1000, FLOOR_MS) for v in series.values)
    if values:
        n = len(values)
        ax.step(values, [(i + 1) / n for i in range(n)], where="post", label=label)


def write_plot(recorder: LoadRecorder, report: LoadReport, path: str) -> None:
    """Four panels: final lag and ack latency against wall time; histograms; CDFs."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 8), layout="constrained")
    (lag_t, ack_t), (hist, cdf) = fig.subplots(2, 2)
    for ax, series, key, title, colour in (
        (lag_t, recorder.final_lag, "final_lag_s", "final lag", COLOURS[0]),
        (ack_t, recorder.ack_latency, "ack_latency_s", "ack latency", COLOURS[1]),
    ):
        xs, ys = _thin(series)
        ax.scatter(xs, ys, s=4, alpha=0.5, color=colour)
        p95 = report.metrics[key].p95
        if p95 is not None:
            ax.axhline(p95 * 1000, color="black", linestyle="--", linewidth=0.8)
            ax.annotate(
                f"p95 {p95 * 1000:.1f} ms",
                (0.01, p95 * 1000),
                xycoords=("axes fraction", "data"),
                va="bottom",
            )
        ax.set_title(f"{title} over time ({len(series)} samples)")
        ax.set_xlabel("seconds since start")
        ax.set_ylabel("ms")
        ax.grid(alpha=0.3)
    samples = {
        (label, colour): [max(v * 1000, FLOOR_MS) for v in series.values]
        for series, label, colour in (
            (recorder.final_lag, "final lag", COLOURS[0]),
            (recorder.ack_latency, "ack latency", COLOURS[1]),
        )
        if len(series)
    }
    if samples:
        everything = [v for values in samples.values() for v in values]
        edges = _log_bins(min(everything), max(everything), 60)
        for (label, colour), values in samples.items():
            hist.hist(values, bins=edges, alpha=0.6, label=label, color=colour)
        hist.set_xscale("log")
        hist.legend()
    _cdf(cdf, recorder.final_lag, "final lag")
    _cdf(cdf, recorder.ack_latency, "ack latency")
    _cdf(cdf, recorder.completion, "session completion")
    _cdf(cdf, recorder.text_wait, "wait for text")
    hist.set_title("distribution")
    hist.set_xlabel("ms (log)")
    hist.set_ylabel("samples")
    cdf.set_title("cumulative distribution")
    cdf.set_xlabel("ms (log)")
    cdf.set_ylabel("fraction of samples")
    curves = (recorder.final_lag, recorder.ack_latency, recorder.completion, recorder.text_wait)
    if any(len(s) for s in curves):
        cdf.set_xscale("log")
        cdf.legend()
    cdf.grid(alpha=0.3)
    run = report.run
    fig.suptitle(
        f"streamscribe loadtest: {run.sessions} sessions, pace {run.pace:g}x, "
        f"{report.completed} completed, {report.failed} failed, {report.unfinished} unfinished"
    )
    fig.savefig(path, dpi=100)
