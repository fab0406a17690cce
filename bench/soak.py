"""Soak: sustained load with sessions coming and going; does anything grow that should not?

    python bench/soak.py [--engine whisper|null] [--sessions 20] [--session-s 40]
                         [--minutes 10] [--session-ttl-s 60] [--sample-s 10]
                         [--json OUT] [--write docs/benchmarks.md]

One `streamscribe up` (embedded Valkey, one gateway, one worker; `--slots` twice
--sessions, so that no session waits in the queue) serves waves of sessions for
--minutes: every --session-s seconds a new `streamscribe loadtest` starts --sessions
sessions, evenly over --session-s, each streaming --session-s of real speech (the
capacity clips, looped to whole copies) at real time. The waves overlap, so about
--sessions sessions stream at any time and as many start and end every --session-s.

Every --sample-s it records each process's resident memory and CPU, and Valkey's
`used_memory` and key count. After the last wave it waits --session-ttl-s (the service
runs with it, so every finished session's keys expire by then) plus two maintenance
ticks (10 s each), and counts the keys that are left, by kind (a session id in a key name
is shown as `{*}`, another id as `*`): what a finished session leaves behind after its
TTL is a leak.

It prints a table per wave (sessions, failures, final lag; and, where some sessions of the
wave were told `queued`, how many and the p95 final lag of the others: a session admitted
late catches up on its stored audio, so its lag is its wait), the samples once a minute,
and a summary: each process's memory growth over the second half of the steady load
(until the last wave starts), per 1,000 sessions served; Valkey's memory before, during
(steady: finished sessions' keys expire as fast as new ones come) and after; and the keys
left once they expired. A bounded run: --minutes at most
120, and each wave's load generator stops on its own deadline.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (
    DEFAULT_CLIPS,
    UpService,
    load_average,
    machine,
    pick_clips,
    replace_section,
    run_loadtest,
    stage_clips,
    table,
    today,
    wait_quiet,
)

HEADING = "## Soak: sustained load with sessions coming and going"
MIB = 1 << 20
_SESSION_IN_KEY = re.compile(r"\{[0-9a-f]{32}\}")
_ID_RUN = re.compile(r"(?<=:)[0-9a-zA-Z_.-]*\d[0-9a-zA-Z_.-]*(?=:|$)")


def heading(engine: str) -> str:
    """The section's heading: one per engine."""
    return HEADING if engine == "whisper" else f"{HEADING} (null engine)"


def key_kind(key: str) -> str:
    """A key's kind: its name with the session id (`{<32 hex>}`) shown as `{*}` and any
    other id-like part (a worker, gateway or job id: one with a digit) as `*`."""
    return _ID_RUN.sub("*", _SESSION_IN_KEY.sub("{*}", key))


