"""Accuracy through the service vs the model's own offline accuracy, on the same clips.

    python bench/accuracy.py [--clips DIR_WITH_manifest.tsv] [--set FIELD=VALUE ...]
                             [--model tiny.en] [--write docs/benchmarks.md]

Starts an embedded Valkey, one gateway and one worker (tiny.en unless --model, CPU int8)
in-process, streams every clip of the manifest (as fast as acknowledged, 4 at a time), and
compares normalised WER (jiwer + whisper-normalizer's English normalizer) with
faster-whisper on the whole clip in one call. Prints a table; with --write, replaces the
accuracy section of the benchmarks document (its own section for a model other than
tiny.en). `--set` changes a worker setting for the service run (e.g. `--set
encode_min_s=30 --set early_final_s=0`); the offline side is always plain faster-whisper
over full 30 s windows, in the worker's `language` (`--set language=auto --model base`:
sessions that name no language detect it, and so does the offline call, over the whole
clip).
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import dataclasses
import datetime
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import model_heading, replace_section
from bench.offline import samples
from gateway.server import Gateway
from shared.client import StreamingSession
from shared.config import Config
from shared.embedded import EmbeddedValkey
from shared.envelope import Transcript
from shared.scoring import wer, word_errors
from shared.wavfile import read_wav
from worker.engine import WhisperEngine
from worker.service import Worker

ROOT = Path(__file__).resolve().parents[1]


def load_manifest(folder: Path) -> list[tuple[str, Path, str]]:
    with open(folder / "manifest.tsv", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    return [(r["id"], folder / r["file"], r["reference"]) for r in rows]


def offline(engine: WhisperEngine, path: Path, language: str | None = "en") -> str:
    """The whole clip in one call, over a full 30 s window: plain faster-whisper (which
    detects the language over the whole clip when `language` is None)."""
    window, engine.encode_min_s = engine.encode_min_s, 30.0
    try:
        segments = engine.transcribe(
            samples(path), language=language, word_timestamps=False, beam_size=1
        )
    finally:
        engine.encode_min_s = window
    return " ".join(s.text for s in segments)


async def streamed(url: str, path: Path) -> str:
    audio = read_wav(path)
    finals: list[str] = []
    async with StreamingSession(
        url,
        sample_rate=audio.sample_rate,
        encoding=audio.encoding,
        channels=audio.channels,
        interim_results=False,
    ) as s:
        for frame in audio.frames(100):
            await s.send_audio(frame)
        await s.close_stream()
        async for r in s.results():
            if isinstance(r, Transcript) and r.is_final:
                finals.append(r.text)
    return " ".join(finals)


async def measure(
    clips: list[tuple[str, Path, str]],
    concurrency: int,
    settings: dict[str, Any],
    model: str = "tiny.en",
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        valkey = EmbeddedValkey(Path(tmp))
        valkey.start()
        config = Config(redis_url=valkey.url, port=0, certfile="none", model=model, **settings)
        engine = WhisperEngine(model, "cpu", "int8", 0, config.encode_min_s)
        worker = Worker(config, engine=engine)
        await worker.start()
        gateway = Gateway(config)
        await gateway.start()
        try:
            t0 = time.monotonic()
            language = None if config.language == "auto" else config.language
            off = [offline(engine, p, language) for _, p, _ in clips]
            offline_s = time.monotonic() - t0
            sem = asyncio.Semaphore(concurrency)

            async def one(path: Path) -> str:
                async with sem:
                    return await streamed(gateway.url, path)

            t0 = time.monotonic()
            svc = await asyncio.gather(*(one(p) for _, p, _ in clips))
            service_s = time.monotonic() - t0
        finally:
            await gateway.shutdown()
            await worker.shutdown()
            valkey.stop()
    refs = [r for _, _, r in clips]
    return {
        "clips": len(clips),
        "audio_s": sum(read_wav(p).duration_s for _, p, _ in clips),
        "offline_wer": wer(refs, off),
        "service_wer": wer(refs, svc),
        "offline_s": offline_s,
        "service_s": service_s,
        "per_clip": [
            (cid, word_errors(r, o), word_errors(r, s))
            for (cid, _, r), o, s in zip(clips, off, svc, strict=True)
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--clips",
        type=Path,
        action="append",
        help="folder with manifest.tsv (repeatable; default: the committed "
        "fixtures and ../shared/audio/real if present)",
    )
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="a worker setting for the service run (a Config field, e.g. encode_min_s=30 "
        "or language=auto)",
    )
    parser.add_argument(
        "--model",
        default="tiny.en",
        help="what the worker's --model takes (`base`: the `model-base` extra); a model other "
        "than tiny.en writes a section of its own",
    )
    parser.add_argument("--write", type=Path, help="update this markdown file's accuracy section")
    args = parser.parse_args()
    fields = {f.name: f.type for f in dataclasses.fields(Config)}
    settings: dict[str, Any] = {}
    for item in args.set:
        name, _, value = item.partition("=")
        if name not in fields:
            parser.error(f"--set {item}: no such setting")
        kind = fields[name]
        settings[name] = value if kind == "str" else float(value) if kind == "float" else int(value)
    folders = args.clips or [
        p
        for p in (ROOT / "tests/fixtures/audio", ROOT.parent / "shared/audio/real")
        if (p / "manifest.tsv").exists()
    ]
    lines = [
        "| clip set | clips | audio s | offline WER | service WER | difference |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    notes: list[str] = []
    for folder in folders:
        clips = [c for c in load_manifest(folder) if c[1].exists()]
        print(f"measuring {len(clips)} clips from {folder} ...", flush=True)
        r = asyncio.run(measure(clips, args.concurrency, settings, args.model))
        diff = float(r["service_wer"]) - float(r["offline_wer"])
        lines.append(
            f"| {folder.name} | {r['clips']} | {float(r['audio_s']):.1f} | "
            f"{float(r['offline_wer']):.3f} | {float(r['service_wer']):.3f} | {diff:+.3f} |"
        )
        differ = []
        for cid, (o, n), (s, _) in r["per_clip"]:
            print(f"  {cid:40s} {n:4d} words, errors: offline {o:3d} service {s:3d}")
            if o != s:
                differ.append(f"`{cid}` {o} → {s} of {n}")
        notes.append(
            f"- {folder.name}: clips where the service and offline word errors differ: "
            + ("; ".join(differ) if differ else "none")
        )
    table = "\n".join(lines) + "\n\n" + "\n".join(notes)
    print(table)
    if args.write:
        stamp = datetime.date.today().isoformat()
        heading = model_heading("## Accuracy: service vs offline model", args.model)
        section = (
            f"{heading}\n\nMeasured {stamp} on {platform.node()} "
            f"({platform.machine()}, Python {platform.python_version()}), {args.model} int8 CPU, "
            f"command `python bench/accuracy.py {' '.join(sys.argv[1:])}`. One in-process "
            f"gateway + worker + embedded Valkey, {args.concurrency} sessions at a time "
            "streamed as fast as acknowledged; offline = faster-whisper on the whole clip in "
            "one call over full 30 s windows. WER is corpus WER (jiwer) after "
            "whisper-normalizer's English normalizer on both sides; `audio` is the committed "
            "fixture set, `real` is `../shared/audio/real`. Below the table, the clips whose "
            "word errors differ (offline → service, of the normalised reference's words)."
            f"\n\n{table}\n"
        )
        replace_section(args.write, heading, section)


if __name__ == "__main__":
    main()
