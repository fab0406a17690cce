"""Offline bound: faster-whisper alone on the benchmark clips, audio seconds per second.

    python bench/offline.py [--clips ID ...] [--cpu-threads N ...] [--parallel 1 2]
                            [--model tiny.en] [--repeats 3] [--json OUT]
                            [--write docs/benchmarks.md]

The same model and settings as the worker (tiny.en unless --model, int8 on CPU, beam 1,
the worker's `cpu_threads` default), each whole clip in one `transcribe()` call, one call
at a time: the ceiling that a streaming service on the same cores is compared with. Also
prints what one call costs for 1-28 s of speech, with and without word timestamps (the
worker's finals ask for them), which is where a streamer's cost comes from. Prints tables;
with --write, replaces the "Offline bound" section of the benchmarks document (its own
section for a model other than tiny.en).

`--parallel P` (several values: one row each) runs P calls at once on one model
(CTranslate2 workers, as the worker's `decode_threads`), each clip P times, with
`cpu_threads` 0 meaning the cores shared out among the P calls: on a machine where one
call cannot use every core, that is the higher ceiling, and bench/capacity.py compares
with the best row.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (
    DEFAULT_CLIPS,
    ClipRef,
    engine_text,
    load_average,
    machine,
    model_heading,
    pick_clips,
    replace_section,
    system_busy_s,
    table,
    today,
    wait_quiet,
)
from shared.config import Config
from shared.protocol import SessionParams
from shared.scoring import wer
from shared.wavfile import read_wav
from worker.audio import AudioConverter
from worker.engine import SAMPLE_RATE, Audio, WhisperEngine

HEADING = "## Offline bound: faster-whisper alone"
CALL_LENGTHS_S = (1, 2, 4, 8, 16, 28)


@dataclass
class OfflineResult:
    cpu_threads: int
    parallel: int  # calls at once
    clips: int
    audio_s: float
    wall_s: float  # median over repeats of the time for all clips
    bound: float  # audio seconds per second of wall time
    wer: float
    load_before: str
    busy_before: float  # cores busy on the machine just before (other processes)
    foreign_cores: float  # cores used by other processes while measuring (both tables)
    call_cost: dict[str, dict[str, float]]  # "4" -> {"plain": s, "words": s}


def samples(path: Path) -> Audio:
    audio = read_wav(path)
    conv = AudioConverter(
        SessionParams(
            sample_rate=audio.sample_rate, encoding=audio.encoding, channels=audio.channels
        )
    )
    return np.concatenate([conv.convert(audio.data), conv.flush()])


def transcribe(engine: WhisperEngine, audio: Audio, words: bool = False) -> str:
    segments = engine.transcribe(audio, language="en", word_timestamps=words, beam_size=1)
    return " ".join(s.text for s in segments)


def own_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measure(
    clips: list[ClipRef],
    cpu_threads: int,
    repeats: int,
    call_cost: bool,
    quiet_wait_s: float,
    parallel: int = 1,
    device: str = "cpu",
    model: str = "tiny.en",
) -> OfflineResult:
    threads = cpu_threads
    if parallel > 1 and cpu_threads == 0:
        threads = max(1, (os.cpu_count() or 1) // parallel)
    # The worker's own choice per device: int8 on CPU, CTranslate2's default on a GPU.
    compute = "int8" if device == "cpu" else "default"
    engine = WhisperEngine(model, device, compute, threads, workers=parallel)
    engine.warm_up()
    inputs = [samples(c.path) for c in clips]
    audio_s = sum(len(a) for a in inputs) / SAMPLE_RATE * parallel
    pool = ThreadPoolExecutor(parallel, thread_name_prefix="offline")
    busy_before = wait_quiet(quiet_wait_s)
    load_before = load_average()
    sys0, own0, t_start = system_busy_s(), own_cpu_s(), time.perf_counter()
    walls, texts = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        texts = list(pool.map(lambda a: transcribe(engine, a), inputs * parallel))
        walls.append(time.perf_counter() - t0)
    pool.shutdown()
    texts = texts[: len(inputs)]
    wall = statistics.median(walls)
    costs: dict[str, dict[str, float]] = {}
    if call_cost:
        speech = np.concatenate(inputs * (1 + int(max(CALL_LENGTHS_S) // max(audio_s, 1))))
        for length in CALL_LENGTHS_S:
            piece = speech[: length * SAMPLE_RATE]
            costs[str(length)] = {}
            for label, words in (("plain", False), ("words", True)):
                times = []
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    transcribe(engine, piece, words)
                    times.append(time.perf_counter() - t0)
                costs[str(length)][label] = statistics.median(times)
    elapsed = time.perf_counter() - t_start
    foreign = max(0.0, (system_busy_s() - sys0 - (own_cpu_s() - own0)) / elapsed)
    return OfflineResult(
        cpu_threads=cpu_threads,
        parallel=parallel,
        clips=len(clips),
        audio_s=audio_s,
        wall_s=wall,
        bound=audio_s / wall,
        wer=wer([c.reference for c in clips], texts),
        load_before=load_before,
        busy_before=busy_before,
        foreign_cores=foreign,
        call_cost=costs,
    )


def threads_label(n: int, parallel: int = 1) -> str:
    if n == 0 and parallel > 1:
        return f"0 (cores / {parallel}: {max(1, (os.cpu_count() or 1) // parallel)} per call)"
    return f"{n} (faster-whisper default: 4)" if n == 0 else str(n)


def render(results: list[OfflineResult]) -> str:
    bound = table(
        [
            "cpu_threads",
            "calls at once",
            "clips",
            "audio s",
            "wall s (median)",
            "audio s / s",
            "WER",
            "other processes' cores: before / during",
            "load avg before",
        ],
        [
            [
                threads_label(r.cpu_threads, r.parallel),
                r.parallel,
                r.clips,
                f"{r.audio_s:.1f}",
                f"{r.wall_s:.2f}",
                f"**{r.bound:.1f}**",
                f"{r.wer:.3f}",
                f"{r.busy_before:.2f} / {r.foreign_cores:.2f}",
                r.load_before,
            ]
            for r in results
        ],
    )
    with_costs = [r for r in results if r.call_cost]
    if not with_costs:
        return bound
    cost_rows = []
    for r in with_costs:
        for length, c in r.call_cost.items():
            cost_rows.append(
                [
                    threads_label(r.cpu_threads, r.parallel),
                    length,
                    f"{c['plain']:.3f}",
                    f"{c['words']:.3f}",
                    f"{float(length) / c['plain']:.1f}",
                ]
            )
    costs = table(
        ["cpu_threads", "speech s in the call", "s per call", "s per call, word timestamps",
         "audio s / s"],
        cost_rows,
    )  # fmt: skip
    return f"{bound}\n\nCost of one call by audio length (median of the repeats):\n\n{costs}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clips", nargs="+", default=list(DEFAULT_CLIPS), help="clip ids")
    parser.add_argument(
        "--cpu-threads",
        type=int,
        nargs="+",
        default=[Config().cpu_threads],
        help="CTranslate2 threads; several values: one row each (default: the worker's)",
    )
    parser.add_argument(
        "--parallel", type=int, nargs="+", default=[1], help="calls at once; one row each"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--model",
        default="tiny.en",
        help="what the worker's --model takes (`base`: the `model-base` extra); a model other "
        "than tiny.en writes a section of its own",
    )
    parser.add_argument(
        "--device", choices=["cpu", "cuda"], default="cpu", help="where the model runs"
    )
    parser.add_argument(
        "--quiet-wait-s",
        type=float,
        default=120.0,
        help="wait up to this long for other processes to go quiet before each measurement",
    )
    parser.add_argument("--no-call-cost", action="store_true", help="skip the per-call table")
    parser.add_argument("--json", type=Path, help="write the results as JSON")
    parser.add_argument("--write", type=Path, help="update this markdown file's section")
    args = parser.parse_args()
    if not 1 <= args.repeats <= 20:
        parser.error("--repeats must be 1..20")
    clips = pick_clips(args.clips)
    results = []
    for n in args.cpu_threads:
        for p in args.parallel:
            print(f"cpu_threads={n}, {p} at once: {len(clips)} clips x {args.repeats} ...")
            results.append(
                measure(
                    clips, n, args.repeats, not args.no_call_cost and p == 1,
                    args.quiet_wait_s, p, args.device, args.model,
                )
            )  # fmt: skip
    text = render(results)
    print(text)
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=2))
    if args.write:
        cmd = "python bench/offline.py " + " ".join(sys.argv[1:])
        heading = model_heading(HEADING, args.model)
        section = (
            f"{heading}\n\nMeasured {today()} on the {machine()}, "
            f"{engine_text(args.model, args.device)}, beam 1, "
            f"each whole clip in one call (with *calls at once* > 1, each clip that many "
            f"times, that many calls running together on one model); command `{cmd}`. Clips: "
            f"{', '.join(c.id for c in clips)} (`../shared/audio/real`). *audio s / s* is "
            f"the offline bound that bench/capacity.py compares with. The machine is "
            f"shared: each row first waits up to {args.quiet_wait_s:.0f} s for other "
            f"processes to use < 0.3 cores and shows what they used before and during "
            f"it.\n\n{text}\n"
        )
        replace_section(args.write, heading, section)
        print(f"wrote {args.write}")


if __name__ == "__main__":
    main()
