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

import logging
from typing import Any

from arq.connections import ArqRedis
from arq.cron import cron
from arq.worker import Worker as ArqWorker

from shared import keys
from shared.config import Config
from shared.fleet import Fleet
from shared.jobs import JobStore, arq_deserialize, arq_serialize
from worker.arqservice import ArqService

log = logging.getLogger(__name__)

# Connections the maintenance pool opens at most when `redis_max_connections` is set; the
# worker's own pool gets the rest. arq polls its queue and the job runs its commands one at
# a time, so it rarely has more than two in flight; a command beyond the limit waits.
MAINTENANCE_CONNECTIONS = 4
# How long after its submit a file job must be before `JobStore.reconcile` repairs it: far
# longer than the moment between a submit's writes.
JOB_GRACE_MS = 60_000


# The codec of streamscribe's arq queues (msgpack), under the names the tests use.
serialize = arq_serialize
deserialize = arq_deserialize


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


class Maintenance(ArqService):
    """The maintenance cron job's arq worker (worker/arqservice.py: its pool, restarts
    and stop), connections named `ss-maintenance:<worker_id>`."""

    label = "maintenance"

    def __init__(
        self, config: Config, redis_url: str, name: str | None = None, max_connections: int = 0
    ) -> None:
        super().__init__(config, redis_url, keys.ARQ_QUEUE, name, max_connections)

    def build(self, pool: ArqRedis) -> ArqWorker:
        every = self.config.maintenance_interval_s
        return ArqWorker(
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
            job_serializer=arq_serialize,
            job_deserializer=arq_deserialize,
            ctx={"fleet": Fleet(pool), "config": self.config},
            poll_delay=0.25,
            keep_result=0,
            log_results=False,
            health_check_key=f"{keys.ARQ_QUEUE}:health-check",
        )
