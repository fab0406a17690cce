"""The encoder window: cost and accuracy of decoding with `encode_min_s` below 30 s.

    python bench/window.py [--min-s 30 15 12 10] [--repeats 2] [--json OUT]
                           [--write docs/benchmarks.md]

Every clip of ../shared/audio/real is cut into utterances exactly as the worker cuts a
session (streaming Silero VAD, `SessionTranscriber`, the shipped settings). For each
`--min-s` value each utterance is decoded alone as a final (word timestamps, beam 1) and
its first 2 s as an interim (no word timestamps), one call at a time with
`WhisperEngine`, and the WER of each clip's joined finals is scored against its reference
(Whisper normaliser). Values are taken in turn, `--repeats` times, and the fastest pass
of each is reported (the machine is shared). Also reported: calls decoded again over the
full window because the shorter one looped (`window_retries`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import load_average, load_manifest, machine, replace_section, table, today
from bench.packing import utterances
from shared.config import Config
from shared.scoring import wer
from worker.engine import SAMPLE_RATE, WhisperEngine

HEADING = "## Encoder window: cost and accuracy per `encode_min_s`"
INTERIM_S = 2.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--min-s", type=float, nargs="+", default=[30.0, 15.0, 12.0, 10.0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--write", type=Path, help="update this markdown file's section")
    args = parser.parse_args()

    clips = load_manifest()
    cfg = Config()
    items = [u for c in clips.values() for u in utterances(c, cfg)]
    audio_s = sum(len(u.audio) for u in items) / SAMPLE_RATE
    print(f"{len(items)} utterances, {audio_s:.1f} s, from {len(clips)} clips", flush=True)
    engine = WhisperEngine("tiny.en", "cpu", "int8", cfg.cpu_threads)
    engine.warm_up()
    load_before = load_average()
    best: dict[float, dict[str, float]] = {}
    for rep in range(args.repeats):
        for min_s in args.min_s:
            engine.encode_min_s = min_s
            retries = engine.window_retries
            texts: dict[str, list[str]] = {}
            t0 = time.perf_counter()
            for u in items:
                segs = engine.transcribe(u.audio, language="en", word_timestamps=True, beam_size=1)
                texts.setdefault(u.clip, []).append(" ".join(s.text for s in segs))
            final_s = (time.perf_counter() - t0) / len(items)
            t0 = time.perf_counter()
            for u in items:
                head = u.audio[: int(INTERIM_S * SAMPLE_RATE)]
                engine.transcribe(head, language="en", word_timestamps=False, beam_size=1)
            interim_s = (time.perf_counter() - t0) / len(items)
            ids = sorted(texts)
            score = wer([clips[c].reference for c in ids], [" ".join(texts[c]) for c in ids])
            result = {
                "final_call_s": final_s,
                "interim_call_s": interim_s,
                "wer": score,
                "window_retries": float(engine.window_retries - retries),
            }
            print(f"pass {rep + 1} encode_min_s {min_s:g}: {result}", flush=True)
            if min_s not in best or final_s < best[min_s]["final_call_s"]:
                best[min_s] = result
    rows = [
        [
            f"{m:g}",
            f"{r['final_call_s'] * 1000:.0f}",
            f"{r['interim_call_s'] * 1000:.0f}",
            f"{r['wer']:.3f}",
            f"{r['window_retries']:.0f}",
        ]
        for m, r in best.items()
    ]
    out = table(
        [
            "encode_min_s",
            "final call ms (alone, word timestamps)",
            f"{INTERIM_S:g} s interim call ms",
            "WER (finals joined per clip)",
            "full-window retries",
        ],
        rows,
    )
    print(out)
    if args.json:
        args.json.write_text(json.dumps({str(k): v for k, v in best.items()}, indent=2))
    if args.write:
        cmd = "python bench/window.py " + " ".join(sys.argv[1:])
        section = (
            f"{HEADING}\n\nMeasured {today()} on {machine()}; command `{cmd}`. "
            f"{len(items)} utterances ({audio_s:.1f} s) cut by the worker's own VAD from the "
            f"{len(clips)} clips of `../shared/audio/real`, each decoded alone, one call at a "
            f"time (tiny.en int8 CPU, beam 1); the fastest of {args.repeats} passes per value. "
            f"Load average before: {load_before}. 30 is Whisper's full window, what "
            "faster-whisper always encodes.\n\n"
            f"{out}\n"
        )
        replace_section(args.write, HEADING, section)


if __name__ == "__main__":
    main()
