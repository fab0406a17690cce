"""The fault scenarios of issue 3, shared by tests/faults (small) and bench/faults.py (more
sessions). Each starts its own topology on an unstarted `Cluster`, streams real clips at
real-time pace through real gateways to real workers, injects its fault mid-session, waits
for every session to end and returns what the invariant checks found."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import statistics
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from shared import keys
from shared.envelope import Transcript
from shared.keys import SessionId, WorkerId
from tests.faults.harness import Cluster, TcpProxy, ValkeyServer, now_ms, wait_for
from tests.faults.invariants import (
    SessionVerdict,
    check_fencing,
    check_session,
    read_results,
)
from tests.faults.recording import ClientRun, Observers, drive, load_clips

CLIPS = ("s1", "s2", "s3", "s4", "s5", "s6")
FAULT_AT_FRAMES = 30  # inject faults after 3 s of audio (clips are about 7 s)
SESSION_TIMEOUT_S = 90.0


@dataclass
class ScenarioResult:
    name: str
    fault: str
    sessions: int = 0
    faults: int = 0
    verdicts: list[SessionVerdict] = field(default_factory=list)
    takeover_ms: list[int] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    texts: dict[str, str] = field(default_factory=dict)  # session id -> final transcript
    acked_frames_lost: int = 0  # acknowledged by a gateway, then missing from Redis

    @property
    def ok(self) -> bool:
        return not self.problems and all(v.ok for v in self.verdicts)

    def report(self) -> str:
        lines = [f"{self.name}: {self.fault}; {self.sessions} sessions, {self.faults} faults"]
        lines += [f"  problem: {p}" for p in self.problems]
        for v in self.verdicts:
            wer = "-" if v.wer_vs_clean is None else f"{v.wer_vs_clean:.3f}"
            status = "ok" if v.ok else "FAIL " + "; ".join(v.problems)
            lines.append(
                f"  {v.name} {v.session_id[:8]}: frames {v.frames_sent} stored "
                f"{v.frames_stored} finals {v.finals} reconnects {v.reconnects} wer {wer} {status}"
            )
        if self.takeover_ms:
            lines.append(f"  takeover ms: {self.takeover_ms}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    @property
    def takeover_median_ms(self) -> float | None:
        return statistics.median(self.takeover_ms) if self.takeover_ms else None


class Stage:
    """Sessions streaming through a cluster, with the recorders watching Redis."""

    def __init__(self, cluster: Cluster, clean: Mapping[str, str], sessions: int) -> None:
        self.cluster = cluster
        self.clean = clean
        self.redis: aioredis.Redis = cluster.redis()
        self.observers = Observers(cluster.redis_url)
        self.runs: list[ClientRun] = [
            load_clips(f"{CLIPS[i % len(CLIPS)]}#{i}", [CLIPS[i % len(CLIPS)]])
            for i in range(sessions)
        ]
        self.tasks: list[asyncio.Task[ClientRun]] = []

    async def __aenter__(self) -> Stage:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def start(
        self, urls: Callable[[int], Sequence[str]], *, pace: float = 1.0, **options: Any
    ) -> None:
        await self.observers.start()
        self.tasks = [
            asyncio.create_task(
                drive(r, urls(i), pace=pace, on_started=self.observers.on_started, **options)
            )
            for i, r in enumerate(self.runs)
        ]
        await self.all_sent(1)

    async def all_sent(self, frames: int) -> None:
        """Until every session has handed `frames` frames to the SDK (or ended)."""
        waits = [asyncio.ensure_future(r.after_frames(frames).wait()) for r in self.runs]
        try:
            async with asyncio.timeout(SESSION_TIMEOUT_S):
                for waiter, task in zip(waits, self.tasks, strict=True):
                    await asyncio.wait([waiter, task], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waits:
                waiter.cancel()

    async def finish(self, result: ScenarioResult, *, require_epochs: bool = False) -> None:
        """Wait for every session to end, then check each one against its clean run.
        `require_epochs`: every transcript must name its owner's epoch (the scenarios
        where owners change rely on it to check fencing)."""
        async with asyncio.timeout(SESSION_TIMEOUT_S):
            await asyncio.gather(*self.tasks)
        for r in self.runs:
            audio = self.observers.audio.get(r.session_id)
            if audio is not None:  # the close mark may still be on its way
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(5):
                        await audio.closed.wait()
            clean = self.clean.get(r.clips[0])
            result.verdicts.append(await check_session(self.redis, r, audio, clean))
            result.texts[r.session_id] = r.text
            entries = await read_results(self.redis, r.session_id)
            events = self.observers.events.for_session(r.session_id)
            fencing = check_fencing(events, entries, require_epochs=require_epochs)
            result.problems += [f"{r.name}: {p}" for p in fencing]
        result.sessions = len(self.runs)
        epochs = [int((await self.meta(r.session_id, "epoch"))[0] or 0) for r in self.runs]
        reclaimed = sum(1 for e in epochs if e > 1)
        if reclaimed:
            result.notes.append(f"{reclaimed} session(s) changed owner (final epochs {epochs})")

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.observers.stop()
        await self.redis.aclose()

    async def meta(self, sid: str, *names: str) -> list[str]:
        values = await cast(
            Awaitable[list[bytes | None]],
            self.redis.hmget(keys.meta(SessionId(sid)), list(names)),
        )
        return [v.decode() if v is not None else "" for v in values]

    async def owners(self) -> dict[str, tuple[str, int]]:
        """session id -> (owner worker id, epoch), once every session is owned."""

        async def probe() -> dict[str, tuple[str, int]] | None:
            out: dict[str, tuple[str, int]] = {}
            for r in self.runs:
                owner, epoch = await self.meta(r.session_id, "owner", "epoch")
                if not owner:
                    return None
                out[r.session_id] = (owner, int(epoch))
            return out

        return cast(dict[str, tuple[str, int]], await wait_for(probe, "every session owned"))

    async def wait_takeover(self, sid: str, old_epoch: int, timeout_s: float = 60.0) -> int:
        """Until a newer owner has claimed `sid`; returns its `claimed_ms`."""

        async def probe() -> int | None:
            epoch, claimed, state = await self.meta(sid, "epoch", "claimed_ms", "state")
            if int(epoch or 0) > old_epoch:
                return int(claimed or 0) or -1
            if state == "closed":
                raise AssertionError(f"session {sid[:8]} closed without a takeover")
            return None

        claimed = cast(int, await wait_for(probe, f"takeover of {sid[:8]}", timeout_s=timeout_s))
        if claimed == -1:
            raise AssertionError("the meta hash has no claimed_ms after a takeover")
        return claimed


async def clean_run(cluster: Cluster, clips: Sequence[str] = CLIPS) -> dict[str, str]:
    """The no-fault transcript of each clip through one worker and one gateway (streamed
    as fast as acknowledged: the finals depend on the audio only, not on its pace)."""
    try:
        await cluster.start_async(workers=1, gateways=1, slots=len(clips))
        runs = [load_clips(clip, [clip]) for clip in clips]
        await asyncio.gather(*(drive(r, cluster.gateway_urls(), pace=0) for r in runs))
        for r in runs:
            if r.error or r.closed is None:
                raise RuntimeError(f"no-fault run of {r.name} failed: {r.error}\n{cluster.logs()}")
        return {r.name: r.text for r in runs}
    finally:
        cluster.close()


# --- 1. worker SIGKILL ---------------------------------------------------------------------


async def worker_kill(
    cluster: Cluster, clean: Mapping[str, str], *, sessions: int = 4, workers: int = 2
) -> ScenarioResult:
    """SIGKILL the worker owning the most sessions mid-session; others take over."""
    result = ScenarioResult("worker SIGKILL", "SIGKILL of the busiest worker mid-session")
    slots = max(2, -(-sessions // (workers - 1)))  # the survivors can hold every session
    await cluster.start_async(workers=workers, gateways=1, slots=slots)
    async with Stage(cluster, clean, sessions) as stage:
        await stage.start(lambda i: cluster.gateway_urls())
        await stage.all_sent(FAULT_AT_FRAMES)
        owners = await stage.owners()
        victim = Counter(o for o, _ in owners.values()).most_common(1)[0][0]
        kill_ms = await asyncio.to_thread(cluster.workers[victim].kill)
        result.faults = 1
        orphans = {sid: epoch for sid, (o, epoch) in owners.items() if o == victim}
        result.notes.append(f"{victim} owned {len(orphans)} of {sessions} sessions when killed")
        for sid, epoch in orphans.items():
            claimed = await stage.wait_takeover(sid, epoch)
            result.takeover_ms.append(claimed - kill_ms)
        await stage.finish(result, require_epochs=True)
    return result


# --- 2. gateway SIGKILL --------------------------------------------------------------------


async def gateway_kill(
    cluster: Cluster, clean: Mapping[str, str], *, sessions: int = 4
) -> ScenarioResult:
    """SIGKILL the gateway every client is connected to; clients resume via the other."""
    result = ScenarioResult("gateway SIGKILL", "SIGKILL of the clients' gateway mid-session")
    await cluster.start_async(workers=1, gateways=2, slots=max(4, sessions))
    g1, g2 = cluster.gateways["g1"], cluster.gateways["g2"]
    async with Stage(cluster, clean, sessions) as stage:
        await stage.start(lambda i: [g1.url, g2.url])
        await stage.all_sent(FAULT_AT_FRAMES)
        await asyncio.to_thread(g1.kill)
        result.faults = 1
        await stage.finish(result)
    for r in stage.runs:
        if r.reconnects < 1:
            result.problems.append(f"{r.name} never reconnected: the fault missed it")
    return result


# --- 3. worker SIGSTOP past its lease, then SIGCONT ---------------------------------------


async def worker_pause(
    cluster: Cluster, clean: Mapping[str, str], *, sessions: int = 2, workers: int = 2
) -> ScenarioResult:
    """SIGSTOP the owner of session 0 until another worker has taken its sessions over,
    then SIGCONT it: it must not publish anything for them any more (fencing)."""
    result = ScenarioResult("worker SIGSTOP", "SIGSTOP of an owner past its lease, then SIGCONT")
    slots = max(2, -(-sessions // (workers - 1)))
    await cluster.start_async(workers=workers, gateways=1, slots=slots)
    async with Stage(cluster, clean, sessions) as stage:
        await stage.start(lambda i: cluster.gateway_urls())
        await stage.all_sent(FAULT_AT_FRAMES)
        owners = await stage.owners()
        victim = owners[stage.runs[0].session_id][0]
        zombie = cluster.workers[victim]
        stop_ms = zombie.pause()
        result.faults = 1
        orphans = {sid: epoch for sid, (o, epoch) in owners.items() if o == victim}
        claims: dict[str, int] = {}
        for sid, epoch in orphans.items():
            claims[sid] = await stage.wait_takeover(sid, epoch)
            result.takeover_ms.append(claims[sid] - stop_ms)
        cont_ms = zombie.resume()
        result.notes.append(
            f"{victim} stopped {cont_ms - stop_ms} ms, owned {len(orphans)} of {sessions} sessions"
        )

        async def zombie_idle() -> bool:
            owned = await cast(
                Awaitable[bytes | None],
                stage.redis.hget(keys.worker_info(WorkerId(victim)), "owned"),
            )
            return owned == b"0"

        try:
            await wait_for(zombie_idle, f"{victim} to drop its sessions after SIGCONT")
        except TimeoutError as exc:
            result.problems.append(str(exc))
        await stage.finish(result, require_epochs=True)
        for sid, epoch in orphans.items():
            late = [
                e
                for e in stage.observers.events.for_session(sid)
                if isinstance(e.item, Transcript)
                and e.item.epoch == epoch
                and e.at_ms >= claims[sid]
            ]
            if late:
                result.problems.append(f"{sid[:8]}: {len(late)} events from fenced epoch {epoch}")
            stale = [
                r
                for r in await read_results(stage.redis, sid)
                if r.epoch == epoch and int(r.entry_id.split("-")[0]) >= claims[sid]
            ]
            if stale:
                result.problems.append(f"{sid[:8]}: results entries from fenced epoch {epoch}")
    return result


# --- 4. Redis restart ----------------------------------------------------------------------


async def redis_restart(
    cluster: Cluster,
    clean: Mapping[str, str],
    *,
    sessions: int = 3,
    kill: bool = False,
    down_s: float = 2.0,
) -> ScenarioResult:
    """Stop Valkey mid-session (SIGTERM, or SIGKILL with `kill`), keep it down `down_s`
    (longer than the gateway's own retries), start it again on the same port and AOF;
    gateways, workers and clients must reconnect by themselves."""
    how = "SIGKILL" if kill else "SIGTERM"
    result = ScenarioResult(
        f"Redis {how} + restart", f"Valkey {how}, down {down_s:.0f} s, restart from AOF"
    )
    await cluster.start_async(workers=1, gateways=1, slots=max(4, sessions))
    valkey = cluster.valkey
    assert valkey is not None
    async with Stage(cluster, clean, sessions) as stage:
        await stage.start(lambda i: cluster.gateway_urls())
        await stage.all_sent(FAULT_AT_FRAMES)
        down_ms = now_ms()
        await asyncio.to_thread(valkey.kill if kill else valkey.stop)
        await asyncio.sleep(down_s)  # the outage's length, not a synchronisation
        await asyncio.to_thread(valkey.restart)
        result.faults = 1
        result.notes.append(f"Valkey was down {now_ms() - down_ms} ms")
        await stage.finish(result)
    return result


async def redis_crash(
    cluster: Cluster,
    clean: Mapping[str, str],
    *,
    sessions: int = 3,
    lost_s: float = 1.0,
    down_s: float = 1.0,
) -> ScenarioResult:
    """Emulate the machine under Valkey crashing with AOF `everysec`: whatever was written
    after the last fsync is gone. The AOF is copied (the "fsync"), traffic runs on for
    `lost_s`, Valkey is SIGKILLed, the copy replaces the AOF and Valkey restarts from it.
    Acknowledged frames from those `lost_s` are gone from Redis; the SDK re-sends them
    from the acknowledged audio it retains (`retain_acked_s`)."""
    result = ScenarioResult(
        "Redis crash, AOF rolled back",
        f"Valkey SIGKILL, last {lost_s:.0f} s of writes lost (no fsync), restart",
    )
    await cluster.start_async(workers=1, gateways=1, slots=max(4, sessions))
    valkey = cluster.valkey
    assert valkey is not None
    async with Stage(cluster, clean, sessions) as stage:
        await stage.start(lambda i: cluster.gateway_urls())
        await stage.all_sent(FAULT_AT_FRAMES)
        snapshot = await asyncio.to_thread(valkey.snapshot_aof)
        await asyncio.sleep(lost_s)  # writes after the "fsync": lost in the crash
        acked = {r.session_id: r.session.acked_seq if r.session else -1 for r in stage.runs}
        await asyncio.to_thread(valkey.kill)
        await asyncio.to_thread(valkey.restore_aof, snapshot)
        down_ms = now_ms()
        lost = await _after_crash(stage, valkey.data_dir, acked)
        await asyncio.sleep(max(0.0, down_s - (now_ms() - down_ms) / 1000))
        await asyncio.to_thread(valkey.restart)
        result.faults = 1
        await stage.finish(result)
    # Exact: each SDK compares its highest ack with the next_seq its resume reported.
    result.acked_frames_lost = sum(r.rewound for r in stage.runs)
    result.notes.append(
        f"acknowledged frames re-sent by the SDKs because Redis lost them: "
        f"{result.acked_frames_lost} (about {lost} already gone when Valkey restarted)"
    )
    return result


async def _after_crash(stage: Stage, data_dir: Path, acked: Mapping[str, int]) -> int:
    """What Redis holds after the crash, read from the restored AOF by a Valkey on another
    port (before any gateway can write again): tells the audio recorders which entries
    the crash took, and returns how many acknowledged frames are gone."""
    probe = ValkeyServer(data_dir)
    await asyncio.to_thread(probe.start)
    lost = 0
    try:
        await asyncio.to_thread(probe.wait_ready)
        client = aioredis.Redis.from_url(probe.url)
        try:
            for r in stage.runs:
                next_seq = await client.hget(keys.meta(r.sid), "next_seq")
                lost += max(0, acked[r.session_id] + 1 - int(next_seq or 0))
                info = await client.xinfo_stream(keys.audio(r.sid))
                stage.observers.audio[r.session_id].forget_after(info["last-generated-id"].decode())
        finally:
            await client.aclose()
    finally:
        await asyncio.to_thread(probe.kill)
    return lost


# --- 5. client network drop ----------------------------------------------------------------


async def network_drop(
    cluster: Cluster, clean: Mapping[str, str], *, sessions: int = 2, outage_s: float = 3.0
) -> ScenarioResult:
    """Cut every client connection (and refuse new ones) for `outage_s` while the clients
    keep producing audio; the SDK buffers it and re-sends after the resume."""
    result = ScenarioResult("client network drop", f"all client links cut for {outage_s:.0f} s")
    await cluster.start_async(workers=1, gateways=1, slots=max(4, sessions))
    gateway = cluster.gateways["g1"]
    proxy = TcpProxy(int(gateway.url.rsplit(":", 1)[1].split("/")[0]))
    await proxy.start()
    try:
        async with Stage(cluster, clean, sessions) as stage:
            await stage.start(lambda i: [proxy.url(gateway.url)])
            await stage.all_sent(FAULT_AT_FRAMES)
            before = {r.name: r.sent for r in stage.runs}
            proxy.cut()
            result.faults = 1
            await asyncio.sleep(outage_s)  # the fault's length, not a synchronisation
            during = {r.name: r.sent - before[r.name] for r in stage.runs}
            refused = proxy.refused
            proxy.restore()
            await stage.finish(result)
    finally:
        await proxy.close()
    result.notes.append(
        f"frames produced during the outage: {during}; reconnect attempts refused: {refused}"
    )
    for r in stage.runs:
        if r.reconnects < 1:
            result.problems.append(f"{r.name} never reconnected: the fault missed it")
        if during[r.name] < 10:
            result.problems.append(f"{r.name} produced only {during[r.name]} frames while cut")
    return result


# --- 6. pub/sub subscriber cut -------------------------------------------------------------


async def pubsub_cut(
    cluster: Cluster, clean: Mapping[str, str], *, sessions: int = 3, every_s: float = 0.3
) -> ScenarioResult:
    """Redis cuts the gateway's pub/sub connection again and again (CLIENT KILL every
    `every_s`) for the rest of the sessions; the results must still arrive, from the
    results stream."""
    result = ScenarioResult("pub/sub subscriber cut", f"gateway subscriber killed every {every_s}s")
    await cluster.start_async(workers=1, gateways=1, slots=max(4, sessions))
    killed: set[str] = set()
    async with Stage(cluster, clean, sessions) as stage:
        await stage.start(lambda i: cluster.gateway_urls())
        await stage.all_sent(10)

        async def chaos() -> None:
            while True:
                with contextlib.suppress(RedisError, OSError):
                    for client in await stage.redis.client_list(_type="pubsub"):
                        if client.get("name") != "fault-recorder":
                            with contextlib.suppress(RedisError):
                                await stage.redis.client_kill_filter(_id=client["id"])
                                killed.add(client["id"])
                await asyncio.sleep(every_s)

        task = asyncio.create_task(chaos())
        try:
            await asyncio.wait(stage.tasks)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        result.faults = len(killed)
        await stage.finish(result)
    result.notes.append(f"{len(killed)} gateway subscriber connections killed")
    if len(killed) < 2:
        result.problems.append("the gateway's subscriber was not cut repeatedly")
    return result


SCENARIOS: dict[str, Callable[..., Awaitable[ScenarioResult]]] = {
    "worker_kill": worker_kill,
    "gateway_kill": gateway_kill,
    "worker_pause": worker_pause,
    "redis_restart": redis_restart,
    "redis_kill": functools.partial(redis_restart, kill=True),
    "redis_crash": redis_crash,
    "network_drop": network_drop,
    "pubsub_cut": pubsub_cut,
}
