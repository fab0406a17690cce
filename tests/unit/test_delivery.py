"""Unit tests for shared/delivery.py: exactly-once, in-order delivery of one session's results."""

from __future__ import annotations

from shared.delivery import Delivery, Result
from shared.envelope import Closed, Transcript


def final(rid: int, text: str = "") -> Transcript:
    return Transcript(rid, True, float(rid), float(rid) + 1, text or f"final {rid}")


def interim(rid: int, text: str = "") -> Transcript:
    return Transcript(rid, False, float(rid), float(rid) + 0.5, text or f"interim {rid}")


def closed(finals: int) -> Closed:
    return Closed("client_closed", 3.0, finals)


def offer_all(delivery: Delivery, items: list[Result]) -> list[Result]:
    out: list[Result] = []
    for item in items:
        out.extend(delivery.offer(item))
    return out


def test_finals_in_order_are_each_delivered_once() -> None:
    """Finals 0, 1, 2 offered in order come out in order, one each."""
    delivery = Delivery()
    assert offer_all(delivery, [final(0), final(1), final(2)]) == [final(0), final(1), final(2)]
    assert delivery.next_result_id == 3
    assert not delivery.needs_catch_up


def test_duplicate_finals_are_dropped() -> None:
    """A final offered again (pub/sub plus stream replay) is forwarded only the first time."""
    delivery = Delivery()
    out = offer_all(delivery, [final(0), final(0), final(1), final(0), final(1)])
    assert out == [final(0), final(1)]
    assert not delivery.needs_catch_up


def test_gap_asks_for_catch_up_and_holds_the_later_final() -> None:
    """A final past the next expected one is held back and sets needs_catch_up."""
    delivery = Delivery()
    assert delivery.offer(final(0)) == [final(0)]
    assert delivery.offer(final(2)) == []
    assert delivery.needs_catch_up
    assert delivery.next_result_id == 1


def test_catch_up_replay_fills_the_gap_without_duplicates() -> None:
    """After a gap, replaying the stream from the start delivers the missing finals once."""
    delivery = Delivery()
    live = offer_all(delivery, [final(0), final(2)])
    replay = offer_all(delivery, [final(0), final(1), final(2)])
    assert live + replay == [final(0), final(1), final(2)]


def test_resume_starts_after_last_result_id() -> None:
    """A Delivery made for a resume skips finals the client already has."""
    delivery = Delivery(next_result_id=2)
    assert offer_all(delivery, [final(0), final(1), final(2)]) == [final(2)]


def test_interim_for_the_open_result_is_delivered_each_time() -> None:
    """Interims with the next result_id pass through, every revision of them."""
    delivery = Delivery()
    first, second = interim(0, "hel"), interim(0, "hello")
    assert offer_all(delivery, [first, second]) == [first, second]
    assert delivery.next_result_id == 0  # interims consume nothing


def test_interims_for_other_result_ids_are_dropped() -> None:
    """Interims for an already-final result or a later one are dropped without catch-up."""
    delivery = Delivery()
    delivery.offer(final(0))
    assert delivery.offer(interim(0)) == []  # stale: its final was already sent
    assert delivery.offer(interim(2)) == []  # ahead of the open utterance
    assert delivery.offer(interim(1)) == [interim(1)]
    assert not delivery.needs_catch_up


def test_no_interims_when_client_asked_for_none() -> None:
    """With interim_results=False no interim is ever forwarded, finals still are."""
    delivery = Delivery(interim_results=False)
    assert offer_all(delivery, [interim(0), final(0), interim(1)]) == [final(0)]


def test_closed_after_all_finals_is_delivered_and_ends_delivery() -> None:
    """session.closed with final_results == finals sent is forwarded and sets done."""
    delivery = Delivery()
    offer_all(delivery, [final(0), final(1)])
    assert delivery.offer(closed(2)) == [closed(2)]
    assert delivery.done


def test_closed_with_no_finals_is_delivered_at_once() -> None:
    """A session that produced no finals closes immediately."""
    delivery = Delivery()
    assert delivery.offer(closed(0)) == [closed(0)]
    assert delivery.done


def test_closed_before_its_finals_waits_and_asks_for_catch_up() -> None:
    """session.closed arriving before all finals is held and sets needs_catch_up."""
    delivery = Delivery()
    delivery.offer(final(0))
    assert delivery.offer(closed(3)) == []
    assert delivery.needs_catch_up
    assert not delivery.done
    assert delivery.closed == closed(3)


def test_held_closed_follows_the_last_missing_final() -> None:
    """Once the missing finals arrive, the held session.closed comes right after the last one."""
    delivery = Delivery()
    delivery.offer(closed(2))
    assert delivery.offer(final(0)) == [final(0)]
    assert delivery.offer(final(1)) == [final(1), closed(2)]
    assert delivery.done


def test_nothing_is_delivered_after_done() -> None:
    """After the closing summary, finals, interims and repeated summaries are all dropped."""
    delivery = Delivery()
    offer_all(delivery, [final(0), closed(1)])
    assert offer_all(delivery, [final(1), interim(1), final(0), closed(1), closed(2)]) == []
    assert delivery.done


def test_not_done_before_closed() -> None:
    """done stays false while only finals have been delivered."""
    delivery = Delivery()
    offer_all(delivery, [final(0), final(1)])
    assert not delivery.done
    assert delivery.closed is None
