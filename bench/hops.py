"""Hop latency: frame appended -> worker reads it, and final published -> client has it.

    python bench/hops.py [--runs null:10 null:150 whisper:2] [--duration-s 20]
                         [--ramp-s 10] [--write docs/benchmarks.md]

For each ENGINE:N: an embedded Valkey, `streamscribe gateway --certfile none` and a worker, each
its own process, and the load generator (`shared.loadtest`, the code of `streamscribe
loadtest`) in this process at pace 1.0 with 100 ms frames. The worker is the normal
`worker.service.Worker`, started by this script in a child process whose audio reads
(`Store.read_audio`) timestamp what `XREAD` returns; nothing in the service is changed or
switched on.

- *append -> read*: worker's wall clock when XREAD returned an entry minus the entry's ID
  time (the ms at which the gateway's INGEST script appended it, Valkey's clock).
- *publish -> client*: the client's wall clock when a final arrived minus its results-
  stream entry ID time (PUBLISH_FINAL appends and publishes in one script).
Same machine, same clock; IDs have 1 ms resolution. Also reports ack latency (client send
-> ack) from the load generator.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import statistics
import sys
import tempfile
import time
from array import array
from collections.abc import Coroutine, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (
    DEFAULT_CLIPS,
    load_average,
    machine,
    pick_clips,
    replace_section,
    stage_clips,
    start_child,
    stop_child,
    streamscribe,
    table,
    today,
    wait_quiet,
)

T = TypeVar("T")
HEADING = "## Hop latency: Redis append -> worker, final -> client"


# --- the worker child ---------------------------------------------------------------------


def worker_child(args: argparse.Namespace) -> None:
    """A normal worker whose audio reads (`Store.read_audio`, its one `XREAD`) note how
    old each entry they return is."""
    from shared.config import Config
    from shared.store import Store
    from worker.service import Worker

    ages_ms = array("d")
    read_audio = Store.read_audio

    async def timed_read_audio(
        self: Store, streams: Sequence[tuple[bytes, bytes]], count: int, block_ms: int | None
    ) -> list[tuple[bytes, list[tuple[bytes, list[bytes]]]]]:
        reply = await read_audio(self, streams, count, block_ms)
        now_ms = time.time() * 1000
        for _key, entries in reply:
            for entry_id, _fields in entries:
                ages_ms.append(now_ms - int(entry_id.split(b"-", 1)[0]))
        return reply

    Store.read_audio = timed_read_audio  # type: ignore[method-assign]

    async def main() -> None:
        config = Config(
            redis_url=args.redis_url,
            engine=args.engine,
            vad="energy" if args.engine == "null" else "silero",  # as bench/ingest.py
            slots=args.slots,
            log_level="WARNING",
        )
        worker = Worker(config)
        await worker.start()
        print("hops worker: ready", flush=True)
        await worker.serve_forever()

    run_async(main())
    Path(args.out).write_text(json.dumps(list(ages_ms)))


# --- the load and the results hop ---------------------------------------------------------


@contextlib.contextmanager
def final_receive_times(out: list[tuple[int, int, float]]) -> Iterator[None]:
    """Note (session index, result_id, wall clock) of every final the load client gets."""
    from shared.loadstats import SessionRecorder

    original = SessionRecorder.transcript

    def transcript(
        self: SessionRecorder,
        t: float,
        result_id: int,
        is_final: bool,
        start: float,
        end: float,
        text: str,
    ) -> None:
        if is_final:
            out.append((self.index, result_id, time.time()))
        original(self, t, result_id, is_final, start, end, text)

    setattr(SessionRecorder, "transcript", transcript)  # noqa: B010 - a bench-only probe
    try:
        yield
    finally:
        setattr(SessionRecorder, "transcript", original)  # noqa: B010


def publish_to_client_ms(
    redis_url: str, session_ids: dict[int, str | None], received: list[tuple[int, int, float]]
) -> list[float]:
    import redis

    from shared import keys
    from shared.keys import SessionId

    client = redis.Redis.from_url(redis_url)
    out = []
    try:
        for index, sid in session_ids.items():
            if sid is None:
                continue
            published = {}
            entries = client.xrange(keys.results(SessionId(sid)), count=10_000)
            for entry_id, fields in entries:  # type: ignore[union-attr]
                if fields.get(b"t") == b"final":
                    published[int(fields[b"rid"])] = int(entry_id.split(b"-", 1)[0])
            for i, rid, wall in received:
                if i == index and rid in published:
                    out.append(wall * 1000 - published[rid])
    finally:
        client.close()
    return out


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """On uvloop where installed, as `streamscribe loadtest` runs."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def measure(engine: str, n: int, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    from shared.embedded import EmbeddedValkey, free_port
    from shared.loadtest import Options, load_clip, run_load

    valkey = EmbeddedValkey(tmp / f"valkey-{n}")
    valkey.start()
    procs = []
    try:
        gateway, url = start_child(
            [
                *streamscribe(),
                "gateway",
                "--redis-url",
                valkey.url,
                "--certfile",
                "none",
                "--port",
                str(free_port()),
                "--max-queue-length",
                str(n * 2 + 100),
                "--log-level",
                "WARNING",
            ],
            "streamscribe gateway: ",
            tmp / f"gateway-{n}.log",
        )
        procs.append(gateway)
        ages_path = tmp / f"ages-{n}.json"
        worker, _ = start_child(
            [
                sys.executable,
                __file__,
                "--worker-child",
                "--redis-url",
                valkey.url,
                "--engine",
                engine,
                "--slots",
                str(n + 10),
                "--out",
                str(ages_path),
            ],
            "hops worker: ready",
            tmp / f"worker-{n}.log",
            timeout_s=300,
        )
        procs.append(worker)
        audio = [str(p) for p in args.audio]
        options = Options(
            url=url,
            sessions=n,
            audio=tuple(audio),
            pace=1.0,
            ramp_s=args.ramp_s if n > 1 else 0.0,
            duration_s=args.duration_s,
            drain_timeout_s=60.0,
            interim_results=True,
        )
        clips = [load_clip(a, options.frame_ms) for a in audio]
        received: list[tuple[int, int, float]] = []
        busy_before = wait_quiet(120.0)
        load_before = load_average()
        with final_receive_times(received):
            report, recorder = run_async(run_load(options, clips))
        stop_child(worker)
        ages = json.loads(ages_path.read_text()) if ages_path.exists() else []
        sids = {s.index: s.session_id for s in recorder.sessions}
        delivered = publish_to_client_ms(valkey.url, sids, received)
    finally:
        for proc in reversed(procs):
            stop_child(proc)
        valkey.stop()
    data = report.to_dict()
    ack = data["metrics"]["ack_latency_s"]
    return {
        "engine": engine,
        "sessions": n,
        "completed": data["completed"],
        "failed": data["failed"],
        "unfinished": data["unfinished"],
        "errors": data["errors_by_close_code"],
        "load_before": load_before,
        "busy_before": busy_before,
        "ack_ms": {k: 1000 * float(ack[k] or 0) for k in ("p50", "p99")},
        "append_to_read_ms": summary(ages),
        "publish_to_client_ms": summary(delivered),
    }


