"""Periodic maintenance on arq: reap abandoned sessions, trim streams, dead-letter.

Every worker process runs an arq worker beside its streaming loops (unless
`--maintenance off`), with one cron job, `maintain`, every `maintenance_interval_s`.
arq enqueues cron jobs under an ID made of the job name and the tick time, so across the
whole fleet each tick runs once, on whichever worker picks it first. Jobs are serialized
with msgpack, never pickle. arq is kept off the streaming path: a slow or failed
maintenance run never delays audio or results.

One run does, in order:
1. detach the sessions of gateways that died without a word (their resume grace starts);
2. reap sessions whose resume grace ended (close mark `abandoned`; a worker finalizes);
3. dead-letter sessions delivered to workers more than `max_session_attempts` times;
4. trim acknowledged history off the dispatch stream (MINID below anything pending);
5. reconcile file jobs (`JobStore.reconcile`): forget finished or failed submits in
   `ss:jobs`, and queue a new run for a waiting job whose arq run is gone.
Audio streams are trimmed by the worker as finals commit (PUBLISH_FINAL, MINID at the
checkpoint) and closed sessions' keys expire after `session_ttl_s`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, cast

import msgpack
from arq.connections import ArqRedis
from arq.cron import cron
from arq.worker import Worker as ArqWorker
from redis.exceptions import RedisError

from shared import keys
from shared.config import Config
from shared.fleet import Fleet
from shared.jobs import JobStore
from shared.store import connection_pool

log = logging.getLogger(__name__)

# Connections the maintenance pool opens at most when `redis_max_connections` is set; the
# worker's own pool gets the rest. arq polls its queue and the job runs its commands one at
# a time, so it rarely has more than two in flight; a command beyond the limit waits.
MAINTENANCE_CONNECTIONS = 4
# How long after its submit a file job must be before `JobStore.reconcile` repairs it: far
# longer than the moment between a submit's writes.
JOB_GRACE_MS = 60_000


def serialize(job: dict[str, Any]) -> bytes:
    return cast(bytes, msgpack.packb(job, use_bin_type=True, datetime=True))


def deserialize(data: bytes) -> dict[str, Any]:
    return cast(dict[str, Any], msgpack.unpackb(data, raw=False, timestamp=3))


async def run_maintenance(fleet: Fleet, config: Config) -> dict[str, int]:
    """One maintenance pass; returns what it did (counts). Safe to run concurrently."""
    gone = await fleet.reap_dead_gateways(config.worker_alive_s, config.resume_grace_s)
    for gid, sids in gone.items():
        log.info("gateway %s is gone; %d session(s) now await resume", gid, len(sids))
    reaped = await fleet.store.reap_detached()
    for sid in reaped:
        log.info("session %s abandoned: resume grace ended", sid)
    dead = await fleet.dead_letter_failing(config.max_session_attempts, config.session_ttl_s)
    for d in dead:
        log.warning("session %s dead-lettered: %s", d.session_id, d.why)
    trimmed = await fleet.trim_dispatch()
    jobs = await JobStore(fleet.redis).reconcile(grace_ms=JOB_GRACE_MS)
    if jobs["requeued"]:
        log.warning("file jobs: %d without a queued run were queued again", jobs["requeued"])
    return {
        "dead_gateways": len(gone),
        "detached": sum(len(s) for s in gone.values()),
        "abandoned": len(reaped),
        "dead_lettered": len(dead),
        "dispatch_trimmed": trimmed,
        "jobs_removed": jobs["removed"],
        "jobs_requeued": jobs["requeued"],
    }


async def maintain(ctx: dict[str, Any]) -> dict[str, int]:
    """The arq cron job."""
    return await run_maintenance(ctx["fleet"], ctx["config"])


class Maintenance:
    """An arq worker inside a streamscribe worker process, restarted after Redis outages.

    Its Redis pool is streamscribe's own (`shared.store.connection_pool`), not arq's:
    its connections are named `ss-maintenance:<worker_id>` in `CLIENT LIST`, and with
    `max_connections` (> 0) it opens at most that many, a command beyond them waiting up to
    `redis_pool_wait_s` as the worker's own commands do (arq's own `max_connections` makes
    redis-py fail at once instead)."""

    def __init__(
        self, config: Config, redis_url: str, name: str | None = None, max_connections: int = 0
    ) -> None:
        self.config = config
        self.redis_url = redis_url
        self.name = name
        self.max_connections = max_connections
        self._task: asyncio.Task[None] | None = None
        self._arq: ArqWorker | None = None
        self._stopping = asyncio.Event()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="maintenance")

    async def _run(self) -> None:
        delay = 0.5
        while not self._stopping.is_set():
            pool: ArqRedis | None = None
            try:
                pool = ArqRedis(
                    connection_pool(
                        self.redis_url,
                        self.name,
                        max_connections=self.max_connections,
                        pool_wait_s=self.config.redis_pool_wait_s,
                    ),
                    job_serializer=serialize,
                    job_deserializer=deserialize,
                    default_queue_name=keys.ARQ_QUEUE,
                )
                pool.auto_close_connection_pool = True  # aclose() closes it too
                await pool.ping()
                fleet = Fleet(pool)
                every = self.config.maintenance_interval_s
                self._arq = ArqWorker(
                    functions=[],
                    cron_jobs=[
                        cron(
                            maintain,
                            name="streamscribe:maintain",
                            second=set(range(0, 60, every)),
                            unique=True,
                            max_tries=1,
                            timeout=max(30, every * 6),
                        )
                    ],
                    redis_pool=pool,
                    queue_name=keys.ARQ_QUEUE,
                    handle_signals=False,
                    job_serializer=serialize,
                    job_deserializer=deserialize,
                    ctx={"fleet": fleet, "config": self.config},
                    poll_delay=0.25,
                    keep_result=0,
                    log_results=False,
                    health_check_key=f"{keys.ARQ_QUEUE}:health-check",
                )
                delay = 0.5
                await self._arq.async_run()
            except asyncio.CancelledError:
                if self._stopping.is_set():
                    return
                raise
            except (RedisError, OSError) as exc:
                log.warning("maintenance: redis unavailable (%s); restarting", exc)
            finally:
                # Let a running job finish (arq shields its bookkeeping from cancellation)
                # before the pool goes away under it.
                jobs = list(self._arq.tasks.values()) if self._arq is not None else []
                if jobs:
                    await asyncio.wait(jobs, timeout=10)
                self._arq = None
                if pool is not None:
                    with contextlib.suppress(RedisError, OSError):
                        await pool.aclose()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), delay)
            delay = min(delay * 2, 5.0)

    async def stop(self) -> None:
        self._stopping.set()
        if self._task is None:
            return
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError, RedisError, OSError):
            await self._task
