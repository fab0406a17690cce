"""What `slots` auto measures at a worker's start-up, several times over, per model; and
whether a worker serves the slots it measured.

    python bench/slots.py [--model tiny.en base] [--repeats 5] [--factor F]
                          [--device cpu] [--batch-decodes N] [--json OUT]
    python bench/slots.py --serve [--model tiny.en base] [--repeats 2]
                          [--clips ID ...] [--duration-s 40] [--json OUT]

Loads each model as the worker does (the shipped settings: encoder window, decode_threads
concurrent decodes, threads per decode), warms it up like the worker, then runs the
worker's start-up measurement (worker/calibration.py) `--repeats` times: each row is what
one worker start would have found. Prints the rate (audio seconds decoded per second), the
slots it gives with `--factor` (the worker's auto_slots_factor) and how long the
measurement took. Compare the slots with the capacity bench/capacity.py measures for the
same model (docs/benchmarks.md, *Slots measured at start-up*).

`--serve`: per model and repeat, starts `streamscribe up --slots auto` (a fresh worker, so
a fresh measurement), reads the slots its worker advertises, and runs bench/capacity.py's
load run with exactly that many real-time sessions on the real clips: it passes when every
session completes without errors and the p95 final lag is at most 2 s.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import load_average, machine, table, today
from shared.config import Config
from worker.calibration import auto_slots, calibrate
from worker.engine import load_engine, pick_device


def serve(args: argparse.Namespace) -> None:
    """Start `up --slots auto`, load it with as many sessions as it measured."""
    from bench.capacity import one_run
    from bench.common import DEFAULT_CLIPS, UpService, pick_clips, stage_clips, worker_stats

    rows: list[list[str]] = []
    runs: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory(prefix="slots-serve-") as tmp_name:
        tmp = Path(tmp_name)
        audio = stage_clips(pick_clips(args.clips or list(DEFAULT_CLIPS)), tmp / "clips")
        for model in args.model:
            for i in range(args.repeats):
                state = tmp / f"{model}-{i}"
                service = UpService(
                    state, ["--slots", "auto", "--model", model], tmp / f"{model}-{i}.log"
                )
                service.start()
                try:
                    stats = worker_stats(service.redis_url)
                    slots, rate = int(stats["slots"]), stats["slots_auto_rate"]
                    print(f"{model} #{i + 1}: {rate:.1f} audio s/s -> {slots} slots", flush=True)
                    run = one_run(service, audio, slots, args, state, [])
                finally:
                    service.stop()
                p95 = run.final_lag_p95
                print(
                    f"  {slots} sessions: {run.completed}/{slots} completed, p95 final lag "
                    f"{p95 if p95 is None else round(p95, 2)} s -> "
                    f"{'pass' if run.passed else 'FAIL'}",
                    flush=True,
                )
                rows.append(
                    [
                        model,
                        f"{rate:.1f}",
                        str(slots),
                        f"{run.completed}/{slots}",
                        "-" if run.final_lag_p50 is None else f"{run.final_lag_p50:.2f}",
                        "-" if p95 is None else f"{p95:.2f}",
                        f"{run.engine_busy:.2f}",
                        "yes" if run.passed else "**no**",
                    ]
                )
                runs.append({"model": model, "rate": rate, "slots": slots, **asdict(run)})
    print()
    print(f"{machine()}, {today()}; {args.duration_s:g} s of real-time audio per session")
    print(
        table(
            [
                "model",
                "measured (audio s/s)",
                "slots",
                "completed",
                "final lag p50 (s)",
                "p95 (s)",
                "engine busy",
                "p95 <= 2 s",
            ],
            rows,
        )
    )
    if args.json:
        args.json.write_text(json.dumps(runs, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", nargs="+", default=["tiny.en"])
    parser.add_argument("--repeats", type=int, default=None, help="5 (2 with --serve)")
    parser.add_argument("--serve", action="store_true")
    parser.add_argument("--clips", nargs="+", help="clip ids for --serve")
    parser.add_argument("--duration-s", type=float, default=40.0)
    parser.add_argument("--ramp-s", type=float, default=4.0)
    parser.add_argument("--drain-timeout-s", type=float, default=30.0)
    parser.add_argument("--max-lag-s", type=float, default=2.0)
    parser.add_argument("--quiet-wait-s", type=float, default=30.0)
    parser.add_argument("--factor", type=float, default=Config().auto_slots_factor)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--batch-decodes", type=int, help="the worker's batch_decodes (default: its default)"
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.serve:
        args.repeats = 2 if args.repeats is None else args.repeats
        serve(args)
        return
    args.repeats = 5 if args.repeats is None else args.repeats
    cfg = Config()
    rows: list[list[str]] = []
    found: dict[str, list[dict[str, float]]] = {}
    print(f"{machine()}, {today()}, load average {load_average()}", flush=True)
    for model in args.model:
        engine = load_engine(
            "whisper",
            model,
            pick_device(args.device),
            cfg.compute_type,
            cfg.cpu_threads,
            cfg.encode_min_s,
            cfg.decode_threads,
            str(Path(cfg.state_dir).expanduser()),
        )
        warm_up = getattr(engine, "warm_up", None)
        if warm_up is not None:
            warm_up()
        runs = found.setdefault(model, [])
        for i in range(args.repeats):
            start = time.monotonic()
            cal = calibrate(
                engine,
                threads=cfg.decode_threads,
                batch=args.batch_decodes or cfg.batch_decodes,
                beam_size=cfg.beam_size,
            )
            took = time.monotonic() - start
            slots = auto_slots(cal.rate, args.factor, cfg.auto_slots_max)
            runs.append({"rate": cal.rate, "slots": slots, "took_s": took, "words": cal.words})
            print(
                f"{model} #{i + 1}: {cal.rate:.1f} audio s/s -> {slots} slots "
                f"(rounds {'/'.join(f'{t:.2f}' for t in cal.rounds_s)} s, took {took:.1f} s)",
                flush=True,
            )
        rates = [r["rate"] for r in runs]
        slots_seen = sorted({int(r["slots"]) for r in runs})
        rows.append(
            [
                model,
                f"{min(rates):.1f}-{max(rates):.1f}",
                f"{statistics.median(rates):.1f}",
                "-".join(str(s) for s in (slots_seen[0], slots_seen[-1]))
                if len(slots_seen) > 1
                else str(slots_seen[0]),
                f"{statistics.median(r['took_s'] for r in runs):.1f}",
            ]
        )
    print()
    print(f"auto_slots_factor {args.factor:g}, {args.repeats} measurement(s) per model")
    print(
        table(
            ["model", "rate (audio s/s)", "median", "slots", "measurement takes (s)"],
            rows,
        )
    )
    if args.json:
        args.json.write_text(json.dumps({"factor": args.factor, "runs": found}, indent=2))


if __name__ == "__main__":
    main()
