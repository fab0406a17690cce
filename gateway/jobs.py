"""File jobs at the gateway: the upload (`GET /v1/jobs`, a WebSocket) and the result
(`GET /v1/jobs/<job_id>`, plain HTTP on the same port); docs/protocol.md, *File jobs*.

The upload is one task per connection, much simpler than a listen session's: each binary
message is appended to the job's audio in Redis before the next is read (so a client
that sends faster than Redis stores waits: back-pressure), `submit` queues the job
(`JobStore.submit`: the fleet-wide `job_max_queued` and the arq run), and a client that
stays connected is told the job's progress every `queue_update_s` until it is done or
failed. `gateway/upload.py` decides what the client may send; `_fail` is the one place
that maps errors to the wire, as in gateway/connection.py.

Redis: the writes (append, submit) are not idempotent, so a failed one is not retried:
the client gets `internal` and 1011 with what became of its job, as a listen session
does when its creation fails. Reads (the progress, the result) are retried briefly.
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import json
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlsplit

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError
from websockets.asyncio.server import ServerConnection
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed, PayloadTooBig

from gateway.auth import authenticate
from gateway.connection import GatewayContext, close_reason, key_id
from gateway.upload import (
    Submit,
    Upload,
    job_created,
    job_finished,
    job_progress,
    job_queued,
    progress_view,
)
from gateway.usage import US, UsageMeter
from shared.errors import (
    BadRequest,
    Internal,
    NotFound,
    Overloaded,
    ProtocolViolation,
    RateLimited,
    StreamscribeError,
    Unauthorized,
)
from shared.jobs import JobInfo, JobStore, QueueFull, is_job_id, new_job_id, parse_job_query
from shared.keys import JobId
from shared.protocol import build_server_message, error_message

log = logging.getLogger(__name__)

JOBS_PATH = "/v1/jobs"
READ_RETRIES = 5

T = TypeVar("T")


class Jobs:
    """What every upload and result request of this gateway shares."""

    def __init__(self, ctx: GatewayContext, store: JobStore) -> None:
        self.ctx = ctx
        self.store = store
        #: Audio (us) per API key of the jobs being submitted here now: counted against
        #: the key's budget until the submit is answered, so that two submits at once
        #: cannot both take the budget's last seconds.
        self.reserved_us: Counter[str] = Counter()
        #: Uploads on this gateway now, from `job.created` to the submit's answer or the
        #: connection's end (`job_max_uploads`).
        self.uploading = 0

    async def upload(self, ws: ServerConnection) -> None:
        await JobUpload(ws, self).run()

    async def result(self, path: str, headers: Headers) -> tuple[http.HTTPStatus, dict[str, Any]]:
        """`GET /v1/jobs/<job_id>`: the status and JSON body to answer."""
        try:
            body = await self._result(path, headers)
        except Unauthorized as err:
            return self._refused(http.HTTPStatus.UNAUTHORIZED, err)
        except BadRequest as err:
            return self._refused(http.HTTPStatus.BAD_REQUEST, err)
        except NotFound as err:
            return self._refused(http.HTTPStatus.NOT_FOUND, err)
        except (RedisError, OSError) as exc:
            log.warning("GET %s: redis unavailable (%s)", urlsplit(path).path, exc)
            unavailable = Internal("storage temporarily unavailable; try again")
            return self._refused(http.HTTPStatus.SERVICE_UNAVAILABLE, unavailable)
        except Exception:
            log.exception("internal error on GET %s", urlsplit(path).path)
            internal = Internal("internal server error")
            return self._refused(http.HTTPStatus.INTERNAL_SERVER_ERROR, internal)
        self.ctx.metrics.inc('job_results_total{status="200"}')
        return http.HTTPStatus.OK, body

    def _refused(
        self, status: http.HTTPStatus, err: StreamscribeError
    ) -> tuple[http.HTTPStatus, dict[str, Any]]:
        self.ctx.metrics.inc(f'job_results_total{{status="{status.value}"}}')
        return status, {"error": err.code, "message": err.message}

    async def _result(self, path: str, headers: Headers) -> dict[str, Any]:
        parts = urlsplit(path)
        try:
            query = parse_qs(parts.query, keep_blank_values=True, max_num_fields=32)
        except ValueError as exc:
            raise BadRequest(f"unreadable query string: {exc}") from None
        unknown = sorted(set(query) - {"access_token"})
        if unknown:
            raise BadRequest(f"unknown query parameter(s): {', '.join(unknown)}")
        tokens = query.get("access_token", [])
        if len(tokens) > 1:
            raise BadRequest(f"query parameter 'access_token' given {len(tokens)} times")
        presented = authenticate(self.ctx.config.api_keys, headers, tokens[0] if tokens else None)
        raw = parts.path.removeprefix(JOBS_PATH + "/")
        if not is_job_id(raw):
            raise BadRequest("malformed job ID: expected 32 lowercase hexadecimal characters")
        jid = JobId(raw)
        info = await self.store.load(jid)
        if (
            info is None
            or info.state == "uploading"
            or (presented is not None and info.key_id != key_id(presented))
        ):
            # A job of another key is as unknown as one that never was: its ID tells nothing.
            raise NotFound("unknown or expired job")
        position = None
        if not info.finished:
            position = await self.store.position(jid)
        return info.to_json(position=position, segments=await self.store.segments(jid))


class JobUpload:
    """One connection to `/v1/jobs`: an upload, its submit, then (while the client stays)
    the job's progress and result."""

    def __init__(self, ws: ServerConnection, jobs: Jobs) -> None:
        self.ws = ws
        self.jobs = jobs
        self.ctx = jobs.ctx
        self.cfg = jobs.ctx.config
        self.store = jobs.store
        self.jid: JobId | None = None
        self.upload: Upload | None = None
        self.key_id = ""  # the API key's ID (gateway.connection.key_id), with api_keys
        self.submitted = False
        self.counted = False  # in `Jobs.uploading`

    async def run(self) -> None:
        self.ctx.metrics.inc("job_uploads_total")
        try:
            try:
                await self._open()
                await self._receive()
                position = await self._submit()
            finally:
                if self.counted:
                    self.jobs.uploading -= 1
                    self.counted = False
            await self._follow(position)
        except StreamscribeError as err:
            await self._fail(err)
        except ConnectionClosed:
            if isinstance(self.ws.protocol.parser_exc, PayloadTooBig):
                # websockets' own 1009 (gateway/wsconn.py sent the `error` before it).
                self.ctx.metrics.inc('errors_total{code="frame_too_large"}')
            self._log_left()
        except Exception:
            log.exception("internal error on job %s", self.jid)
            await self._fail(Internal("internal server error"))

    async def _open(self) -> None:
        query = urlsplit(self.ws.request.path if self.ws.request else "").query
        params = parse_job_query(query)
        headers = self.ws.request.headers if self.ws.request else None
        presented = authenticate(self.cfg.api_keys, headers, params.access_token)
        if presented is not None:
            self.key_id = key_id(presented)
        self.upload = Upload(
            params,
            max_audio_s=self.cfg.job_max_audio_s,
            max_text_frame_bytes=self.cfg.max_text_frame_bytes,
        )
        # Refused before any audio is sent: too many uploads here, or a full queue (the
        # submit checks the queue again, exactly: jobs may be queued meanwhile).
        if self.jobs.uploading >= self.cfg.job_max_uploads:
            self.ctx.metrics.inc('jobs_refused_total{reason="uploads"}')
            raise Overloaded(
                f"overloaded: {self.jobs.uploading} uploads in progress on this gateway "
                f"(job_max_uploads {self.cfg.job_max_uploads}); try again later"
            )
        unfinished = await self._read(self.store.unfinished)
        if unfinished >= self.cfg.job_max_queued:
            self.ctx.metrics.inc('jobs_refused_total{reason="queue_full"}')
            raise Overloaded(
                f"overloaded: {unfinished} file jobs are waiting or running "
                f"(job_max_queued {self.cfg.job_max_queued}); try again later"
            )
        self.jobs.uploading += 1
        self.counted = True
        jid = new_job_id()
        await self._write(
            self.store.begin_upload(
                jid, params, key_id=self.key_id, ttl_s=self.cfg.job_upload_ttl_s
            ),
            "the job was not created; try again later",
        )
        self.jid = jid
        log.info(
            "job %s: upload opened (%d Hz %s x%d)",
            jid,
            params.sample_rate,
            params.encoding,
            params.channels,
        )
        await self.ws.send(job_created(jid, self.cfg.job_max_audio_s))

    async def _receive(self) -> None:
        """Audio until `submit`; past `idle_timeout_s` without a message the upload is
        dropped (a client that neither sends nor leaves would hold the connection)."""
        upload, jid = self._upload(), self._jid()
        while True:
            try:
                message = await asyncio.wait_for(self.ws.recv(), self.cfg.idle_timeout_s)
            except TimeoutError:
                raise ProtocolViolation(
                    f"no audio and no submit for {self.cfg.idle_timeout_s:g} s "
                    "(idle_timeout_s); the upload was dropped"
                ) from None
            if isinstance(message, str):
                if isinstance(upload.receive_text(message), Submit):
                    return
                continue
            try:
                upload.receive_audio(len(message))
            except BadRequest:
                self.ctx.metrics.inc('jobs_refused_total{reason="too_long"}')
                raise
            if not message:
                continue
            size = await self._write(
                self.store.append(
                    jid, message, max_bytes=upload.max_bytes, ttl_s=self.cfg.job_upload_ttl_s
                ),
                "the upload was not kept; send the file again as a new job",
            )
            if size == -2:
                raise NotFound(
                    f"the upload expired ({self.cfg.job_upload_ttl_s:g} s after its last message); "
                    "send the file again as a new job"
                )
            if size != upload.size:  # -1 or another size: its audio was written elsewhere
                log.error("job %s: %d bytes received, %d stored", jid, upload.size, size)
                raise Internal("internal server error; send the file again as a new job")

    async def _submit(self) -> int:
        """Queue the job (its audio counted against the API key's budget first); its
        position in the fleet's queue."""
        upload, jid = self._upload(), self._jid()
        usage = self.ctx.usage
        audio_us = upload.size * US // upload.params.bytes_per_second
        reserved = usage is not None and self.key_id != "" and bool(self.cfg.audio_budget_s)
        if reserved:
            await self._take_budget(self.key_id, audio_us)
        try:
            position = await self._write(
                self.store.submit(jid, max_queued=self.cfg.job_max_queued),
                f"the job may not have been queued: see GET {JOBS_PATH}/{jid}",
            )
        except QueueFull as full:
            self.ctx.metrics.inc('jobs_refused_total{reason="queue_full"}')
            raise Overloaded(
                f"overloaded: {full.unfinished} file jobs are waiting or running "
                f"(job_max_queued {self.cfg.job_max_queued}); try again later"
            ) from None
        except LookupError:
            raise NotFound(
                f"the upload expired ({self.cfg.job_upload_ttl_s:g} s after its last message); "
                "send the file again as a new job"
            ) from None
        finally:
            if reserved:
                self.jobs.reserved_us[self.key_id] -= audio_us
                if self.jobs.reserved_us[self.key_id] <= 0:
                    del self.jobs.reserved_us[self.key_id]
        self.submitted = True
        if usage is not None and self.key_id:
            usage.stored(self.key_id, audio_us)
        self.ctx.metrics.inc("jobs_submitted_total")
        log.info("job %s submitted: %.1f s of audio, position %d", jid, upload.seconds, position)
        await self.ws.send(job_queued(jid, upload.seconds, position))
        return position

    async def _take_budget(self, key: str, audio_us: int) -> None:
        """Refuse the job if its audio does not fit in what is left of the key's budget
        (with the key's fleet total made fresh first); else hold it until the submit is
        answered."""
        usage = self.ctx.usage
        assert usage is not None
        await self._read(lambda: self.ctx.sync_usage(only=key))  # idempotent
        if not usage.allows(key, self.jobs.reserved_us[key] + audio_us):
            self.ctx.metrics.inc("audio_over_budget_total")
            self.ctx.metrics.inc('jobs_refused_total{reason="audio_budget"}')
            raise RateLimited(self._over_budget(usage, key, audio_us))
        self.jobs.reserved_us[key] += audio_us

    def _over_budget(self, usage: UsageMeter, key: str, audio_us: int) -> str:
        """Why the job is refused; the setting's name within a close reason's 123 bytes."""
        left_us = max(0, usage.budget_us - usage.used_us(key) - self.jobs.reserved_us[key])
        renews = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(usage.renews_at()))
        return (
            f"the job's {audio_us / US:g} s of audio exceed what is left of this API key's "
            f"audio budget (audio_budget_s {self.cfg.audio_budget_s:g} s per "
            f"{usage.window_s} s): {left_us / US:g} s; renews {renews}"
        )

    async def _follow(self, position: int) -> None:
        """While the client stays: `job.progress` when the job's state, progress or place
        changed, then `job.done` or `job.failed` and close 1000. Every `queue_update_s`;
        meanwhile the client may send `keepalive` (anything else ends the connection)."""
        upload, jid = self._upload(), self._jid()
        last: dict[str, Any] = {
            "job_id": jid,
            "state": "queued",
            "done_seconds": 0.0,
            "audio_seconds": round(upload.seconds, 3),
            "position": position,
        }
        loop = asyncio.get_running_loop()
        due = loop.time() + self.cfg.queue_update_s
        while True:
            wait_s = due - loop.time()
            if wait_s > 0:
                try:
                    message = await asyncio.wait_for(self.ws.recv(), wait_s)
                except TimeoutError:
                    pass
                else:
                    if isinstance(message, str):
                        upload.receive_text(message)  # keepalive; anything else raises
                    else:
                        upload.receive_audio(len(message))  # raises: after submit
                    continue
            due = loop.time() + self.cfg.queue_update_s
            info = await self._read(lambda: self.store.load(jid))
            if info is None:
                raise NotFound("the job no longer exists")
            if info.finished:
                await self._finished(info)
                return
            view = progress_view(info, await self._read(lambda: self.store.position(jid)))
            if view != last:
                await self.ws.send(job_progress(view))
                last = view

    async def _finished(self, info: JobInfo) -> None:
        segments = None
        if info.state == "done":
            segments = await self._read(lambda: self.store.segments(info.job_id))
        await self.ws.send(job_finished(info, segments))
        log.info("job %s %s: result sent", info.job_id, info.state)
        with contextlib.suppress(ConnectionClosed):
            await self.ws.close(1000, f"job {info.state}")

    # --- helpers -------------------------------------------------------------------------

    async def _write(self, call: Awaitable[T], outcome: str) -> T:
        """A write that is not retried (not idempotent): Redis unavailable ends the
        connection with `internal` and 1011, saying what became of the job."""
        try:
            return await call
        except (RedisError, OSError) as exc:
            log.warning("job %s: redis unavailable (%s)", self.jid, exc)
            raise Internal(f"storage temporarily unavailable: {outcome}") from None

    async def _read(self, call: Callable[[], Awaitable[T]]) -> T:
        """An idempotent call, retried across a brief outage; then `internal` and 1011."""
        delay = 0.05
        for attempt in range(READ_RETRIES):
            try:
                return await call()
            except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                if attempt == READ_RETRIES - 1:
                    log.warning("job %s: redis unavailable (%s)", self.jid, exc)
                    raise Internal(self._unavailable()) from None
                await asyncio.sleep(delay)
                delay *= 2
            except RedisError as exc:
                log.warning("job %s: redis error (%s)", self.jid, exc)
                raise Internal(self._unavailable()) from None
        raise AssertionError("unreachable")

    def _unavailable(self) -> str:
        if self.submitted:
            return (
                "storage temporarily unavailable; the job goes on: read its result with "
                f"GET {JOBS_PATH}/{self.jid}"
            )
        return "storage temporarily unavailable; the job was not submitted: try again later"

    def _log_left(self) -> None:
        if self.jid is None:
            return
        if self.submitted:
            log.info("job %s: client left; the job goes on", self.jid)
        else:
            log.info(
                "job %s: client left before submit; the upload expires in %g s",
                self.jid,
                self.cfg.job_upload_ttl_s,
            )

    async def _fail(self, err: StreamscribeError) -> None:
        self.ctx.metrics.inc(f'errors_total{{code="{err.code}"}}')
        log.info("job %s: %s (%d): %s", self.jid, err.code, err.close_code, err.message)
        with contextlib.suppress(ConnectionClosed):
            await self.ws.send(build_server_message(error_message(err)))
        with contextlib.suppress(ConnectionClosed):
            await self.ws.close(err.close_code, close_reason(err.message))

    def _upload(self) -> Upload:
        assert self.upload is not None
        return self.upload

    def _jid(self) -> JobId:
        assert self.jid is not None
        return self.jid


def json_body(body: dict[str, Any]) -> str:
    return json.dumps(body, ensure_ascii=False) + "\n"
