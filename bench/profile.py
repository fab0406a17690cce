"""Where the worker's time goes: a sampling profile of the worker under real-time load.

    python bench/profile.py [--sessions 15] [--duration-s 40] [--up-flags '...']
                            [--json OUT] [--write docs/benchmarks.md]

Starts `streamscribe up` (the shipped settings with a slot for every session, plus
`--up-flags`), runs `streamscribe
loadtest` with N real-time sessions on the capacity clips (bench/common.py DEFAULT_CLIPS),
and samples every thread of the worker process with py-spy (`pip install py-spy`;
non-blocking, so the worker is never paused) over the middle of the run.

A decode thread hands the work to CTranslate2's own compute threads and waits for it, so
its samples tell where the *decode time* goes: each is put in one group by what its stack
holds (the encoder, the decoder's token loop, word alignment, feature extraction, the
rest of faster-whisper's call). The other threads' samples are grouped the same way (the
VAD, the Redis client, the worker's own code, the event loop); a thread waiting for work
(an idle pool thread, the event loop in its poll) is left out. The worker's CPU per
thread group over the same span (/proc) is reported beside it.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (
    DEFAULT_CLIPS,
    THREAD_GROUPS,
    load_average,
    machine,
    pick_clips,
    replace_section,
    run_loadtest,
    running_up,
    stage_clips,
    table,
    thread_cpu,
    today,
    worker_thread_cores,
)

HEADING = "## Where the worker's time goes (profile under load)"
RATE_HZ = 100

# (group, what a stack must hold), first match wins; matched against "function (file:line)"
# frames of py-spy's raw output. The first five are inside a decode.
DECODE = "decode: "
GROUPS: tuple[tuple[str, str], ...] = (
    (DECODE + "encoder", "WhisperModel.encode "),
    (DECODE + "decoder token loop", "generate_with_fallback "),
    (DECODE + "word alignment", "find_alignment "),
    (DECODE + "feature extraction", "FeatureExtractor.__call__ "),
    (DECODE + "rest of faster-whisper's call", "WhisperEngine._decode "),
    ("VAD (Silero)", "StreamingVad.__call__ "),
    ("Redis client", "/redis/"),
    ("worker code (stream, scheduler, service)", "/worker/"),
)
# A thread whose innermost frame is one of these is waiting, not working.
IDLE_LEAVES = (
    "_worker ",
    "Condition.wait ",
    "Event.wait ",
    "Runner.run ",
    "select ",
    "run_forever ",
    "_run_once ",
)


def group_of(frames: list[str]) -> str | None:
    """The group of one sample (frames outermost first); None for a waiting thread."""
    if frames[-1].startswith(IDLE_LEAVES):
        return None
    for name, needle in GROUPS:
        if any(needle in f for f in frames):
            return name
    return "other (event loop, Python runtime)"


def parse_raw(text: str) -> Counter[str]:
    """py-spy `--format raw` (collapsed stacks, one `a;b;c COUNT` per line) per group."""
    out: Counter[str] = Counter()
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")[1:]  # the first entry names the thread
        group = group_of(frames) if frames else None
        if group is not None:
            out[group] += int(count)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=15)
    parser.add_argument("--duration-s", type=float, default=40.0)
    parser.add_argument("--up-flags", default="", help="extra `streamscribe up` flags")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--write", type=Path, help="update this markdown file's section")
    args = parser.parse_args()
    if shutil.which("py-spy") is None:
        raise SystemExit("bench/profile.py needs py-spy: pip install py-spy")
    sample_s = max(5.0, args.duration_s - 15.0)
    with tempfile.TemporaryDirectory(prefix="ss-profile-") as tmp_name:
        tmp = Path(tmp_name)
        audio = stage_clips(pick_clips(DEFAULT_CLIPS), tmp / "clips")
        load_before = load_average()
        up_args = ["--slots", str(args.sessions + 1), *shlex.split(args.up_flags)]
        with running_up(tmp / "up", up_args, tmp / "up.log") as service:
            wpid = service.pids["worker"]
            report: dict[str, Any] = {}

            def load() -> None:
                report.update(
                    run_loadtest(
                        service.url,
                        audio,
                        args.sessions,
                        tmp / "load.json",
                        cafile=service.cafile,
                        extra=["--duration-s", str(args.duration_s), "--ramp-s", "4"],
                    )
                )

            loader = threading.Thread(target=load)
            loader.start()
            time.sleep(10.0)  # past the ramp: every session streaming
            cpu0, threads0 = service.cpu()["worker"], thread_cpu(wpid)
            t0 = time.monotonic()
            raw = tmp / "worker.raw"
            subprocess.run(
                [
                    "py-spy",
                    "record",
                    "--pid",
                    str(wpid),
                    "--nonblocking",
                    "--idle",
                    "--threads",
                    "--rate",
                    str(RATE_HZ),
                    "--duration",
                    str(int(sample_s)),
                    "--format",
                    "raw",
                    "--output",
                    str(raw),
                ],
                check=True,
                capture_output=True,
            )
            wall = time.monotonic() - t0
            cores = (service.cpu()["worker"] - cpu0) / wall
            by_thread = worker_thread_cores(wpid, threads0, thread_cpu(wpid), wall)
            loader.join()
        samples = parse_raw(raw.read_text())
    decode = sum(n for k, n in samples.items() if k.startswith(DECODE))
    total = sum(samples.values())
    if not decode:
        raise SystemExit("py-spy took no sample of a decode")
    rows = [
        [
            name,
            str(n),
            f"{n / decode:.0%}" if name.startswith(DECODE) else "-",
            f"{n / total:.0%}",
        ]
        for name, n in sorted(samples.items(), key=lambda kv: -kv[1])
    ]
    lag = report.get("metrics", {}).get("final_lag_s", {})
    out = table(
        ["what a worker thread was doing", "samples", "share of decode time", "share of all"],
        rows,
    )
    threads = ", ".join(f"{g} {by_thread.get(g, 0.0):.2f}" for g in THREAD_GROUPS)
    summary = (
        f"{args.sessions} real-time sessions; final lag p50 "
        f"{lag.get('p50', float('nan')):.2f} s, p95 {lag.get('p95', float('nan')):.2f} s; "
        f"worker {cores:.2f} cores over the {sample_s:.0f} s sampled (per thread group: "
        f"{threads})"
    )
    print(out)
    print(summary)
    if args.json:
        args.json.write_text(
            json.dumps(
                {"cores": cores, "thread_cores": by_thread, "samples": dict(samples)}, indent=2
            )
        )
    if args.write:
        cmd = "python bench/profile.py " + " ".join(sys.argv[1:])
        section = (
            f"{HEADING}\n\nMeasured {today()} on {machine()}; command `{cmd}`. "
            f"`streamscribe up` and `streamscribe loadtest` on {', '.join(DEFAULT_CLIPS)}; "
            f"py-spy sampled the worker at {RATE_HZ} Hz without pausing it. Load average "
            f"before: {load_before}. {summary}.\n\n{out}\n"
        )
        replace_section(args.write, HEADING, section)


if __name__ == "__main__":
    main()
