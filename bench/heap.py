"""Heap census of one gateway: what does it keep after its sessions are gone?

    python bench/heap.py [--rounds 12] [--sessions 200] [--session-s 20] [--warm-rounds 2]
                         [--heap-trim-drop N] [--tracemalloc] [--json OUT]
                         [--write docs/benchmarks.md]

Unlike bench/soak.py, which watches `streamscribe up` from outside, this runs the gateway
in this process (the same `Gateway` class `streamscribe gateway` runs), next to an
embedded Valkey and a null-engine worker in child processes, and looks inside it. Each
round, a `streamscribe loadtest` child process streams --sessions sessions of
--session-s seconds (ramped over --session-s, TLS as deployed) and ends; once the gateway
holds no connection (and, with its trimming on, once it has trimmed after its last
connection closed, as it does whatever the round's size), a census is taken:

- resident memory, and the C allocator's view (glibc `mallinfo2`: bytes in use, bytes
  free but kept);
- Python's allocated memory blocks (`sys.getallocatedblocks`) and the objects the
  garbage collector tracks, by type;
- the gateway's own tables (relay subscriptions, pub/sub channels, Redis connections,
  sessions waiting to be released);
- with --tracemalloc (tracing starts after the warm-up rounds; it slows the gateway), the
  source lines whose allocations grew most.

It prints a line per round and, at the end, what grew between the end of the warm-up and
the last round, per 1,000 sessions: by type, the tables, Python blocks and RSS. Then it
calls glibc `malloc_trim(0)` itself and reads resident memory again: what that returns to
the system was free memory the allocator kept, not live objects. --heap-trim-drop 0 turns
the gateway's own trimming off, to see what the allocator keeps without it. Bounded:
--rounds at most 200, and each round's load generator stops on its own deadline.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (
    DEFAULT_CLIPS,
    ROOT,
    fmt,
    machine,
    pick_clips,
    replace_section,
    rss_bytes,
    run_loadtest,
    stage_clips,
    start_child,
    stop_child,
    table,
    today,
)
from gateway.memory import MMAP_THRESHOLD_BYTES, fix_mmap_threshold, glibc, trim, trim_supported
from shared.config import Config
from shared.runtime import tune_gc

MIB = 1 << 20
HEADING = "## Gateway memory: heap census"


def heading(heap_trim_drop: int, mmap_threshold: int) -> str:
    """The section's heading: one for the gateway's defaults, one with its trimming off,
    one with glibc's adaptive mmap threshold."""
    off = [
        *([] if heap_trim_drop else ["trimming off"]),
        *([] if mmap_threshold else ["glibc's adaptive mmap threshold"]),
    ]
    return f"{HEADING} ({', '.join(off)})" if off else HEADING


class _Mallinfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
            "fsmblks", "uordblks", "fordblks", "keepcost",
        )
    ]  # fmt: skip


def mallinfo() -> tuple[float, float] | None:
    """glibc's heap: (MiB in use, MiB free but kept), or None without glibc 2.33+."""
    libc = glibc()
    fn = getattr(libc, "mallinfo2", None) if libc is not None else None
    if fn is None:
        return None
    fn.restype = _Mallinfo2
    info = fn()
    in_use = info.uordblks + info.hblkhd
    return in_use / MIB, info.fordblks / MIB


@dataclass
class Census:
    round: int
    sessions: int  # served so far
    rss_mib: float
    malloc_in_use_mib: float | None
    malloc_free_mib: float | None
    blocks: int
    objects: int
    by_type: dict[str, int] = field(repr=False)
    tables: dict[str, int]
    failed: int = 0
    final_lag_p95_s: float | None = None
    trims: int = 0  # the gateway's own (heap_trim_drop) so far
    peak_rss_mib: float = 0.0  # the most resident memory while the round's sessions ran
    #: The round's last trim by the gateway: RSS before and after (MiB), and its time (ms).
    last_trim: tuple[float | None, float | None, float] | None = None


def type_counts() -> Counter[str]:
    counts: Counter[str] = Counter()
    for obj in gc.get_objects():
        t = type(obj)
        counts[f"{t.__module__}.{t.__qualname__}"] += 1
    return counts


