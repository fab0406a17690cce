"""A client's network drops for a few seconds (a TCP proxy cuts and refuses every
connection) while it keeps producing audio."""

from __future__ import annotations

import pytest

from tests.faults.harness import Cluster
from tests.faults.scenarios import network_drop

pytestmark = [pytest.mark.faults, pytest.mark.model, pytest.mark.timeout(180)]


async def test_network_drop_while_audio_keeps_coming(
    cluster: Cluster, clean_texts: dict[str, str]
) -> None:
    """The link is cut for 3 s after 3 s of audio; the SDK keeps accepting audio (buffered),
    reconnects when the link is back, resumes and re-sends from next_seq: the transcript
    is complete and no frame is lost or duplicated."""
    result = await network_drop(cluster, clean_texts, sessions=2, outage_s=3.0)
    assert result.ok, result.report()
