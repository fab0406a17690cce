"""`UsageMeter` (gateway/usage.py) with several gateways, lost replies and changing
windows (hypothesis): the fleet's count never goes above the audio really stored, and once
every gateway has synced it is exactly that, per key and window, as each gateway sees it.

Redis is modelled by USAGE_SYNC's rule (shared/scripts.py): per (key, window) hash, a
gateway's field only ever rises, and the reply is the sum of the fields. A sync may lose
its reply after the writes were made (the gateway learns nothing and writes again later).
"""

from __future__ import annotations

from collections import defaultdict

from hypothesis import given
from hypothesis import strategies as st

from gateway.usage import SyncItem, UsageMeter

WINDOW_S = 100
KEYS = ("a", "b")


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


class FakeRedis:
    def __init__(self) -> None:
        self.hashes: dict[tuple[str, int], dict[int, int]] = defaultdict(dict)

    def usage_sync(self, gateway: int, items: list[SyncItem]) -> list[int]:
        out = []
        for item in items:
            fields = self.hashes[(item.key_id, item.window)]
            fields[gateway] = max(fields.get(gateway, 0), item.local_us)
            out.append(sum(fields.values()))
        return out


ops = st.lists(
    st.one_of(
        st.tuples(
            st.just("store"), st.integers(0, 2), st.sampled_from(KEYS), st.integers(1, 10**6)
        ),
        st.tuples(st.just("sync"), st.integers(0, 2), st.booleans()),
        st.tuples(st.just("tick"), st.floats(0, 150)),
        st.tuples(st.just("open"), st.integers(0, 2), st.sampled_from(KEYS)),
    ),
    max_size=60,
)


@given(ops)
def test_the_fleet_count_never_passes_what_was_stored_and_meets_it_once_synced(
    steps: list[tuple[object, ...]],
) -> None:
    clock = Clock()
    meters = [UsageMeter(WINDOW_S, 1.0, clock=clock) for _ in range(3)]
    redis = FakeRedis()
    stored: dict[tuple[str, int], int] = defaultdict(int)  # the truth, per key and window

    def sync(g: int, reply_lost: bool = False) -> None:
        items = meters[g].to_sync()
        totals = redis.usage_sync(g, items)
        if not reply_lost:
            meters[g].synced(items, totals)

    for step in steps:
        if step[0] == "store":
            _, g, key, us = step
            assert isinstance(g, int) and isinstance(key, str) and isinstance(us, int)
            meters[g].stored(key, us)
            stored[(key, meters[g].window())] += us
        elif step[0] == "sync":
            _, g, lost = step
            assert isinstance(g, int) and isinstance(lost, bool)
            sync(g, lost)
        elif step[0] == "tick":
            assert isinstance(step[1], float)
            clock.now += step[1]
        else:
            _, g, key = step
            assert isinstance(g, int) and isinstance(key, str)
            meters[g].opened(key)
        for at, fields in redis.hashes.items():
            assert sum(fields.values()) <= stored[at], "counted more than was stored"

    for g in range(3):  # every gateway syncs; a key read by all of them
        for key in KEYS:
            meters[g].opened(key)
        sync(g)
    for g in range(3):
        sync(g)  # the others' writes, learnt
    window = meters[0].window()
    for at, fields in redis.hashes.items():
        assert sum(fields.values()) == stored[at]
    for g in range(3):
        for key in KEYS:
            assert meters[g].used_us(key) == stored[(key, window)]
