"""Unit tests for the decode scheduling policy (worker/scheduler.py).

The policy (`DecodeQueue`, `InterimPolicy`, `LoadMeter`) runs on an injected fake clock,
with no loop and no thread. The last tests drive the async `Scheduler` shell with a fake
engine that blocks until the test lets it go, to show what actually reaches the engine.
"""

from __future__ import annotations

import asyncio
import queue
import random
import threading

import numpy as np
import pytest

from shared.config import Config
from shared.errors import ConfigError
from worker.engine import Audio, RawWord, Segment
from worker.scheduler import DecodeQueue, InterimPolicy, Job, Kind, LoadMeter, Scheduler
from worker.stream import DecodeRequest


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


POLICY = InterimPolicy(interval_s=1.0, stale_s=1.0, busy_target=0.5, shed_busy=0.9)


def make_queue(policy: InterimPolicy = POLICY) -> tuple[DecodeQueue[str], FakeClock]:
    clock = FakeClock()
    return DecodeQueue(policy, clock, load_window_s=4.0), clock


def run(q: DecodeQueue[str], clock: FakeClock, job: Job[str], cost_s: float) -> None:
    """Decode `job` on the fake engine: it takes `cost_s` of fake time."""
    q.started(job)
    clock.now += cost_s
    q.finished(job)


def pop_payload(q: DecodeQueue[str]) -> str | None:
    job, _dropped = q.pop()
    return None if job is None else job.payload


# --- ordering ----------------------------------------------------------------------------


def test_finals_before_interims_oldest_first() -> None:
    """Finals leave the queue before any interim, and each kind in arrival order."""
    q, _ = make_queue()
    q.push("interim", "a", "interim-a")
    q.push("final", "b", "final-b")
    q.push("interim", "c", "interim-c")
    q.push("final", "d", "final-d")
    assert [pop_payload(q) for _ in range(5)] == [
        "final-b",
        "final-d",
        "interim-a",
        "interim-c",
        None,
    ]


def test_no_interim_while_a_final_waits() -> None:
    """However long an interim has waited, a final queued after it is served first."""
    q, clock = make_queue()
    q.push("interim", "a", "interim-a")
    clock.now += 0.5
    q.push("final", "b", "final-b")
    job, dropped = q.pop()
    assert job is not None and job.kind == "final" and dropped == []
    assert q.finals_waiting == 0


# --- stale interims ----------------------------------------------------------------------


def test_stale_interim_dropped_final_never() -> None:
    """An interim that waited longer than stale_s is dropped undecoded; a final that waited
    as long is still decoded."""
    q, clock = make_queue()
    q.push("interim", "a", "interim-a")
    q.push("final", "b", "final-b")
    clock.now += POLICY.stale_s + 0.01
    job, dropped = q.pop()
    assert job is not None and job.payload == "final-b"
    job, dropped = q.pop()
    assert job is None
    assert [d.payload for d in dropped] == ["interim-a"]
    assert q.counters.interim_stale == 1 and q.counters.interim_shed == 0


def test_fresh_interim_on_idle_engine_is_decoded() -> None:
    """On an idle engine a session's first interim is decoded at once."""
    q, _ = make_queue()
    q.push("interim", "a", "interim-a")
    assert pop_payload(q) == "interim-a"


# --- load ----------------------------------------------------------------------------------


def test_load_meter_counts_finished_and_running_decodes_in_the_window() -> None:
    """Busy fraction = decoding time inside the last window, the running decode included."""
    meter = LoadMeter(window_s=4.0)
    meter.started(100.0)
    meter.finished(101.0)  # 1 s busy
    assert meter.busy_fraction(102.0) == pytest.approx(0.25)
    meter.started(103.0)
    assert meter.busy_fraction(104.0) == pytest.approx(0.5)  # 1 s done + 1 s running
    meter.finished(104.0)
    # At 106 the window is [102, 106]: the first decode has left it.
    assert meter.busy_fraction(106.0) == pytest.approx(0.25)
    assert meter.busy_fraction(200.0) == 0.0
    with pytest.raises(RuntimeError):
        meter.finished(201.0)


