"""Packed decoding with the real model: every word stays with the session that spoke it.

The six committed fixtures have (almost) disjoint vocabularies; each is cut into its two
sentences, giving twelve utterances of six "sessions". Seeded random packs of three to
six utterances of different sessions are decoded in one window by tiny.en and split back
with `packing.split`; for every slot that the split attributes, no word that only
another session of the pack said may appear; over all packs at least 80 % of the slots
must come back attributed and their WER may exceed that of decoding each sentence alone
by at most 0.05. This runs at the default guard (1 s) and at the least one allowed.
Then four sessions stream through the real service at once (faster than real time, so
their finals meet in the queue and are packed) and get only their own words.
"""

from __future__ import annotations

import asyncio
import random
import re
from typing import Any

import numpy as np
import pytest

from shared.scoring import wer
from shared.wavfile import read_wav
from tests.conftest import FIXTURES, ServiceFactory
from tests.e2e.test_model_pipeline import stream
from tests.helpers import reference
from worker.engine import SAMPLE_RATE, Audio, WhisperEngine
from worker.packing import MIN_GUARD_S, layout, pack_audio, split

pytestmark = pytest.mark.model
SESSIONS = ["s1", "s2", "s3", "s4", "s5", "s6"]


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower()))


def sentences(name: str) -> list[tuple[Audio, str]]:
    """The clip's two sentences: cut at the longest quiet stretch in its middle."""
    audio = read_wav(FIXTURES / f"{name}.wav")
    samples = np.frombuffer(audio.data, np.int16).astype(np.float32) / np.float32(32768)
    hop = SAMPLE_RATE // 50
    energy = np.array(
        [np.abs(samples[i : i + hop]).max() for i in range(0, len(samples) - hop, hop)]
    )
    quiet = energy < 0.02
    best, best_len, run = 0, 0, 0
    lo, hi = len(quiet) // 5, len(quiet) * 4 // 5
    for i in range(lo, hi):
        run = run + 1 if quiet[i] else 0
        if run > best_len:
            best, best_len = i - run // 2, run
    cut = best * hop
    first, second = reference(name).split(". ", 1)
    return [(samples[:cut], first), (samples[cut:], second)]


Utterances = dict[str, list[tuple[Audio, str, str]]]  # session -> (audio, reference, alone)


@pytest.fixture(scope="module")
def utterances(whisper: WhisperEngine) -> Utterances:
    out: Utterances = {}
    for name in SESSIONS:
        out[name] = []
        for audio, ref in sentences(name):
            segments = whisper.transcribe(audio, language="en", word_timestamps=True, beam_size=1)
            out[name].append((audio, ref, " ".join(s.text for s in segments)))
    return out


@pytest.mark.parametrize("guard_s", [1.0, MIN_GUARD_S])
def test_packed_words_never_land_in_another_session(
    whisper: WhisperEngine, utterances: Utterances, guard_s: float
) -> None:
    rng = random.Random(7)
    refs: list[str] = []
    packed: list[str] = []
    alone: list[str] = []
    slots = 0
    for _ in range(8):
        names = rng.sample(SESSIONS, rng.randint(3, 6))
        items = [(name, *utterances[name][rng.randint(0, 1)]) for name in names]
        lay = layout([len(a) for _, a, _, _ in items], int(guard_s * SAMPLE_RATE))
        words = whisper.transcribe_words(
            pack_audio([a for _, a, _, _ in items], lay), language="en", beam_size=1
        )
        for (name, _, ref, by_itself), result in zip(items, split(lay, words), strict=True):
            slots += 1
            if result is None:
                continue  # the scheduler would decode it alone
            text = " ".join(s.text for s in result)
            own = _words(reference(name))
            foreign = set().union(*(_words(reference(o)) for o, *_ in items if o != name))
            leaked = (_words(text) & foreign) - own
            assert not leaked, f"{name} got {leaked} from its pack: {text!r}"
            refs.append(ref)
            packed.append(text)
            alone.append(by_itself)
    # Packing only pays if most slots come back attributed, and only if it keeps accuracy.
    assert len(refs) >= 0.8 * slots, f"only {len(refs)} of {slots} slots attributed"
    packed_wer, alone_wer = wer(refs, packed), wer(refs, alone)
    print(
        f"\nguard {guard_s} s: {len(refs)}/{slots} slots attributed, WER packed "
        f"{packed_wer:.3f} alone {alone_wer:.3f}"
    )
    assert packed_wer <= alone_wer + 0.05


async def test_sessions_whose_finals_are_packed_get_only_their_own_words(
    service_factory: ServiceFactory, whisper: WhisperEngine
) -> None:
    # One decode at a time, so that finals of the 4 sessions wait together and get packed.
    svc = await service_factory(engine=whisper, slots=8, pack_finals=8, decode_threads=1)
    names = ["s1", "s2", "s3", "s4"]
    results = await asyncio.gather(*(stream(svc.url, f"{n}.wav", realtime=False) for n in names))
    assert svc.worker is not None and svc.worker.scheduler is not None
    counters = svc.worker.scheduler.counters
    assert counters.packs >= 1, "no finals were packed: the test did not test packing"
    assert_own_words(names, results)


def assert_own_words(names: list[str], results: list[Any]) -> None:
    """Each fixture session got all its finals in order, none of the other sessions'
    words, and its own text (WER at most 0.2)."""
    for name, (finals, closed) in zip(names, results, strict=True):
        text = " ".join(f.text for f in finals)
        assert [f.result_id for f in finals] == list(range(len(finals)))
        assert closed.final_results == len(finals) >= 1
        own = _words(reference(name))
        foreign = set().union(*(_words(reference(o)) for o in names if o != name)) - own
        assert not (_words(text) & foreign), f"{name} got words of other sessions: {text!r}"
        assert wer([reference(name)], [text]) <= 0.2, (name, text)
