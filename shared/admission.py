"""Fleet-wide admission control, sans I/O: queue positions and the 1013 verdict.

Sessions wait for a worker in the dispatch lanes (shared/keys.py: `high`, then `normal`).
A lane's consumer group tells how many entries were ever read (`entries-read`) and how
many are still unread (`lag`); a session knows its entry's place in its lane (the lane's
`entries-added` right after its XADD). So its queue position is

    (its place - entries read in its lane) + unread entries of every higher lane

and no list has to be walked. The gateway (gateway/admission.py) collects the lane
states from Redis and asks the functions below.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from shared.errors import Overloaded
from shared.protocol import PRIORITIES


@dataclass(frozen=True, slots=True)
class LaneState:
    """One dispatch lane as its consumer group sees it."""

    added: int  # entries ever added to the lane
    read: int  # entries ever delivered to a worker
    head_ms: int | None = None  # enqueue time (unix ms) of the oldest unread entry

    @property
    def waiting(self) -> int:
        return max(0, self.added - self.read)


def lanes_at_or_above(priority: str) -> tuple[str, ...]:
    """The priorities served before or together with `priority`, highest first."""
    return PRIORITIES[: PRIORITIES.index(priority) + 1]


def queue_position(priority: str, index: int, lanes: Mapping[str, LaneState]) -> int:
    """1-based place in the fleet's queue of a session whose entry is `index` in its
    lane; 0 once a worker has read the entry (it is being claimed or served)."""
    own = lanes[priority]
    ahead_in_lane = index - own.read
    if ahead_in_lane <= 0:
        return 0
    higher = lanes_at_or_above(priority)[:-1]
    return ahead_in_lane + sum(lanes[p].waiting for p in higher)


def admit(
    priority: str,
    lanes: Mapping[str, LaneState],
    now_ms: int,
    *,
    max_queue_length: int,
    max_queue_wait_s: float,
) -> None:
    """Raise `Overloaded` (1013) when a new session of `priority` must not join the queue:
    the sessions waiting in its lane and above reach `max_queue_length`, or the oldest of
    them has waited `max_queue_wait_s` (the queue is not moving)."""
    relevant = [lanes[p] for p in lanes_at_or_above(priority)]
    waiting = sum(lane.waiting for lane in relevant)
    if waiting >= max_queue_length:
        raise Overloaded(
            f"overloaded: {waiting} sessions are waiting for a worker "
            f"(limit {max_queue_length}); try again later"
        )
    heads = [lane.head_ms for lane in relevant if lane.waiting and lane.head_ms is not None]
    if heads:
        waited_s = (now_ms - min(heads)) / 1000
        if waited_s >= max_queue_wait_s:
            raise Overloaded(
                f"overloaded: the oldest waiting session has waited {waited_s:.0f}s "
                f"(limit {max_queue_wait_s:g}s); try again later"
            )