def test_load_meter_matches_a_full_recount_over_many_overlapping_decodes() -> None:
    """The meter keeps a running total and scans only the window's edge; it must read the
    same as summing every span's overlap with the window, with decodes of any length
    finishing out of order on two threads."""
    rng = random.Random(3)
    meter = LoadMeter(window_s=2.0, capacity=2)
    spans: list[tuple[float, float]] = []
    running: list[float] = []
    now = 0.0
    for _ in range(2000):
        now += rng.choice([0.001, 0.01, 0.1, 0.7])
        if len(running) < 2 and rng.random() < 0.6:
            running.append(meter.started(now))
        elif running:
            start = running.pop(rng.randrange(len(running)))
            meter.finished(now, start)
            spans.append((start, now))
        lo = now - 2.0
        want = sum(max(0.0, min(end, now) - max(start, lo)) for start, end in spans)
        want += sum(now - max(start, lo) for start in running)
        assert meter.busy_fraction(now) == pytest.approx(min(1.0, want / 4.0), abs=1e-9)


def test_load_meter_mean_call_is_over_the_calls_that_ended_in_the_window() -> None:
    """The mean duration of the engine calls that ended in the last window; None before
    any, and again once they have all left the window."""
    meter = LoadMeter(window_s=4.0, capacity=2)
    assert meter.mean_call_s(100.0) is None
    for start, end in ((100.0, 100.2), (100.1, 100.5), (103.0, 103.3)):
        meter.started(start)
        meter.finished(end, start)
    assert meter.mean_call_s(103.5) == pytest.approx(0.3)  # (0.2 + 0.4 + 0.3) / 3
    assert meter.mean_call_s(104.3) == pytest.approx(0.35)  # the first ended 4.1 s ago
    assert meter.mean_call_s(107.3) is None


def test_load_meter_refuses_two_decodes_at_once() -> None:
    """One engine thread runs one decode: a second start without a finish is a bug."""
    meter = LoadMeter()
    meter.started(1.0)
    with pytest.raises(RuntimeError):
        meter.started(1.5)


def test_load_meter_with_two_decode_threads_measures_the_share_of_both() -> None:
    """Capacity 2: one decode running all window long is half the capacity, two are all of
    it, a third at once is a bug; decodes may finish in any order."""
    meter = LoadMeter(window_s=4.0, capacity=2)
    a = meter.started(100.0)
    assert meter.busy_fraction(104.0) == pytest.approx(0.5)
    b = meter.started(104.0)
    with pytest.raises(RuntimeError):
        meter.started(104.5)
    assert meter.busy_fraction(106.0) == pytest.approx((4.0 + 2.0) / 8.0)
    meter.finished(107.0, b)  # the later one ends first
    meter.finished(108.0, a)
    # Window [104, 108]: a ran all of it, b 3 s of it.
    assert meter.busy_fraction(108.0) == pytest.approx((4.0 + 3.0) / 8.0)
    assert meter.busy_fraction(200.0) == 0.0
    with pytest.raises(ValueError):
        LoadMeter(capacity=0)


def test_spacing_grows_with_load_and_sheds_at_the_top() -> None:
    """Full rate up to busy_target, spacing (1-target)/(1-busy) times longer above it,
    no interims from shed_busy on."""
    assert POLICY.spacing_s(0.0) == 1.0
    assert POLICY.spacing_s(0.5) == 1.0
    assert POLICY.spacing_s(0.75) == pytest.approx(2.0)
    assert POLICY.spacing_s(0.8) == pytest.approx(2.5)
    assert POLICY.spacing_s(0.9) is None
    assert POLICY.spacing_s(1.0) is None
    spacings = [POLICY.spacing_s(b / 100) for b in range(50, 90)]
    known = [s for s in spacings if s is not None]
    assert len(known) == len(spacings)
    assert known == sorted(known)  # never shorter when busier


def test_target_one_turns_adaptation_off() -> None:
    """busy_target = 1: interims every interval whatever the load (stale drop only)."""
    off = InterimPolicy(busy_target=1.0, shed_busy=1.0)
    assert not off.adaptive
    assert {off.spacing_s(b) for b in (0.0, 0.5, 0.95, 1.0)} == {off.interval_s}


