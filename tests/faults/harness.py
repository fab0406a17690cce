"""Fault-injection harness: real processes that a test can kill, stop and restart.

- `ValkeyServer`: a `valkey-server` child with AOF (`appendfsync everysec`) on a fixed port
  and data directory, so it can be stopped, SIGKILLed, paused and restarted in place.
- `ServiceProcess`: `python -m shared.cli worker|gateway ...` in its own process group,
  stdout and stderr captured to a log file; readiness is the process's own "ready" line.
- `Cluster`: one Valkey, N workers, M gateways; `close()` kills whatever is left.
- `TcpProxy`: a loopback TCP proxy between clients and a gateway that can cut every
  connection and refuse new ones, or silently drop all bytes (a dead link).

Used by tests/faults (pytest) and bench/faults.py (the reliability benchmark).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import redis.asyncio as aioredis

from shared.embedded import free_port, valkey_binary

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures" / "audio"
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0

#: Settings every fault-test worker gets (environment, so that settings a given revision
#: does not know are ignored instead of failing the command line).
WORKER_ENV = {
    "STREAMSCRIBE_LEASE_S": "3",
    "STREAMSCRIBE_HEARTBEAT_S": "1",
    "STREAMSCRIBE_TAKEOVER_INTERVAL_S": "0.5",
    "STREAMSCRIBE_WORKER_ALIVE_S": "3",
    "STREAMSCRIBE_CPU_THREADS": "1",
    "STREAMSCRIBE_DEVICE": "cpu",
    "STREAMSCRIBE_READ_BLOCK_MS": "50",
    # Every final decoded alone: which finals share a packed window depends on timing
    # (a takeover makes one worker decode several sessions' finals at once), and a packed
    # decode may differ by a word from an alone one ("sailed away" / "sailed that way" in
    # s1), which the WER-vs-no-fault check would read as damage. Packing is tested in
    # tests/unit/test_packing.py and tests/e2e/test_packing_model.py.
    "STREAMSCRIBE_PACK_FINALS": "1",
}
GATEWAY_ENV = {
    "STREAMSCRIBE_HEARTBEAT_S": "1",
    "STREAMSCRIBE_WORKER_ALIVE_S": "3",
    "STREAMSCRIBE_RECONCILE_INTERVAL_S": "0.5",
}


def now_ms() -> int:
    return int(time.time() * 1000)


def child_env(extra: Mapping[str, str]) -> dict[str, str]:
    """The test's environment without any STREAMSCRIBE_* setting, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMSCRIBE_")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


class ProcessFailed(RuntimeError):
    """A child process exited, or did not print its ready line in time."""


