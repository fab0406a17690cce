"""A `language=auto` session fixed on a language keeps it across owners: a worker that
claims it reads `language_locked` from its meta hash and names that language in every
decode. Real Valkey, gateway and WebSockets; the engine is the null engine with a record
of the language each decode was given (what the worker asks of the engine is under test
here; the lock's decisions on real detections are in tests/e2e/test_model_pipeline.py).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Sequence
from typing import cast

import redis.asyncio as aioredis

from shared import keys
from shared.keys import SessionId
from tests.conftest import ServiceFactory, make_config
from tests.helpers import await_ack, drain, fixture, open_ws, started
from worker.engine import Audio, NullEngine, Segment
from worker.service import Worker


class LanguageRecord(NullEngine):
    """The null engine, noting the language of every decode it is given."""

    def __init__(self) -> None:
        self.languages: list[str | None] = []

    def transcribe(
        self,
        audio: Audio,
        *,
        language: str | None,
        word_timestamps: bool,
        beam_size: int,
        prompt: str | None = None,
    ) -> list[Segment]:
        self.languages.append(language)
        return super().transcribe(
            audio, language=language, word_timestamps=word_timestamps, beam_size=beam_size
        )

    def transcribe_batch(
        self,
        audios: Sequence[Audio],
        *,
        language: str | None,
        word_timestamps: bool,
        beam_size: int,
        prompt: str | None = None,
    ) -> list[list[Segment]]:
        return [
            self.transcribe(a, language=language, word_timestamps=word_timestamps, beam_size=1)
            for a in audios
        ]


async def test_a_claimed_session_decodes_in_its_locked_language(
    service_factory: ServiceFactory, redis: aioredis.Redis, redis_url: str
) -> None:
    """An `auto` session is stored before any worker runs, and its meta says an earlier
    owner fixed it on German: the worker that claims it decodes in German from its first
    decode. The same session without that field is decoded with detection (None)."""
    svc = await service_factory(with_worker=False, model="base")  # multilingual: auto allowed
    audio = fixture("s1.wav")
    frames = list(audio.frames(100))
    seen = {}
    for name, locked in (("locked", "de"), ("detecting", None)):
        # One session and one worker at a time, so each record is one session's.
        ws = await open_ws(svc.url, "language=auto")
        sid = SessionId((await started(ws))["session_id"])
        if locked is not None:
            await cast(Awaitable[int], redis.hset(keys.meta(sid), "language_locked", locked))
        for frame in frames:
            await ws.send(frame)
        await await_ack(ws, len(frames) - 1)
        await ws.send(json.dumps({"type": "close_stream"}))
        engine = LanguageRecord()
        config = make_config(redis_url, worker_id=f"w-{name}", model="base")
        worker = Worker(config, engine=engine)
        await worker.start()
        try:
            outcome = await drain(ws)
        finally:
            await worker.shutdown()
        assert outcome.of_type("session.closed") and outcome.finals, outcome.messages
        seen[name] = engine.languages
    assert seen["locked"] and set(seen["locked"]) == {"de"}
    assert seen["detecting"] and set(seen["detecting"]) == {None}
