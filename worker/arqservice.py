"""An arq worker inside a streamscribe worker process, restarted after Redis outages.

The maintenance job (worker/maintenance.py) and the file jobs' runner
(worker/filejobs.py) each run one, on a queue and a Redis pool of their own. This is the
loop they share: make the pool, build the arq worker (`build`, theirs), run it until
Redis fails or the worker stops, let what it runs end (`end_runs`), and start again with
backoff (0.5 s doubling to 5 s).

The pool is streamscribe's own (`shared.store.connection_pool`), not arq's: its
connections are named (`name`) in `CLIENT LIST`, and with `max_connections` (> 0) it opens
at most that many, a command beyond them waiting up to `redis_pool_wait_s` as the
worker's own commands do (arq's own `max_connections` makes redis-py fail at once
instead). Jobs are serialized with msgpack (`shared.jobs.arq_serialize`), never pickle.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from arq.connections import ArqRedis
from arq.worker import Worker as ArqWorker
from redis.exceptions import RedisError

from shared.config import Config
from shared.jobs import arq_deserialize, arq_serialize
from shared.store import connection_pool

log = logging.getLogger(__name__)

#: How long a stop waits for the jobs arq runs to end by themselves.
END_WAIT_S = 10.0


class ArqService:
    """One arq worker, kept running across Redis outages until `stop`."""

    #: For the logs and the task's name.
    label = "arq"

    def __init__(
        self,
        config: Config,
        redis_url: str,
        queue: str,
        name: str | None = None,
        max_connections: int = 0,
    ) -> None:
        self.config = config
        self.redis_url = redis_url
        self.queue = queue
        self.name = name
        self.max_connections = max_connections
        self._task: asyncio.Task[None] | None = None
        self._arq: ArqWorker | None = None
        self._stopping = asyncio.Event()

    def build(self, pool: ArqRedis) -> ArqWorker:
        """The arq worker to run on `pool` (each start after an outage builds a new one)."""
        raise NotImplementedError

    async def end_runs(self, arq: ArqWorker) -> None:
        """Let the jobs arq runs finish (its bookkeeping shields them from cancellation)
        before the pool goes away under them: at most END_WAIT_S."""
        jobs = list(arq.tasks.values())
        if jobs:
            await asyncio.wait(jobs, timeout=END_WAIT_S)

    def start(self) -> None:
        self._task = asyncio.create_task(self._serve(), name=self.label)

    async def stop(self) -> None:
        self._stopping.set()
        if self._arq is not None:
            self._arq.allow_pick_jobs = False
        if self._task is None:
            return
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError, RedisError, OSError):
            await self._task

    async def _serve(self) -> None:
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
                    job_serializer=arq_serialize,
                    job_deserializer=arq_deserialize,
                    default_queue_name=self.queue,
                )
                pool.auto_close_connection_pool = True  # aclose() closes it too
                await pool.ping()
                self._arq = self.build(pool)
                delay = 0.5
                await self._arq.async_run()
            except asyncio.CancelledError:
                if self._stopping.is_set():
                    return
                raise
            except (RedisError, OSError) as exc:
                log.warning("%s: redis unavailable (%s); restarting", self.label, exc)
            finally:
                if self._arq is not None:
                    await self.end_runs(self._arq)
                self._arq = None
                if pool is not None:
                    with contextlib.suppress(RedisError, OSError):
                        await pool.aclose()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), delay)
            delay = min(delay * 2, 5.0)
