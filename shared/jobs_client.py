"""The Python SDK for file jobs: upload a file's audio, then read or wait for its result.

    receipt = await submit_job("wss://host:8765/v1/listen", pcm, sample_rate=16000)
    result = await wait_job(receipt.url, receipt.job_id)   # or keep_open=True on submit
    print(result["text"])

The URL may be any of the gateway's endpoints (`/v1/listen`, `/v1/jobs`, or the bare
`wss://host:port`): the jobs endpoints are found from its host and port. The wire
contract is docs/protocol.md, *File jobs*.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

JOBS_PATH = "/v1/jobs"
#: Bytes per upload message: under the gateway's default max_frame_bytes (65,536).
DEFAULT_CHUNK_BYTES = 60_000

Progress = Callable[[dict[str, Any]], None]


class JobError(Exception):
    """The service refused or failed the job: `code` is the protocol's error code
    (`bad_request`, `overloaded`, ..., or `job_failed`), `close_code` the WebSocket
    close code or HTTP status where there was one."""

    def __init__(self, code: str, message: str, close_code: int | None = None) -> None:
        super().__init__(f"{code}: {message}" if message else code)
        self.code = code
        self.message = message
        self.close_code = close_code


@dataclass(frozen=True, slots=True)
class JobReceipt:
    """What `job.queued` said: the job is stored and queued."""

    url: str  # the gateway's jobs URL (wss://host:port/v1/jobs)
    job_id: str
    audio_seconds: float
    position: int


def jobs_url(url: str) -> str:
    """`wss://host:port/v1/jobs` from any URL of the gateway."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("ws", "wss"):
        raise ValueError(f"not a WebSocket URL (ws:// or wss://): {url!r}")
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, JOBS_PATH, "", ""))


def result_url(url: str, job_id: str) -> str:
    """`https://host:port/v1/jobs/<job_id>` (http:// for a ws:// gateway)."""
    parts = urllib.parse.urlsplit(jobs_url(url))
    scheme = "https" if parts.scheme == "wss" else "http"
    return urllib.parse.urlunsplit((scheme, parts.netloc, f"{JOBS_PATH}/{job_id}", "", ""))


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


async def submit_job(
    url: str,
    audio: bytes,
    *,
    sample_rate: int = 16000,
    encoding: str = "pcm_s16le",
    channels: int = 1,
    language: str | None = None,
    name: str = "",
    api_key: str | None = None,
    ssl_context: ssl.SSLContext | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    wait: bool = False,
    on_progress: Progress | None = None,
) -> tuple[JobReceipt, dict[str, Any] | None]:
    """Upload `audio` (raw samples in the declared format) as one job and submit it.

    Returns the receipt and, with `wait`, the finished job (`job.done`'s fields: `text`,
    `segments`, ...) after staying connected for it; `on_progress` gets each
    `job.progress`. Raises JobError when the service refuses the job or it fails; an
    upload cut before `job.queued` queued nothing and may simply be sent again.
    """
    if chunk_bytes < 1:
        raise ValueError("chunk_bytes must be at least 1")
    query: dict[str, str | int] = {
        "sample_rate": sample_rate,
        "encoding": encoding,
        "channels": channels,
    }
    if language:
        query["language"] = language
    if name:
        query["name"] = name
    target = f"{jobs_url(url)}?{urllib.parse.urlencode(query)}"
    async with connect(
        target,
        ssl=ssl_context,
        additional_headers=_headers(api_key),
        compression=None,
        max_size=None,  # a finished job's transcript can be long
        open_timeout=30,
    ) as ws:
        created = await _expect(ws, "job.created")
        try:
            for start in range(0, len(audio), chunk_bytes):
                await ws.send(audio[start : start + chunk_bytes])
            await ws.send(json.dumps({"type": "submit"}))
        except ConnectionClosed:
            pass  # the reason is in the error message the service sent first
        queued = await _expect(ws, "job.queued")
        receipt = JobReceipt(
            jobs_url(url),
            str(queued.get("job_id", created["job_id"])),
            float(queued["audio_seconds"]),
            int(queued["position"]),
        )
        if not wait:
            return receipt, None
        while True:
            msg = await _next(ws)
            if msg["type"] == "job.progress":
                if on_progress is not None:
                    on_progress(msg)
            elif msg["type"] == "job.done":
                return receipt, msg
            elif msg["type"] == "job.failed":
                raise JobError("job_failed", str(msg.get("error", "")))


async def _next(ws: ClientConnection) -> dict[str, Any]:
    try:
        raw = await ws.recv()
    except ConnectionClosed as exc:
        code = exc.rcvd.code if exc.rcvd else None
        reason = exc.rcvd.reason if exc.rcvd else "connection lost"
        raise JobError("closed", reason, code) from None
    msg: dict[str, Any] = json.loads(raw)
    if msg.get("type") == "error":
        code = None
        try:
            await ws.wait_closed()
            code = ws.close_code
        except ConnectionClosed:
            pass
        raise JobError(str(msg.get("code")), str(msg.get("message", "")), code)
    return msg


async def _expect(ws: ClientConnection, kind: str) -> dict[str, Any]:
    msg = await _next(ws)
    if msg.get("type") != kind:
        raise JobError("protocol_violation", f"expected {kind}, got {msg.get('type')!r}")
    return msg


def _get(url: str, api_key: str | None, context: ssl.SSLContext | None) -> dict[str, Any]:
    request = urllib.request.Request(url, headers=_headers(api_key))
    try:
        with urllib.request.urlopen(request, timeout=30, context=context) as resp:
            body: dict[str, Any] = json.loads(resp.read())
            return body
    except urllib.error.HTTPError as exc:
        try:
            err = json.loads(exc.read())
        except ValueError:
            err = {}
        raise JobError(
            str(err.get("error", "http_error")), str(err.get("message", exc.reason)), exc.code
        ) from None


async def get_job(
    url: str, job_id: str, *, api_key: str | None = None, ssl_context: ssl.SSLContext | None = None
) -> dict[str, Any]:
    """The job's state now (`GET /v1/jobs/<job_id>`): with its segments so far."""
    return await asyncio.to_thread(_get, result_url(url, job_id), api_key, ssl_context)


async def wait_job(
    url: str,
    job_id: str,
    *,
    api_key: str | None = None,
    ssl_context: ssl.SSLContext | None = None,
    poll_s: float = 2.0,
    timeout_s: float | None = None,
    on_progress: Progress | None = None,
) -> dict[str, Any]:
    """Poll the job until it is done (its view) or failed (JobError `job_failed`);
    TimeoutError after `timeout_s` (None: no limit)."""

    async def poll() -> dict[str, Any]:
        while True:
            view = await get_job(url, job_id, api_key=api_key, ssl_context=ssl_context)
            if view["state"] == "done":
                return view
            if view["state"] == "failed":
                raise JobError("job_failed", str(view.get("error", "")))
            if on_progress is not None:
                on_progress(view)
            await asyncio.sleep(poll_s)

    return await asyncio.wait_for(poll(), timeout_s)
