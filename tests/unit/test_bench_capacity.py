"""bench/capacity.py: how its variants share the time budget."""

from __future__ import annotations

import pytest

from bench.capacity import share_deadline


def test_capacity_variants_share_the_budget() -> None:
    """bench/capacity.py gives each variant an equal share of the budget left, so the
    last of several (the GPU run's batched variant) is not starved by the first; what one
    leaves unused goes to the ones after it, and a spent budget gives nothing."""
    assert share_deadline(0.0, 360.0, 2) == 180.0
    assert share_deadline(100.0, 360.0, 1) == 360.0  # the last one: everything left
    assert share_deadline(100.0, 360.0, 2) == 230.0  # the first left 80 s unused
    assert share_deadline(400.0, 360.0, 2) == 400.0  # spent: no run starts
    with pytest.raises(ValueError):
        share_deadline(0.0, 10.0, 0)
