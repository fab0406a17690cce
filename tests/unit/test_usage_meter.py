"""`UsageMeter`: an API key's audio per usage window, as this gateway knows it, and the
budget's edge (gateway/usage.py)."""

from __future__ import annotations

import pytest

from gateway.usage import US, SyncItem, UsageMeter


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


DAY = 86400


def meter(budget_s: float = 1.0, now: float = 10 * DAY + 5.0) -> tuple[UsageMeter, Clock]:
    clock = Clock(now)
    return UsageMeter(DAY, budget_s, clock=clock), clock


def test_windows_are_aligned_on_the_epoch() -> None:
    m, clock = meter(now=10 * DAY + 123.4)
    assert m.window() == 10 * DAY
    assert m.renews_at() == 11 * DAY
    clock.now = 11 * DAY  # the first instant of the next window belongs to it
    assert m.window() == 11 * DAY
    clock.now = 11 * DAY - 0.001
    assert m.window() == 10 * DAY


def test_the_budget_may_be_reached_exactly_not_passed() -> None:
    m, _ = meter(budget_s=1.0)
    for _ in range(9):
        assert m.allows("k", 100_000)
        m.stored("k", 100_000)
    assert m.allows("k", 100_000)  # the tenth 100 ms frame ends exactly on the budget
    assert not m.allows("k", 100_001)
    assert not m.spent("k")
    m.stored("k", 100_000)
    assert m.used_us("k") == US
    assert m.spent("k")
    assert not m.allows("k", 1)
    assert m.allows("other", US)  # per key


def test_without_a_budget_everything_is_allowed_and_still_counted() -> None:
    m, _ = meter(budget_s=0)
    m.stored("k", 10**12)
    assert m.allows("k", 10**12) and not m.spent("k")
    assert m.to_sync() == [SyncItem("k", 10 * DAY, 10**12)]


def test_usage_is_the_fleet_total_plus_what_was_stored_here_since() -> None:
    m, _ = meter()
    m.stored("k", 300_000)
    items = m.to_sync()
    assert items == [SyncItem("k", 10 * DAY, 300_000)]
    m.stored("k", 50_000)  # while the sync is on its way
    m.synced(items, [700_000])  # other gateways stored 400 ms meanwhile
    assert m.used_us("k") == 750_000
    assert m.to_sync() == [SyncItem("k", 10 * DAY, 350_000)]  # only what moved


def test_a_sync_writes_what_moved_and_reads_every_key_with_a_connection_here() -> None:
    m, _ = meter()
    m.opened("a")
    m.opened("a")
    m.opened("b")
    m.stored("b", 5)
    assert m.to_sync() == [SyncItem("a", 10 * DAY, 0), SyncItem("b", 10 * DAY, 5)]
    m.synced(m.to_sync(), [2 * US, 5])
    assert m.used_us("a") == 2 * US  # another gateway's audio of key a, learnt here
    m.closed("b")
    assert m.to_sync() == [SyncItem("a", 10 * DAY, 0)]  # b moved no further and is closed
    m.closed("a")
    assert m.to_sync() == [SyncItem("a", 10 * DAY, 0)]  # one connection of a still open
    m.closed("a")
    assert m.to_sync() == []
    assert m.to_sync(only="c") == [SyncItem("c", 10 * DAY, 0)]


def test_a_new_window_starts_empty_and_the_old_one_is_written_then_forgotten() -> None:
    m, clock = meter(budget_s=1.0)
    m.stored("k", US)
    m.synced(m.to_sync(), [US])
    assert m.spent("k")
    m.stored("k", 200_000)  # stored late in the day, not yet written
    clock.now = 11 * DAY + 1
    assert m.used_us("k") == 0 and not m.spent("k")  # a fresh budget
    m.stored("k", 100_000)
    items = m.to_sync()
    assert items == [SyncItem("k", 10 * DAY, 1_200_000), SyncItem("k", 11 * DAY, 100_000)]
    m.synced(items, [1_200_000, 100_000])
    assert m.to_sync() == []  # the old window was written and is gone
    assert m.used_us("k") == 100_000


def test_an_unwritten_old_window_is_kept_until_a_sync_succeeds() -> None:
    m, clock = meter()
    m.stored("k", 42)
    clock.now = 11 * DAY
    m.synced([], [])  # a sync of nothing (say, the one that failed sent nothing back)
    assert m.to_sync() == [SyncItem("k", 10 * DAY, 42)]


def test_a_window_must_be_positive() -> None:
    with pytest.raises(ValueError):
        UsageMeter(0, 1.0)


def test_a_late_reply_of_an_older_sync_is_not_taken() -> None:
    """Two syncs of one key at once (a new session's and the heartbeat's) may be answered
    out of order: the older reply's fleet total does not replace the newer one's."""
    m, _ = meter()
    m.stored("k", 100)
    older = m.to_sync()
    m.stored("k", 100)
    newer = m.to_sync(only="k")
    m.synced(newer, [1_200])  # 200 from here, 1,000 from other gateways
    m.synced(older, [1_100])
    assert m.used_us("k") == 1_200
