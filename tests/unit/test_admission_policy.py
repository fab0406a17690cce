"""Admission decisions (shared/admission.py): queue positions across priority lanes and
the 1013 verdicts at the edges of max_queue_length and max_queue_wait_s."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared.admission import LaneState, admit, lanes_at_or_above, queue_position
from shared.errors import Overloaded


def lanes(high: tuple[int, int] = (0, 0), normal: tuple[int, int] = (0, 0)) -> dict[str, LaneState]:
    return {"high": LaneState(*high), "normal": LaneState(*normal)}


def test_lane_order() -> None:
    """high is served before normal; normal waits behind both."""
    assert lanes_at_or_above("high") == ("high",)
    assert lanes_at_or_above("normal") == ("high", "normal")


@pytest.mark.parametrize(
    ("index", "expected"),
    [(10, 0), (11, 1), (12, 2), (15, 5), (9, 0)],
)
def test_position_in_own_lane(index: int, expected: int) -> None:
    """A lane that has delivered 10 entries: entry 11 is next (1), entries up to 10 are
    with a worker already (0)."""
    assert queue_position("normal", index, lanes(normal=(15, 10))) == expected


def test_higher_lane_waiters_come_first() -> None:
    """Unread high-priority entries count ahead of every normal session; a high session
    ignores the normal lane."""
    state = lanes(high=(7, 4), normal=(20, 10))
    assert queue_position("normal", 11, state) == 1 + 3
    assert queue_position("high", 5, state) == 1
    assert queue_position("high", 7, state) == 3


def test_admit_refuses_at_the_length_limit() -> None:
    """Exactly max_queue_length waiting: refused (1013); one fewer: admitted."""
    admit("normal", lanes(normal=(4, 1)), 0, max_queue_length=4, max_queue_wait_s=30)
    with pytest.raises(Overloaded) as info:
        admit(
            "normal", lanes(high=(1, 0), normal=(4, 1)), 0, max_queue_length=4, max_queue_wait_s=30
        )
    assert info.value.close_code == 1013
    assert "4 sessions are waiting" in info.value.message


def test_high_priority_ignores_a_full_normal_lane() -> None:
    """A full normal lane does not stop a high-priority session."""
    full = lanes(normal=(200, 0))
    admit("high", full, 0, max_queue_length=100, max_queue_wait_s=30)
    with pytest.raises(Overloaded):
        admit("normal", full, 0, max_queue_length=100, max_queue_wait_s=30)


def test_admit_refuses_when_the_head_waited_too_long() -> None:
    """The oldest waiting entry at max_queue_wait_s: refused; just under: admitted."""
    state = {"high": LaneState(0, 0), "normal": LaneState(3, 2, head_ms=10_000)}
    admit("normal", state, 39_999, max_queue_length=100, max_queue_wait_s=30)
    with pytest.raises(Overloaded) as info:
        admit("normal", state, 40_000, max_queue_length=100, max_queue_wait_s=30)
    assert "waited 30s" in info.value.message


def test_head_of_an_empty_lane_is_ignored() -> None:
    """A stale head time on a lane with nobody waiting refuses nothing."""
    state = {"high": LaneState(5, 5, head_ms=0), "normal": LaneState(0, 0)}
    admit("normal", state, 10**9, max_queue_length=100, max_queue_wait_s=30)


@given(st.lists(st.sampled_from(["high", "normal", "read"]), max_size=60))
def test_positions_are_the_order_workers_take_sessions_in(events: list[str]) -> None:
    """Sessions join either lane and workers read the next one (the high lane first), in
    any order: each waiting session's position, from the lanes' counters alone, is its
    place in the order workers will take them (hypothesis)."""
    lanes: dict[str, list[int]] = {"high": [], "normal": []}  # unread entries, oldest first
    added = {"high": 0, "normal": 0}
    read = {"high": 0, "normal": 0}
    for event in events:
        if event == "read":
            lane = "high" if lanes["high"] else "normal"
            if lanes[lane]:
                lanes[lane].pop(0)
                read[lane] += 1
            continue
        added[event] += 1
        lanes[event].append(added[event])
        state = {p: LaneState(added[p], read[p]) for p in lanes}
        order = [("high", i) for i in lanes["high"]] + [("normal", i) for i in lanes["normal"]]
        for place, (lane, index) in enumerate(order, start=1):
            assert queue_position(lane, index, state) == place
        for lane in lanes:
            for index in range(1, read[lane] + 1):
                assert queue_position(lane, index, state) == 0  # taken already
