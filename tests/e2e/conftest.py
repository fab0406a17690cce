"""The real models, each loaded once for every end-to-end test that needs it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from shared.config import Config
from worker.engine import WhisperEngine, load_engine


def _as_worker_builds(model: str, state_dir: Path) -> WhisperEngine:
    """`model` on CPU as a worker builds it with the shipped settings (encoder window,
    concurrent decodes, threads per decode), warmed up; a split model is joined under
    `state_dir`, not the user's."""
    cfg = Config()
    engine = load_engine(
        "whisper", model, "cpu", "int8", 0, cfg.encode_min_s, cfg.decode_threads, str(state_dir)
    )
    assert isinstance(engine, WhisperEngine)
    engine.warm_up()
    return engine


@pytest.fixture(scope="session")
def whisper(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WhisperEngine]:
    """tiny.en, the default model."""
    yield _as_worker_builds("tiny.en", tmp_path_factory.mktemp("state"))


@pytest.fixture(scope="session")
def whisper_base(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WhisperEngine]:
    """Whisper base (multilingual; the `model-base` extra)."""
    yield _as_worker_builds("base", tmp_path_factory.mktemp("state"))
