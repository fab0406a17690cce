"""The claim gate (worker/claimgate.py): when a worker with free slots takes new sessions,
at every edge of its three settings, on an injected time."""

from __future__ import annotations

import pytest

from shared.config import Config
from shared.errors import ConfigError
from worker.claimgate import ClaimGate, ClaimPolicy

POLICY = ClaimPolicy(max_final_wait_s=1.0, probe_busy=0.8, probe_s=5.0)


def test_open_while_finals_are_served_promptly() -> None:
    gate = ClaimGate(POLICY)
    assert gate.allowed(100.0, final_wait_s=0.5, final_busy=0.5) is None  # every free slot
    assert gate.state == "open"
    assert gate.allowed(100.0, final_wait_s=1.0, final_busy=0.79) is None  # both at the edge
    assert gate.state == "open"


def test_closed_while_a_final_waits_longer_than_the_limit() -> None:
    gate = ClaimGate(POLICY)
    assert gate.allowed(100.0, final_wait_s=1.01, final_busy=0.1) == 0
    assert gate.state == "closed"
    # Closed wins over probing, even when no session was taken for a long time.
    assert gate.allowed(1000.0, final_wait_s=3.0, final_busy=1.0) == 0
    assert gate.state == "closed"
    assert gate.allowed(1000.0, final_wait_s=0.2, final_busy=0.2) is None  # caught up
    assert gate.state == "open"


def test_probing_takes_one_session_per_probe_s() -> None:
    gate = ClaimGate(POLICY)
    assert gate.allowed(100.0, final_wait_s=0.3, final_busy=0.8) == 1  # at the edge
    assert gate.state == "probing"
    gate.took(100.0)
    assert gate.allowed(104.99, final_wait_s=0.3, final_busy=0.9) == 0
    assert gate.state == "probing"
    assert gate.allowed(105.0, final_wait_s=0.3, final_busy=0.9) == 1
    # Below the busy threshold the spacing does not apply.
    gate.took(105.0)
    assert gate.allowed(105.1, final_wait_s=0.3, final_busy=0.5) is None


def test_probe_spacing_counts_sessions_taken_while_open() -> None:
    """A session taken just before finals reached the threshold counts as the probe."""
    gate = ClaimGate(POLICY)
    assert gate.allowed(100.0, final_wait_s=0.0, final_busy=0.2) is None
    gate.took(100.0)
    assert gate.allowed(101.0, final_wait_s=0.0, final_busy=0.85) == 0


def test_a_session_that_ends_while_probing_is_replaced_at_once() -> None:
    """Each session that ended while probing lets one waiting session in without the
    spacing (a replacement adds no load); spacing then applies again."""
    gate = ClaimGate(POLICY)
    assert gate.allowed(100.0, final_wait_s=0.3, final_busy=0.9) == 1
    gate.took(100.0)
    assert gate.allowed(101.0, final_wait_s=0.3, final_busy=0.9) == 0
    gate.ended()
    gate.ended()
    assert gate.allowed(101.0, final_wait_s=0.3, final_busy=0.9) == 2
    gate.took(101.0)
    gate.took(101.0)
    assert gate.allowed(101.5, final_wait_s=0.3, final_busy=0.9) == 0  # spacing from 100.0
    assert gate.allowed(105.0, final_wait_s=0.3, final_busy=0.9) == 1


@pytest.mark.parametrize(("wait", "busy"), [(1.5, 0.9), (0.3, 0.5)])
def test_credits_are_dropped_when_closed_or_open(wait: float, busy: float) -> None:
    """Closed: the engine needs the room the ended session left. Open: no spacing anyway.
    Sessions that end while not probing leave no credit."""
    gate = ClaimGate(POLICY)
    assert gate.allowed(100.0, final_wait_s=0.3, final_busy=0.9) == 1
    gate.took(100.0)
    gate.ended()
    gate.allowed(101.0, final_wait_s=wait, final_busy=busy)
    gate.ended()  # not probing: no credit
    assert gate.credits == 0
    assert gate.allowed(101.0, final_wait_s=0.3, final_busy=0.9) == 0


def test_off_takes_every_free_slot_whatever_the_engine_does() -> None:
    gate = ClaimGate(ClaimPolicy(max_final_wait_s=0.0))
    assert gate.allowed(100.0, final_wait_s=60.0, final_busy=1.0) is None
    assert gate.state == "open"


def test_no_spacing_with_probe_s_zero() -> None:
    gate = ClaimGate(ClaimPolicy(probe_s=0.0))
    gate.took(100.0)
    assert gate.allowed(100.0, final_wait_s=0.0, final_busy=1.0) == 1


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_final_wait_s": -0.1},
        {"max_final_wait_s": float("inf")},
        {"probe_busy": 0.0},
        {"probe_busy": 1.01},
        {"probe_s": -1.0},
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
        ("claim_probe_s", -0.1, 0.0),
    ],
)
def test_config_checks_the_gate_settings_at_their_edges(name: str, bad: float, good: float) -> None:
    assert getattr(Config(**{name: good}), name) == good
    with pytest.raises(ConfigError, match=name.replace("_", "-")):
        Config(**{name: bad})
