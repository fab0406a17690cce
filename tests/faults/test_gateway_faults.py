"""Gateway-side faults with real processes: a gateway SIGKILLed mid-session, and a
gateway whose pub/sub subscriber Redis keeps cutting."""

from __future__ import annotations

import pytest

from tests.faults.harness import Cluster
from tests.faults.scenarios import gateway_kill, pubsub_cut

pytestmark = [pytest.mark.faults, pytest.mark.model, pytest.mark.timeout(180)]


async def test_sigkill_of_a_gateway_clients_resume_through_another(
    cluster: Cluster, clean_texts: dict[str, str]
) -> None:
    """Every client streams through gateway 1, which is SIGKILLed after 3 s of audio; the
    SDK resumes through gateway 2 (its fallback URL) and no frame or final is lost or
    duplicated."""
    result = await gateway_kill(cluster, clean_texts, sessions=3)
    assert result.ok, result.report()


async def test_results_reach_the_client_when_the_subscriber_is_cut(
    cluster: Cluster, clean_texts: dict[str, str]
) -> None:
    """Redis drops the gateway's pub/sub connection every 0.3 s for the whole session:
    every final and session.closed still arrive, exactly once, from the results stream."""
    result = await pubsub_cut(cluster, clean_texts, sessions=2)
    assert result.ok, result.report()
