"""The encoder window: cost and accuracy of decoding with `encode_min_s` below 30 s.

    python bench/window.py [--min-s 30 15 13 12 10] [--repeats 3] [--json OUT]
                           [--write docs/benchmarks.md]

Every clip of ../shared/audio/real is cut into utterances exactly as the worker cuts a
session (streaming Silero VAD, `SessionTranscriber`, the shipped settings). Each utterance
is decoded as the worker decodes it: alone, as a final (word timestamps, beam 1, the
clip's previous final as prompt), on one CPU thread (the shipped `decode_threads` 2 on
2 cores gives each decode one thread); its first 2 s are also decoded as an interim (no
word timestamps). The `--min-s` values are taken in turn for every utterance, so a slow
spell of this shared machine costs every value alike; each call's fastest of `--repeats`
passes is kept. WER is of each clip's joined finals against its reference (Whisper
normaliser). Also reported: calls decoded again over the full window because the shorter
one looped (`window_retries`), and the encoder alone on the window a short utterance gets
(two calls at once on one model, as the worker runs them; median of 6 rounds).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import load_average, load_manifest, machine, replace_section, table, today
from bench.packing import utterances
from shared.config import Config
from shared.scoring import wer
from worker.engine import SAMPLE_RATE, WhisperEngine, encode_frames
from worker.stream import prompt_of

HEADING = "## Encoder window: cost and accuracy per `encode_min_s`"
INTERIM_S = 2.0
ENCODER_ROUNDS = 6
ENCODER_CALLS = 5  # per thread per round


def encoder_ms(engine: WhisperEngine, frames: int) -> float:
    """Median wall time of one encoder call over `frames` mel frames, two at once."""
    import ctranslate2

    model = engine._model.model  # the CTranslate2 Whisper model under faster-whisper
    features = np.random.default_rng(0).standard_normal((1, 80, frames), dtype=np.float32)
    view = ctranslate2.StorageView.from_array(0.1 * features)
    model.encode(view)

    def calls() -> None:
        for _ in range(ENCODER_CALLS):
            model.encode(view)

    rounds = []
    for _ in range(ENCODER_ROUNDS):
        threads = [threading.Thread(target=calls) for _ in range(2)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        rounds.append((time.perf_counter() - t0) / ENCODER_CALLS)
    return statistics.median(rounds) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--min-s", type=float, nargs="+", default=[30.0, 15.0, 13.0, 12.0, 10.0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--write", type=Path, help="update this markdown file's section")
    args = parser.parse_args()

    clips = load_manifest()
    cfg = Config()
    items = [u for c in clips.values() for u in utterances(c, cfg)]
    audio_s = sum(len(u.audio) for u in items) / SAMPLE_RATE
    print(f"{len(items)} utterances, {audio_s:.1f} s, from {len(clips)} clips", flush=True)
    engine = WhisperEngine("tiny.en", "cpu", "int8", 1, workers=2)
    engine.warm_up()
    load_before = load_average()
    values = args.min_s
    final_s = {v: [float("inf")] * len(items) for v in values}
    interim_s = {v: [float("inf")] * len(items) for v in values}
    texts: dict[float, dict[str, list[str]]] = {v: {} for v in values}
    retries = dict.fromkeys(values, 0)
    for rep in range(args.repeats):
        prompts: dict[float, dict[str, str]] = {v: {} for v in values}
        for i, u in enumerate(items):
            head = u.audio[: int(INTERIM_S * SAMPLE_RATE)]
            for v in values:
                engine.encode_min_s = v
                before = engine.window_retries
                prompt = prompts[v].get(u.clip)
                t0 = time.perf_counter()
                segs = engine.transcribe(
                    u.audio, language="en", word_timestamps=True, beam_size=1, prompt=prompt
                )
                final_s[v][i] = min(final_s[v][i], time.perf_counter() - t0)
                t0 = time.perf_counter()
                engine.transcribe(
                    head, language="en", word_timestamps=False, beam_size=1, prompt=prompt
                )
                interim_s[v][i] = min(interim_s[v][i], time.perf_counter() - t0)
                text = " ".join(s.text for s in segs)
                if text:
                    prompts[v][u.clip] = prompt_of(text, Config().prompt_chars)
                if rep == 0:
                    texts[v].setdefault(u.clip, []).append(text)
                    retries[v] += engine.window_retries - before
        print(f"pass {rep + 1} of {args.repeats} done", flush=True)
    ids = sorted(texts[values[0]])
    refs = [clips[c].reference for c in ids]
    short = int(1.0 * SAMPLE_RATE)
    results = {
        v: {
            "encoder_ms": encoder_ms(engine, encode_frames(short, v)),
            "final_call_ms": 1000 * sum(final_s[v]) / len(items),
            "interim_call_ms": 1000 * sum(interim_s[v]) / len(items),
            "wer": wer(refs, [" ".join(texts[v][c]) for c in ids]),
            "window_retries": float(retries[v]),
        }
        for v in values
    }
    for v, r in results.items():
        print(f"encode_min_s {v:g}: {r}", flush=True)
    rows = [
        [
            f"{v:g}",
            f"{r['encoder_ms']:.0f}",
            f"{r['final_call_ms']:.0f}",
            f"{r['interim_call_ms']:.0f}",
            f"{r['wer']:.3f}",
            f"{r['window_retries']:.0f}",
        ]
        for v, r in results.items()
    ]
    out = table(
        [
            "encode_min_s",
            "encoder alone, ms per call (two at once)",
            "final call ms (one thread)",
            f"{INTERIM_S:g} s interim call ms",
            "WER (finals joined per clip)",
            "full-window retries",
        ],
        rows,
    )
    print(out)
    if args.json:
        args.json.write_text(json.dumps({str(k): v for k, v in results.items()}, indent=2))
    if args.write:
        cmd = "python bench/window.py " + " ".join(sys.argv[1:])
        section = (
            f"{HEADING}\n\nMeasured {today()} on {machine()}; command `{cmd}`. "
            f"{len(items)} utterances ({audio_s:.1f} s) cut by the worker's own VAD from the "
            f"{len(clips)} clips of `../shared/audio/real`, each decoded as the worker decodes "
            "it: alone, on one CPU thread, with the clip's previous final as prompt "
            "(tiny.en int8, beam 1); values taken in turn per utterance, each call's fastest "
            f"of {args.repeats} passes. The encoder column is CTranslate2's encoder alone on "
            "the window a 1 s utterance gets, two calls at once (median of "
            f"{ENCODER_ROUNDS} rounds). Load average before: {load_before}. 30 is Whisper's "
            "full window, what faster-whisper always encodes.\n\n"
            f"{out}\n"
        )
        replace_section(args.write, HEADING, section)


if __name__ == "__main__":
    main()
