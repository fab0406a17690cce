"""The claim gate (worker/claimgate.py): when a worker with free slots takes new sessions,
at every edge of its three settings, on an injected time."""

from __future__ import annotations

from typing import Any, cast

import pytest

from shared.config import Config
from shared.errors import ConfigError
from worker.claimgate import ClaimGate, ClaimPolicy, State

# With 8 sessions held and finals at 80% of the engine, one session is a tenth of it:
# probing spaces new sessions 0.1 x 50 s = 5 s apart.
POLICY = ClaimPolicy(max_final_wait_s=1.0, probe_busy=0.8, probe_ramp_s=50.0)
N = 8  # sessions held


def test_open_while_finals_are_served_promptly() -> None:
    gate = ClaimGate(POLICY)
    # Every free slot:
    assert gate.allowed(100.0, final_wait_s=0.5, final_busy=0.5, sessions=N) is None
    assert gate.state == "open"
    # Both at the edge:
    assert gate.allowed(100.0, final_wait_s=1.0, final_busy=0.79, sessions=N) is None
    assert gate.state == "open"


def test_closed_while_a_final_waits_longer_than_the_limit() -> None:
    gate = ClaimGate(POLICY)
    assert gate.allowed(100.0, final_wait_s=1.01, final_busy=0.1, sessions=N) == 0
    assert gate.state == "closed"
    # Closed wins over probing, even when no session was taken for a long time.
    assert gate.allowed(1000.0, final_wait_s=3.0, final_busy=1.0, sessions=N) == 0
    assert gate.state == "closed"
    assert gate.allowed(1000.0, final_wait_s=0.2, final_busy=0.2, sessions=N) is None  # caught up
    assert cast(State, gate.state) == "open"  # (mypy keeps `closed` across the call above)


def test_probing_takes_one_session_per_spacing() -> None:
    gate = ClaimGate(POLICY)
    assert gate.allowed(100.0, final_wait_s=0.3, final_busy=0.8, sessions=N) == 1  # at the edge
    assert gate.state == "probing"
    gate.took(100.0)
    assert gate.allowed(104.99, final_wait_s=0.3, final_busy=0.8, sessions=N) == 0
    assert gate.state == "probing" and gate.spacing_s == pytest.approx(5.0)
    assert gate.allowed(105.0, final_wait_s=0.3, final_busy=0.8, sessions=N) == 1
    # Below the busy threshold the spacing does not apply.
    gate.took(105.0)
    assert gate.allowed(105.1, final_wait_s=0.3, final_busy=0.5, sessions=N) is None
    assert gate.spacing_s == 0.0


@pytest.mark.parametrize(
    ("busy", "sessions", "spacing"),
    [
        (0.8, 8, 5.0),  # a tenth of the engine each: 5 s
        (0.8, 4, 10.0),  # twice the cost per session (a larger model): twice the spacing
        (0.8, 400, 0.1),  # a GPU's many cheap sessions: a tenth of a second
        (1.0, 10, 5.0),
        (0.8, 0, 40.0),  # none held (they just ended): the whole load counts as one
    ],
)
def test_probe_spacing_follows_what_one_session_costs(
    busy: float, sessions: int, spacing: float
) -> None:
    gate = ClaimGate(POLICY)
    assert gate.allowed(0.0, final_wait_s=0.3, final_busy=busy, sessions=sessions) == 1
    gate.took(0.0)
    assert gate.spacing_s == pytest.approx(spacing)
    early = spacing * 0.999
    assert gate.allowed(early, final_wait_s=0.3, final_busy=busy, sessions=sessions) == 0
    due = spacing
    assert gate.allowed(due, final_wait_s=0.3, final_busy=busy, sessions=sessions) == 1


def test_probe_spacing_is_measured_again_at_each_verdict() -> None:
    """A session that held the engine's load ends: each remaining one costs more of it,
    and the spacing grows at once."""
    gate = ClaimGate(POLICY)
    gate.took(100.0)
    assert gate.allowed(106.0, final_wait_s=0.3, final_busy=0.8, sessions=8) == 1
    assert gate.allowed(106.0, final_wait_s=0.3, final_busy=0.8, sessions=4) == 0
    assert gate.spacing_s == pytest.approx(10.0)


