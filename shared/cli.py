"""The `streamscribe` command: up, gateway, worker, transcribe, status, loadtest."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import os
import signal
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from shared import __version__
from shared.config import (
    COMMON,
    GATEWAY,
    UP,
    WORKER,
    Config,
    add_arguments,
    env_name,
    host_port,
    load_config,
)
from shared.errors import ConfigError

log = logging.getLogger("streamscribe")


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # Third-party loggers stay quiet at INFO: websockets would log per connection,
    # faster-whisper once per decode, arq once per maintenance run.
    for noisy in ("websockets", "faster_whisper", "arq"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, getattr(logging, level)))


def run_loop(coro: Any) -> None:
    from shared.runtime import tune_gc

    tune_gc()
    try:
        import uvloop

        uvloop.run(coro)
    except ImportError:
        asyncio.run(coro)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="streamscribe",
        description="Real-time speech-to-text over TLS WebSockets, scaled out through Redis.",
    )
    parser.add_argument("--version", action="version", version=f"streamscribe {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = sub.add_parser(
        "up",
        help="start everything locally: (embedded Valkey,) a gateway, a worker, a dev certificate",
        description="Start a complete local service in one process tree. Without --redis-url "
        "an embedded Valkey is started; without --certfile a self-signed development "
        "certificate is made (pass --certfile none for plain ws://). --workers N starts N "
        "worker processes. Ctrl-C stops it all.",
    )
    add_arguments(up, COMMON, GATEWAY, WORKER, UP)

    gw = sub.add_parser(
        "gateway",
        help="run one gateway process",
        description="Run one gateway (needs --redis-url).",
    )
    add_arguments(gw, COMMON, GATEWAY)

    wk = sub.add_parser(
        "worker",
        help="run one worker process",
        description="Run one worker (needs --redis-url). Loads the model "
        "before it claims any session.",
    )
    add_arguments(wk, COMMON, WORKER)

    tr = sub.add_parser(
        "transcribe",
        help="stream a WAV file to the service and print the transcript",
        description="Stream a 16-bit or float WAV file (8-48 kHz, mono or stereo). Interim "
        "results are shown in place, finals line by line. Without --url, uses the "
        "service started by `streamscribe up` on this machine.",
    )
    from shared.transcribe_cli import add_service_arguments

    tr.add_argument("file", help="WAV file to transcribe")
    add_service_arguments(tr, "gateway URL, e.g. wss://host:8765/v1/listen")
    tr.add_argument(
        "--realtime",
        action="store_true",
        help="send at real-time pace (default: as fast as the service acknowledges)",
    )
    tr.add_argument("--frame-ms", type=int, default=100, help="audio per frame (default 100)")
    tr.add_argument("--no-interim", action="store_true", help="ask for finals only")
    tr.add_argument(
        "--language",
        help="language spoken: an ISO 639 code (de, fr, ...) or auto (detection); needs a "
        "multilingual model such as base (default: the service's, en)",
    )
    tr.add_argument("--json", action="store_true", help="print every result as a JSON line")

    from shared.status import add_status_parser

    add_status_parser(sub)

    from shared.loadtest import add_loadtest_parser

    add_loadtest_parser(sub)

    from shared.jobs_cli import add_jobs_parser

    add_jobs_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "transcribe":
            from shared.transcribe_cli import transcribe_command

            return transcribe_command(args)
        if args.command == "status":
            from shared.status import run_status

            return run_status(args)
        if args.command == "loadtest":
            from shared.loadtest import run_loadtest

            return run_loadtest(args)
        if args.command == "jobs":
            from shared.jobs_cli import run_jobs

            return run_jobs(args)
        config = load_config(_config_args(args))
    except ConfigError as exc:
        parser.error(str(exc))
    setup_logging(config.log_level)
    if args.command == "gateway":
        from gateway.server import run_gateway

        config.require_redis_url()
        try:
            config.require_tls_choice()
        except ConfigError as exc:
            parser.error(str(exc))
        run_loop(run_gateway(config))
    elif args.command == "worker":
        from worker.models import ModelError
        from worker.service import run_worker

        config.require_redis_url()
        try:
            run_loop(run_worker(config))
        except (ModelError, ConfigError) as exc:
            log.error("%s", exc)
            return 1
    elif args.command == "up":
        try:
            worker_metrics_of(config, 0)  # a port range past 65535: before anything starts
        except ConfigError as exc:
            parser.error(str(exc))
        return up(config)
    return 0


def _config_args(args: argparse.Namespace) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(Config)}
    return {k: v for k, v in vars(args).items() if k in names}


# --- up ---------------------------------------------------------------------------------


def _child_env(config: Config) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    for f in dataclasses.fields(Config):
        value = getattr(config, f.name)
        if value is None:
            env.pop(env_name(f.name), None)
        elif isinstance(value, tuple):
            env[env_name(f.name)] = ",".join(value)
        else:
            env[env_name(f.name)] = str(value)
    return env


def _wait_line(proc: subprocess.Popen[str], prefix: str, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            if proc.poll() is not None:
                raise RuntimeError(f"{prefix.strip()} process exited with code {proc.returncode}")
            continue
        if line.startswith(prefix):
            return line[len(prefix) :].strip()
    raise RuntimeError(f"timed out waiting for {prefix.strip()}")


def worker_cpu_threads(config: Config, cores: int) -> int:
    """CPU threads per decode for each of `up`'s workers: `cpu_threads` as set, or with 0
    (the default) the cores shared out among every decode of every worker (at least 1)."""
    if config.cpu_threads:
        return config.cpu_threads
    return max(1, cores // (config.workers * config.decode_threads))


def worker_metrics_of(config: Config, i: int) -> str:
    """`worker_metrics` of `up`'s worker `i` (from 0): port PORT+i, so that each of
    `--workers N` has its own (port 0 stays 0: each picks a free one)."""
    if not config.worker_metrics:
        return ""
    host, port = host_port(config.worker_metrics, "worker_metrics")
    if port == 0:
        return config.worker_metrics
    if port + config.workers - 1 > 65535:
        raise ConfigError(
            f"--worker-metrics: ports {port}..{port + config.workers - 1} for "
            f"{config.workers} workers go past 65535"
        )
    host = f"[{host}]" if ":" in host else host
    return f"{host}:{port + i}"


def up(config: Config) -> int:
    """Start Valkey (if needed), a gateway and `workers` workers as child processes; stop
    on signal."""
    from shared.devcert import ensure_dev_cert
    from shared.embedded import EmbeddedValkey

    state = Path(config.state_dir).expanduser()
    state.mkdir(parents=True, exist_ok=True)
    valkey: EmbeddedValkey | None = None
    cafile: str | None = None
    if config.redis_url is None:
        valkey = EmbeddedValkey(state / "valkey", own_session=True)
        valkey.start()
        config = dataclasses.replace(config, redis_url=valkey.url)
        log.info("embedded Valkey on %s", valkey.url)
    if config.certfile is None:
        cert, key = ensure_dev_cert(state)
        config = dataclasses.replace(config, certfile=str(cert), keyfile=str(key))
        cafile = str(cert)
    if config.workers > 1:
        config = dataclasses.replace(
            config, cpu_threads=worker_cpu_threads(config, os.cpu_count() or 1)
        )
    env = _child_env(config)
    # -P: not the current directory first on sys.path, where a folder of the user's named
    # `shared` (or `gateway`, `worker`) would shadow this package in the children.
    cmd = [sys.executable, "-P", "-m", "shared.cli"]
    children: list[subprocess.Popen[str]] = []
    workers: list[subprocess.Popen[str]] = []
    stop = {"flag": False}

    def _stop(_signum: int, _frame: Any) -> None:
        stop["flag"] = True

    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    try:
        gateway = subprocess.Popen(
            [*cmd, "gateway"], env=env, stdout=subprocess.PIPE, text=True, start_new_session=True
        )
        children.append(gateway)
        url = _wait_line(gateway, "streamscribe gateway: ", 60)
        # Each worker starts once the gateway and the workers before it are up: with slots
        # auto it times its model at start-up, which another process starting beside it
        # would slow (fewer slots); and the first joins a model shipped in parts, once.
        print("loading the model...", flush=True)
        ready: list[str] = []
        for i in range(config.workers):
            own = {env_name("worker_metrics"): worker_metrics_of(config, i)}
            worker = subprocess.Popen(
                [*cmd, "worker"],
                env={**env, **own},
                stdout=subprocess.PIPE,
                text=True,
                start_new_session=True,
            )
            workers.append(worker)
            children.append(worker)
            ready.append(_wait_line(worker, "streamscribe worker ", 300))
        info = {
            "url": url,
            "redis_url": config.redis_url,
            "cafile": cafile,
            "pid": os.getpid(),
            "api_key_required": bool(config.api_keys),
        }
        (state / "up.json").write_text(json.dumps(info, indent=2))
        print(f"streamscribe is up\n  url:   {url}\n  redis: {config.redis_url}", flush=True)
        for i, line in enumerate(ready):
            name = "worker" if len(ready) == 1 else f"worker {i + 1} of {len(ready)}"
            print(f"  {name}: {line.partition('ready, ')[2] or line}", flush=True)
        if cafile:
            print(f"  dev certificate (trust it or use --insecure): {cafile}", flush=True)
        print(
            "Try: streamscribe transcribe FILE.wav   (a whole file as a job: streamscribe "
            "jobs submit FILE.wav --wait; Ctrl-C stops everything)",
            flush=True,
        )
        while not stop["flag"]:
            for child in children:
                if child.poll() is not None:
                    log.error("a child process exited (code %s); stopping", child.returncode)
                    stop["flag"] = True
            time.sleep(0.2)
    except RuntimeError as exc:
        log.error("%s", exc)
        return 1
    finally:
        print("stopping...", flush=True)
        # The gateway drains first, then the workers, all at once.
        for stage in ([c for c in children if c not in workers], workers):
            running = [c for c in stage if c.poll() is None]
            for child in running:
                child.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + config.drain_timeout_s + 5
            for child in running:
                try:
                    child.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    child.kill()
        if valkey is not None:
            valkey.stop()
        with_state = state / "up.json"
        if with_state.exists():
            with_state.unlink()
    return 0


def find_up(state_dir: str | None) -> dict[str, Any]:
    """What a running `streamscribe up` on this machine wrote about itself."""
    state = Path(state_dir or load_config({}).state_dir).expanduser()
    path = state / "up.json"
    if not path.exists():
        raise ConfigError(f"no --url given and no running `streamscribe up` found ({path} missing)")
    info: dict[str, Any] = json.loads(path.read_text())
    return info


def http_get(url: str, cafile: str | None = None, timeout_s: float = 2.0) -> tuple[int, str]:
    context = ssl.create_default_context(cafile=cafile) if url.startswith("https") else None
    try:
        with urllib.request.urlopen(url, timeout=timeout_s, context=context) as resp:
            return int(resp.status), resp.read().decode()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read().decode()


if __name__ == "__main__":
    sys.exit(main())
