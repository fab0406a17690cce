"""Valkey (AOF everysec) stopped and restarted mid-session on the same port and data
directory: gateways, workers and clients reconnect by themselves."""

from __future__ import annotations

import pytest

from tests.faults.harness import Cluster
from tests.faults.scenarios import redis_crash, redis_restart

pytestmark = [pytest.mark.faults, pytest.mark.model, pytest.mark.timeout(180)]


async def test_graceful_redis_restart_loses_nothing(
    cluster: Cluster, clean_texts: dict[str, str]
) -> None:
    """SIGTERM (Valkey fsyncs its AOF and exits), restart from the AOF: every session
    finishes with every acknowledged frame stored once and every final delivered once."""
    result = await redis_restart(cluster, clean_texts, sessions=2)
    assert result.ok, result.report()


async def test_redis_sigkill_restart_loses_nothing_acknowledged(
    cluster: Cluster, clean_texts: dict[str, str]
) -> None:
    """SIGKILL of Valkey (the process dies, the machine does not): AOF data written before
    each reply is in the OS page cache, so after the restart nothing acknowledged is
    missing and the sessions finish intact."""
    result = await redis_restart(cluster, clean_texts, sessions=2, kill=True)
    assert result.ok, result.report()


async def test_redis_crash_losing_its_last_second_loses_no_audio(
    cluster: Cluster, clean_texts: dict[str, str]
) -> None:
    """A machine crash under Valkey with AOF everysec, emulated: the AOF is rolled back to
    a copy taken 1 s before the SIGKILL, so acknowledged frames of that second are gone
    from Redis. The clients re-send them from their retained audio and every session ends
    with each frame stored once, in order, and a transcript close to the clean one."""
    result = await redis_crash(cluster, clean_texts, sessions=2, lost_s=1.0)
    assert result.ok, result.report()
    assert result.acked_frames_lost > 0, "the rollback lost nothing: the fault missed"