@pytest.mark.parametrize(
    ("target", "shed"), [(0.0, 0.9), (0.6, 0.5), (0.5, 1.5), (-0.1, 0.5), (1.2, 1.2)]
)
def test_policy_rejects_bad_thresholds(target: float, shed: float) -> None:
    """Thresholds must satisfy 0 < busy_target <= shed_busy <= 1."""
    with pytest.raises(ValueError):
        InterimPolicy(busy_target=target, shed_busy=shed)


def test_config_checks_the_thresholds_and_names_both_settings() -> None:
    """The worker's config refuses target > shed, naming both flags."""
    with pytest.raises(ConfigError) as info:
        Config(interim_busy_target=0.95, interim_shed_busy=0.9)
    assert "--interim-busy-target" in str(info.value)
    assert "--interim-shed-busy" in str(info.value)
    assert Config().interim_busy_target < Config().interim_shed_busy


def make_busy(q: DecodeQueue[str], clock: FakeClock, fraction: float, seconds: int = 4) -> None:
    """Keep the engine busy `fraction` of each second with finals, for `seconds` seconds
    (4 s fill the whole load window)."""
    for _ in range(seconds):
        q.push("final", "other", "f")
        job, _ = q.pop()
        assert job is not None
        run(q, clock, job, fraction)
        clock.now += 1 - fraction


def test_interims_spaced_out_when_busy() -> None:
    """At 75% busy a session's interims are two intervals apart, not one."""
    q, clock = make_queue()
    make_busy(q, clock, 0.75)
    assert q.load.busy_fraction(clock.now) == pytest.approx(0.75)
    q.push("interim", "s", "after-one-interval")
    job, dropped = q.pop()
    assert job is None and [d.payload for d in dropped] == ["after-one-interval"]
    assert q.counters.interim_shed == 1
    make_busy(q, clock, 0.75, seconds=1)  # one more interval at the same load
    q.push("interim", "s", "after-two-intervals")
    assert pop_payload(q) == "after-two-intervals"


def test_no_interims_when_saturated_but_finals_go_on() -> None:
    """At >= shed_busy every interim is dropped; every final is still decoded."""
    q, clock = make_queue()
    make_busy(q, clock, 0.95)
    q.push("interim", "s", "interim")
    q.push("final", "t", "final")
    assert pop_payload(q) == "final"
    job, dropped = q.pop()
    assert job is None and [d.payload for d in dropped] == ["interim"]


def busy_pair(
    policy: InterimPolicy, fraction: float, call_s: float = 0.2
) -> tuple[DecodeQueue[str], FakeClock]:
    """A queue with two decode threads, both busy `fraction` of each second for the whole
    4 s load window (finals of another session, in calls of `call_s`), and now idle."""
    clock = FakeClock()
    q: DecodeQueue[str] = DecodeQueue(policy, clock, load_window_s=4.0, concurrency=2)
    calls = round(fraction / call_s)
    for _ in range(4):
        for _ in range(calls):
            q.push("final", "other", "f1")
            q.push("final", "other", "f2")
            jobs = [q.pop()[0], q.pop()[0]]
            for job in jobs:
                assert job is not None
                q.started(job)
            clock.now += call_s
            for job in jobs:
                assert job is not None
                q.finished(job)
        clock.now += 1 - calls * call_s
    return q, clock


FLOOR = InterimPolicy(busy_target=0.5, shed_busy=0.7, floor_s=3.0, floor_busy=0.9)


def test_the_worker_policy_follows_its_config() -> None:
    """Every interim setting reaches the policy; the floor is on by default (3 s, for
    engines whose calls take at most 0.4 s)."""
    default = InterimPolicy.from_config(Config())
    assert (default.floor_s, default.floor_busy, default.floor_max_call_s) == (3.0, 0.9, 0.4)
    policy = InterimPolicy.from_config(
        Config(
            interim_interval_s=2.0,
            interim_busy_target=0.4,
            interim_shed_busy=0.6,
            interim_floor_s=5.0,
            interim_floor_busy=0.8,
            interim_floor_max_call_s=0.3,
        )
    )
    assert policy == InterimPolicy(
        interval_s=2.0,
        stale_s=2.0,
        busy_target=0.4,
        shed_busy=0.6,
        floor_s=5.0,
        floor_busy=0.8,
        floor_max_call_s=0.3,
    )