def growth_per_1000(
    samples: Sequence[tuple[float, float]], sessions_at: Sequence[tuple[float, int]]
) -> tuple[float, float] | None:
    """(MiB grown, MiB per 1,000 sessions) between the middle sample (time, MiB), the
    warm-up long over, and the last; `sessions_at` (time, sessions started so far) says
    how many sessions came in between. None with too few samples."""
    if len(samples) < 4:
        return None
    warm_t, warm = samples[len(samples) // 2]
    end_t, end = samples[-1]

    def started(t: float) -> int:
        return max((n for when, n in sessions_at if when <= t), default=0)

    served = started(end_t) - started(warm_t)
    grown = end - warm
    return grown, (grown / served * 1000 if served > 0 else 0.0)


@dataclass
class Sample:
    t: float  # seconds since the first wave started
    sessions_started: int
    rss_mib: dict[str, float]
    cpu_s: dict[str, float]
    used_memory_mib: float
    keys: int


@dataclass
class Wave:
    index: int
    started_t: float
    sessions: int
    completed: int = 0
    failed: int = 0
    final_lag_p50_s: float | None = None
    final_lag_p95_s: float | None = None
    # Sessions told `queued` (admitted late, catching up on stored audio), and the p95
    # final lag of the others: a queued session's lag says how long it waited, not how
    # fast the service decodes.
    queued: int = 0
    final_lag_unqueued_p95_s: float | None = None
    errors: dict[str, int] = field(default_factory=dict)


def redis_info(redis_url: str) -> tuple[float, int]:
    """Valkey's used memory (MiB) and its key count."""
    import redis

    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        info = cast(dict[str, Any], client.info("memory"))
        keys = int(cast(int, client.dbsize()))
        return float(info["used_memory"]) / MIB, keys
    finally:
        client.close()


def key_kinds(redis_url: str) -> dict[str, int]:
    import redis

    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        return dict(Counter(key_kind(str(k)) for k in client.scan_iter(count=1000)))
    finally:
        client.close()


def sample(service: UpService, t: float, started: int) -> Sample:
    used, keys = redis_info(service.redis_url)
    return Sample(t, started, service.rss_mib(), service.cpu(), used, keys)


def progress_line(s: Sample) -> str:
    """One sample as a progress line: a long soak shows its memory as it goes."""
    rss = ", ".join(f"{name} {mib:.1f}" for name, mib in sorted(s.rss_mib.items()))
    return (
        f"t {s.t:.0f} s, {s.sessions_started} sessions started: RSS MiB {rss}; "
        f"Valkey used {s.used_memory_mib:.1f} MiB, {s.keys} keys"
    )


def wave_result(index: int, started_t: float, report: Mapping[str, Any]) -> Wave:
    lag = report["metrics"]["final_lag_s"]
    served = report["metrics"].get("final_lag_unqueued_s", lag)
    return Wave(
        index=index,
        started_t=started_t,
        sessions=int(report["sessions_total"]),
        completed=int(report["completed"]),
        failed=int(report["failed"]) + int(report["unfinished"]),
        final_lag_p50_s=lag.get("p50"),
        final_lag_p95_s=lag.get("p95"),
        queued=int(report.get("queued_sessions", 0)),
        final_lag_unqueued_p95_s=served.get("p95"),
        errors={**report["errors_by_close_code"], **report["error_messages"]},
    )


def fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def wave_line(wave: Wave) -> str:
    """A finished wave as a progress line."""
    line = (
        f"wave {wave.index + 1}: {wave.completed}/{wave.sessions} completed, final lag "
        f"p95 {fmt(wave.final_lag_p95_s)} s"
    )
    if wave.queued:
        line += f"; {wave.queued} queued, the others' p95 {fmt(wave.final_lag_unqueued_p95_s)} s"
    return line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine", choices=["whisper", "null"], default="whisper")
    parser.add_argument("--sessions", type=int, default=20, help="sessions streaming at once")
    parser.add_argument("--session-s", type=float, default=40.0, help="audio per session")
    parser.add_argument("--minutes", type=float, default=10.0, help="how long waves start")
    parser.add_argument("--session-ttl-s", type=float, default=60.0)
    parser.add_argument("--sample-s", type=float, default=10.0)
    parser.add_argument("--clips", nargs="+", default=list(DEFAULT_CLIPS))
    parser.add_argument("--quiet-wait-s", type=float, default=30.0)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--write", type=Path, help="update this markdown file's section")
    args = parser.parse_args()
    if not (1 <= args.sessions <= 2000 and 5 <= args.session_s <= 600):
        parser.error("--sessions must be 1..2000 and --session-s 5..600")
    if not (0 < args.minutes <= 120 and args.sample_s > 0 and args.session_ttl_s >= 1):
        parser.error("--minutes must be in (0, 120], --sample-s > 0, --session-ttl-s >= 1")
    waves_n = max(1, round(args.minutes * 60 / args.session_s))
    maintenance_s = 10.0
    up_args = [
        "--slots", str(2 * args.sessions),
        "--max-queue-length", str(4 * args.sessions + 100),
        "--session-ttl-s", f"{args.session_ttl_s:g}",
        "--maintenance-interval-s", f"{maintenance_s:g}",
        "--log-level", "WARNING",
    ]  # fmt: skip
    if args.engine == "null":
        up_args += ["--engine", "null"]
    with tempfile.TemporaryDirectory(prefix="ss-soak-") as tmp_name:
        tmp = Path(tmp_name)
        audio = stage_clips(pick_clips(args.clips), tmp / "clips")
        service = UpService(tmp / "up", up_args, tmp / "up.log")
        service.start()
        try:
            busy_before = wait_quiet(args.quiet_wait_s)
            load_before = load_average()
            baseline_keys = key_kinds(service.redis_url)
            samples: list[Sample] = []
            waves: list[Wave] = []
            started_at: list[tuple[float, int]] = [(0.0, 0)]
            stop = threading.Event()
            t0 = time.monotonic()

            def sampler() -> None:
                while not stop.is_set():
                    now = time.monotonic() - t0
                    samples.append(sample(service, now, started_at[-1][1]))
                    print(progress_line(samples[-1]), flush=True)
                    stop.wait(args.sample_s)  # the sampling period, not a synchronisation

            sampling = threading.Thread(target=sampler, name="soak-sampler", daemon=True)
            sampling.start()
            pending: list[tuple[int, float, Future[dict[str, Any]]]] = []
            with ThreadPoolExecutor(max_workers=4, thread_name_prefix="wave") as pool:
                for i in range(waves_n):
                    due = t0 + i * args.session_s
                    time.sleep(max(0.0, due - time.monotonic()))  # the wave's start time
                    at = time.monotonic() - t0
                    started_at.append((at, (i + 1) * args.sessions))
                    extra = [
                        "--pace", "1.0",
                        "--ramp-s", f"{args.session_s:g}",
                        "--duration-s", f"{args.session_s:g}",
                        "--insecure",
                    ]  # fmt: skip
                    future = pool.submit(
                        run_loadtest,
                        service.url,
                        audio,
                        args.sessions,
                        tmp / f"wave-{i}.json",
                        extra=extra,
                        cafile=None,
                        timeout_s=4 * args.session_s + 300,
                    )
                    pending.append((i, at, future))
                    print(f"wave {i + 1}/{waves_n} started at {at:.0f} s", flush=True)
                for i, at, future in pending:
                    wave = wave_result(i, at, future.result())
                    waves.append(wave)
                    print(wave_line(wave), flush=True)
            load_end = time.monotonic() - t0
            print(f"load over at {load_end:.0f} s; waiting for keys to expire", flush=True)
            # Every session closed by now; its keys expire session_ttl_s after, and the
            # maintenance tick trims what it trims. Wait that long, then look.
            time.sleep(args.session_ttl_s + 2 * maintenance_s)  # the TTL itself, by design
            stop.set()
            sampling.join()
            samples.append(sample(service, time.monotonic() - t0, started_at[-1][1]))
            left = key_kinds(service.redis_url)
        finally:
            service.stop()
    served = sum(w.sessions for w in waves)
    report = summarise(args, samples, waves, started_at, load_end, baseline_keys, left)
    text = render(args, report, served, busy_before, load_before)
    print(text)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    if args.write:
        replace_section(args.write, heading(args.engine), text)
        print(f"wrote {args.write}")


def summarise(
    args: argparse.Namespace,
    samples: Sequence[Sample],
    waves: Sequence[Wave],
    started_at: Sequence[tuple[float, int]],
    load_end: float,
    baseline_keys: Mapping[str, int],
    left: Mapping[str, int],
) -> dict[str, Any]:
    # The steady part: until the last wave starts (then fewer and fewer sessions stream).
    steady_end = waves[-1].started_t if waves else load_end
    during = [s for s in samples if s.t <= steady_end]
    roles = sorted({r for s in during for r in s.rss_mib})
    growth = {
        role: growth_per_1000([(s.t, s.rss_mib.get(role, 0.0)) for s in during], started_at)
        for role in roles
    }
    steady = sorted(s.used_memory_mib for s in during[len(during) // 2 :])
    extra_keys = {
        k: n - baseline_keys.get(k, 0) for k, n in left.items() if n > baseline_keys.get(k, 0)
    }
    return {
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "waves": [asdict(w) for w in waves],
        "samples": [asdict(s) for s in samples],
        "rss_growth": growth,
        "valkey_used_mib": {
            "before": samples[0].used_memory_mib if samples else None,
            "steady_median": steady[len(steady) // 2] if steady else None,
            "after": samples[-1].used_memory_mib if samples else None,
        },
        "keys_before": dict(baseline_keys),
        "keys_left": dict(left),
        "keys_left_beyond_before": extra_keys,
        "load_end_s": load_end,
    }


def render(
    args: argparse.Namespace,
    report: Mapping[str, Any],
    served: int,
    busy_before: float,
    load_before: str,
) -> str:
    waves = report["waves"]
    wave_rows = [
        [
            w["index"] + 1,
            f"{w['started_t']:.0f}",
            f"{w['completed']}/{w['sessions']}",
            fmt(w["final_lag_p50_s"]),
            fmt(w["final_lag_p95_s"]),
            w.get("queued", 0),
            fmt(w.get("final_lag_unqueued_p95_s", w["final_lag_p95_s"])),
            ", ".join(f"{k}: {v}" for k, v in w["errors"].items()) or "none",
        ]
        for w in waves
    ]
    samples = report["samples"]
    roles = sorted({r for s in samples for r in s["rss_mib"]})
    shown: list[dict[str, Any]] = []
    for s in samples:  # about one a minute, and the last
        if not shown or s["t"] - shown[-1]["t"] >= 59 or s is samples[-1]:
            shown.append(s)
    sample_rows = [
        [
            f"{s['t']:.0f}",
            s["sessions_started"],
            *(fmt(s["rss_mib"].get(r), 1) for r in roles),
            fmt(s["used_memory_mib"], 1),
            s["keys"],
        ]
        for s in shown
    ]
    growth_lines = []
    for role, g in report["rss_growth"].items():
        if g is not None:
            growth_lines.append(f"{role} {g[0]:+.1f} MiB ({g[1]:+.2f} MiB per 1,000 sessions)")
    used = report["valkey_used_mib"]
    redis_line = (
        f"used memory {fmt(used['before'], 1)} MiB before the load, "
        f"{fmt(used['steady_median'], 1)} MiB in the second half of the steady load (median), "
        f"{fmt(used['after'], 1)} MiB once the keys expired"
    )
    beyond = report["keys_left_beyond_before"]
    session_left = {k: n for k, n in beyond.items() if "{*}" in k}
    fleet_left = {k: n for k, n in beyond.items() if "{*}" not in k}
    left_line = (
        "of sessions, "
        + (", ".join(f"`{k}` {n}" for k, n in sorted(session_left.items())) or "**none**")
        + "; other keys beyond those before the first wave (fleet state, bounded: "
        "docs/redis-layout.md): "
        + (", ".join(f"`{k}` {n}" for k, n in sorted(fleet_left.items())) or "none")
    )
    failed = sum(w["failed"] for w in waves)
    engine = "tiny.en int8 CPU" if args.engine == "whisper" else "the null engine"
    cmd = "python bench/soak.py " + " ".join(sys.argv[1:])
    return (
        f"{heading(args.engine)}\n\nMeasured {today()} on the {machine()}; command `{cmd}`. One "
        f"`streamscribe up` ({engine}, Silero VAD, slots {2 * args.sessions}, "
        f"`--session-ttl-s {args.session_ttl_s:g}`) and the load generator on the same "
        f"cores. Every {args.session_s:g} s a wave of {args.sessions} sessions starts, "
        f"spread over {args.session_s:g} s, each streaming {args.session_s:g} s of real "
        f"speech ({', '.join(args.clips)}, looped to whole copies) at real time, so about "
        f"{args.sessions} stream at once. Other processes' cores before: "
        f"{busy_before:.2f}; load average {load_before}.\n\n"
        f"**{served:,} sessions in {len(waves)} waves, {failed} failed.** Resident memory "
        f"growth over the second half of the steady load (until the last wave started): "
        f"{'; '.join(growth_lines) or '-'}. Valkey: {redis_line}. Keys left "
        f"{args.session_ttl_s:g} s + two maintenance ticks after the last session: "
        f"{left_line}.\n\n"
        + table(
            [
                "wave",
                "started s",
                "completed",
                "final lag p50 s",
                "p95 s",
                "queued",
                "never queued: p95 s",
                "errors",
            ],
            wave_rows,
        )
        + "\n\n"
        + table(
            [
                "t s",
                "sessions started",
                *(f"{r} RSS MiB" for r in roles),
                "Valkey used MiB",
                "keys",
            ],
            sample_rows,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
