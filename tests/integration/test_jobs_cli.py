"""`streamscribe jobs submit` and `jobs get` against a real gateway and worker (null
engine): what they print and their exit status."""

from __future__ import annotations

import asyncio
import json

import pytest

from shared.cli import main
from tests.conftest import FIXTURES, ServiceFactory


async def test_submit_wait_prints_the_transcript_and_get_reads_it_back(
    service_factory: ServiceFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    svc = await service_factory(vad="energy")
    wav = str(FIXTURES / "s1.wav")
    code = await asyncio.to_thread(main, ["jobs", "submit", "--url", svc.url, wav, "--wait"])
    out, err = capsys.readouterr()
    assert code == 0
    assert "] speech" in out  # the null engine's word, with the segment's times
    assert "done: 6.2 s of audio" in err
    code = await asyncio.to_thread(main, ["jobs", "submit", "--url", svc.url, wav, "--json"])
    out, _ = capsys.readouterr()
    assert code == 0
    job_id = json.loads(out)["job_id"]
    code = await asyncio.to_thread(
        main, ["jobs", "get", "--url", svc.url, job_id, "--wait", "--json"]
    )
    out, _ = capsys.readouterr()
    view = json.loads(out)
    assert code == 0 and view["state"] == "done" and view["name"] == "s1.wav"
    assert view["audio_seconds"] == pytest.approx(6.203, abs=0.001)


async def test_get_of_an_unknown_job_exits_2(
    service_factory: ServiceFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    svc = await service_factory(with_worker=False)
    code = await asyncio.to_thread(main, ["jobs", "get", "--url", svc.url, "ab" * 16])
    _, err = capsys.readouterr()
    assert code == 2 and "not_found: unknown or expired job" in err
