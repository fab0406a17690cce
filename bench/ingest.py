"""Gateway ingest: the most concurrent real-time sessions one gateway process holds.

    python bench/ingest.py [--sessions 250 500 1000 1500 2000] [--duration-s 20]
                           [--budget-s 600] [--tls] [--write docs/benchmarks.md]

For each N a fresh `streamscribe up --engine null --vad energy --certfile none` (plain
ws keeps the load generator cheap, and --tls serves wss:// as deployed; the null engine
takes the model out, the energy VAD takes Silero out: at 150-250 sessions Silero alone
used 0.7-0.85 of the 2 cores) with slots and queue limits above N, then `streamscribe
loadtest` in its own process: N sessions at pace 1.0, 100 ms frames, real clips looped
to --duration-s, started over N / --ramp-rate seconds. A run passes with p99 ack latency
<= --max-ack-ms, no failed session and no errors (sessions the null worker has not
closed by the deadline count as unfinished, not failed). After the first failure N is
bisected. The gateway's CPU time and RSS come from /proc while the run lasts:

- CPU per session: gateway CPU seconds / session-seconds of audio streamed;
- memory per connection: (peak gateway RSS during the run - RSS before) / N.

Everything (gateway, null worker with its VAD, Valkey, load generator) shares the machine's
cores, so the figures are for this machine, not for a gateway alone.

With --pause-worker the worker is stopped (SIGSTOP) as soon as `up` is ready: no session
is claimed, so every session waits in the dispatch queue while its audio is stored and
acknowledged as usual (the protocol allows audio while queued). Only the gateway, Valkey
and the load generator then use the cores: the gateway's own ingest path, as it would run
with its workers on other machines. The queue limits are raised so that no session is
refused or cancelled (--max-queue-wait-s and --queue-update-s 3600: the per-session queue
position updates would otherwise add two Redis calls per session per second). That mode
writes its own section.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import signal
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
    cpu_s,
    fmt,
    load_average,
    machine,
    pick_clips,
    replace_section,
    rss_bytes,
    speed_ms,
    stage_clips,
    streamed_audio_s,
    streamscribe,
    system_busy_s,
    table,
    today,
    wait_quiet,
)

HEADING = "## Gateway ingest: concurrent real-time sessions, null engine"
HEADING_PAUSED = "## Gateway ingest with the worker paused: the gateway path alone"
HEADING_TLS = "## Gateway ingest over TLS (wss), null engine"


@dataclass
class IngestRun:
    sessions: int
    passed: bool
    completed: int
    failed: int
    unfinished: int
    ack_p50_ms: float | None
    ack_p99_ms: float | None
    ack_max_ms: float | None
    connect_p99_s: float | None
    send_delay_p99_ms: float | None
    final_lag_p95_s: float | None
    session_s: float  # session-seconds of audio streamed
    gateway_cpu_ms_per_session_s: float
    gateway_rss_before_mb: float
    gateway_rss_peak_mb: float
    kib_per_connection: float
    cores: dict[str, float]  # process -> average cores used over the run
    load_before: str
    busy_before: float  # cores busy just before the run (ours idle)
    speed_ms: float  # bench.common.speed_ms() just before the run (lower is faster)
    foreign_cores: float  # cores used by processes outside this benchmark during the run
    elapsed_s: float
    errors: dict[str, Any] = field(default_factory=dict)
    retried: int = 0  # runs thrown away because other processes loaded the machine


def ms(value: Any) -> float | None:
    return None if value is None else 1000 * float(value)


def one_run(n: int, args: argparse.Namespace, audio: list[Path], tmp: Path) -> IngestRun:
    state = Path(tempfile.mkdtemp(prefix=f"up-{n}-", dir=tmp))
    service = UpService(
        state,
        [
            "--engine",
            "null",
            "--vad",
            args.vad,
            *([] if args.tls else ["--certfile", "none"]),
            "--slots",
            str(-(-n // args.workers) + 100 // args.workers),
            "--workers",
            str(args.workers),
            "--max-queue-length",
            str(n * 2 + 100),
            "--log-level",
            "WARNING",
            *(
                ["--max-queue-wait-s", "3600", "--queue-update-s", "3600"]
                if args.pause_worker
                else []
            ),
        ],
        state / "up.log",
    )
    service.start()
    try:
        gw = service.pids["gateway"]
        if args.pause_worker:
            for pid in service.role_pids["worker"]:
                os.kill(pid, signal.SIGSTOP)
        busy_before = wait_quiet(args.quiet_wait_s)
        load_before = load_average()
        speed = speed_ms()
        rss0, cpu0 = rss_bytes(gw), service.cpu()
        json_out = state / "ingest.json"
        cmd = [
            *streamscribe(),
            "loadtest",
            "--url",
            service.url,
            "--sessions",
            str(n),
            "--audio",
            *[str(a) for a in audio],
            "--pace",
            "1.0",
            "--duration-s",
            str(args.duration_s),
            "--ramp-s",
            str(max(1.0, n / args.ramp_rate)),
            "--drain-timeout-s",
            str(args.drain_timeout_s),
            "--tick-ms",
            f"{args.tick_ms:g}",
            "--json",
            str(json_out),
            "--no-progress",
            *(["--cafile", service.cafile] if args.tls and service.cafile else []),
        ]
        usage0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0, sys0 = time.monotonic(), system_busy_s()
        peak = rss0
        with open(state / "loadtest.log", "wb") as log:
            proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
            limit = t0 + args.duration_s + n / args.ramp_rate + 180
            while proc.poll() is None and time.monotonic() < limit:
                peak = max(peak, rss_bytes(gw))
                time.sleep(0.5)  # sampling period of the RSS probe
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        wall, sys1 = time.monotonic() - t0, system_busy_s()
        usage1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        gw_cpu = cpu_s(gw) - cpu0["gateway"]
        cpu1 = service.cpu()
        cores = {role: (cpu1[role] - cpu0.get(role, 0.0)) / wall for role in cpu1}
        cores["loadtest"] = (
            usage1.ru_utime - usage0.ru_utime + usage1.ru_stime - usage0.ru_stime
        ) / wall
    finally:
        if args.pause_worker:
            # Woken, it would start on hundreds of queued sessions: end it instead.
            for pid in service.role_pids["worker"]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        service.stop()
    report: dict[str, Any] = json.loads(json_out.read_text())
    m = report["metrics"]
    errors = {
        k: report[k]
        for k in ("errors_by_close_code", "error_messages", "connect_errors", "anomalies")
        if report.get(k)
    }
    session_s = streamed_audio_s(report)
    ack_p99 = ms(m["ack_latency_s"]["p99"])
    # The gateway's criterion: acks and errors. Sessions the (null) worker had not closed
    # by the deadline are "unfinished", reported but not held against the gateway.
    passed = (
        report["failed"] == 0 and not errors and ack_p99 is not None and ack_p99 <= args.max_ack_ms
    )
    return IngestRun(
        sessions=n,
        passed=passed,
        completed=int(report["completed"]),
        failed=int(report["failed"]),
        unfinished=int(report["unfinished"]),
        ack_p50_ms=ms(m["ack_latency_s"]["p50"]),
        ack_p99_ms=ack_p99,
        ack_max_ms=ms(m["ack_latency_s"]["max"]),
        connect_p99_s=m["connect_s"]["p99"],
        send_delay_p99_ms=ms(m["send_delay_s"]["p99"]),
        final_lag_p95_s=m["final_lag_s"]["p95"],
        session_s=session_s,
        gateway_cpu_ms_per_session_s=1000 * gw_cpu / session_s if session_s else 0.0,
        gateway_rss_before_mb=rss0 / 2**20,
        gateway_rss_peak_mb=peak / 2**20,
        kib_per_connection=(peak - rss0) / 1024 / n,
        cores=cores,
        load_before=load_before,
        busy_before=busy_before,
        speed_ms=speed,
        foreign_cores=max(0.0, (sys1 - sys0) / wall - sum(cores.values())),
        elapsed_s=float(report["elapsed_s"]),
        errors=errors,
    )


def row(r: IngestRun) -> list[str]:
    c = r.cores
    return [
        str(r.sessions) + (f" (retry {r.retried})" if r.retried else ""),
        "yes" if r.passed else "**no**",
        f"{r.completed}/{r.sessions}" + (f" ({r.unfinished} unfinished)" if r.unfinished else ""),
        f"{fmt(r.ack_p50_ms)} / {fmt(r.ack_p99_ms)} / {fmt(r.ack_max_ms)}",
        fmt(r.send_delay_p99_ms),
        fmt(r.final_lag_p95_s, 2),
        f"{r.gateway_cpu_ms_per_session_s:.2f}",
        f"{r.gateway_rss_before_mb:.0f} -> {r.gateway_rss_peak_mb:.0f}",
        f"{r.kib_per_connection:.0f}",
        ", ".join(f"{c.get(k, 0.0):.2f}" for k in ("gateway", "worker", "valkey", "loadtest")),
        ", ".join(f"{k}: {v}" for k, v in r.errors.items()) or "none",
        f"{r.busy_before:.2f} / {r.foreign_cores:.2f}",
        r.load_before,
        f"{r.speed_ms:.0f}",
    ]


HEADER = [
    "N",
    "pass",
    "completed",
    "ack ms p50 / p99 / max",
    "send delay p99 ms",
    "final lag p95 s",
    "gateway CPU ms per session-s",
    "gateway RSS MB",
    "KiB per connection",
    "cores: gateway, worker, valkey, loadtest",
    "errors",
    "other processes' cores: before / during",
    "load avg before",
    "machine speed ms",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, nargs="+", default=[250, 500, 1000, 1500, 2000])
    parser.add_argument("--clips", nargs="+", default=list(DEFAULT_CLIPS))
    parser.add_argument("--duration-s", type=float, default=20.0)
    parser.add_argument("--ramp-rate", type=float, default=100.0, help="sessions started per s")
    parser.add_argument("--max-ack-ms", type=float, default=100.0)
    parser.add_argument(
        "--vad",
        choices=["energy", "silero"],
        default="energy",
        help="the null worker's VAD (energy: no model, so the worker leaves the cores to "
        "the gateway; silero: what a real worker runs)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="worker processes (`up --workers`), each with slots for its share of the "
        "sessions (default 1)",
    )
    parser.add_argument(
        "--pause-worker",
        action="store_true",
        help="stop the worker (SIGSTOP) once up: sessions wait in the queue, their audio is "
        "stored and acked, and only the gateway, Valkey and the load generator run",
    )
    parser.add_argument(
        "--drain-timeout-s",
        type=float,
        default=None,
        help="how long the load generator waits for sessions to close after streaming "
        "(default 30; 5 with --pause-worker, where none closes)",
    )
    parser.add_argument(
        "--tick-ms",
        type=float,
        default=5.0,
        help="the load generator's sending clock (`streamscribe loadtest --tick-ms`; "
        "default 5; 0: each frame at its own due time)",
    )
    parser.add_argument(
        "--tls",
        action="store_true",
        help="serve wss:// with `up`'s development certificate, as deployed (default: plain "
        "ws://, which keeps the load generator cheap); writes its own section",
    )
    parser.add_argument("--budget-s", type=float, default=900.0, help="no new run after this")
    parser.add_argument("--quiet-wait-s", type=float, default=120.0)
    parser.add_argument("--retries", type=int, default=2)
    parser.add_argument("--retry-if-other-cores", type=float, default=0.15)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--write", type=Path)
    args = parser.parse_args()
    if args.drain_timeout_s is None:
        args.drain_timeout_s = 5.0 if args.pause_worker else 30.0
    if min(args.sessions) < 1 or max(args.sessions) > 5000:
        parser.error("--sessions must be 1..5000")
    if args.tls and args.pause_worker:
        parser.error("--tls and --pause-worker write different sections; choose one")
    deadline = time.monotonic() + args.budget_s
    runs: list[IngestRun] = []
    with tempfile.TemporaryDirectory(prefix="ss-ingest-") as tmp_name:
        tmp = Path(tmp_name)
        audio = stage_clips(pick_clips(args.clips), tmp / "clips")
        todo = sorted(set(args.sessions))
        good, bad = 0, None
        while todo and time.monotonic() < deadline:
            n = todo.pop(0)
            print(f"{n} sessions ...", flush=True)
            run = one_run(n, args, audio, tmp)
            print(" | ".join(row(run)), flush=True)
            for attempt in range(1, args.retries + 1):
                # A shared machine: a failure while other processes took a good part of a
                # core says little about the gateway. Try again (bounded).
                noisy = run.foreign_cores >= args.retry_if_other_cores
                if run.passed or not noisy or time.monotonic() >= deadline:
                    break
                run = one_run(n, args, audio, tmp)
                run.retried = attempt
                print("retry: " + " | ".join(row(run)), flush=True)
            runs.append(run)
            if run.passed:
                good = max(good, n)
            else:
                bad = n if bad is None else min(bad, n)
            if bad is not None:
                mid = (good + bad) // 2
                mid -= mid % 25  # steps of 25 sessions are fine enough here
                done = {r.sessions for r in runs}
                todo = [mid] if good < mid < bad and mid not in done else []
    best = max((r.sessions for r in runs if r.passed), default=0)
    text = f"Largest N passing: **{best}**\n\n" + table(
        HEADER, [row(r) for r in sorted(runs, key=lambda r: r.sessions)]
    )
    print(text)
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in runs], indent=2))
    if args.write:
        cmd = "python bench/ingest.py " + " ".join(sys.argv[1:])
        workers = "one worker" if args.workers == 1 else f"{args.workers} worker processes"
        if args.pause_worker:
            section = (
                f"{HEADING_PAUSED}\n\nMeasured {today()} on the {machine()}; command `{cmd}`. "
                f"As the section above, but the worker is stopped (SIGSTOP) once `up` is "
                f"ready: every session waits in the queue (no worker claims it) while its "
                f"audio is stored in Valkey and acknowledged as usual, so the cores are "
                f"shared by the gateway, Valkey and the load generator only: the gateway's "
                f"ingest path as it runs with its workers on other machines. Queue limits "
                f"raised so that no session is refused or cancelled "
                f"(`--max-queue-wait-s 3600 --queue-update-s 3600`). "
                f"{args.duration_s:.0f} s of real speech per session, pace 1.0, 100 ms "
                f"frames, {args.ramp_rate:.0f} sessions started per second. Pass: no failed "
                f"session, no errors, p99 ack <= {args.max_ack_ms:.0f} ms; no session can "
                f"finish (none is transcribed), so all count as unfinished.\n\n{text}\n"
            )
            replace_section(args.write, HEADING_PAUSED, section)
            print(f"wrote {args.write}")
            return
        heading = HEADING_TLS if args.tls else HEADING
        certfile = "" if args.tls else " --certfile none"
        tls = (
            "TLS as deployed: `up`'s development certificate, and the load generator "
            "does the client side of every handshake and record on the same cores. "
            if args.tls
            else ""
        )
        section = (
            f"{heading}\n\nMeasured {today()} on the {machine()}; command `{cmd}`. "
            f"`streamscribe up --engine null --vad {args.vad}{certfile}` (one gateway "
            f"process, {workers} with the null engine and the {args.vad} VAD on every "
            f"frame, embedded Valkey) and `streamscribe loadtest` (its own process) on the "
            f"same cores: the load generator and the worker compete with the gateway. "
            f"{tls}{args.duration_s:.0f} s of real speech per session "
            f"({', '.join(args.clips)}, looped), pace 1.0, 100 ms frames sent on a "
            f"{args.tick_ms:g} ms clock (`--tick-ms`), "
            f"{args.ramp_rate:.0f} sessions started per second, interims on. Each run "
            f"first waits up to {args.quiet_wait_s:.0f} s for other processes to use < 0.3 "
            f"cores. Pass: "
            f"no failed session, no errors, p99 ack <= {args.max_ack_ms:.0f} ms (sessions "
            f"still open {args.drain_timeout_s:.0f} s after streaming ended count as "
            f"unfinished: the worker's lag, not the gateway's). "
            f"*cores* = CPU seconds / wall seconds of the run. *machine speed*: the best "
            f"of three timings of a fixed Python loop just before the run (lower is "
            f"faster; on this VM it has varied by a factor of up to 1.8 within an hour, "
            f"and every process's CPU per frame moves with it).\n\n{text}\n"
        )
        replace_section(args.write, heading, section)
        print(f"wrote {args.write}")


if __name__ == "__main__":
    main()
