"""The real models, each loaded once for every end-to-end test that needs it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from shared.config import Config
from worker.engine import WhisperEngine, load_engine


def _as_worker_builds(model: str) -> WhisperEngine:
    """`model` on CPU as a worker builds it with the shipped settings (encoder window,
    concurrent decodes, threads per decode), warmed up."""
    cfg = Config()
    engine = load_engine("whisper", model, "cpu", "int8", 0, cfg.encode_min_s, cfg.decode_threads)
    assert isinstance(engine, WhisperEngine)
    engine.warm_up()
    return engine


@pytest.fixture(scope="session")
def whisper() -> Iterator[WhisperEngine]:
    """tiny.en, the default model."""
    yield _as_worker_builds("tiny.en")


@pytest.fixture(scope="session")
def whisper_base() -> Iterator[WhisperEngine]:
    """Whisper base (multilingual; the `model-base` extra)."""
    yield _as_worker_builds("base")