def test_interim_floor_edges_on_the_policy_itself() -> None:
    """floor_s is inclusive, floor_busy exclusive, floor_max_call_s inclusive; with no
    call ended lately (None) the call limit does not hold the floor back."""
    assert FLOOR.floor_due(3.0, 0.89, 0.4)
    assert not FLOOR.floor_due(2.99, 0.89, 0.4)
    assert not FLOOR.floor_due(3.0, 0.9, 0.4)
    assert not FLOOR.floor_due(3.0, 0.89, 0.41)
    assert FLOOR.floor_due(3.0, 0.89, None)


def test_interim_floor_waits_out_long_engine_calls() -> None:
    """With the engine's calls longer than floor_max_call_s on average (a slow model) the
    floor does not run, at the same load where short calls let it; the limit itself is
    allowed, and a limit that is not positive is refused."""
    slow, _ = busy_pair(FLOOR, 0.8, call_s=0.8)
    assert slow.load.mean_call_s(slow.clock()) == pytest.approx(0.8)
    slow.push("interim", "long", "unseen 10", unseen_s=10.0)
    assert slow.pop()[0] is None and slow.counters.interim_floor == 0
    edge, _ = busy_pair(FLOOR, 0.8, call_s=0.4)
    edge.push("interim", "long", "unseen 10", unseen_s=10.0)
    assert edge.pop()[0] is not None and edge.counters.interim_floor == 1
    with pytest.raises(ValueError):
        InterimPolicy(floor_max_call_s=0.0)
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ConfigError) as info:
            Config(interim_floor_max_call_s=bad)
        assert "--interim-floor-max-call-s" in str(info.value)


def test_interim_floor_serves_an_utterance_long_without_text_while_there_is_room() -> None:
    """Above shed_busy an interim still runs when its utterance has gone floor_s of audio
    without text on screen and the engine is under floor_busy; with less unseen audio it
    is shed."""
    q, clock = busy_pair(FLOOR, 0.8)
    assert q.load.busy_fraction(clock.now) == pytest.approx(0.8)
    q.push("interim", "short", "unseen 2.9", unseen_s=2.9)
    q.push("interim", "long", "unseen 3.0", unseen_s=3.0)
    job, dropped = q.pop()
    assert job is not None and job.payload == "unseen 3.0"
    assert [d.payload for d in dropped] == ["unseen 2.9"]
    assert (q.counters.interim_floor, q.counters.interim_shed) == (1, 1)
    assert q.pop() == (None, [])


def test_interim_floor_stops_at_floor_busy_and_zero_turns_it_off() -> None:
    """From floor_busy on finals have the engine alone, however long an utterance went
    without text; floor_s 0 turns the floor off."""
    full, _ = busy_pair(FLOOR, 0.95, call_s=0.19)
    full.push("interim", "long", "unseen 10", unseen_s=10.0)
    job, dropped = full.pop()
    assert job is None and [d.payload for d in dropped] == ["unseen 10"]

    off, _ = busy_pair(InterimPolicy(busy_target=0.5, shed_busy=0.7, floor_s=0.0), 0.8)
    off.push("interim", "long", "unseen 10", unseen_s=10.0)
    assert off.pop()[0] is None and off.counters.interim_floor == 0


@pytest.mark.parametrize(
    "floor_s, floor_busy", [(-1.0, 0.9), (float("nan"), 0.9), (3.0, 0.0), (3.0, 1.1)]
)
def test_policy_and_config_refuse_a_bad_floor(floor_s: float, floor_busy: float) -> None:
    """floor_s must be >= 0 and finite, floor_busy in (0, 1]; the config names the flag."""
    with pytest.raises(ValueError):
        InterimPolicy(floor_s=floor_s, floor_busy=floor_busy)
    with pytest.raises(ConfigError) as info:
        Config(interim_floor_s=floor_s, interim_floor_busy=floor_busy)
    assert "--interim-floor-" in str(info.value)
    InterimPolicy(floor_s=0.0, floor_busy=1.0)  # the edges themselves are allowed
    Config(interim_floor_s=0.0, interim_floor_busy=1.0)