def gateway_tables(gateway: Any) -> dict[str, int]:
    """The gateway's long-lived tables: each should go back to its idle size."""
    relay = gateway.relay
    pool = gateway.redis.connection_pool
    server = gateway._server
    return {
        "connections": len(server.connections) if server is not None else 0,
        "relay queues": len(relay._queues),
        "relay heard": len(relay._heard),
        "relay slices": sum(len(s) for s in relay._slices),
        "pubsub channels": len(relay._pubsub.channels),
        "pubsub pending unsubscribe": len(relay._pubsub.pending_unsubscribe_channels),
        "redis connections": len(pool._available_connections) + len(pool._in_use_connections),
        "unreleased": len(gateway.ctx.unreleased),
        "asyncio tasks": len(asyncio.all_tasks()),
    }


def census(gateway: Any, round_: int, sessions: int) -> Census:
    gc.collect()
    heap = mallinfo()
    counts = type_counts()
    return Census(
        round=round_,
        sessions=sessions,
        rss_mib=rss_bytes(os.getpid()) / MIB,
        malloc_in_use_mib=heap[0] if heap else None,
        malloc_free_mib=heap[1] if heap else None,
        blocks=sys.getallocatedblocks(),
        objects=sum(counts.values()),
        by_type=dict(counts),
        tables=gateway_tables(gateway),
    )


def growth(first: Census, last: Census, top: int = 15) -> list[tuple[str, int, float]]:
    """Types whose count grew most: (type, growth, growth per 1,000 sessions)."""
    served = max(1, last.sessions - first.sessions)
    deltas = Counter(last.by_type)
    deltas.subtract(first.by_type)
    return [
        (name, delta, 1000 * delta / served) for name, delta in deltas.most_common(top) if delta > 0
    ]


