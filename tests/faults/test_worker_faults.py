"""Worker faults with real processes: SIGKILL (takeover) and SIGSTOP past the lease
(fencing of the zombie), checked against the invariants and the no-fault transcripts."""

from __future__ import annotations

import pytest

from tests.faults.harness import Cluster
from tests.faults.scenarios import worker_kill, worker_pause

pytestmark = [pytest.mark.faults, pytest.mark.model, pytest.mark.timeout(180)]


async def test_sigkill_of_a_worker_mid_session_is_taken_over(
    cluster: Cluster, clean_texts: dict[str, str]
) -> None:
    """Four live sessions on two workers; the busiest worker is SIGKILLed after 3 s of
    audio: the other claims its sessions (new epoch) and every session ends with all
    frames stored once in order, finals 0..n-1 once, and a transcript close to clean."""
    result = await worker_kill(cluster, clean_texts, sessions=4)
    assert result.ok, result.report()
    assert result.takeover_ms, result.report()


async def test_a_stopped_owner_is_fenced_after_takeover(
    cluster: Cluster, clean_texts: dict[str, str]
) -> None:
    """The owner of a session is SIGSTOPped past its 3 s lease; once another worker has
    taken over it is SIGCONTed: nothing it publishes reaches the events channel or the
    results stream (no event or entry with its epoch after the takeover)."""
    result = await worker_pause(cluster, clean_texts, sessions=2)
    assert result.ok, result.report()
    assert result.takeover_ms and min(result.takeover_ms) >= 0, result.report()