def simulate(
    q: DecodeQueue[str],
    clock: FakeClock,
    *,
    sessions: int,
    seconds: int,
    final_every_s: float,
    decode_s: float,
) -> tuple[dict[str, int], list[str]]:
    """A fake worker in fake time: every session asks for an interim each interval (when it
    has none queued) and for a final every `final_every_s`; the engine takes `decode_s` per
    decode. Returns interims decoded per session and the finals in decode order."""
    interims = {f"s{i}": 0 for i in range(sessions)}
    finals: list[str] = []
    asked_at = dict.fromkeys(interims, -1.0)
    next_final = dict.fromkeys(interims, clock.now + final_every_s)
    waiting: set[str] = set()  # sessions with a request in the queue (one at a time)
    final_no = 0
    end = clock.now + seconds
    steps = 0
    while clock.now < end and steps < 100_000:  # bounded in count and (fake) time
        steps += 1
        for s in interims:
            if s in waiting:
                continue
            if clock.now >= next_final[s]:
                q.push("final", s, f"final-{final_no}")
                final_no += 1
                next_final[s] += final_every_s
                waiting.add(s)
            elif clock.now - asked_at[s] >= POLICY.interval_s:
                q.push("interim", s, s)
                asked_at[s] = clock.now
                waiting.add(s)
        job, dropped = q.pop()
        for d in dropped:
            waiting.discard(d.session)
        if job is None:
            clock.now += 0.05  # idle engine: time passes
            continue
        run(q, clock, job, decode_s)
        waiting.discard(job.session)
        if job.kind == "final":
            finals.append(job.payload)
        else:
            interims[job.session] += 1
    return interims, finals


def test_interim_rate_adapts_to_load_and_finals_are_never_dropped() -> None:
    """With the same sessions, heavier final load means fewer interims per session, and
    every final is decoded, in the order it was asked for."""
    light_q, light_clock = make_queue()
    light, light_finals = simulate(
        light_q, light_clock, sessions=2, seconds=60, final_every_s=5.0, decode_s=0.1
    )
    heavy_q, heavy_clock = make_queue()
    heavy, heavy_finals = simulate(
        heavy_q, heavy_clock, sessions=4, seconds=60, final_every_s=1.5, decode_s=0.3
    )
    # Light: the engine stays under the target; every session gets interims at full rate
    # except while its own final runs.
    assert light_q.counters.interim_shed == 0
    assert min(light.values()) >= 40
    # Heavy: interims were spaced out, not decoded every interval.
    assert heavy_q.counters.interim_shed > 0
    assert max(heavy.values()) < min(light.values())
    for q, finals in ((light_q, light_finals), (heavy_q, heavy_finals)):
        assert finals == sorted(finals, key=lambda f: int(f.split("-")[1]))
        assert q.counters.final == len(finals)
        assert q.finals_waiting <= 4  # one request per session at most


def test_without_adaptation_interims_take_every_free_slot() -> None:
    """The same heavy load with adaptation off decodes more interims (the old behaviour):
    the adaptive policy is what spaced them out."""
    off = InterimPolicy(interval_s=1.0, stale_s=1.0, busy_target=1.0, shed_busy=1.0)
    off_q, off_clock = make_queue(off)
    without, _ = simulate(off_q, off_clock, sessions=4, seconds=60, final_every_s=1.5, decode_s=0.3)
    on_q, on_clock = make_queue()
    with_policy, _ = simulate(
        on_q, on_clock, sessions=4, seconds=60, final_every_s=1.5, decode_s=0.3
    )
    assert off_q.counters.interim_shed == 0
    assert sum(with_policy.values()) < sum(without.values())


def test_forget_clears_a_sessions_history() -> None:
    """After forget(), a session's interim history is gone (bounded memory)."""
    q, _ = make_queue()
    q.push("interim", "s", "x")
    assert pop_payload(q) == "x"
    q.forget("s")
    assert "s" not in q._last_interim


# --- how long finals wait (the worker's claim gate) ----------------------------------------


