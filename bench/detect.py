"""What a decode that detects its language costs, against one told the language.

    python bench/detect.py [--model base] [--clips 8] [--seconds 4] [--rounds 2]

One `WhisperEngine` (CPU int8, one thread, the worker's encoder window) decodes the first
--seconds of --clips real clips (`../shared/audio/real`) three ways, one clip at a time:
told the language (`en`), detecting with the detection's encoder pass reused (the
worker's way), and detecting with faster-whisper's own `detect_language` (a second
encoder pass: what the worker did before session 18). Prints the mean seconds per decode
of each, per round, and the encoder passes the worker's way saved.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import table
from bench.offline import samples
from shared.config import Config
from worker.engine import SAMPLE_RATE, Audio, WhisperEngine, _windowed_model_class

REAL = Path(__file__).resolve().parents[2] / "shared" / "audio" / "real"


def load(path: Path, seconds: float) -> Audio:
    return samples(path)[: int(seconds * SAMPLE_RATE)]


@contextmanager
def faster_whispers_own_detection() -> Iterator[None]:
    """faster-whisper's `detect_language` (its own encoder pass) in place of the worker's."""
    from faster_whisper import WhisperModel

    cls = _windowed_model_class()
    ours = cls.detect_language
    cls.detect_language = WhisperModel.detect_language
    try:
        yield
    finally:
        cls.detect_language = ours


def mean_decode_s(engine: WhisperEngine, audios: list[Audio], language: str | None) -> float:
    times = []
    for audio in audios:
        t0 = time.perf_counter()
        engine.transcribe(audio, language=language, word_timestamps=True, beam_size=1)
        times.append(time.perf_counter() - t0)
    return statistics.mean(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="base", help="a multilingual model (detection)")
    parser.add_argument("--clips", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    paths = sorted(REAL.glob("*.wav"))[: args.clips]
    if not paths:
        sys.exit(f"no clips in {REAL}")
    audios = [load(p, args.seconds) for p in paths]
    window = Config().encode_min_s
    with tempfile.TemporaryDirectory(prefix="ss-detect-") as state:
        engine = WhisperEngine(args.model, "cpu", "int8", 1, window, cache_dir=state)
        if not engine.multilingual:
            sys.exit(f"{args.model} is English-only: it never detects")
        engine.transcribe(audios[0], language=None, word_timestamps=True, beam_size=1)  # warm
        rows = []
        for r in range(args.rounds):
            saved = engine.encodes_saved
            told = mean_decode_s(engine, audios, "en")
            reused = mean_decode_s(engine, audios, None)
            saved = engine.encodes_saved - saved
            with faster_whispers_own_detection():
                own = mean_decode_s(engine, audios, None)
            rows.append(
                [str(r + 1), f"{told:.3f}", f"{reused:.3f}", f"{own:.3f}", f"{saved}/{len(audios)}"]
            )
            print(" | ".join(rows[-1]), flush=True)
    print(
        f"\n{args.model}, {len(audios)} clips, first {args.seconds:g} s each, 1 thread, "
        f"{window:g} s encoder window; mean seconds per decode:\n"
    )
    print(
        table(
            [
                "round",
                "told en",
                "detecting (reused)",
                "detecting (faster-whisper's own)",
                "encodes saved",
            ],
            rows,
        )
    )


if __name__ == "__main__":
    main()