async def wait_idle(gateway: Any, timeout_s: float = 60.0) -> None:
    """Until the gateway holds no connection and no relay subscription (bounded)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        tables = gateway_tables(gateway)
        if tables["connections"] == 0 and tables["relay queues"] == 0:
            return
        await asyncio.sleep(0.2)  # polling the gateway's own tables; no event to await
    raise RuntimeError(f"gateway not idle after {timeout_s:g} s: {gateway_tables(gateway)}")


async def sample_peak(peak: list[int], every_s: float = 0.5) -> None:
    """Keep the most resident memory seen in `peak[0]` until cancelled."""
    while True:
        await asyncio.sleep(every_s)  # the sampling period
        peak[0] = max(peak[0], rss_bytes(os.getpid()))


async def wait_trimmed_idle(gateway: Any, timeout_s: float) -> None:
    """Until the gateway, holding no connection, has trimmed after its last one closed
    (its heartbeat does it, and its `TrimPolicy` peak is then 0; bounded)."""
    deadline = time.monotonic() + timeout_s
    while gateway.heap_trim.peak > 0:
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"the gateway did not trim within {timeout_s:g} s of its last connection "
                f"closing ({gateway.heap_trims} trims so far)"
            )
        await asyncio.sleep(0.1)  # polling the gateway's policy; no event to await


async def run(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    from gateway.server import Gateway
    from shared.cli import _child_env
    from shared.config import load_config
    from shared.devcert import ensure_dev_cert
    from shared.embedded import EmbeddedValkey

    audio = stage_clips(pick_clips(args.clips), tmp / "clips")
    valkey = EmbeddedValkey(tmp / "valkey")
    valkey.start()
    cert, key = ensure_dev_cert(tmp)
    config = load_config(
        {
            "redis_url": valkey.url,
            "certfile": str(cert),
            "keyfile": str(key),
            "port": 0,
            "engine": "null",
            "slots": 2 * args.sessions,
            "max_queue_length": 4 * args.sessions + 100,
            "log_level": "WARNING",
            "heap_trim_drop": args.heap_trim_drop,
        }
    )
    worker: subprocess.Popen[bytes] | None = None
    gateway = Gateway(config)
    try:
        await gateway.start()
        env = _child_env(config)
        os.environ.update({k: v for k, v in env.items() if k.startswith("STREAMSCRIBE_")})
        worker, _ = await asyncio.to_thread(
            start_child,
            [sys.executable, "-m", "shared.cli", "worker"],
            "streamscribe worker ",
            tmp / "worker.log",
        )
        extra = [
            "--pace", "1.0",
            "--ramp-s", f"{args.session_s:g}",
            "--duration-s", f"{args.session_s:g}",
            "--cafile", str(cert),
        ]  # fmt: skip
        censuses: list[Census] = []
        top_lines: list[tuple[str, float, int]] = []
        snapshot: tracemalloc.Snapshot | None = None
        served = 0
        for i in range(args.rounds):
            trims_before = gateway.heap_trims
            peak = [rss_bytes(os.getpid())]
            sampling = asyncio.create_task(sample_peak(peak))
            report = await asyncio.to_thread(
                run_loadtest,
                gateway.url,
                audio,
                args.sessions,
                tmp / f"round-{i}.json",
                extra=extra,
                timeout_s=4 * args.session_s + 300,
            )
            served += args.sessions
            sampling.cancel()
            await wait_idle(gateway)
            if trim_supported() and args.heap_trim_drop > 0:
                # The gateway trims once its last connection has closed (and maybe
                # before, on the way down): census after that.
                await wait_trimmed_idle(gateway, 10 * config.heartbeat_s)
            c = census(gateway, i + 1, served)
            c.failed = int(report["failed"]) + int(report["unfinished"])
            c.final_lag_p95_s = report["metrics"]["final_lag_s"].get("p95")
            if censuses and censuses[-1].round != args.warm_rounds:
                censuses[-1].by_type = {}  # only the warm-up's and the last are compared
            c.trims = gateway.heap_trims
            c.peak_rss_mib = peak[0] / MIB
            last = gateway.last_trim
            if last is not None and gateway.heap_trims > trims_before:
                c.last_trim = (last.rss_before_mib, last.rss_after_mib, last.took_ms)
            censuses.append(c)
            print(
                f"round {c.round}: {c.sessions} sessions served, {c.failed} failed; "
                f"RSS {c.rss_mib:.1f} MiB, Python blocks {c.blocks:,}, objects {c.objects:,}",
                flush=True,
            )
            if args.tracemalloc and i + 1 == args.warm_rounds:
                tracemalloc.start(args.trace_depth)
                snapshot = tracemalloc.take_snapshot()
        if snapshot is not None:
            gc.collect()
            diff = tracemalloc.take_snapshot().compare_to(snapshot, "traceback")
            for stat in diff[:15]:
                where = " <- ".join(f"{Path(f.filename).name}:{f.lineno}" for f in stat.traceback)
                top_lines.append((where, stat.size_diff / 1024, stat.count_diff))
            tracemalloc.stop()
        gc.collect()
        rss_before_trim = rss_bytes(os.getpid()) / MIB
        started = time.perf_counter()
        trimmed = trim()
        trim_ms = 1000 * (time.perf_counter() - started)
        rss_after_trim = rss_bytes(os.getpid()) / MIB if trimmed else None
    finally:
        await gateway.shutdown()
        if worker is not None:
            stop_child(worker)
        valkey.stop()
    return {
        "censuses": censuses,
        "top_lines": top_lines,
        "rss_before_trim": rss_before_trim,
        "rss_after_trim": rss_after_trim,
        "trim_ms": trim_ms,
    }


def render(args: argparse.Namespace, result: dict[str, Any]) -> str:
    censuses: list[Census] = result["censuses"]
    first = censuses[min(args.warm_rounds, len(censuses)) - 1]
    last = censuses[-1]
    served = max(1, last.sessions - first.sessions)

    def per_k(a: float, b: float) -> str:
        return f"{1000 * (b - a) / served:+.2f}"

    rows = [
        [
            c.round,
            c.sessions,
            c.failed,
            fmt(c.final_lag_p95_s, 2),
            fmt(c.peak_rss_mib),
            fmt(c.rss_mib),
            fmt(c.malloc_in_use_mib),
            fmt(c.malloc_free_mib),
            c.trims,
            "-"
            if c.last_trim is None
            else f"{fmt(c.last_trim[0])} -> {fmt(c.last_trim[1])} in {c.last_trim[2]:.1f} ms",
            f"{c.blocks:,}",
            f"{c.objects:,}",
        ]
        for c in censuses
    ]
    header = [
        "round", "sessions", "failed", "final lag p95 (s)", "RSS MiB at peak",
        "RSS MiB idle", "malloc in use MiB",
        "malloc free MiB", "gateway trims", "its last trim: RSS MiB", "Python blocks",
        "GC objects",
    ]  # fmt: skip
    trimming = (
        f"The gateway trims (`heap_trim_drop` {args.heap_trim_drop}, and when its last "
        "connection closes): each round's fall from its peak hands the freed memory "
        "back, and the census is taken after its trim at no connection."
        if args.heap_trim_drop
        else "The gateway never trims (`heap_trim_drop` 0): what the allocator keeps."
    )
    trimming += (
        f" glibc's mmap threshold fixed at {args.mmap_threshold} bytes, as the gateway fixes it."
        if args.mmap_threshold
        else " glibc's mmap threshold left to adapt (the gateway fixes it at 128 KiB)."
    )
    lines = [
        heading(args.heap_trim_drop, args.mmap_threshold),
        "",
        "`python bench/heap.py`: the gateway in the benchmark's own process (uvloop where "
        "installed, as `streamscribe gateway` runs it) with an embedded Valkey and a "
        f"null-engine worker; each round {args.sessions} TLS sessions of "
        f"{args.session_s:g} s stream at real time and end, and a census of the idle "
        "gateway follows. " + trimming,
        "",
        f"Machine: {machine()}. Date: {today()}.",
        f"Command: `python bench/heap.py --rounds {args.rounds} --sessions {args.sessions} "
        f"--session-s {args.session_s:g} --warm-rounds {args.warm_rounds} "
        f"--heap-trim-drop {args.heap_trim_drop} --mmap-threshold {args.mmap_threshold}"
        + (" --tracemalloc" if args.tracemalloc else "")
        + "`",
        "",
        table(header, rows),
        "",
        f"From round {first.round} to {last.round} ({last.sessions - first.sessions:,} "
        "sessions), per 1,000 sessions: "
        f"RSS {per_k(first.rss_mib, last.rss_mib)} MiB, Python blocks "
        f"{per_k(first.blocks, last.blocks)}, GC objects {per_k(first.objects, last.objects)}.",
        "",
        table(
            ["gateway table", f"after round {first.round}", f"after round {last.round}"],
            [[name, first.tables[name], last.tables.get(name, "-")] for name in first.tables],
        ),
    ]
    grew = growth(first, last)
    if grew:
        lines += [
            "",
            table(
                ["type", "count grew by", "per 1,000 sessions"],
                [[name, delta, f"{per:.1f}"] for name, delta, per in grew],
            ),
        ]
    if result["top_lines"]:
        lines += [
            "",
            table(
                ["allocated at (tracemalloc)", "KiB grew", "blocks grew"],
                [[where, f"{kib:+.1f}", f"{n:+d}"] for where, kib, n in result["top_lines"]],
            ),
        ]
    if result["rss_after_trim"] is not None:
        lines += [
            "",
            f"malloc_trim(0) at the end: RSS {result['rss_before_trim']:.1f} -> "
            f"{result['rss_after_trim']:.1f} MiB, in {result['trim_ms']:.1f} ms.",
        ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--sessions", type=int, default=200, help="sessions per round")
    parser.add_argument("--session-s", type=float, default=20.0, help="audio per session")
    parser.add_argument("--warm-rounds", type=int, default=2, help="growth is counted after")
    parser.add_argument(
        "--heap-trim-drop",
        type=int,
        default=Config().heap_trim_drop,
        help="the gateway's heap_trim_drop (0: it never trims)",
    )
    parser.add_argument(
        "--mmap-threshold",
        type=int,
        default=MMAP_THRESHOLD_BYTES,
        help="glibc mmap threshold the gateway fixes at start, bytes (0: glibc's adaptive default)",
    )
    parser.add_argument("--tracemalloc", action="store_true", help="trace after the warm-up")
    parser.add_argument("--trace-depth", type=int, default=4, help="frames per traceback")
    parser.add_argument("--clips", nargs="+", default=list(DEFAULT_CLIPS))
    parser.add_argument("--json", type=Path)
    parser.add_argument("--write", type=Path, help="update this markdown file's section")
    args = parser.parse_args()
    if not (2 <= args.rounds <= 200 and 1 <= args.warm_rounds < args.rounds):
        parser.error("--rounds must be 2..200 and --warm-rounds 1..rounds-1")
    if not (1 <= args.sessions <= 2000 and 5 <= args.session_s <= 600):
        parser.error("--sessions must be 1..2000 and --session-s 5..600")
    if args.heap_trim_drop < 0 or args.mmap_threshold < 0:
        parser.error("--heap-trim-drop and --mmap-threshold must be >= 0")
    os.chdir(ROOT)
    tune_gc()  # as the service does (shared.cli.run_loop), and on the same event loop
    if args.mmap_threshold:
        fix_mmap_threshold(args.mmap_threshold)  # as gateway.server.run_gateway does
    with tempfile.TemporaryDirectory(prefix="ss-heap-") as tmp_name:
        try:
            import uvloop
        except ImportError:
            result = asyncio.run(run(args, Path(tmp_name)))
        else:
            result = uvloop.run(run(args, Path(tmp_name)))
    text = render(args, result)
    print(text)
    if args.write:
        replace_section(args.write, heading(args.heap_trim_drop, args.mmap_threshold), text)
        print(f"wrote {args.write}")
    if args.json:
        out = dict(result, censuses=[asdict(c) for c in result["censuses"]])
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
