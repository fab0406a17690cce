"""`streamscribe status`: the fleet on one screen, read from Redis alone.

It answers what docs/redis-layout.md answers with `redis-cli` recipes: how many sessions
wait for a worker in each dispatch lane, which workers are alive and how much each holds,
how far each is behind, which gateways are alive or dead and how many sessions each holds,
which sessions wait for their client, how many sessions each API key holds against
`max_sessions_per_key`, how much audio each API key stored per usage window, which file
jobs wait or run and how far each is, which sessions were dead-lettered and why, and
(`--session ID`) who owns one session and where it stands.

The command is four modules:

- `shared/status_model.py`: the collected values, small frozen dataclasses, and the pure
  derivations from them;
- `shared/status_collect.py`: **collectors** (async, redis-py) read Redis through the names
  in `shared/keys.py` and return those dataclasses; they never build key strings themselves;
- `shared/status_render.py`: **renderers** (pure functions) turn those dataclasses into
  lines of text. `--json` prints the same dataclasses as JSON, so a script sees exactly
  what the screen shows;
- this module: the sections, one report from all of them, and the command line.

A *section* is one collector and one renderer (`Section`). `FLEET_SECTIONS` lists the
sections shown on every run, in screen order; `SESSION_SECTION` is added by `--session`.
To show something new, write a dataclass, a collector and a renderer, and append one
`Section` to `FLEET_SECTIONS`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from shared import keys
from shared.config import env_name, flag_name, load_config
from shared.errors import ConfigError
from shared.keys import SessionId
from shared.status_collect import (
    Probe,
    collect_deadletter,
    collect_detached,
    collect_dispatch,
    collect_gateways,
    collect_jobs,
    collect_quotas,
    collect_server,
    collect_session,
    collect_usage,
    collect_workers,
)
from shared.status_model import (
    SESSION_SECTION_NAME,
    Query,
    Report,
    SectionError,
    redact_url,
)
from shared.status_render import (
    Renderer,
    render_deadletter,
    render_detached,
    render_dispatch,
    render_gateways,
    render_jobs,
    render_quotas,
    render_report,
    render_server,
    render_session,
    render_usage,
    render_workers,
    to_json,
)

# Besides what is defined here, the report's types; the collected values are in
# shared/status_model.py.
__all__ = [
    "FLEET_SECTIONS",
    "SESSION_SECTION",
    "Query",
    "Report",
    "Section",
    "SectionError",
    "add_status_parser",
    "collect",
    "collect_from_url",
    "query_from_args",
    "render",
    "run_status",
    "sections_for",
    "to_json",
]


@dataclass(frozen=True, slots=True)
class Section:
    name: str
    collect: Callable[[Probe], Awaitable[object]]
    render: Renderer


FLEET_SECTIONS: tuple[Section, ...] = (
    Section("server", collect_server, render_server),
    Section("dispatch", collect_dispatch, render_dispatch),
    Section("workers", collect_workers, render_workers),
    Section("gateways", collect_gateways, render_gateways),
    Section("detached", collect_detached, render_detached),
    Section("quotas", collect_quotas, render_quotas),
    Section("usage", collect_usage, render_usage),
    Section("jobs", collect_jobs, render_jobs),
    Section("deadletter", collect_deadletter, render_deadletter),
)
SESSION_SECTION = Section(SESSION_SECTION_NAME, collect_session, render_session)


def sections_for(query: Query) -> tuple[Section, ...]:
    if query.session_id is None:
        return FLEET_SECTIONS
    return (*FLEET_SECTIONS, SESSION_SECTION)


async def collect(redis: aioredis.Redis, query: Query) -> Report:
    """Read every section; a Redis that cannot be reached gives a report with `error`."""
    url = redact_url(query.url)
    try:
        seconds, micros = await redis.time()
    except (RedisError, OSError) as exc:
        return Report(url, 0, {}, error=str(exc) or type(exc).__name__)
    # Redis's clock, not this machine's: heartbeats and deadlines are compared with one
    # clock whichever host the operator runs `status` on.
    probe = Probe(redis, query, int(seconds) * 1000 + int(micros) // 1000)
    sections: dict[str, object] = {}
    for section in sections_for(query):
        try:
            sections[section.name] = await section.collect(probe)
        except ResponseError as exc:
            sections[section.name] = SectionError(str(exc))
        except (RedisError, OSError) as exc:  # the connection went away mid-way
            return Report(url, probe.now_ms, sections, error=str(exc) or type(exc).__name__)
    return Report(url, probe.now_ms, sections)


async def collect_from_url(query: Query) -> Report:
    from shared.keys import client_name
    from shared.store import connect

    redis = connect(query.url, client_name("status"))
    try:
        return await collect(redis, query)
    finally:
        await redis.aclose()


def render(report: Report, sections: Sequence[Section] | None = None) -> str:
    """The whole screen as text."""
    chosen = sections or (*FLEET_SECTIONS, SESSION_SECTION)
    return render_report(report, {s.name: s.render for s in chosen})


# --- command line ------------------------------------------------------------------------


def add_status_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    st = subparsers.add_parser(
        "status",
        help="show queues, workers and sessions from Redis on one screen",
        description="Show Redis, both dispatch lanes (sessions waiting for a worker, how "
        "long the oldest has waited, sessions claimed), workers (heartbeat, sessions held, "
        "how far behind), gateways (alive or dead, sessions held), sessions waiting for "
        "their client, the sessions each API key holds against --max-sessions-per-key, "
        "dead-lettered sessions with the reason, and with --session one "
        "session's state, owner, dispatch entry (or queue position) and failures. Without "
        "--redis-url, uses the Redis of `streamscribe up` on this machine. Exit code 1: "
        "Redis unreachable or the session unknown.",
    )
    for name, metavar, text in (
        ("redis_url", "URL", "Redis/Valkey to inspect"),
        ("state_dir", "DIR", "where `up` wrote up.json (used without a Redis URL)"),
        (
            "worker_alive_s",
            "SECONDS",
            "a worker or gateway is alive if it reported within this many s",
        ),
    ):
        st.add_argument(
            flag_name(name),
            dest=name,
            metavar=metavar,
            default=argparse.SUPPRESS,
            help=f"{text} [env {env_name(name)}]",
        )
    st.add_argument("--session", metavar="ID", help="also show this session in detail")
    st.add_argument("--json", action="store_true", help="print the report as JSON")
    st.add_argument(
        "--limit",
        type=int,
        default=20,
        help="rows of long lists (detached and dead-lettered sessions, API keys) to show "
        "(default 20)",
    )


def _redis_url_from_up(state_dir: str) -> str:
    path = Path(state_dir).expanduser() / "up.json"
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        raise ConfigError(
            f"no {flag_name('redis_url')} or {env_name('redis_url')} given, and no running "
            f"`streamscribe up` found ({path} missing or unreadable)"
        ) from None
    url = info.get("redis_url") if isinstance(info, dict) else None
    if not isinstance(url, str):
        raise ConfigError(f"{path} names no redis_url")
    return url


def query_from_args(args: argparse.Namespace) -> Query:
    given = {
        k: v for k, v in vars(args).items() if k in ("redis_url", "state_dir", "worker_alive_s")
    }
    config = load_config(given)
    url = config.redis_url or _redis_url_from_up(config.state_dir)
    sid = args.session
    if sid is not None and not keys.is_session_id(sid):
        raise ConfigError(f"--session: not a session ID (32 lowercase hex characters): {sid!r}")
    if args.limit < 1:
        raise ConfigError(f"--limit must be at least 1, got {args.limit}")
    return Query(
        url=url,
        alive_s=config.worker_alive_s,
        session_id=None if sid is None else SessionId(sid),
        limit=args.limit,
    )


def run_status(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """`streamscribe status`: 0 when printed, 1 when Redis is unreachable or the session
    is unknown. Raises ConfigError for bad arguments."""
    query = query_from_args(args)
    report = asyncio.run(collect_from_url(query))
    stream = out if out is not None else sys.stdout
    if args.json:
        stream.write(json.dumps(to_json(report), indent=2) + "\n")
    else:
        stream.write(render(report))
    return 0 if report.ok else 1
