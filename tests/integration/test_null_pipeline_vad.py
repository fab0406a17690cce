"""The null engine with the energy VAD (what the ingest benchmark runs) still segments."""

from __future__ import annotations

import json

from tests.conftest import ServiceFactory
from tests.helpers import drain, fixture, open_ws, started


async def test_energy_vad_cuts_the_fixture_into_finals(service_factory: ServiceFactory) -> None:
    svc = await service_factory(vad="energy")
    audio = fixture("s1.wav")
    ws = await open_ws(svc.url)
    await started(ws)
    for frame in audio.frames(100):
        await ws.send(frame)
    await ws.send(json.dumps({"type": "close_stream"}))
    out = await drain(ws)
    assert out.code == 1000
    assert [f["result_id"] for f in out.finals] == list(range(len(out.finals)))
    assert len(out.finals) >= 2  # the pause between the fixture's two sentences
    assert out.messages[-1]["final_results"] == len(out.finals)
