"""The real model, loaded once for every end-to-end test that needs it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from shared.config import Config
from worker.engine import WhisperEngine, load_engine


@pytest.fixture(scope="session")
def whisper() -> Iterator[WhisperEngine]:
    """tiny.en on CPU as a worker builds it with the shipped settings (encoder window,
    concurrent decodes, threads per decode)."""
    cfg = Config()
    engine = load_engine(
        "whisper", "tiny.en", "cpu", "int8", 0, cfg.encode_min_s, cfg.decode_threads
    )
    assert isinstance(engine, WhisperEngine)
    engine.warm_up()
    yield engine


@pytest.fixture(scope="session")
def whisper_base() -> Iterator[WhisperEngine]:
    """Whisper base (multilingual; the `model-base` extra) on CPU as a worker builds it."""
    cfg = Config()
    engine = load_engine(
        "whisper", "base", "cpu", "int8", 0, cfg.encode_min_s, cfg.decode_threads
    )
    assert isinstance(engine, WhisperEngine)
    engine.warm_up()
    yield engine