class ManagedProcess:
    """A child in its own process group, output copied line by line to a log file.

    A reader thread copies the output and sets `ready` when a line contains `marker`;
    `exited` is set at end of output. Signals go to the whole process group.
    """

    def __init__(
        self,
        name: str,
        args: Sequence[str],
        log_path: Path,
        marker: str,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.name = name
        self.args = list(args)
        self.log_path = log_path
        self.marker = marker
        self.env = dict(env) if env is not None else None
        self.proc: subprocess.Popen[str] | None = None
        self.ready_line = ""
        self.ready = threading.Event()
        self.exited = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self.alive:
            raise RuntimeError(f"{self.name} is already running")
        self.ready.clear()
        self.exited.clear()
        self.ready_line = ""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            self.args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=ROOT,
            env=self.env,
            start_new_session=True,
        )
        self._thread = threading.Thread(
            target=self._copy, args=(self.proc,), name=f"log-{self.name}", daemon=True
        )
        self._thread.start()

    def _copy(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        with open(self.log_path, "a") as log:
            log.write(f"--- {self.name} started: pid {proc.pid} ---\n")
            for line in proc.stdout:
                log.write(line)
                log.flush()
                if not self.ready.is_set() and self.marker in line:
                    self.ready_line = line.strip()
                    self.ready.set()
        proc.stdout.close()
        self.exited.set()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_ready(self, timeout_s: float = START_TIMEOUT_S) -> str:
        """Block until the ready line appears; raise with the log's tail if the process
        exits first or the deadline passes."""
        deadline = time.monotonic() + timeout_s
        while not self.ready.wait(0.05):
            if self.exited.is_set() or time.monotonic() > deadline:
                code = self.proc.poll() if self.proc else None
                raise ProcessFailed(f"{self.name} not ready (exit code {code}):\n{self.log_tail()}")
        return self.ready_line

    async def wait_ready_async(self, timeout_s: float = START_TIMEOUT_S) -> str:
        return await asyncio.to_thread(self.wait_ready, timeout_s)

    def signal(self, sig: signal.Signals) -> None:
        if self.alive:
            os.killpg(self.pid, sig)

    def kill(self) -> int:
        """SIGKILL the process group; returns the time of the kill (unix ms)."""
        self.signal(signal.SIGCONT)  # a stopped group still dies, but be explicit
        at = now_ms()
        self.signal(signal.SIGKILL)
        self.wait()
        return at

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM (graceful); SIGKILL after `timeout_s`."""
        if not self.alive:
            return
        self.signal(signal.SIGCONT)
        self.signal(signal.SIGTERM)
        try:
            self.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()

    def pause(self) -> int:
        at = now_ms()
        self.signal(signal.SIGSTOP)
        return at

    def resume(self) -> int:
        at = now_ms()
        self.signal(signal.SIGCONT)
        return at

    def wait(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        if self.proc is not None:
            self.proc.wait(timeout_s)
        if self._thread is not None:
            self._thread.join(timeout_s)

    def log_tail(self, chars: int = 6000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except FileNotFoundError:
            return "(no log)"


class ValkeyServer(ManagedProcess):
    """valkey-server with AOF `everysec` on a fixed port and data dir: restartable in place."""

    def __init__(self, data_dir: Path, port: int | None = None, *, appendonly: bool = True):
        self.data_dir = data_dir
        self.port = port or free_port()
        args = [
            valkey_binary(),
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(data_dir),
            "--save",
            "",
            "--appendonly",
            "yes" if appendonly else "no",
            "--appendfsync",
            "everysec",
            "--daemonize",
            "no",
            "--protected-mode",
            "yes",
            "--loglevel",
            "notice",
        ]
        super().__init__("valkey", args, data_dir / "valkey.log", "Ready to accept connections")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        super().start()

    def restart(self, timeout_s: float = START_TIMEOUT_S) -> None:
        """Start again on the same port and data directory (loads the AOF)."""
        self.start()
        self.wait_ready(timeout_s)

    @property
    def aof_dir(self) -> Path:
        return self.data_dir / "appendonlydir"

    def snapshot_aof(self) -> Path:
        """Copy the AOF as it is on disk now: what an fsync at this moment would keep."""
        target = self.data_dir / "aof-snapshot"
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(self.aof_dir, target)
        return target

    def restore_aof(self, snapshot: Path) -> None:
        """Replace the AOF (server stopped) by an earlier snapshot: the state a machine
        crash leaves behind when the last fsync was at the snapshot. The copy may end in
        a torn command, which Valkey drops on load (`aof-load-truncated yes`)."""
        if self.alive:
            raise RuntimeError("stop valkey before restoring its AOF")
        shutil.rmtree(self.aof_dir)
        shutil.copytree(snapshot, self.aof_dir)


class ServiceProcess(ManagedProcess):
    """A `streamscribe gateway` or `worker` process."""

    url: str = ""

    def wait_ready(self, timeout_s: float = START_TIMEOUT_S) -> str:
        line = super().wait_ready(timeout_s)
        if self.marker.startswith("streamscribe gateway"):
            self.url = line.split(": ", 1)[1].strip()
        return line


@dataclass
class Cluster:
    """One Valkey (AOF), workers and gateways as separate processes; `close()` kills all."""

    base_dir: Path
    worker_env: dict[str, str] = field(default_factory=lambda: dict(WORKER_ENV))
    gateway_env: dict[str, str] = field(default_factory=lambda: dict(GATEWAY_ENV))
    valkey: ValkeyServer | None = None
    workers: dict[str, ServiceProcess] = field(default_factory=dict)
    gateways: dict[str, ServiceProcess] = field(default_factory=dict)

    def start_valkey(self) -> ValkeyServer:
        self.valkey = ValkeyServer(self.base_dir / "valkey")
        self.valkey.start()
        self.valkey.wait_ready()
        return self.valkey

    @property
    def redis_url(self) -> str:
        assert self.valkey is not None
        return self.valkey.url

    def redis(self) -> aioredis.Redis:
        return cast(
            aioredis.Redis, aioredis.Redis.from_url(self.redis_url, socket_connect_timeout=2)
        )

    def add_worker(self, wid: str, *extra: str, slots: int = 4) -> ServiceProcess:
        args = [sys.executable, "-m", "shared.cli", "worker", "--redis-url", self.redis_url]
        args += ["--worker-id", wid, "--lease-s", self.worker_env["STREAMSCRIBE_LEASE_S"]]
        args += ["--slots", str(slots), *extra]
        proc = ServiceProcess(
            wid,
            args,
            self.base_dir / f"{wid}.log",
            f"streamscribe worker {wid}: ready",
            child_env(self.worker_env),
        )
        self.workers[wid] = proc
        proc.start()
        return proc

    def add_gateway(self, name: str, *extra: str) -> ServiceProcess:
        args = [sys.executable, "-m", "shared.cli", "gateway", "--redis-url", self.redis_url]
        args += ["--port", "0", "--certfile", "none", *extra]
        proc = ServiceProcess(
            name,
            args,
            self.base_dir / f"{name}.log",
            "streamscribe gateway: ",
            child_env(self.gateway_env),
        )
        self.gateways[name] = proc
        proc.start()
        return proc

    def start(self, *, workers: int = 1, gateways: int = 1, slots: int = 4) -> None:
        """Valkey, then all workers and gateways at once; returns when all are ready."""
        self.start_valkey()
        for i in range(1, workers + 1):
            self.add_worker(f"w{i}", slots=slots)
        for i in range(1, gateways + 1):
            self.add_gateway(f"g{i}")
        for proc in [*self.workers.values(), *self.gateways.values()]:
            proc.wait_ready()

    async def start_async(self, *, workers: int = 1, gateways: int = 1, slots: int = 4) -> None:
        await asyncio.to_thread(self.start, workers=workers, gateways=gateways, slots=slots)

    def gateway_urls(self) -> list[str]:
        return [g.url for g in self.gateways.values() if g.alive]

    def processes(self) -> list[ManagedProcess]:
        procs: list[ManagedProcess] = [*self.workers.values(), *self.gateways.values()]
        if self.valkey is not None:
            procs.append(self.valkey)
        return procs

    def close(self) -> None:
        """Kill every process still running (stopped ones too)."""
        for proc in self.processes():
            with contextlib.suppress(ProcessLookupError, subprocess.TimeoutExpired):
                proc.kill()

    def logs(self, chars: int = 4000) -> str:
        return "\n".join(
            f"===== {p.name} ({p.log_path}) =====\n{p.log_tail(chars)}" for p in self.processes()
        )


# --- network faults between client and gateway -------------------------------------------


class TcpProxy:
    """A loopback TCP proxy to a gateway that a test can cut or silence.

    - `cut()`: abort every open connection (both sides) and refuse new ones (accepted,
      then reset at once) until `restore()`.
    - `blackhole(True)`: keep connections open but drop every byte both ways: a dead
      link that only keepalive pings can notice.
    """

    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.refusing = False
        self.dropping = False
        self.accepted = 0
        self.refused = 0
        self._server: asyncio.Server | None = None
        self._pairs: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._refused_changed = asyncio.Event()

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return self.port

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    def url(self, gateway_url: str) -> str:
        """`gateway_url` with host and port replaced by the proxy's."""
        scheme, rest = gateway_url.split("://", 1)
        path = rest[rest.index("/") :]
        return f"{scheme}://127.0.0.1:{self.port}{path}"

    def retarget(self, port: int, host: str = "127.0.0.1") -> None:
        self.target = (host, port)

    def cut(self) -> None:
        self.refusing = True
        for client, upstream in list(self._pairs):
            client.transport.abort()
            upstream.transport.abort()
        self._pairs.clear()

    def restore(self) -> None:
        self.refusing = False
        self.dropping = False

    def blackhole(self, on: bool = True) -> None:
        self.dropping = on

    async def wait_refused(self, count: int, timeout_s: float = 30.0) -> None:
        """Until `count` connection attempts have been refused in total."""
        async with asyncio.timeout(timeout_s):
            while self.refused < count:
                self._refused_changed.clear()
                await self._refused_changed.wait()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.refusing:
            self.refused += 1
            self._refused_changed.set()
            writer.transport.abort()
            return
        self.accepted += 1
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        pair = (writer, up_writer)
        self._pairs.add(pair)
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pump(src, dst, pair))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pump(
        self,
        src: asyncio.StreamReader,
        dst: asyncio.StreamWriter,
        pair: tuple[asyncio.StreamWriter, asyncio.StreamWriter],
    ) -> None:
        try:
            while data := await src.read(65536):
                if self.dropping:
                    continue
                dst.write(data)
                await dst.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            self._pairs.discard(pair)
            for w in pair:
                with contextlib.suppress(Exception):
                    w.close()

    async def close(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


async def wait_for(
    probe: Callable[[], object],
    what: str,
    *,
    timeout_s: float = 30.0,
    interval_s: float = 0.05,
) -> object:
    """Poll `probe` (sync or async) until it returns something truthy; bounded in time."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = probe()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        await asyncio.sleep(interval_s)
