"""The null engine with the energy VAD (what the ingest benchmark runs) still segments."""

from __future__ import annotations

from tests.conftest import ServiceFactory
from tests.helpers import fixture, stream_session


async def test_energy_vad_cuts_the_fixture_into_finals(service_factory: ServiceFactory) -> None:
    svc = await service_factory(vad="energy")
    out = await stream_session(svc.url, fixture("s1.wav"))
    assert out.code == 1000
    assert [f["result_id"] for f in out.finals] == list(range(len(out.finals)))
    assert len(out.finals) >= 2  # the pause between the fixture's two sentences
    assert out.messages[-1]["final_results"] == len(out.finals)
