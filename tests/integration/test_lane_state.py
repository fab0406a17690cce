"""The gateway's read of the dispatch lanes (gateway/admission.py, scripts.LANE_STATE)
against real Valkey: every shape a lane's consumer group can be in, read in one round
trip, and the 1013 verdicts that rest on it."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis

from gateway.admission import Admission
from shared import keys
from shared.admission import LaneState
from shared.errors import Overloaded
from tests.conftest import make_config

NORMAL = keys.dispatch("normal")
HIGH = keys.dispatch("high")


def admission(redis: aioredis.Redis, redis_url: str, **overrides: object) -> Admission:
    return Admission(redis, make_config(redis_url, **overrides))


async def add(redis: aioredis.Redis, lane: str, n: int) -> list[bytes]:
    return [await redis.xadd(lane, {"m": b"x"}) for _ in range(n)]


def ms(entry_id: bytes) -> int:
    return int(entry_id.split(b"-")[0])


async def read_one(redis: aioredis.Redis, lane: str) -> None:
    await redis.xreadgroup(keys.DISPATCH_GROUP, "w1", {lane: ">"}, count=1)


async def test_lanes_that_do_not_exist_are_empty(redis: aioredis.Redis, redis_url: str) -> None:
    lanes = await admission(redis, redis_url).lanes()
    assert lanes == {"high": LaneState(0, 0, None), "normal": LaneState(0, 0, None)}


async def test_without_a_group_every_entry_waits(redis: aioredis.Redis, redis_url: str) -> None:
    ids = await add(redis, NORMAL, 3)
    lanes = await admission(redis, redis_url).lanes()
    assert lanes["normal"] == LaneState(added=3, read=0, head_ms=ms(ids[0]))
    assert lanes["high"] == LaneState(0, 0, None)


async def test_a_group_counts_what_it_read(redis: aioredis.Redis, redis_url: str) -> None:
    ids = await add(redis, NORMAL, 3)
    await redis.xgroup_create(NORMAL, keys.DISPATCH_GROUP, id="0")
    await read_one(redis, NORMAL)
    adm = admission(redis, redis_url)
    assert (await adm.lanes())["normal"] == LaneState(added=3, read=1, head_ms=ms(ids[1]))
    await read_one(redis, NORMAL)
    await read_one(redis, NORMAL)
    assert (await adm.lanes())["normal"] == LaneState(added=3, read=3, head_ms=None)


async def test_a_group_on_an_empty_lane(redis: aioredis.Redis, redis_url: str) -> None:
    await redis.xgroup_create(HIGH, keys.DISPATCH_GROUP, id="0", mkstream=True)
    [group] = await redis.xinfo_groups(HIGH)
    assert group["entries-read"] is None  # Redis cannot tell: the counting branch
    assert (await admission(redis, redis_url).lanes())["high"] == LaneState(0, 0, None)


async def test_before_the_groups_first_read_the_whole_lane_waits(
    redis: aioredis.Redis, redis_url: str
) -> None:
    await redis.xgroup_create(NORMAL, keys.DISPATCH_GROUP, id="0", mkstream=True)
    ids = await add(redis, NORMAL, 3)
    [group] = await redis.xinfo_groups(NORMAL)
    assert group["entries-read"] is None  # what a paused or busy fleet's lane looks like
    adm = admission(redis, redis_url)
    assert (await adm.lanes())["normal"] == LaneState(added=3, read=0, head_ms=ms(ids[0]))
    await read_one(redis, NORMAL)
    assert (await adm.lanes())["normal"] == LaneState(added=3, read=1, head_ms=ms(ids[1]))


async def test_a_long_queue_before_the_first_read_is_counted_whole(
    redis: aioredis.Redis, redis_url: str
) -> None:
    await redis.xgroup_create(NORMAL, keys.DISPATCH_GROUP, id="0", mkstream=True)
    pipe = redis.pipeline(transaction=False)
    for _ in range(10_050):  # past the 10,000 entries the tombstone branch would count
        pipe.xadd(NORMAL, {"m": b"x"})
    await pipe.execute()
    assert (await admission(redis, redis_url).lanes())["normal"].added == 10_050


async def test_unknown_lag_counts_the_unread_entries(redis: aioredis.Redis, redis_url: str) -> None:
    ids = await add(redis, NORMAL, 4)
    await redis.xgroup_create(NORMAL, keys.DISPATCH_GROUP, id="0")
    await read_one(redis, NORMAL)
    await redis.xdel(NORMAL, ids[2])  # deleted out of order, after the group's position
    [group] = await redis.xinfo_groups(NORMAL)
    assert group["lag"] is None  # the branch under test
    lanes = await admission(redis, redis_url).lanes()
    # ids[1] and ids[3] are unread; the count restarts from them.
    assert lanes["normal"] == LaneState(added=2, read=0, head_ms=ms(ids[1]))


async def test_the_script_is_loaded_again_after_a_flush(
    redis: aioredis.Redis, redis_url: str
) -> None:
    adm = admission(redis, redis_url)
    await add(redis, NORMAL, 2)
    assert (await adm.lanes())["normal"].added == 2
    await redis.script_flush()
    await add(redis, NORMAL, 1)
    assert (await adm.lanes())["normal"].added == 3


async def test_check_new_refuses_at_the_queue_length(redis: aioredis.Redis, redis_url: str) -> None:
    adm = admission(redis, redis_url, max_queue_length=3)
    await add(redis, HIGH, 1)
    await add(redis, NORMAL, 1)
    await adm.check_new("normal")  # 2 waiting, limit 3
    await adm.check_new("high")  # only the high lane counts for high
    await add(redis, NORMAL, 1)
    with pytest.raises(Overloaded, match="3 sessions are waiting"):
        await adm.check_new("normal")
    await adm.check_new("high")


async def test_check_new_refuses_when_the_head_waited_too_long(
    redis: aioredis.Redis, redis_url: str
) -> None:
    adm = admission(redis, redis_url, max_queue_wait_s=30)
    seconds, _ = await redis.time()
    now_ms = int(seconds) * 1000
    await redis.xadd(NORMAL, {"m": b"x"}, id=f"{now_ms - 20_000}-0")
    await adm.check_new("normal")  # waited ~20 s of 30: the server's clock is read
    await redis.delete(NORMAL)
    await redis.xadd(NORMAL, {"m": b"x"}, id=f"{now_ms - 40_000}-0")
    with pytest.raises(Overloaded, match=r"has waited 4[01]s"):
        await adm.check_new("normal")
    await adm.check_new("high")  # the normal lane does not hold up high priority
