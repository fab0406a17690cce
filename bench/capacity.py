"""Streaming capacity: the most concurrent real-time sessions one `streamscribe up` serves.

    python bench/capacity.py [--clips ID ...] [--sessions 1 2 4 6 8 10 12]
                             [--variant 'NAME=UP FLAGS [-- LOADTEST FLAGS]' ...]
                             [--model tiny.en] [--budget-s 600]
                             [--json OUT] [--write docs/benchmarks.md]

1. Offline bound: bench/offline.py on the same clips, in its own process, before the
   service starts (audio seconds per second; nothing else of ours is running): the
   better of one call at a time and two calls at once on one model.
2. For each variant (default: the shipped settings), starts `streamscribe up` (own state
   dir, free port, embedded Valkey, development TLS certificate, enough slots), then runs
   `streamscribe loadtest --json` in its own process at pace 1.0 with N sessions on the
   clips, looped to --duration-s, started over --ramp-s, for N in --sessions. A run
   passes when every session completed without errors and the p95 final lag is at most
   --max-lag-s. After the first failure, N is bisected between the last pass and it.
3. Reports the largest N that passed and N / offline bound. Per run it also records the
   worker's decode counters (heartbeat hash) and every process's CPU time, which says
   where the two cores went.

The whole run is bounded by --budget-s: no new load run starts once it is spent. Each variant
gets an equal share of what is left when its sweep starts (what one leaves goes to the next).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (
    DEFAULT_CLIPS,
    ROOT,
    UpService,
    engine_text,
    interims_per_session_s,
    load_average,
    machine,
    model_heading,
    pick_clips,
    replace_section,
    run_loadtest,
    stage_clips,
    streamed_audio_s,
    system_busy_s,
    table,
    thread_cpu,
    today,
    wait_quiet,
    worker_stats,
    worker_thread_cores,
)

HEADING = "## Streaming capacity: real-time sessions on one `streamscribe up`"
COUNTERS = (
    "decodes_final",
    "decodes_interim",
    "interims_dropped_stale",
    "interims_dropped_load",
    "packs",
    "packed_finals",
    "pack_retries",
    "early_decodes",
    "early_finals",
    "window_retries",
    "engine_busy_s",
)


@dataclass
class LoadRun:
    sessions: int
    passed: bool
    completed: int
    failed: int
    unfinished: int
    final_lag_p50: float | None
    final_lag_p95: float | None
    final_lag_max: float | None
    first_interim_p50: float | None
    ack_p99: float | None
    interims_per_session_s: float
    wer: float | None
    audio_s: float
    elapsed_s: float
    load_before: str
    busy_before: float  # cores busy on the machine just before the run (ours idle)
    foreign_cores: float  # cores used by processes not in this benchmark during the run
    cpu_share: dict[str, float]  # process -> cores used on average during the run
    decodes: dict[str, float]  # counter -> count during the run
    worker_threads: dict[str, float]  # thread group -> cores used on average
    engine_busy: float  # decode-seconds per second of the run (up to decode_threads)
    errors: dict[str, Any] = field(default_factory=dict)
    retried: int = 0  # runs thrown away because other processes loaded the machine


@dataclass
class Variant:
    name: str
    up_args: list[str]
    loadtest_args: list[str] = field(default_factory=list)
    runs: list[LoadRun] = field(default_factory=list)
    pythonpath: str | None = None  # another checkout's code (`PYTHONPATH=DIR` in the flags)

    @property
    def flags(self) -> str:
        """Markdown: the `up` flags, then any extra load generator flags."""
        up = f"`{' '.join(self.up_args)}`" if self.up_args else "defaults"
        code = f" (code: `{self.pythonpath}`)" if self.pythonpath else ""
        extra = f"; loadtest `{' '.join(self.loadtest_args)}`" if self.loadtest_args else ""
        return up + code + extra

    @property
    def best(self) -> int:
        return max((r.sessions for r in self.runs if r.passed), default=0)


def metric(report: dict[str, Any], name: str, stat: str) -> float | None:
    value = report["metrics"][name].get(stat)
    return None if value is None else float(value)


def one_run(
    service: UpService,
    audio: list[Path],
    n: int,
    args: argparse.Namespace,
    out: Path,
    loadtest_args: list[str],
) -> LoadRun:
    busy_before = wait_quiet(args.quiet_wait_s)
    load_before = load_average()
    wpid = service.pids["worker"]
    stats0, cpu0, t0 = worker_stats(service.redis_url), service.cpu(), time.monotonic()
    threads0, sys0 = thread_cpu(wpid), system_busy_s()
    report = run_loadtest(
        service.url,
        audio,
        n,
        out / f"load-{n}.json",
        cafile=service.cafile,
        extra=[
            "--pace",
            "1.0",
            "--duration-s",
            str(args.duration_s),
            "--ramp-s",
            str(args.ramp_s),
            "--drain-timeout-s",
            str(args.drain_timeout_s),
            *loadtest_args,
        ],
    )
    wall = time.monotonic() - t0
    stats1, cpu1, threads1 = worker_stats(service.redis_url), service.cpu(), thread_cpu(wpid)
    sys1 = system_busy_s()
    cpu = {role: (cpu1[role] - cpu0.get(role, 0.0)) / wall for role in cpu1}
    cpu["loadtest"] = float(report["loadtest_cpu_s"]) / wall
    p95 = metric(report, "final_lag_s", "p95")
    errors = {
        k: report[k]
        for k in ("errors_by_close_code", "error_messages", "connect_errors", "anomalies")
        if report.get(k)
    }
    audio_s = streamed_audio_s(report)
    passed = report["completed"] == n and not errors and p95 is not None and p95 <= args.max_lag_s
    return LoadRun(
        sessions=n,
        passed=passed,
        completed=int(report["completed"]),
        failed=int(report["failed"]),
        unfinished=int(report["unfinished"]),
        final_lag_p50=metric(report, "final_lag_s", "p50"),
        final_lag_p95=p95,
        final_lag_max=metric(report, "final_lag_s", "max"),
        first_interim_p50=metric(report, "first_interim_s", "p50"),
        ack_p99=metric(report, "ack_latency_s", "p99"),
        interims_per_session_s=interims_per_session_s(report),
        wer=None if report["wer"] is None else float(report["wer"]["value"]),
        audio_s=audio_s,
        elapsed_s=float(report["elapsed_s"]),
        load_before=load_before,
        busy_before=busy_before,
        foreign_cores=max(0.0, (sys1 - sys0) / wall - sum(cpu.values())),
        cpu_share=cpu,
        decodes={k: stats1.get(k, 0.0) - stats0.get(k, 0.0) for k in COUNTERS},
        worker_threads=worker_thread_cores(wpid, threads0, threads1, wall),
        engine_busy=(stats1.get("engine_busy_s", 0.0) - stats0.get("engine_busy_s", 0.0)) / wall,
        errors=errors,
    )


def share_deadline(now: float, deadline: float, variants_left: int) -> float:
    """When the next of `variants_left` variants must stop starting runs: an equal share
    of the budget that is left, so that a variant late in the list is not starved by the
    ones before it (what one leaves unused goes to those after it)."""
    if variants_left < 1:
        raise ValueError("no variant left")
    return now + max(0.0, deadline - now) / variants_left


def sweep(
    variant: Variant, audio: list[Path], args: argparse.Namespace, state: Path, deadline: float
) -> None:
    """Ascending N until the first failure, then bisect; stop when the budget is spent."""
    slots = max(args.sessions) + 1
    service = UpService(
        state, ["--slots", str(slots), *variant.up_args], state / "up.log", variant.pythonpath
    )
    service.start()
    try:
        print(f"[{variant.name}] up at {service.url} ({' '.join(variant.up_args)})", flush=True)
        todo = sorted(set(args.sessions))
        good, bad = 0, None
        while todo and time.monotonic() < deadline:
            n = todo.pop(0)
            run = one_run(service, audio, n, args, state, variant.loadtest_args)
            print(f"[{variant.name}] {row(run)}", flush=True)
            for attempt in range(1, args.retries + 1):
                # The machine is shared: a failure while other processes took a good part
                # of a core says little about us. Try again (bounded).
                noisy = run.foreign_cores >= args.retry_if_other_cores
                if run.passed or not noisy or time.monotonic() >= deadline:
                    break
                run = one_run(service, audio, n, args, state, variant.loadtest_args)
                run.retried = attempt
                print(f"[{variant.name}] retry: {row(run)}", flush=True)
            variant.runs.append(run)
            if run.passed:
                good = max(good, n)
            else:
                bad = n if bad is None else min(bad, n)
            if bad is not None:  # bisect between the last pass and the first failure
                mid = (good + bad) // 2
                done = {r.sessions for r in variant.runs}
                todo = [mid] if good < mid < bad and mid not in done else []
    finally:
        service.stop()


def fmt(value: float | None, scale: float = 1.0, digits: int = 2) -> str:
    return "-" if value is None else f"{value * scale:.{digits}f}"


HEADER = [
    "N",
    "pass",
    "completed",
    "final lag p50 s",
    "p95 s",
    "max s",
    "first interim p50 s",
    "interims / session-s",
    "WER",
    "final / interim decodes (dropped: stale, load)",
    "packs (finals in them, decoded again alone)",
    "early decodes (became finals)",
    "full-window retries",
    "engine busy",
    "CPU cores: worker, gateway, valkey, loadtest",
    "worker cores: CT2, VAD, engine-py, loop, other",
    "other processes' cores: before / during",
    "load avg before",
]


def row(r: LoadRun) -> list[str]:
    d = r.decodes
    c = r.cpu_share
    return [
        str(r.sessions) + (f" (retry {r.retried})" if r.retried else ""),
        "yes" if r.passed else "**no**",
        f"{r.completed}/{r.sessions}",
        fmt(r.final_lag_p50),
        fmt(r.final_lag_p95),
        fmt(r.final_lag_max),
        fmt(r.first_interim_p50),
        f"{r.interims_per_session_s:.2f}",
        fmt(r.wer, digits=3),
        f"{d['decodes_final']:.0f} / {d['decodes_interim']:.0f} "
        f"({d['interims_dropped_stale']:.0f}, {d['interims_dropped_load']:.0f})",
        f"{d['packs']:.0f} ({d['packed_finals']:.0f}, {d['pack_retries']:.0f})",
        f"{d.get('early_decodes', 0):.0f} ({d.get('early_finals', 0):.0f})",
        f"{d.get('window_retries', 0):.0f}",
        f"{r.engine_busy:.0%}",
        ", ".join(f"{c.get(k, 0.0):.2f}" for k in ("worker", "gateway", "valkey", "loadtest")),
        ", ".join(f"{v:.2f}" for v in r.worker_threads.values()),
        f"{r.busy_before:.2f} / {r.foreign_cores:.2f}",
        r.load_before,
    ]


def offline_bound(
    clip_ids: list[str],
    cpu_threads: str | None,
    tmp: Path,
    device: str = "cpu",
    model: str = "tiny.en",
) -> dict[str, Any]:
    out = tmp / "offline.json"
    cmd = [sys.executable, str(ROOT / "bench" / "offline.py"), "--clips", *clip_ids]
    cmd += ["--device", device, "--model", model]
    cmd += ["--no-call-cost", "--repeats", "3", "--parallel", "1", "2", "--json", str(out)]
    if cpu_threads is not None:
        cmd += ["--cpu-threads", cpu_threads]
    subprocess.run(cmd, cwd=ROOT, check=True, timeout=900, stdout=subprocess.DEVNULL)
    rows: list[dict[str, Any]] = json.loads(out.read_text())
    # The ceiling is the best faster-whisper alone does on these cores: one call at a
    # time, or two at once on one model (what the worker's decode_threads does).
    best = max(rows, key=lambda r: float(r["bound"]))
    by_parallel = {int(r["parallel"]): float(r["bound"]) for r in rows}
    return {**best, "by_parallel": by_parallel}


def render(variants: list[Variant], offline: dict[str, Any], args: argparse.Namespace) -> str:
    bound = float(offline["bound"])
    summary = table(
        ["variant", "flags", "largest N passing", "offline bound audio s / s", "ratio"],
        [
            [
                v.name,
                v.flags,
                f"**{v.best}**",
                f"{bound:.1f}",
                f"**{v.best / bound:.2f}**",
            ]
            for v in variants
        ],
    )
    parts = [summary]
    for v in variants:
        runs = sorted(v.runs, key=lambda r: r.sessions)
        parts.append(f"Runs, variant *{v.name}*:\n\n" + table(HEADER, [row(r) for r in runs]))
    return "\n\n".join(parts)


def parse_variant(text: str) -> Variant:
    """NAME=[PYTHONPATH=DIR] UP FLAGS [-- LOADTEST FLAGS]. `PYTHONPATH=DIR` runs that
    variant's `up` on the code in DIR (a `git worktree` of another commit)."""
    name, _, flags = text.partition("=")
    if not name:
        raise argparse.ArgumentTypeError("--variant wants NAME=FLAGS")
    words = shlex.split(flags)
    pythonpath = None
    if words and words[0].startswith("PYTHONPATH="):
        pythonpath = str(Path(words.pop(0).partition("=")[2]).resolve())
        if not (Path(pythonpath) / "shared" / "cli.py").is_file():
            raise argparse.ArgumentTypeError(f"{pythonpath} holds no streamscribe checkout")
    cut = words.index("--") if "--" in words else len(words)
    return Variant(name, words[:cut], words[cut + 1 :], pythonpath=pythonpath)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clips", nargs="+", default=list(DEFAULT_CLIPS), help="clip ids")
    parser.add_argument("--sessions", type=int, nargs="+", default=[1, 2, 4, 6, 8, 10, 12])
    parser.add_argument("--duration-s", type=float, default=30.0)
    parser.add_argument("--ramp-s", type=float, default=4.0)
    parser.add_argument("--drain-timeout-s", type=float, default=30.0)
    parser.add_argument("--max-lag-s", type=float, default=2.0)
    parser.add_argument(
        "--variant",
        type=parse_variant,
        action="append",
        help="NAME=UP FLAGS [-- LOADTEST FLAGS] (repeatable); default: one variant, defaults",
    )
    parser.add_argument("--cpu-threads", help="passed to the offline bound and to every `up`")
    parser.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default="cpu",
        help="where the model runs: passed to the offline bound and to every `up` (a GPU "
        "run: compare variants such as --variant 'alone=--batch-decodes 1' "
        "--variant 'batch 8=--batch-decodes 8')",
    )
    parser.add_argument(
        "--model",
        default="tiny.en",
        help="passed to the offline bound and to every `up` (`base`: the `model-base` "
        "extra); a model other than tiny.en writes a section of its own",
    )
    parser.add_argument("--budget-s", type=float, default=600.0, help="no new run after this")
    parser.add_argument(
        "--quiet-wait-s",
        type=float,
        default=120.0,
        help="before each run wait up to this long for other processes to go quiet",
    )
    parser.add_argument(
        "--retries",
        type=int,
        default=2,
        help="repeat a failed run this often when other processes loaded the machine",
    )
    parser.add_argument(
        "--retry-if-other-cores",
        type=float,
        default=0.15,
        help="a failed run counts as disturbed when other processes used this many cores",
    )
    parser.add_argument("--json", type=Path)
    parser.add_argument("--write", type=Path, help="update this markdown file's section")
    args = parser.parse_args()
    if min(args.sessions) < 1 or max(args.sessions) > 2000:
        parser.error("--sessions must be 1..2000")
    started = time.monotonic()
    deadline = started + args.budget_s
    clips = pick_clips(args.clips)
    variants: list[Variant] = args.variant or [Variant("default", [])]
    if args.cpu_threads is not None:
        for v in variants:
            v.up_args += ["--cpu-threads", args.cpu_threads]
    if args.device != "cpu":
        for v in variants:
            v.up_args += ["--device", args.device]
    if args.model != "tiny.en":
        for v in variants:
            v.up_args += ["--model", args.model]
    with tempfile.TemporaryDirectory(prefix="ss-capacity-") as tmp_name:
        tmp = Path(tmp_name)
        audio = stage_clips(clips, tmp / "clips")
        print(f"offline bound on {', '.join(args.clips)} ...", flush=True)
        offline = offline_bound(args.clips, args.cpu_threads, tmp, args.device, args.model)
        print(
            f"offline bound: {offline['bound']:.1f} audio s / s "
            f"(one call at a time {offline['by_parallel'].get(1, 0.0):.1f}, "
            f"two at once {offline['by_parallel'].get(2, 0.0):.1f})",
            flush=True,
        )
        for i, v in enumerate(variants):
            share = share_deadline(time.monotonic(), deadline, len(variants) - i)
            sweep(v, audio, args, tmp / f"up-{i}", share)
    text = render(variants, offline, args)
    print(text)
    print(f"total {time.monotonic() - started:.0f} s")
    if args.json:
        args.json.write_text(
            json.dumps({"offline": offline, "variants": [asdict(v) for v in variants]}, indent=2)
        )
    if args.write:
        cmd = "python bench/capacity.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
        heading = model_heading(HEADING, args.model)
        section = (
            f"{heading}\n\nMeasured {today()} on the {machine()}; command `{cmd}`. "
            f"Gateway, worker ({engine_text(args.model, args.device)}), embedded Valkey and "
            f"the load generator "
            f"(`streamscribe loadtest`, its own process) all share the {os.cpu_count()} cores. "
            f"Clips "
            f"{', '.join(args.clips)} looped to {args.duration_s:.0f} s per session, pace 1.0, "
            f"sessions started over {args.ramp_s:.0f} s, TLS with the development "
            f"certificate. A run passes when every session completes without errors and "
            f"the p95 final lag is at most {args.max_lag_s:.1f} s. *ratio* = largest passing "
            f"N / offline bound (audio s per s, bench/offline.py on the same clips in the "
            f"same run: {offline['bound']:.1f}, the better of one call at a time, "
            f"{offline['by_parallel'].get(1, 0.0):.1f}, and two calls at once on one model, "
            f"{offline['by_parallel'].get(2, 0.0):.1f}; load average before it "
            f"{offline['load_before']}). CPU cores = CPU seconds of each process / wall "
            f"seconds of the run; worker cores split by thread (CT2 = CTranslate2's native "
            f"compute threads, VAD = conversion + Silero, engine-py = faster-whisper's Python "
            f"side incl. feature extraction, loop = the event loop and Redis I/O). *Engine "
            f"busy* = time spent in decode calls, summed over the engine's decode threads "
            f"(`decode_threads`, default 2), / wall time: up to 200%. *Other "
            f"processes* = cores used by processes outside this benchmark (the machine is "
            f"shared; each run first waits up to {args.quiet_wait_s:.0f} s for < 0.3 cores)."
            f"\n\n{text}\n"
        )
        replace_section(args.write, heading, section)
        print(f"wrote {args.write}")


if __name__ == "__main__":
    main()
