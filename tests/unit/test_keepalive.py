"""The keepalive round's reading of failed renewals (`worker.service.split_renewals`)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from worker.service import split_renewals


@dataclass
class _S:
    name: str
    open: bool = True


def _names(items: list[_S]) -> list[str]:
    return [s.name for s in items]


def test_renewed_sessions_are_held_and_failed_open_ones_lost() -> None:
    a, b, c = _S("a"), _S("b"), _S("c")
    held, lost = split_renewals([a, b, c], [True, False, True], lambda s: s.open)
    assert _names(held) == ["a", "c"]
    assert _names(lost) == ["b"]


def test_a_session_closed_while_the_renewals_were_in_flight_is_not_lost() -> None:
    # Its close deleted the lease, so its renewal failed; its task may still be
    # acknowledging the dispatch entry and must not be cancelled.
    closing = _S("closing", open=False)
    held, lost = split_renewals([closing], [False], lambda s: s.open)
    assert held == [] and lost == []


def test_only_the_still_open_failures_are_lost() -> None:
    items = [_S("x", open=False), _S("y"), _S("z", open=False), _S("w")]
    held, lost = split_renewals(items, [False, False, True, False], lambda s: s.open)
    assert _names(held) == ["z"]  # renewed: held, whatever the predicate says
    assert _names(lost) == ["y", "w"]


def test_replies_must_match_the_sessions_one_to_one() -> None:
    with pytest.raises(ValueError):
        split_renewals([_S("a")], [True, True], lambda s: True)
