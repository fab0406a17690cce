"""File jobs: how fast whole files are transcribed, and what they cost live sessions.

    python bench/filejobs.py [--clips ID ...] [--copies 2] [--live 6] [--duration-s 60]
                             [--json OUT] [--write docs/benchmarks.md]

One `streamscribe up` (default settings, the real model), three phases:

1. *Idle*: every clip, `--copies` times, submitted as file jobs at once
   (`shared/jobs_client.py`); audio seconds per wall second from the first submit to
   the last job done, and WER against the clips' references. Compared with the offline
   bound (bench/offline.py: one call at a time, as a worker runs one file decode at
   once, and two at once) measured in the same run on the same clips.
2. *Live only*: `streamscribe loadtest` with `--live` real-time sessions for
   `--duration-s` (the baseline for 3).
3. *Live + files*: the same loadtest while file jobs are kept queued (each finished job
   replaced by the next copy, at most `--max-jobs`): the live sessions' final lag and
   completion beside the baseline, and the file audio transcribed meanwhile.

Prints tables; with --write, replaces the "File jobs" section of the benchmarks document.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (
    DEFAULT_CLIPS,
    ROOT,
    ClipRef,
    machine,
    pick_clips,
    replace_section,
    run_loadtest,
    running_up,
    stage_clips,
    table,
    today,
)
from shared.jobs_client import JobError, submit_job, wait_job
from shared.scoring import wer
from shared.wavfile import read_wav

HEADING = "## File jobs"


def ssl_context(cafile: str | None) -> ssl.SSLContext | None:
    return ssl.create_default_context(cafile=cafile) if cafile else None


async def run_jobs(
    url: str,
    clips: list[ClipRef],
    copies: int,
    ctx: ssl.SSLContext | None,
    timeout_s: float,
) -> dict[str, Any]:
    """Submit every clip `copies` times at once; wait for all; time and score them."""
    started = time.monotonic()

    async def one(clip: ClipRef) -> tuple[ClipRef, dict[str, Any]]:
        audio = read_wav(clip.path)
        receipt, _ = await submit_job(
            url, audio.data, sample_rate=audio.sample_rate, ssl_context=ctx, name=clip.id
        )
        view = await wait_job(
            receipt.url, receipt.job_id, ssl_context=ctx, poll_s=0.25, timeout_s=timeout_s
        )
        return clip, view

    done = await asyncio.gather(*(one(c) for c in clips for _ in range(copies)))
    wall = time.monotonic() - started
    audio_s = sum(c.duration_s for c, _ in done)
    return {
        "jobs": len(done),
        "audio_s": audio_s,
        "wall_s": wall,
        "speed": audio_s / wall,
        "wer": wer([c.reference for c, _ in done], [v["text"] for _, v in done]),
        "runs": sum(int(v["runs"]) for _, v in done),
    }


class Backlog:
    """Keeps file jobs queued while a loadtest runs: `jobs` at once, each finished job
    replaced by the next clip, until `stop`; counts the file audio finished."""

    def __init__(
        self, url: str, clips: list[ClipRef], ctx: ssl.SSLContext | None, jobs: int
    ) -> None:
        self.url, self.clips, self.ctx, self.jobs = url, clips, ctx, jobs
        self.finished_audio_s = 0.0
        self.finished = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(120)

    async def _main(self) -> None:
        async def lane(k: int) -> None:
            i = k
            while not self._stop.is_set():
                clip = self.clips[i % len(self.clips)]
                i += self.jobs
                audio = read_wav(clip.path)
                try:
                    receipt, _ = await submit_job(
                        self.url, audio.data, sample_rate=audio.sample_rate, ssl_context=self.ctx
                    )
                    while not self._stop.is_set():
                        try:
                            await wait_job(
                                receipt.url,
                                receipt.job_id,
                                ssl_context=self.ctx,
                                poll_s=0.25,
                                timeout_s=1.0,
                            )
                            break
                        except TimeoutError:
                            continue
                    else:
                        return
                except JobError as exc:
                    self.errors.append(str(exc))
                    return
                self.finished += 1
                self.finished_audio_s += clip.duration_s

        await asyncio.gather(*(lane(k) for k in range(self.jobs)))


def loadtest(
    url: str, cafile: str | None, audio: list[Path], sessions: int, duration_s: float, out: Path
) -> dict[str, Any]:
    extra = ["--pace", "1.0", "--duration-s", str(duration_s), "--ramp-s", "4"]
    return run_loadtest(url, audio, sessions, out, extra=extra, cafile=cafile)


def live_row(name: str, report: dict[str, Any], files: Backlog | None) -> list[str]:
    def ms(stat: str) -> str:
        value = report["metrics"]["final_lag_s"].get(stat)
        return "-" if value is None else f"{1000 * float(value):.0f}"

    return [
        name,
        f"{report['completed']}/{report['sessions_total']}",
        ms("p50"),
        ms("p95"),
        ms("max"),
        "-" if report["wer"] is None else f"{float(report['wer']['value']):.3f}",
        "-" if files is None else f"{files.finished} ({files.finished_audio_s:.0f} s)",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clips", nargs="+", default=list(DEFAULT_CLIPS))
    parser.add_argument("--copies", type=int, default=2, help="each clip's jobs in phase 1")
    parser.add_argument("--live", type=int, default=6, help="live sessions in phases 2-3")
    parser.add_argument("--duration-s", type=float, default=60.0)
    parser.add_argument("--max-jobs", type=int, default=2, help="file jobs queued in phase 3")
    parser.add_argument("--up-args", default="", help="more flags for `streamscribe up`")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--write", type=Path)
    args = parser.parse_args()
    if not (1 <= args.copies <= 20 and 1 <= args.live <= 200 and 1 <= args.max_jobs <= 20):
        parser.error("--copies 1..20, --live 1..200, --max-jobs 1..20")
    if not 5 <= args.duration_s <= 600:
        parser.error("--duration-s must be 5..600")
    clips = pick_clips(args.clips)
    result: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="ss-filejobs-") as tmp_name:
        tmp = Path(tmp_name)
        audio = stage_clips(clips, tmp / "clips")
        print(f"offline bound on {', '.join(args.clips)} ...", flush=True)
        out = tmp / "offline.json"
        subprocess.run(
            [
                sys.executable,
                str(ROOT / "bench" / "offline.py"),
                "--clips",
                *args.clips,
                *("--no-call-cost", "--repeats", "3", "--parallel", "1", "2", "--json", str(out)),
            ],
            cwd=ROOT,
            check=True,
            timeout=900,
            stdout=subprocess.DEVNULL,
        )
        rows = json.loads(out.read_text())
        offline = next(r for r in rows if int(r["parallel"]) == 1)
        offline2 = next(r for r in rows if int(r["parallel"]) == 2)
        result["offline"] = rows
        print(
            f"offline bound: one call at a time {offline['bound']:.1f}, two at once "
            f"{offline2['bound']:.1f} audio s/s",
            flush=True,
        )
        up_args = shlex.split(args.up_args)
        with running_up(tmp / "state", up_args, tmp / "up.log") as up:
            ctx = ssl_context(up.cafile)
            print("phase 1: file jobs on an idle service ...", flush=True)
            idle = asyncio.run(run_jobs(up.url, clips, args.copies, ctx, 900))
            result["idle"] = idle
            print(f"  {idle['speed']:.1f} audio s/s, WER {idle['wer']:.3f}", flush=True)
            print(f"phase 2: {args.live} live sessions alone ...", flush=True)
            base = loadtest(up.url, up.cafile, audio, args.live, args.duration_s, tmp / "a.json")
            print(f"phase 3: {args.live} live sessions with file jobs queued ...", flush=True)
            files = Backlog(up.url, clips, ctx, args.max_jobs)
            files.start()
            both = loadtest(up.url, up.cafile, audio, args.live, args.duration_s, tmp / "b.json")
            files.stop()
            result["live"] = {"alone": base, "with_files": both}
            result["backlog"] = {
                "finished": files.finished,
                "audio_s": files.finished_audio_s,
                "errors": files.errors,
            }
    idle = result["idle"]
    text_idle = table(
        [
            "jobs",
            "audio s",
            "wall s",
            "audio s/s",
            "offline: 1 call at a time, 2 at once",
            "ratio to 1 call",
            "WER",
        ],
        [
            [
                idle["jobs"],
                f"{idle['audio_s']:.0f}",
                f"{idle['wall_s']:.1f}",
                f"{idle['speed']:.1f}",
                f"{offline['bound']:.1f}, {offline2['bound']:.1f}",
                f"{idle['speed'] / offline['bound']:.2f}",
                f"{idle['wer']:.3f}",
            ]
        ],
    )
    text_live = table(
        ["run", "sessions completed", "final lag p50 ms", "p95", "max", "WER", "file jobs done"],
        [
            live_row("live only", result["live"]["alone"], None),
            live_row("live + file jobs", result["live"]["with_files"], files),
        ],
    )
    print(text_idle)
    print(text_live)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=str))
    if args.write:
        cmd = "python bench/filejobs.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
        section = (
            f"{HEADING}\n\nMeasured {today()} on the {machine()}; command `{cmd}`. One "
            f"`streamscribe up` (tiny.en, default settings) with its gateway, worker and "
            f"embedded Valkey, and the clients, all on the {os.cpu_count()} cores. Clips "
            f"{', '.join(args.clips)}.\n\n"
            f"Idle service: each clip submitted {args.copies} times at once, from the "
            f"first upload to the last job done, beside faster-whisper alone (bench/offline.py, "
            f"each clip in one call) with one call at a time (a worker runs one file decode "
            f"at once, keeping its other decode thread for live finals) and two at once:"
            f"\n\n{text_idle}\n\n"
            f"Under live load: `streamscribe loadtest --sessions {args.live} --duration-s "
            f"{args.duration_s:.0f}` alone, then again with {args.max_jobs} file job(s) "
            f"kept queued (each finished job replaced by the next clip):\n\n{text_live}\n"
        )
        replace_section(args.write, HEADING, section)
        print(f"wrote the {HEADING!r} section of {args.write}")


if __name__ == "__main__":
    main()