def test_probe_spacing_counts_sessions_taken_while_open() -> None:
    """A session taken just before finals reached the threshold counts as the probe."""
    gate = ClaimGate(POLICY)
    assert gate.allowed(100.0, final_wait_s=0.0, final_busy=0.2, sessions=N) is None
    gate.took(100.0)
    assert gate.allowed(101.0, final_wait_s=0.0, final_busy=0.85, sessions=N) == 0


def test_a_session_that_ends_while_probing_is_replaced_at_once() -> None:
    """Each session that ended while probing lets one waiting session in without the
    spacing (a replacement adds no load); spacing then applies again."""
    gate = ClaimGate(POLICY)
    assert gate.allowed(100.0, final_wait_s=0.3, final_busy=0.8, sessions=N) == 1
    gate.took(100.0)
    assert gate.allowed(101.0, final_wait_s=0.3, final_busy=0.8, sessions=N) == 0
    gate.ended()
    gate.ended()
    assert gate.allowed(101.0, final_wait_s=0.3, final_busy=0.8, sessions=N) == 2
    gate.took(101.0)
    gate.took(101.0)
    # The spacing counts from 100.0, the last session taken without a credit:
    assert gate.allowed(101.5, final_wait_s=0.3, final_busy=0.8, sessions=N) == 0
    assert gate.allowed(105.0, final_wait_s=0.3, final_busy=0.8, sessions=N) == 1


@pytest.mark.parametrize(("wait", "busy"), [(1.5, 0.9), (0.3, 0.5)])
def test_credits_are_dropped_when_closed_or_open(wait: float, busy: float) -> None:
    """Closed: the engine needs the room the ended session left. Open: no spacing anyway.
    Sessions that end while not probing leave no credit."""
    gate = ClaimGate(POLICY)
    assert gate.allowed(100.0, final_wait_s=0.3, final_busy=0.8, sessions=N) == 1
    gate.took(100.0)
    gate.ended()
    gate.allowed(101.0, final_wait_s=wait, final_busy=busy, sessions=N)
    gate.ended()  # not probing: no credit
    assert gate.credits == 0
    assert gate.allowed(101.0, final_wait_s=0.3, final_busy=0.8, sessions=N) == 0


def test_off_takes_every_free_slot_whatever_the_engine_does() -> None:
    gate = ClaimGate(ClaimPolicy(max_final_wait_s=0.0))
    assert gate.allowed(100.0, final_wait_s=60.0, final_busy=1.0, sessions=N) is None
    assert gate.state == "open"


def test_no_spacing_with_probe_ramp_s_zero() -> None:
    gate = ClaimGate(ClaimPolicy(probe_ramp_s=0.0))
    gate.took(100.0)
    assert gate.allowed(100.0, final_wait_s=0.0, final_busy=1.0, sessions=N) == 1


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_final_wait_s": -0.1},
        {"max_final_wait_s": float("inf")},
        {"probe_busy": 0.0},
        {"probe_busy": 1.01},
        {"probe_ramp_s": -1.0},
        {"probe_ramp_s": float("inf")},
    ],
)
def test_policy_refuses_bad_settings(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        ClaimPolicy(**kwargs)


@pytest.mark.parametrize(
    ("name", "bad", "good"),
    [
        ("claim_max_final_wait_s", -0.1, 0.0),
        ("claim_probe_busy", 0.0, 1.0),
        ("claim_probe_busy", 1.01, 0.01),
        ("claim_probe_ramp_s", -0.1, 0.0),
    ],
)
def test_config_checks_the_gate_settings_at_their_edges(name: str, bad: float, good: float) -> None:
    assert getattr(Config(**cast(dict[str, Any], {name: good})), name) == good
    with pytest.raises(ConfigError, match=name.replace("_", "-")):
        Config(**cast(dict[str, Any], {name: bad}))