def test_final_wait_is_zero_on_an_idle_engine() -> None:
    q, clock = make_queue()
    assert q.final_wait_s() == 0.0
    job = q.push("final", "a", "f")
    popped, _ = q.pop()
    assert popped is job
    run(q, clock, job, 0.3)  # decoded the moment it came: no wait
    assert q.final_wait_s() == 0.0


def test_final_wait_counts_a_final_still_in_the_queue() -> None:
    q, clock = make_queue()
    q.push("final", "a", "f")
    clock.now += 1.5
    assert q.final_wait_s() == pytest.approx(1.5)


def test_final_wait_remembers_started_finals_for_one_load_window() -> None:
    """A final that waited 2 s before its decode started counts until the window (4 s)
    has passed since that start, then no longer."""
    q, clock = make_queue()
    job = q.push("final", "a", "f")
    clock.now += 2.0
    popped, _ = q.pop()
    assert popped is job
    run(q, clock, job, 0.5)
    assert q.final_wait_s() == pytest.approx(2.0)
    clock.now += 3.4  # 3.9 s after the decode started
    assert q.final_wait_s() == pytest.approx(2.0)
    clock.now += 0.1  # 4.0 s: out of the window
    assert q.final_wait_s() == 0.0


def test_final_wait_counts_every_final_of_a_shared_call_but_no_interim() -> None:
    """A call that takes several finals (a batch or a pack) counts the longest wait among
    them, the first one's; an interim never counts, however long it waited."""
    q, clock = make_queue()
    old = q.push("final", "a", "f-old")
    clock.now += 1.0
    young = q.push("final", "b", "f-young")
    interim = q.push("interim", "c", "i")
    clock.now += 0.5
    popped, _ = q.pop()
    assert popped is old
    assert q.take_finals(lambda jobs: True, 1) == [young]  # into the same call
    q.started(old, [young])
    assert q.final_wait_s() == pytest.approx(1.5)  # the older final's wait
    clock.now += 0.2
    q.finished(old, 2)
    clock.now += 4.0  # the finals' starts left the window; the interim is still queued
    assert interim in q._heap
    assert q.final_wait_s() == 0.0


# --- the async shell with a fake engine -----------------------------------------------------


class GateEngine:
    """Records each decode and holds it until the test releases it (no sleeps)."""

    name = "gate"
    can_pack = False

    def __init__(self) -> None:
        self.calls: queue.Queue[str] = queue.Queue()
        self.release = threading.Semaphore(0)

    def transcribe(
        self,
        audio: Audio,
        *,
        language: str | None,
        word_timestamps: bool,
        beam_size: int,
        prompt: str | None = None,
    ) -> list[Segment]:
        self.calls.put(prompt or "")
        if not self.release.acquire(timeout=10):
            raise TimeoutError("test never released the decode")
        return [Segment(0.0, 0.1, prompt or "", ())]

    def transcribe_words(
        self, audio: Audio, *, language: str | None, beam_size: int
    ) -> list[RawWord]:
        raise AssertionError("the scheduler policy tests decode no packed windows")

    async def next_call(self) -> str:
        return await asyncio.to_thread(self.calls.get, True, 10)


def request(kind: Kind, tag: str) -> DecodeRequest:
    return DecodeRequest(kind, 0, 1600, np.zeros(1600, np.float32), 0, prompt=tag)


async def test_scheduler_runs_waiting_final_before_waiting_interims() -> None:
    """While the engine decodes, a final and an interim arrive: the final runs next, the
    interim only after it, and each caller gets its own result."""
    engine = GateEngine()
    policy = InterimPolicy(interval_s=60.0, stale_s=60.0)  # nothing goes stale in this test
    sched = Scheduler(engine, beam_size=1, policy=policy)
    sched.start()
    try:
        first = asyncio.ensure_future(sched.decode(request("interim", "i1"), "en", session="a"))
        assert await engine.next_call() == "i1"
        late_interim = asyncio.ensure_future(
            sched.decode(request("interim", "i2"), "en", session="b")
        )
        final = asyncio.ensure_future(sched.decode(request("final", "f1"), "en", session="c"))
        await asyncio.sleep(0)  # let both reach the queue (ordering, not timing)
        assert sched.queued == 2
        engine.release.release()
        assert await engine.next_call() == "f1"
        engine.release.release()
        assert await engine.next_call() == "i2"
        engine.release.release()
        results = await asyncio.wait_for(asyncio.gather(first, final, late_interim), 10)
        assert [r[0].text if r else None for r in results] == ["i1", "f1", "i2"]
        assert sched.counters.final == 1 and sched.counters.interim == 2
    finally:
        await sched.close()