def summary(values: list[float]) -> dict[str, float]:
    return {
        "count": len(values),
        "p50": pct(values, 0.5),
        "p99": pct(values, 0.99),
        "max": max(values) if values else float("nan"),
        "mean": statistics.fmean(values) if values else float("nan"),
    }


def render(results: list[dict[str, Any]]) -> str:
    rows = []
    for r in results:
        a, p = r["append_to_read_ms"], r["publish_to_client_ms"]
        rows.append(
            [
                r["engine"],
                r["sessions"],
                f"{r['completed']}/{r['sessions']}",
                f"{a['p50']:.0f} / {a['p99']:.0f} / {a['max']:.0f} ({a['count']})",
                f"{p['p50']:.0f} / {p['p99']:.0f} / {p['max']:.0f} ({p['count']})",
                f"{r['ack_ms']['p50']:.0f} / {r['ack_ms']['p99']:.0f}",
                f"{r['busy_before']:.2f}",
                r["load_before"],
            ]
        )
    return table(
        [
            "engine",
            "N",
            "completed",
            "append -> worker read ms p50 / p99 / max (entries)",
            "final publish -> client ms p50 / p99 / max (finals)",
            "ack ms p50 / p99",
            "other processes' cores before",
            "load avg before",
        ],
        rows,
    )


def parse_run(text: str) -> tuple[str, int]:
    engine, _, n = text.partition(":")
    if engine not in ("null", "whisper") or not n.isdigit():
        raise argparse.ArgumentTypeError(f"want ENGINE:N (null or whisper), got {text!r}")
    return engine, int(n)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--runs",
        type=parse_run,
        nargs="+",
        default=[("null", 10), ("null", 150)],
        help="ENGINE:N, engine null or whisper (default: null:10 null:150)",
    )
    parser.add_argument("--clips", nargs="+", default=list(DEFAULT_CLIPS))
    parser.add_argument("--duration-s", type=float, default=20.0)
    parser.add_argument("--ramp-s", type=float, default=10.0)
    parser.add_argument("--write", type=Path)
    parser.add_argument("--json", type=Path)
    # the worker child (started by this script)
    parser.add_argument("--worker-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--redis-url", help=argparse.SUPPRESS)
    parser.add_argument("--engine", default="null", help=argparse.SUPPRESS)
    parser.add_argument("--slots", type=int, default=100, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker_child:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        worker_child(args)
        return
    if not args.runs or any(n < 1 or n > 5000 for _, n in args.runs):
        parser.error("--runs wants ENGINE:N with N in 1..5000")
    from shared.loadtest import _raise_fd_limit

    _raise_fd_limit(max(n for _, n in args.runs) * 3 + 64)
    results = []
    with tempfile.TemporaryDirectory(prefix="ss-hops-") as tmp_name:
        tmp = Path(tmp_name)
        args.audio = stage_clips(pick_clips(args.clips), tmp / "clips")
        for engine, n in args.runs:
            print(f"{engine} engine, {n} sessions ...", flush=True)
            results.append(measure(engine, n, args, tmp))
            print(json.dumps(results[-1]), flush=True)
    text = render(results)
    print(text)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    if args.write:
        cmd = "python bench/hops.py " + " ".join(sys.argv[1:])
        section = (
            f"{HEADING}\n\nMeasured {today()} on the {machine()}; command `{cmd}`. "
            f"Plain ws; gateway, worker, Valkey and the load "
            f"generator are separate processes on the same 2 cores. Clips "
            f"{', '.join(args.clips)} looped to {args.duration_s:.0f} s, pace 1.0, 100 ms "
            f"frames, sessions started over {args.ramp_s:.0f} s.\n\n{text}\n"
        )
        replace_section(args.write, HEADING, section)
        print(f"wrote {args.write}")


if __name__ == "__main__":
    main()
