"""A/B at one load: variants of `streamscribe up` taking turns at the same N sessions.

    python bench/ab.py --sessions 17 --repeats 3 --variant default= \\
                       --variant 'shed 0.8=--interim-shed-busy 0.8' [--json OUT]

bench/capacity.py sweeps one variant after the other, and this shared VM's speed can move
by 2x in between. Here every variant's `streamscribe up` runs for the whole comparison
(idle ones cost next to nothing), and the load runs take turns: variant A, variant B, A,
B, ... each `--repeats` times, so a slow spell hits them alike. Each run is
`streamscribe loadtest` at pace 1.0 on the capacity clips, as in bench/capacity.py
(`--slots` is set so that every session can be served at once); each line printed is one run:
sessions completed, final lag p50 / p95 / max, the sessions told `queued` and the p95
final lag of those never queued, interims per session-second, the wait for text p50 /
p95 (the longest an utterance went with nothing of it on screen, docs/loadtest.md), the
worker's decodes over the run (from its heartbeats, so up to one heartbeat late), and the cores
that processes other than ours used meanwhile (the rest of the machine's busy time, steal
included, less every `up`'s and the load generator's own CPU): a run with a high figure
there was disturbed and says little about its variant.

Two versions of the code take turns the same way: a variant whose flags start with
`PYTHONPATH=DIR` runs its `up` on the checkout in DIR, for instance the commit before a
change (`git worktree add ../old HEAD~1`, then `--variant 'before=PYTHONPATH=../old'
--variant 'after='`). `--clips` picks other clips of ../shared/audio/real.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.capacity import Variant, parse_variant
from bench.common import (
    DEFAULT_CLIPS,
    UpService,
    interims_per_session_s,
    pick_clips,
    run_loadtest,
    running_up,
    stage_clips,
    system_busy_s,
    table,
    wait_quiet,
    worker_stats,
)


def _cpu(ups: list[UpService]) -> float:
    """CPU seconds used so far by every process of every running `up`."""
    return sum(sum(up.cpu().values()) for up in ups)


def _seconds(value: Any) -> str:
    return "-" if value is None else f"{float(value):.2f}"


DECODE_COUNTERS = (
    "decodes_final",
    "decodes_interim",
    "early_decodes",
    "interims_set_aside",
    "interims_withdrawn",
)


def _decodes(before: dict[str, float], after: dict[str, float]) -> dict[str, int]:
    """The worker's decode counters over one run (heartbeats; a field an older version
    does not report counts 0)."""
    return {k: round(after.get(k, 0.0) - before.get(k, 0.0)) for k in DECODE_COUNTERS}


def _decodes_text(d: dict[str, int]) -> str:
    return (
        f"{d['decodes_final']} / {d['decodes_interim']} "
        f"({d['early_decodes']}; {d['interims_set_aside']}, {d['interims_withdrawn']})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=17)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--duration-s", type=float, default=40.0)
    parser.add_argument(
        "--variant",
        type=parse_variant,
        action="append",
        help="NAME=UP FLAGS [-- LOADTEST FLAGS] (repeatable; at least two)",
    )
    parser.add_argument(
        "--clips",
        nargs="+",
        default=list(DEFAULT_CLIPS),
        help="clip ids in ../shared/audio/real (default: the capacity clips)",
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    variants: list[Variant] = args.variant or []
    if len(variants) < 2:
        parser.error("give at least two --variant")
    rows: list[list[str]] = []
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="ss-ab-") as tmp_name, contextlib.ExitStack() as st:
        tmp = Path(tmp_name)
        audio = stage_clips(pick_clips(args.clips), tmp / "clips")
        slots = ["--slots", str(args.sessions + 1)]
        ups = [
            st.enter_context(
                running_up(tmp / f"up{i}", [*slots, *v.up_args], tmp / f"{i}.log", v.pythonpath)
            )
            for i, v in enumerate(variants)
        ]
        for rep in range(args.repeats):
            for i, (variant, service) in enumerate(zip(variants, ups, strict=True)):
                wait_quiet(30.0)
                stats0 = worker_stats(service.redis_url)
                sys0, ours0, t0 = system_busy_s(), _cpu(ups), time.monotonic()
                report = run_loadtest(
                    service.url,
                    audio,
                    args.sessions,
                    tmp / f"load-{rep}-{i}.json",
                    cafile=service.cafile,
                    extra=[
                        "--pace",
                        "1.0",
                        "--duration-s",
                        str(args.duration_s),
                        "--ramp-s",
                        "4",
                        *variant.loadtest_args,
                    ],
                )
                wall = time.monotonic() - t0
                decodes = _decodes(stats0, worker_stats(service.redis_url))
                ours = _cpu(ups) - ours0 + float(report["loadtest_cpu_s"])
                foreign = max(0.0, (system_busy_s() - sys0 - ours) / wall)
                lag = report["metrics"]["final_lag_s"]
                served = report["metrics"].get("final_lag_unqueued_s", lag)
                wait = report["metrics"].get("text_wait_s", {})
                result = {
                    "variant": variant.name,
                    "repeat": rep + 1,
                    "completed": int(report["completed"]),
                    "final_lag_s": {k: lag.get(k) for k in ("p50", "p95", "max")},
                    "queued_sessions": int(report.get("queued_sessions", 0)),
                    "final_lag_unqueued_p95_s": served.get("p95"),
                    "interims_per_session_s": interims_per_session_s(report),
                    "text_wait_s": {k: wait.get(k) for k in ("p50", "p95")},
                    "other_cores": foreign,
                    "decodes": decodes,
                }
                results.append(result)
                row = [
                    variant.name,
                    str(rep + 1),
                    f"{result['completed']}/{args.sessions}",
                    *(_seconds(lag.get(k)) for k in ("p50", "p95", "max")),
                    str(result["queued_sessions"]),
                    _seconds(served.get("p95")),
                    f"{result['interims_per_session_s']:.3f}",
                    f"{_seconds(wait.get('p50'))} / {_seconds(wait.get('p95'))}",
                    _decodes_text(decodes),
                    f"{foreign:.2f}",
                ]
                rows.append(row)
                print(" | ".join(row), flush=True)
    print(
        table(
            [
                "variant",
                "run",
                "completed",
                "final lag p50 s",
                "p95 s",
                "max s",
                "queued sessions",
                "never queued: p95 s",
                "interims / session-s",
                "wait for text p50 / p95 s",
                "decodes: finals / interims (early; interims set aside, withdrawn)",
                "other processes' cores",
            ],
            rows,
        )
    )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