async def test_scheduler_answers_a_dropped_interim_with_none() -> None:
    """An interim shed under load reaches no engine and its caller gets None."""
    engine = GateEngine()
    clock = FakeClock()
    sched = Scheduler(engine, beam_size=1, policy=POLICY, clock=clock)
    sched.start()
    try:
        final = asyncio.ensure_future(sched.decode(request("final", "f1"), "en", session="a"))
        assert await engine.next_call() == "f1"
        clock.now += 10.0  # the final has kept the engine busy for the whole window
        interim = asyncio.ensure_future(sched.decode(request("interim", "i1"), "en", session="b"))
        await asyncio.sleep(0)
        engine.release.release()
        assert (await asyncio.wait_for(final, 10)) is not None
        assert await asyncio.wait_for(interim, 10) is None
        assert engine.calls.empty()
        assert sched.counters.interim_shed == 1
    finally:
        await sched.close()


async def test_two_decode_threads_run_two_decodes_at_once_and_no_third() -> None:
    """concurrency=2: two finals are in the engine together; a third waits in the queue
    until one of them is done."""
    engine = GateEngine()
    policy = InterimPolicy(interval_s=60.0, stale_s=60.0)
    sched = Scheduler(engine, beam_size=1, policy=policy, concurrency=2)
    sched.start()
    try:
        jobs = [
            asyncio.ensure_future(sched.decode(request("final", f"f{i}"), "en", session=f"s{i}"))
            for i in range(3)
        ]
        started = {await engine.next_call(), await engine.next_call()}
        assert started == {"f0", "f1"}  # both in the engine, neither released yet
        assert sched.queued == 1 and engine.calls.empty()
        engine.release.release()
        assert await engine.next_call() == "f2"
        engine.release.release()
        engine.release.release()
        results = await asyncio.wait_for(asyncio.gather(*jobs), 10)
        assert sorted(r[0].text for r in results if r) == ["f0", "f1", "f2"]
        assert sched.counters.final == 3
    finally:
        await sched.close()


def test_withdrawing_takes_only_that_sessions_queued_interims() -> None:
    """Withdrawing a session's interims takes every one of its queued interims (counted
    once), and nothing of another session's or any final."""
    q, _ = make_queue()
    q.push("interim", "a", "a-i1")
    q.push("interim", "b", "b-i1")
    q.push("final", "b", "b-f1")
    q.push("interim", "a", "a-i2")
    gone = q.withdraw_interims("a")
    assert [j.payload for j in gone] == ["a-i1", "a-i2"]
    assert q.counters.interim_withdrawn == 2
    assert q.withdraw_interims("a") == [] and q.counters.interim_withdrawn == 2
    assert [pop_payload(q), pop_payload(q), pop_payload(q)] == ["b-f1", "b-i1", None]


async def test_scheduler_answers_a_withdrawn_interim_with_none_and_never_decodes_it() -> None:
    """A session's interim still queued behind another decode is withdrawn at once (its
    final is due); one already in the engine is not, and comes back as usual."""
    engine = GateEngine()
    policy = InterimPolicy(interval_s=60.0, stale_s=60.0)
    sched = Scheduler(engine, beam_size=1, policy=policy)
    sched.start()
    try:
        running = asyncio.ensure_future(sched.decode(request("interim", "b-i1"), "en", session="b"))
        assert await engine.next_call() == "b-i1"
        queued = asyncio.ensure_future(sched.decode(request("interim", "a-i1"), "en", session="a"))
        await asyncio.sleep(0)  # it reaches the queue (ordering, not timing)
        assert sched.queued == 1
        assert sched.withdraw_interim("a")
        assert await asyncio.wait_for(queued, 10) is None  # answered before any release
        assert not sched.withdraw_interim("b")  # in the engine: it runs to the end
        engine.release.release()
        result = await asyncio.wait_for(running, 10)
        assert result is not None and result[0].text == "b-i1"
        assert engine.calls.empty() and sched.queued == 0
        assert (sched.counters.interim, sched.counters.interim_withdrawn) == (1, 1)
    finally:
        await sched.close()


