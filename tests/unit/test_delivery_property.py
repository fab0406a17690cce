"""`Delivery` (shared/delivery.py) against any way pub/sub can fail: whatever subset of a
session's live messages reaches the gateway, duplicated or not, and from whichever
result a resumed connection starts, the client gets each final after its starting point
exactly once, in order, then the closing summary once, last.

The model: a worker publishes, for each result r, some interims of r and then final r,
and at the end the summary; finals and the summary also go to the durable results
stream. Live delivery (pub/sub) loses any message and may repeat one. The gateway's
caller does what gateway/connection.py does: it offers each live message, and whenever
`needs_catch_up` is set it re-reads the stream as published so far from
`next_result_id`; at the end the reconcile timer's re-read runs once more.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from shared.delivery import Delivery, Result
from shared.envelope import Closed, Transcript


def final(rid: int) -> Transcript:
    return Transcript(rid, True, float(rid), float(rid) + 1, f"final {rid}")


def interim(rid: int, n: int) -> Transcript:
    return Transcript(rid, False, float(rid), float(rid) + 0.5, f"interim {rid}.{n}")


@st.composite
def sessions(draw: st.DrawFn) -> tuple[list[Result], list[int], int, bool]:
    """(everything published in order, how often each arrives live (0: lost), the
    result a resumed connection starts from, whether interims are asked for)."""
    finals = draw(st.integers(0, 8))
    published: list[Result] = []
    for r in range(finals):
        published += [interim(r, n) for n in range(draw(st.integers(0, 3)))]
        published.append(final(r))
    published.append(Closed("client_closed", float(finals), finals))
    copies = draw(st.lists(st.sampled_from([0, 1, 1, 1, 2]), min_size=len(published)))
    start = draw(st.integers(0, finals))
    return published, copies[: len(published)], start, draw(st.booleans())


def stream_until(published: list[Result], upto: int, after: int) -> list[Result]:
    """The durable results stream as published up to index `upto`, from result `after`."""
    return [
        item
        for item in published[: upto + 1]
        if isinstance(item, Closed) or (item.is_final and item.result_id >= after)
    ]


@given(sessions())
def test_each_final_once_in_order_then_the_summary_whatever_pubsub_loses(
    case: tuple[list[Result], list[int], int, bool],
) -> None:
    published, copies, start, interims = case
    delivery = Delivery(next_result_id=start, interim_results=interims)
    sent: list[Result] = []

    def offer(item: Result) -> None:
        sent.extend(delivery.offer(item))
        while delivery.needs_catch_up:
            delivery.needs_catch_up = False
            for replayed in stream_until(published, i, delivery.next_result_id):
                sent.extend(delivery.offer(replayed))

    for i, item in enumerate(published):
        for _ in range(copies[i]):
            offer(item)
    i = len(published) - 1
    for replayed in stream_until(published, i, delivery.next_result_id):  # reconcile
        sent.extend(delivery.offer(replayed))

    finals = [t.result_id for t in sent if isinstance(t, Transcript) and t.is_final]
    total = published[-1].final_results if isinstance(published[-1], Closed) else -1
    assert finals == list(range(start, total))
    assert isinstance(sent[-1], Closed) and sum(isinstance(t, Closed) for t in sent) == 1
    assert delivery.done
    delivered = start
    for item in sent:
        if isinstance(item, Transcript) and item.is_final:
            delivered += 1
        elif isinstance(item, Transcript):
            assert interims, "an interim went to a client that asked for none"
            assert item.result_id == delivered, "an interim of a result already final"
