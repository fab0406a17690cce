"""How many sessions this worker can serve: measured at start-up (`slots` 0, the default).

A worker's capacity depends on the model, the device, its threads and what else runs on
the machine, so no fixed number of slots suits every deployment (tiny.en on 2 CPU cores
served 36 real-time sessions, Whisper base 15-16, a GPU hundreds). With `slots` 0 the
worker decodes four short English utterances shipped with the package
(`calibration_audio/`, 6.2-7.2 s each, 26.2 s in all: each one a typical final) the way
its scheduler decodes finals (`decode_threads` calls at once, `batch_decodes` utterances
per call, word timestamps, told the language), and times it. One round decodes the set
once (repeated until every thread has a full batch); the first round is not timed (it pays
for lazy initialisation), and the fastest of the next `ROUNDS` is the engine's rate in
audio seconds per second (the fastest, because on a shared machine other work only ever
slows a round down). Slots are then

    slots = max(1, min(auto_slots_max, floor(auto_slots_factor * rate)))

`auto_slots_factor` (0.35) comes from docs/benchmarks.md, *Slots measured at start-up*: on
the 2-core VM, with gateway, Valkey and load generator on the same cores, the most
real-time sessions served within the 2 s p95 final lag were 0.47 of this rate for tiny.en
(36 of 77) and 0.39 for base (15.5 of 39.5); 0.35 stays below both, as docs/configuration.md
advises for `slots` (a worker that takes queued sessions at capacity catches up on their
stored audio at the other sessions' expense).

The policy (`auto_slots`) and the timing (`measure`, with an injected clock) are separate
so that both are tested without a model; `calibrate` ties them to the shipped audio.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources

import numpy as np

from shared.wavfile import read_wav
from worker.engine import SAMPLE_RATE, Audio, Engine, batch_engine
from worker.samples import CLIP_NAMES, clip_files

log = logging.getLogger(__name__)

ROUNDS = 4  # timed rounds after the untimed first one; the fastest counts

Clock = Callable[[], float]


@dataclass(frozen=True, slots=True)
class Calibration:
    """What the start-up measurement found."""

    rate: float  # audio seconds decoded per second of wall time, best timed round
    round_audio_s: float  # audio in one round
    rounds_s: tuple[float, ...]  # wall time of each timed round
    words: int  # words the engine returned in the timed rounds (0: it heard nothing)
    threads: int
    batch: int


def auto_slots(rate: float, factor: float, cap: int) -> int:
    """The slots a worker advertises for an engine that decodes `rate` audio s per s."""
    if not (factor > 0 and cap >= 1):
        raise ValueError("factor must be positive and cap at least 1")
    if not rate > 0:
        return 1
    if math.isinf(rate):
        return cap
    return max(1, min(cap, math.floor(factor * rate)))


def load_clips() -> list[Audio]:
    """The shipped calibration utterances as float32 samples at 16 kHz."""
    clips: list[Audio] = []
    for name, file in zip(CLIP_NAMES, clip_files(), strict=True):
        with resources.as_file(file) as path:
            wav = read_wav(path)
        if (wav.sample_rate, wav.channels, wav.encoding) != (SAMPLE_RATE, 1, "pcm_s16le"):
            raise ValueError(f"calibration clip {name}.wav must be 16 kHz mono 16-bit PCM")
        clips.append(np.frombuffer(wav.data, np.int16).astype(np.float32) / 32768.0)
    return clips


def round_groups(clips: Sequence[Audio], threads: int, batch: int) -> list[list[Audio]]:
    """One round's engine calls: the clips, repeated until there are at least
    `threads * batch` of them and a whole number of batches, in groups of `batch`."""
    if threads < 1 or batch < 1 or not clips:
        raise ValueError("need clips, threads >= 1 and batch >= 1")
    n = max(len(clips), threads * batch)
    n = -(-n // batch) * batch
    items = [clips[i % len(clips)] for i in range(n)]
    return [items[i : i + batch] for i in range(0, n, batch)]


def measure(
    engine: Engine,
    clips: Sequence[Audio],
    *,
    threads: int,
    batch: int,
    beam_size: int,
    language: str = "en",
    rounds: int = ROUNDS,
    clock: Clock = time.monotonic,
) -> Calibration:
    """Decode the clips as the scheduler decodes finals, `rounds + 1` times; time all but
    the first. `batch` above 1 needs an engine with `transcribe_batch`."""
    groups = round_groups(clips, threads, batch)
    batcher = batch_engine(engine)
    audio_s = sum(len(a) for g in groups for a in g) / SAMPLE_RATE

    def call(group: list[Audio]) -> int:
        if len(group) == 1:
            results = [
                engine.transcribe(
                    group[0], language=language, word_timestamps=True, beam_size=beam_size
                )
            ]
        else:
            assert batcher is not None  # groups of several only with a batching engine
            results = batcher.transcribe_batch(
                group, language=language, word_timestamps=True, beam_size=beam_size
            )
        return sum(len(seg.text.split()) for segs in results for seg in segs)

    times: list[float] = []
    words = 0
    with ThreadPoolExecutor(threads, thread_name_prefix="calibrate") as pool:
        for r in range(rounds + 1):
            start = clock()
            n = sum(pool.map(call, groups))
            if r:
                times.append(clock() - start)
                words += n
    best = min(times)
    rate = audio_s / best if best > 0 else math.inf
    return Calibration(rate, audio_s, tuple(times), words, threads, batch)


def calibrate(engine: Engine, *, threads: int, batch: int, beam_size: int) -> Calibration:
    """`measure` on the shipped clips; batches only where the engine can batch."""
    if batch_engine(engine) is None:
        batch = 1
    return measure(engine, load_clips(), threads=threads, batch=batch, beam_size=beam_size)
