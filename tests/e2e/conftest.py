"""The real model, loaded once for every end-to-end test that needs it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from worker.engine import WhisperEngine


@pytest.fixture(scope="session")
def whisper() -> Iterator[WhisperEngine]:
    engine = WhisperEngine("tiny.en", "cpu", "int8", 0)
    engine.warm_up()
    yield engine
