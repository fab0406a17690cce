"""When the gateway hands freed memory back to the system (gateway.memory)."""

from __future__ import annotations

import platform

import pytest

from gateway.memory import TrimPolicy, fix_mmap_threshold, resident_mib, trim, trim_supported
from shared.config import Config
from shared.errors import ConfigError


def test_a_fall_of_min_drop_to_half_the_peak_trims_once() -> None:
    """Connections rise to 100 and fall: no trim until they are down by min_drop (64)
    and at half the peak or less; then the peak starts again from where they are."""
    policy = TrimPolicy(64)
    for n in range(1, 101):
        policy.opened(n)
    assert not policy.due(100)
    assert not policy.due(37)  # down 63: one short of min_drop
    assert policy.due(36)  # down 64, and 36 <= 50
    assert policy.peak == 36
    assert not policy.due(1)  # down only 35 since the trim
    assert policy.due(0)  # but the last one closed: what they all freed goes back
    assert not policy.due(0)  # once


def test_a_fall_to_more_than_half_the_peak_does_not_trim() -> None:
    """From 200 to 101 is a drop of 99 but more than half the peak: the heap will be
    used again soon; at 100 it trims."""
    policy = TrimPolicy(64)
    policy.opened(200)
    assert not policy.due(101)
    assert policy.due(100)


def test_the_peak_counts_connections_seen_only_at_a_check() -> None:
    """A check sees more open than any `opened` call reported (it counts them too)."""
    policy = TrimPolicy(2)
    assert not policy.due(4)
    assert policy.due(2)


def test_a_small_gateway_trims_when_its_last_connection_closes() -> None:
    """16 connections never fall by min_drop (64); when the last one closes, the gateway
    trims once, and again only after connections came and all went again."""
    policy = TrimPolicy(64)
    for n in range(1, 17):
        policy.opened(n)
    assert not any(policy.due(n) for n in range(16, 0, -1))
    assert policy.due(0)
    assert not policy.due(0)
    policy.opened(1)
    assert policy.due(0)


def test_zero_never_trims_and_negatives_are_refused() -> None:
    policy = TrimPolicy(0)
    policy.opened(1000)
    assert not policy.due(0)
    with pytest.raises(ValueError, match="min_drop"):
        TrimPolicy(-1)
    assert Config(heap_trim_drop=0).heap_trim_drop == 0
    with pytest.raises(ConfigError, match="heap-trim-drop"):
        Config(heap_trim_drop=-1)


def test_trim_and_the_mmap_threshold_run_on_glibc() -> None:
    """On glibc Linux (this project's machines) both calls exist and run; elsewhere the
    gateway does neither."""
    on_glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    assert trim_supported() is on_glibc
    assert trim() is on_glibc
    assert fix_mmap_threshold() is on_glibc  # glibc's own starting value: harmless here
    if platform.system() == "Linux":
        mib = resident_mib()
        assert mib is not None and mib > 1
