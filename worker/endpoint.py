"""The worker's HTTP endpoint (`worker_metrics`, off unless set): `GET /metrics` and
`GET /healthz`.

- `/metrics`: the figures of the worker's heartbeat hash (docs/redis-layout.md,
  `ss:worker:<worker_id>`) as Prometheus text, named `streamscribe_worker_<field>`, the
  running totals with `_total` added, and the worker's latency histograms
  (`Worker.histograms`: engine calls, finals' queue wait, finals due to published),
  which the heartbeat does not hold (`render`). Scraped from the worker itself, so an
  operator need not read Redis for them.
- `/healthz`: 200 while the worker serves, 503 once it is stopping. It asks nothing of
  Redis: a liveness probe on it restarts a wedged worker, not every worker during a Redis
  outage.

HTTP/1.1, one request per connection (`Connection: close`), `GET` and `HEAD` only; a
request head larger than `MAX_HEAD_BYTES` gets 431 and one not sent within
`HEAD_TIMEOUT_S` is dropped; past `MAX_CLIENTS` connections at once a new one gets 503
without being read, so idle connections cannot pile up. Nothing here reads the request
body or trusts its headers.
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import logging
from collections.abc import Callable, Mapping
from typing import Any

from shared.metrics import Histogram, Metrics

log = logging.getLogger(__name__)

MAX_HEAD_BYTES = 8192
HEAD_TIMEOUT_S = 5.0
MAX_CLIENTS = 16
LINGER_S = 1.0

#: Heartbeat fields that are running totals since the worker started (Prometheus
#: counters); every other numeric field is a gauge.
COUNTERS = frozenset(
    {
        "engine_busy_s",
        "decodes_final",
        "decodes_interim",
        "decodes_file",
        "interims_dropped_stale",
        "interims_dropped_load",
        "interims_set_aside",
        "interims_withdrawn",
        "interims_floor",
        "packs",
        "packed_finals",
        "packed_interims",
        "pack_retries",
        "batches",
        "batched",
        "early_decodes",
        "early_finals",
        "window_retries",
        "encodes_saved",
    }
)
#: Heartbeat fields that are not figures: `model` and the worker's ID go into
#: `streamscribe_worker_info`'s labels, `claiming` into `streamscribe_worker_claiming`'s.
CLAIM_STATES = ("open", "probing", "closed")
NOT_FIGURES = frozenset({"model", "claiming", "pid"})


def render(
    worker_id: str,
    stats: Mapping[str, Any],
    histograms: Mapping[str, Histogram] | None = None,
) -> str:
    """Prometheus text of one heartbeat's `stats`, and of `histograms` (by name, labels
    included: `engine_call_seconds{kind="final"}`)."""
    metrics = Metrics("streamscribe_worker")
    metrics.set(f'info{{worker_id="{_label(worker_id)}",model="{_label(stats["model"])}"}}', 1)
    for state in CLAIM_STATES:
        metrics.set(f'claiming{{state="{state}"}}', int(stats["claiming"] == state))
    for name, value in stats.items():
        if name in NOT_FIGURES or isinstance(value, bool) or not isinstance(value, int | float):
            continue  # slots_auto_rate is "" with a fixed number of slots
        if name in COUNTERS:
            metrics.total(f"{name}_total", value)
        else:
            metrics.set(name, value)
    for name, histogram in (histograms or {}).items():
        metrics.histogram(name, histogram)
    return metrics.render()


def _label(value: object) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Endpoint:
    """The HTTP server; `start` binds it (port 0: any free one, then in `port`)."""

    def __init__(
        self,
        host: str,
        port: int,
        metrics: Callable[[], str],
        healthy: Callable[[], bool],
    ) -> None:
        self.host = host
        self.port = port
        self._metrics = metrics
        self._healthy = healthy
        self._server: asyncio.Server | None = None
        self.clients = 0  # connections being served now

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._serve, self.host, self.port, limit=MAX_HEAD_BYTES
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.clients += 1
        try:
            answer = await self._read(reader)
            if answer is not None:
                await self._respond(writer, *answer)
                await self._linger(reader, writer)
        except ConnectionError:
            pass
        except Exception:  # one bad request must not stop the endpoint
            log.exception("worker endpoint: request failed")
        finally:
            self.clients -= 1
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _read(self, reader: asyncio.StreamReader) -> tuple[str, http.HTTPStatus, str] | None:
        """The answer to the connection's request: (method, status, body), or None to
        close it without one."""
        if self.clients > MAX_CLIENTS:
            return "GET", http.HTTPStatus.SERVICE_UNAVAILABLE, "too many connections\n"
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HEAD_TIMEOUT_S)
        except asyncio.LimitOverrunError:
            return "GET", http.HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "too large\n"
        except (asyncio.IncompleteReadError, TimeoutError):
            return None  # the client went away or never finished its request
        return self._answer(head)

    @staticmethod
    async def _linger(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Half-close, then read what the client still sends until it closes (at most
        `LINGER_S`): closing a socket with unread input resets it, and the client could
        lose the answer before reading it (an unread request, or the rest of a too
        large one)."""
        if writer.can_write_eof():
            writer.write_eof()
        with contextlib.suppress(TimeoutError, OSError):
            async with asyncio.timeout(LINGER_S):
                while await reader.read(65536):
                    pass

    def _answer(self, head: bytes) -> tuple[str, http.HTTPStatus, str]:
        parts = head.split(b"\r\n", 1)[0].decode("latin-1").split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            return "GET", http.HTTPStatus.BAD_REQUEST, "bad request\n"
        method, target = parts[0], parts[1]
        if method not in ("GET", "HEAD"):
            return method, http.HTTPStatus.METHOD_NOT_ALLOWED, "GET or HEAD only\n"
        path = target.split("?", 1)[0]
        if path == "/metrics":
            return method, http.HTTPStatus.OK, self._metrics()
        if path == "/healthz":
            if self._healthy():
                return method, http.HTTPStatus.OK, "ok\n"
            return method, http.HTTPStatus.SERVICE_UNAVAILABLE, "stopping\n"
        return method, http.HTTPStatus.NOT_FOUND, "not found: /metrics or /healthz\n"

    @staticmethod
    async def _respond(
        writer: asyncio.StreamWriter, method: str, status: http.HTTPStatus, body: str
    ) -> None:
        data = body.encode()
        lines = [
            f"HTTP/1.1 {status.value} {status.phrase}",
            "Content-Type: text/plain; version=0.0.4; charset=utf-8",
            f"Content-Length: {len(data)}",
            "Connection: close",
        ]
        if status == http.HTTPStatus.METHOD_NOT_ALLOWED:
            lines.append("Allow: GET, HEAD")
        writer.write("\r\n".join(lines).encode() + b"\r\n\r\n")
        if method != "HEAD":
            writer.write(data)
        await writer.drain()
