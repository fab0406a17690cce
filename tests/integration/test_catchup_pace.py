"""A session taken after waiting in the queue, its audio stored meanwhile, is read at most
`catchup_pace` times real time until it has caught up (worker/service.py,
`catchup_budget_s`), and still gets every final. Real Valkey, gateway and WebSockets; the
null engine with the energy VAD, so finals come as fast as the audio is read."""

from __future__ import annotations

import asyncio
import json

import pytest
import redis.asyncio as aioredis
from websockets.asyncio.client import ClientConnection

from shared.config import Config
from shared.errors import ConfigError
from tests.conftest import ServiceFactory
from tests.helpers import drain, fixture, open_ws, started
from tests.integration.test_admission import epoch, finish, next_of, occupy
from tests.integration.test_takeover import until
from worker.engine import SAMPLE_RATE
from worker.service import CATCHUP_AHEAD_S, catchup_budget_s

FRAME_MS = 100
SPEECH = ("s1.wav", "s2.wav", "s3.wav", "s4.wav")  # 26 s, 11 utterances


@pytest.mark.parametrize(
    ("fed_s", "elapsed_s", "pace", "budget"),
    [
        (0.0, 0.0, 2.0, 2.0),  # the head start
        (2.0, 0.0, 2.0, 0.0),  # used up
        (1.0, 5.0, 2.0, 11.0),
        (12.5, 5.0, 2.0, -0.5),  # ahead: nothing until real time has passed
        (6.0, 5.0, 1.0, 1.0),  # real time, plus the head start
    ],
)
def test_catchup_budget_is_pace_times_real_time_plus_a_head_start(
    fed_s: float, elapsed_s: float, pace: float, budget: float
) -> None:
    assert CATCHUP_AHEAD_S == 2.0
    assert catchup_budget_s(fed_s, elapsed_s, pace) == pytest.approx(budget)


@pytest.mark.parametrize(("value", "ok"), [(0.0, True), (1.0, True), (2.5, True), (0.99, False)])
def test_catchup_pace_is_off_or_at_least_real_time(value: float, ok: bool) -> None:
    """Below real time a session would never catch up on a live stream."""
    if ok:
        assert Config(catchup_pace=value).catchup_pace == value
    else:
        with pytest.raises(ConfigError, match="catchup-pace"):
            Config(catchup_pace=value)


async def queued_with_stored_speech(
    url: str, redis: aioredis.Redis
) -> tuple[ClientConnection, str, ClientConnection, float]:
    """A session holding the only slot, and a second one that waited behind it while 26 s
    of speech was stored for it; returns both and the stored seconds."""
    running, _ = await occupy(url, redis)
    ws = await open_ws(url)
    sid = (await started(ws))["session_id"]
    assert (await next_of(ws, "queued"))["position"] == 1
    frames = [f for name in SPEECH for f in fixture(name).frames(FRAME_MS)]
    for frame in frames:
        await ws.send(frame)
    stored = sum(len(f) for f in frames) / (2 * SAMPLE_RATE)  # 16-bit mono
    return running, sid, ws, stored


async def test_a_session_taken_with_stored_audio_is_read_at_the_pace_and_catches_up(
    service_factory: ServiceFactory, redis: aioredis.Redis
) -> None:
    pace = 4.0  # quick; the bound below still stays far under the 26 s stored
    svc = await service_factory(slots=1, queue_update_s=0.1, vad="energy", catchup_pace=pace)
    worker = svc.worker
    assert worker is not None
    running, sid, ws, stored = await queued_with_stored_speech(svc.url, redis)
    assert stored > 20
    assert (await finish(running)).code == 1000
    await until(lambda: epoch(redis, sid), "the waiting session to be taken")
    owned = next(o for o in worker.owned.values() if o.sid == sid)
    assert owned.paced is not None
    taken_at, base = owned.paced.taken_at, owned.paced.base_samples
    loop = asyncio.get_running_loop()
    while True:  # its first final
        msg = json.loads(await ws.recv())
        if msg["type"] == "transcript" and msg["is_final"]:
            break
    elapsed = loop.time() - taken_at
    fed_s = (owned.transcriber.total_samples - base) / SAMPLE_RATE
    # Read at most `pace` x real time ahead of the head start, give or take one frame.
    bound = CATCHUP_AHEAD_S + pace * elapsed + FRAME_MS / 1000
    assert fed_s <= bound < stored, (fed_s, bound)
    await ws.send(json.dumps({"type": "close_stream"}))
    out = await drain(ws)
    assert out.code == 1000
    closed = out.of_type("session.closed")[0]
    assert closed["audio_seconds"] == pytest.approx(stored, abs=0.001)
    assert len(out.finals) + 1 == closed["final_results"]  # the first was read above
    assert owned.paced is None  # caught up before the end


async def test_catchup_pace_zero_reads_stored_audio_at_full_speed(
    service_factory: ServiceFactory, redis: aioredis.Redis
) -> None:
    svc = await service_factory(slots=1, queue_update_s=0.1, vad="energy", catchup_pace=0.0)
    worker = svc.worker
    assert worker is not None
    running, sid, ws, stored = await queued_with_stored_speech(svc.url, redis)
    assert (await finish(running)).code == 1000
    await until(lambda: epoch(redis, sid), "the waiting session to be taken")
    owned = next(o for o in worker.owned.values() if o.sid == sid)
    assert owned.paced is None
    await ws.send(json.dumps({"type": "close_stream"}))
    out = await drain(ws)
    assert out.code == 1000
    assert out.of_type("session.closed")[0]["audio_seconds"] == pytest.approx(stored, abs=0.001)
