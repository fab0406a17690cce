"""Packed finals vs finals decoded alone, on the real clips: speed, accuracy, attribution.

    python bench/packing.py [--clips ID ...] [--seeds 1 2] [--pack-finals 8]
                            [--pack-window-s 28] [--pack-guard-s 1.0]
                            [--json OUT] [--write docs/benchmarks.md]

Every clip of ../shared/audio/real (default: all 34) is cut into utterances exactly as
the worker cuts a session (streaming Silero VAD, `SessionTranscriber`, the shipped
settings). Then, per seed, the utterances are shuffled and laid into packs the way the
scheduler packs waiting finals (at most --pack-finals utterances of different clips and
--pack-window-s of audio with guards), each pack decoded in one call with
`WhisperEngine.transcribe_words` and split back with `packing.split`; a slot that cannot
be attributed is decoded alone, as the scheduler does. The same utterances are also
decoded one call each (no prompt, like the packed ones). Reported per mode: engine wall
time, audio seconds per second, WER per clip (utterance texts joined in order, Whisper
normaliser), and for packs: the share of slots attributed and "foreign words" — words
of five letters or more in an utterance's text that are not in its own clip's
reference but are in the reference of another clip of the same pack (the same count is
made for the alone decodes against the same packs, as the baseline for chance).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (
    ClipRef,
    load_average,
    load_manifest,
    machine,
    replace_section,
    table,
    today,
    wait_quiet,
)
from shared.config import Config
from shared.scoring import wer
from shared.wavfile import read_wav
from worker.engine import SAMPLE_RATE, Audio, StreamingVad, WhisperEngine
from worker.packing import layout, pack_audio, split
from worker.scheduler import PackPolicy
from worker.stream import SessionTranscriber, StreamOptions

HEADING = "## Packed finals: several sessions in one window"


@dataclass
class Utterance:
    clip: str
    index: int  # order within the clip
    audio: Audio


@dataclass
class ModeResult:
    mode: str
    calls: int
    wall_s: float
    audio_s: float
    rate: float  # audio seconds per second
    wer: float
    slots: int = 0
    attributed: int = 0
    foreign_words: int = 0


def utterances(clip: ClipRef, cfg: Config) -> list[Utterance]:
    audio = read_wav(clip.path)
    samples = np.frombuffer(audio.data, np.int16).astype(np.float32) / np.float32(32768)
    options = StreamOptions.from_config(cfg, interim_results=False)
    t = SessionTranscriber(options, StreamingVad())
    t.close(samples)
    out: list[Utterance] = []
    while (req := t.next_request()) is not None:
        out.append(Utterance(clip.id, len(out), req.audio))
        t.complete(req, [])
    return out


def words_of(text: str) -> set[str]:
    return set(re.findall(r"[a-z']+", text.lower()))


def make_packs(items: list[Utterance], policy: PackPolicy, rng: random.Random) -> list[list[int]]:
    """Indexes of `items` per pack: shuffled, greedy, different clips in one pack."""
    order = list(range(len(items)))
    rng.shuffle(order)
    packs: list[list[int]] = []
    while order:
        pack = [order.pop(0)]
        for i in list(order):
            clips = {items[j].clip for j in pack}
            lengths = [len(items[j].audio) for j in (*pack, i)]
            if items[i].clip not in clips and policy.fits(lengths):
                pack.append(i)
                order.remove(i)
        packs.append(pack)
    return packs


def run(
    engine: WhisperEngine,
    clips: dict[str, ClipRef],
    items: list[Utterance],
    policy: PackPolicy,
    seed: int,
) -> tuple[ModeResult, ModeResult]:
    refs = {c: clips[c].reference for c in clips}
    own_words = {c: words_of(r) for c, r in refs.items()}
    audio_s = sum(len(u.audio) for u in items) / SAMPLE_RATE
    packs = make_packs(items, policy, random.Random(seed))

    alone_text: dict[int, str] = {}
    started = time.perf_counter()
    for i, u in enumerate(items):
        segs = engine.transcribe(u.audio, language="en", word_timestamps=True, beam_size=1)
        alone_text[i] = " ".join(s.text for s in segs)
    alone_wall = time.perf_counter() - started

    packed_text: dict[int, str] = {}
    slots = attributed = calls = 0
    started = time.perf_counter()
    guard = int(policy.guard_s * SAMPLE_RATE)
    for pack in packs:
        if len(pack) == 1:
            u = items[pack[0]]
            segs = engine.transcribe(u.audio, language="en", word_timestamps=True, beam_size=1)
            packed_text[pack[0]] = " ".join(s.text for s in segs)
            calls += 1
            continue
        audios = [items[i].audio for i in pack]
        lay = layout([len(a) for a in audios], guard)
        words = engine.transcribe_words(pack_audio(audios, lay), language="en", beam_size=1)
        calls += 1
        for i, result in zip(pack, split(lay, words), strict=True):
            slots += 1
            if result is None:
                segs = engine.transcribe(
                    items[i].audio, language="en", word_timestamps=True, beam_size=1
                )
                calls += 1
                packed_text[i] = " ".join(s.text for s in segs)
            else:
                attributed += 1
                packed_text[i] = " ".join(s.text for s in result)
    packed_wall = time.perf_counter() - started

    def foreign(texts: dict[int, str]) -> int:
        count = 0
        for pack in packs:
            for i in pack:
                mine = items[i].clip
                others = set().union(*(own_words[items[j].clip] for j in pack if j != i))
                extra = words_of(texts[i]) - own_words[mine]
                count += sum(1 for w in extra & others if len(w) >= 5)
        return count

    def clip_wer(texts: dict[int, str]) -> float:
        by_clip: dict[str, list[tuple[int, str]]] = {}
        for i, u in enumerate(items):
            by_clip.setdefault(u.clip, []).append((u.index, texts[i]))
        ids = sorted(by_clip)
        hyps = [" ".join(t for _, t in sorted(by_clip[c])) for c in ids]
        return wer([refs[c] for c in ids], hyps)

    alone = ModeResult(
        "alone",
        len(items),
        alone_wall,
        audio_s,
        audio_s / alone_wall,
        clip_wer(alone_text),
        foreign_words=foreign(alone_text),
    )
    packed = ModeResult(
        "packed",
        calls,
        packed_wall,
        audio_s,
        audio_s / packed_wall,
        clip_wer(packed_text),
        slots,
        attributed,
        foreign(packed_text),
    )
    return alone, packed


def main() -> None:
    cfg = Config()
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clips", nargs="*", help="clip ids (default: all)")
    ap.add_argument("--seeds", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--pack-finals", type=int, default=8)  # the service default is 1: off
    ap.add_argument("--pack-window-s", type=float, default=cfg.pack_window_s)
    ap.add_argument("--pack-guard-s", type=float, default=cfg.pack_guard_s)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--write", type=Path)
    args = ap.parse_args()

    manifest = load_manifest()
    clips = {c: manifest[c] for c in (args.clips or sorted(manifest))}
    policy = PackPolicy(args.pack_finals, args.pack_window_s, args.pack_guard_s)
    engine = WhisperEngine(cfg.model, "cpu", "int8", cfg.cpu_threads, cfg.encode_min_s)
    engine.warm_up()
    items = [u for c in clips.values() for u in utterances(c, cfg)]
    print(f"{len(clips)} clips, {len(items)} utterances", flush=True)
    busy = wait_quiet(60.0)
    load = load_average()
    rows: list[ModeResult] = []
    for seed in args.seeds:
        alone, packed = run(engine, clips, items, policy, seed)
        rows += [alone, packed]
        print(
            f"seed {seed}: alone {alone.rate:.1f} audio-s/s WER {alone.wer:.3f}; packed "
            f"{packed.rate:.1f} audio-s/s WER {packed.wer:.3f}, {packed.attributed}/"
            f"{packed.slots} slots attributed, foreign words {packed.foreign_words} "
            f"(alone {alone.foreign_words})",
            flush=True,
        )
    header = [
        "seed",
        "mode",
        "engine calls",
        "wall s",
        "audio s / s",
        "WER (per clip)",
        "slots attributed",
        "foreign words",
    ]
    body = [
        [
            args.seeds[k // 2],
            r.mode,
            r.calls,
            f"{r.wall_s:.1f}",
            f"{r.rate:.1f}",
            f"{r.wer:.3f}",
            f"{r.attributed}/{r.slots}" if r.mode == "packed" else "-",
            r.foreign_words,
        ]
        for k, r in enumerate(rows)
    ]
    out = table(header, body)
    print(out)
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=2))
    if args.write:
        section = (
            f"{HEADING}\n\n"
            f"`python bench/packing.py --seeds {' '.join(map(str, args.seeds))}` on "
            f"{today()}, {machine()}, tiny.en int8, beam 1; {len(clips)} real clips cut "
            f"into {len(items)} utterances by the worker's own segmentation; pack_finals "
            f"{policy.max_items}, window {policy.window_s} s, guard {policy.guard_s} s. "
            f"Other processes used {busy:.2f} cores before the run (load {load}).\n\n"
            f"{out}\n\n"
            "*Foreign words*: words (5+ letters) of an utterance's text that its own clip's "
            "reference lacks but another clip of the same pack has; the alone row counts "
            "the same against the same packs (chance overlap).\n"
        )
        replace_section(args.write, HEADING, section)
        print(f"wrote {args.write}")


if __name__ == "__main__":
    main()