def test_scheduler_refuses_no_decode_threads() -> None:
    with pytest.raises(ValueError):
        Scheduler(GateEngine(), beam_size=1, policy=POLICY, concurrency=0)


# --- latency histograms (the worker's /metrics) --------------------------------------------


def test_timings_observe_each_call_by_kind_and_each_finals_first_wait() -> None:
    """An engine call is timed once, start to end, under its first job's kind (a shared
    call of three finals is one call); every final in it has its own queue wait; an
    interim's wait is not timed; a final put back to go alone (a pack's retry) is not
    counted twice."""
    q, clock = make_queue(InterimPolicy(60.0, 60.0, busy_target=1.0, shed_busy=1.0))
    t = q.timings
    a = q.push("final", "a", "fa")
    clock.now += 0.25
    b = q.push("final", "b", "fb")
    c = q.push("final", "c", "fc")
    i = q.push("interim", "d", "i")
    clock.now += 0.5
    popped, _ = q.pop()
    assert popped is a
    assert q.take_finals(lambda jobs: True, 2) == [b, c]
    q.started(a, [b, c])
    clock.now += 2.0
    q.finished(a, 3)
    assert t.engine_call["final"].count == 1 and t.engine_call["final"].sum == 2.0
    assert t.final_queue_wait.count == 3
    assert t.final_queue_wait.sum == pytest.approx(0.75 + 0.5 + 0.5)
    q.requeue_first([c])  # c could not be placed: decoded again alone, counted once
    popped, _ = q.pop()
    assert popped is c and c.alone
    run(q, clock, c, 0.125)
    assert t.engine_call["final"].count == 2
    assert t.engine_call["final"].sum == pytest.approx(2.125)
    assert t.final_queue_wait.count == 3
    popped, _ = q.pop()
    assert popped is i
    run(q, clock, i, 0.0625)
    assert t.engine_call["interim"].count == 1 and t.engine_call["interim"].sum == 0.0625
    assert t.final_queue_wait.count == 3 and t.engine_call["final"].count == 2


async def test_scheduler_times_engine_calls_and_queue_waits_on_its_clock() -> None:
    """Through the async shell with an injected clock: the first final is in the engine
    for 0.3 s of that clock, the second waits those 0.3 s in the queue, then runs 0.5 s;
    the histograms say exactly that (no real time is measured)."""
    engine = GateEngine()
    clock = FakeClock()
    policy = InterimPolicy(interval_s=60.0, stale_s=60.0)
    sched = Scheduler(engine, beam_size=1, policy=policy, clock=clock)
    sched.start()
    try:
        first = asyncio.ensure_future(sched.decode(request("final", "f1"), "en", session="a"))
        assert await engine.next_call() == "f1"
        second = asyncio.ensure_future(sched.decode(request("final", "f2"), "en", session="b"))
        await asyncio.sleep(0)  # it reaches the queue (ordering, not timing)
        assert sched.queued == 1
        clock.now += 0.3
        engine.release.release()
        assert await engine.next_call() == "f2"
        clock.now += 0.5
        engine.release.release()
        await asyncio.wait_for(asyncio.gather(first, second), 10)
        calls, waits = sched.timings.engine_call["final"], sched.timings.final_queue_wait
        assert calls.count == 2 and calls.sum == pytest.approx(0.8)
        assert calls.cumulative()[calls.bounds.index(0.25)][1] == 0  # 0.3 and 0.5 > 0.25
        assert calls.cumulative()[calls.bounds.index(0.5)][1] == 2  # 0.5 is in le=0.5
        assert waits.count == 2 and waits.sum == pytest.approx(0.3)
        assert sched.timings.engine_call["interim"].count == 0
    finally:
        await sched.close()
