"""The gateway process: WebSocket server, health endpoints, relay and heartbeat.

One port serves: `/v1/listen` (live sessions, gateway/connection.py), `/v1/jobs` (file
job uploads) and `GET /v1/jobs/<job_id>` (their results, plain HTTP; gateway/jobs.py),
and `/healthz`, `/readyz`, `/metrics`.

The gateway registers itself in `ss:gateways` every `heartbeat_s`; if it dies, the
maintenance job (worker/maintenance.py) detaches the sessions it held so they can be
resumed elsewhere or reaped. Reaping abandoned sessions is the maintenance job's work.

Shutdown is a method (`Gateway.shutdown`); signals only trigger it. It is staged and
bounded: stop accepting and tell clients to reconnect elsewhere (1012), wait up to
`drain_timeout_s` for handlers to detach their sessions, then cancel what is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import logging
import os
import secrets
import signal
import socket
import time

import redis.asyncio as aioredis
from redis.exceptions import RedisError
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from gateway.admission import Admission
from gateway.connection import Connection, GatewayContext, release_session
from gateway.ingest import IngestBatcher
from gateway.jobs import JOBS_PATH, Jobs, json_body
from gateway.memory import Trimmed, TrimPolicy, fix_mmap_threshold, resident_mib, trim
from gateway.relay import Relay
from gateway.results import ResultsReader
from gateway.tls import TLSContext
from gateway.usage import UsageMeter
from gateway.wsconn import GatewayServerConnection
from shared.config import Config
from shared.fleet import Fleet
from shared.jobs import JobStore
from shared.keys import GatewayId, client_name
from shared.metrics import Metrics
from shared.store import Store, connect

log = logging.getLogger(__name__)

LISTEN_PATH = "/v1/listen"


class Gateway:
    def __init__(self, config: Config, redis: aioredis.Redis | None = None) -> None:
        self.config = config
        self.gateway_id = GatewayId(f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}")
        self.redis = (
            redis
            if redis is not None
            else connect(
                config.require_redis_url(),
                client_name("gateway", self.gateway_id),
                max_connections=config.redis_max_connections,
                pool_wait_s=config.redis_pool_wait_s,
            )
        )
        self.store = Store(self.redis)
        self.relay = Relay(self.redis, config.reconcile_interval_s)
        self.metrics = Metrics("streamscribe_gateway")
        self.tls: TLSContext | None = None
        if config.tls_enabled:
            assert config.certfile is not None
            self.tls = TLSContext(config.certfile, config.keyfile)
        self.fleet = Fleet(self.redis)
        self.batcher = IngestBatcher(self.store)
        self.results = ResultsReader(self.store)
        self.ctx = GatewayContext(
            config,
            self.store,
            self.relay,
            self.metrics,
            self.fleet,
            self.gateway_id,
            Admission(self.redis, config),
            self.batcher,
            self.results,
            usage=(
                UsageMeter(config.usage_window_s, config.audio_budget_s)
                if config.api_keys
                else None
            ),
        )
        self.jobs = Jobs(self.ctx, JobStore(self.redis))
        self._server: Server | None = None
        self._open = 0  # connections being handled
        self.heap_trim = TrimPolicy(config.heap_trim_drop)
        self.heap_trims = 0
        self.last_trim: Trimmed | None = None
        self._heartbeat: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()

    @property
    def port(self) -> int:
        assert self._server is not None
        sock = next(iter(self._server.sockets))
        return int(sock.getsockname()[1])

    @property
    def url(self) -> str:
        scheme = "wss" if self.tls else "ws"
        host = self.config.host if ":" not in self.config.host else f"[{self.config.host}]"
        return f"{scheme}://{host}:{self.port}{LISTEN_PATH}"

    async def start(self) -> None:
        await self.relay.start()
        self.batcher.start()
        self.results.start()
        self._server = await serve(
            self._handle,
            self.config.host,
            self.config.port,
            ssl=self.tls.context if self.tls else None,
            process_request=self._process_request,
            max_size=self.config.max_frame_bytes,
            ping_interval=self.config.ping_interval_s,
            ping_timeout=self.config.ping_timeout_s,
            compression=None,  # PCM barely compresses; deflate would only cost CPU
            server_header="streamscribe",
            close_timeout=5,
            create_connection=GatewayServerConnection,
        )
        await self.fleet.gateway_heartbeat(self.gateway_id)
        self._heartbeat = asyncio.create_task(self._heartbeat_loop(), name="heartbeat")
        log.info("gateway %s listening on %s", self.gateway_id, self.url)

    async def serve_forever(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stopping.set)
        if self.tls is not None:
            loop.add_signal_handler(signal.SIGHUP, self.tls.reload)
        await self._stopping.wait()
        await self.shutdown()

    async def shutdown(self) -> None:
        """Stop accepting, ask clients to reconnect (1012), wait (bounded), clean up."""
        log.info("gateway draining")
        if self._server is not None:
            self._server.close(
                close_connections=True, code=1012, reason="gateway draining; reconnect and resume"
            )
            try:
                await asyncio.wait_for(self._server.wait_closed(), self.config.drain_timeout_s)
            except TimeoutError:
                log.warning("drain timeout: cutting remaining connections")
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeat
        with contextlib.suppress(RedisError, OSError):
            await self.ctx.sync_usage()  # what the drained connections stored last
        with contextlib.suppress(RedisError, OSError):
            await self._release_unreleased()
            # Only once every session is released: otherwise the registry entry stays, the
            # gateway counts as dead, and the maintenance job detaches what is left.
            await self.fleet.gateway_gone(self.gateway_id)
        await self.batcher.close()
        await self.results.close()
        await self.relay.close()
        await self.redis.aclose()
        log.info("gateway stopped")

    async def _handle(self, ws: ServerConnection) -> None:
        self._open += 1
        self.heap_trim.opened(self._open)
        try:
            path = ws.request.path.split("?", 1)[0] if ws.request else LISTEN_PATH
            if path == JOBS_PATH:
                await self.jobs.upload(ws)
            else:
                await Connection(ws, self.ctx).run()
        finally:
            self._open -= 1

    def _trim_heap(self) -> None:
        """After connections fell from a peak, give the memory they freed back to the
        system (see gateway.memory)."""
        peak = self.heap_trim.peak
        if not self.heap_trim.due(self._open):
            return
        before = resident_mib()
        started = time.perf_counter()
        if not trim():
            return
        done = Trimmed(
            peak, self._open, before, resident_mib(), 1000 * (time.perf_counter() - started)
        )
        self.heap_trims += 1
        self.last_trim = done
        self.metrics.inc("heap_trims_total")
        log.info(
            "connections fell from %d to %d: returned freed memory to the system, "
            "resident %s -> %s MiB (%.1f ms)",
            done.peak,
            done.open_now,
            "?" if done.rss_before_mib is None else f"{done.rss_before_mib:.0f}",
            "?" if done.rss_after_mib is None else f"{done.rss_after_mib:.0f}",
            done.took_ms,
        )

    async def _process_request(self, ws: ServerConnection, request: Request) -> Response | None:
        path = request.path.split("?", 1)[0]
        if path in (LISTEN_PATH, JOBS_PATH):
            return None  # the WebSocket handshake (`_handle`)
        if path.startswith(JOBS_PATH + "/"):
            status, body = await self.jobs.result(request.path, request.headers)
            response = _respond(ws, status, json_body(body), "application/json")
            if status == http.HTTPStatus.UNAUTHORIZED:
                response.headers["WWW-Authenticate"] = "Bearer"
            return response
        if path == "/healthz":
            return _text(ws, http.HTTPStatus.OK, "ok\n")
        if path == "/readyz":
            ready, why = await self._readiness()
            return _text(
                ws, http.HTTPStatus.OK if ready else http.HTTPStatus.SERVICE_UNAVAILABLE, why
            )
        if path == "/metrics":
            self.metrics.set(
                "connections_open", len(self._server.connections) if self._server else 0
            )
            self.metrics.set("relay_dropped_messages", self.relay.dropped)
            self.metrics.set("relay_subscribed", int(self.relay.subscribed))
            self.metrics.set("relay_reconnects", self.relay.reconnects)
            self.metrics.set("ingest_pipelines", self.batcher.pipelines)
            self.metrics.set("ingest_calls", self.batcher.calls)
            self.metrics.set("results_pipelines", self.results.pipelines)
            self.metrics.set("results_reads", self.results.calls)
            self.metrics.histogram("ack_seconds", self.ctx.ack_seconds)
            self.metrics.histogram("ingest_pipeline_seconds", self.batcher.round_trip)
            self.metrics.histogram("results_pipeline_seconds", self.results.round_trip)
            return _text(ws, http.HTTPStatus.OK, self.metrics.render())
        return _text(
            ws,
            http.HTTPStatus.NOT_FOUND,
            f"not found; WebSocket endpoints are {LISTEN_PATH} (live streams) and "
            f"{JOBS_PATH} (file jobs; results: GET {JOBS_PATH}/<job_id>)\n",
        )

    async def _readiness(self) -> tuple[bool, str]:
        try:
            await self.redis.ping()
            workers = await self.store.alive_workers(self.config.worker_alive_s)
        except (RedisError, OSError) as exc:
            return False, f"redis unreachable: {exc}\n"
        if workers < 1:
            return False, "no worker alive\n"
        return True, f"ready: {workers} worker(s) alive\n"

    async def _release_unreleased(self) -> None:
        while self.ctx.unreleased:
            sid, conn, done = self.ctx.unreleased[0]
            await release_session(self.ctx, sid, conn, done)
            self.ctx.unreleased.pop(0)

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.heartbeat_s)
            try:
                await self.fleet.gateway_heartbeat(self.gateway_id)
                await self._release_unreleased()
                if self.ctx.quota_held:
                    await self.ctx.hold_quota()
                await self.ctx.sync_usage()
            except (RedisError, OSError) as exc:
                log.warning("heartbeat: redis unavailable (%s)", exc)
            self._trim_heap()


def _text(ws: ServerConnection, status: http.HTTPStatus, body: str) -> Response:
    return _respond(ws, status, body, "text/plain; charset=utf-8")


def _respond(
    ws: ServerConnection, status: http.HTTPStatus, body: str, content_type: str
) -> Response:
    response = ws.respond(status, body)
    response.headers = Headers(
        [(k, v) for k, v in response.headers.raw_items() if k.lower() != "content-type"]
    )
    response.headers["Content-Type"] = content_type
    return response


async def run_gateway(config: Config) -> None:
    fix_mmap_threshold()  # process-wide: see gateway.memory
    gateway = Gateway(config)
    await gateway.start()
    print(f"streamscribe gateway: {gateway.url}", flush=True)
    await gateway.serve_forever()
