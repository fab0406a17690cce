"""Fault injection at a larger scale: every scenario of tests/faults, with more sessions.

    python bench/faults.py [--rounds 2] [--sessions N] [--only worker_kill,redis_kill]
                           [--write docs/reliability.md]

Each round of a scenario starts its own real processes (Valkey with AOF everysec,
gateway and worker processes, tiny.en on CPU), streams the fixture clips through the SDK
at real-time pace, injects its fault after 3 s of audio and checks every session (see
tests/faults/invariants.py): frames lost / duplicated / reordered in the audio stream as
stored, finals 0..n-1 exactly once on the client and in the results stream, the closing
summary, fencing epochs, and WER against the no-fault run of the same clips. Takeover time
is `claimed_ms` of the new owner minus the moment of the SIGKILL/SIGSTOP. Prints a table;
with --write, replaces the generated section of docs/reliability.md.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import platform
import re
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shared.scoring import wer
from tests.faults.harness import FIXTURES, Cluster
from tests.faults.scenarios import SCENARIOS, ScenarioResult, clean_run

ROOT = Path(__file__).resolve().parents[1]
START = "<!-- bench/faults.py: start -->"
END = "<!-- bench/faults.py: end -->"

#: Sessions per round by default: as many as two cores keep at real-time pace.
DEFAULT_SESSIONS = {
    "worker_kill": 6,
    "gateway_kill": 6,
    "worker_pause": 4,
    "redis_restart": 4,
    "redis_kill": 4,
    "redis_crash": 4,
    "network_drop": 4,
    "pubsub_cut": 4,
}


@dataclass
class Row:
    name: str
    fault: str = ""
    rounds: int = 0
    sessions: int = 0
    faults: int = 0
    frames: int = 0
    lost: int = 0
    duplicated: int = 0
    reordered: int = 0
    acked_lost: int = 0
    finals: int = 0
    reconnects: int = 0
    takeover_ms: list[int] = field(default_factory=list)
    failed_sessions: int = 0
    errors: list[str] = field(default_factory=list)
    clean: list[str] = field(default_factory=list)
    faulty: list[str] = field(default_factory=list)
    refs: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def add(self, result: ScenarioResult, clean: dict[str, str]) -> None:
        self.fault = result.fault
        self.rounds += 1
        self.sessions += result.sessions
        self.faults += result.faults
        self.takeover_ms += result.takeover_ms
        self.acked_lost += result.acked_frames_lost
        self.errors += result.problems
        self.notes += [f"round {self.rounds}: {n}" for n in result.notes]
        for v in result.verdicts:
            clip = v.name.split("#")[0]
            self.frames += v.frames_sent
            self.lost += v.lost
            self.duplicated += v.duplicated
            self.reordered += v.reordered
            self.finals += v.finals
            self.reconnects += v.reconnects
            self.failed_sessions += 0 if v.ok else 1
            self.errors += [f"{v.name}: {p}" for p in v.problems]
            self.refs.append((FIXTURES / f"{clip}.txt").read_text().strip())
            self.clean.append(clean[clip])
            self.faulty.append(result.texts.get(v.session_id, ""))

    @property
    def ok(self) -> bool:
        return self.rounds > 0 and not self.errors and not self.failed_sessions

    def takeover(self) -> str:
        if not self.takeover_ms:
            return "-"
        median, worst = statistics.median(self.takeover_ms), max(self.takeover_ms)
        return f"{median / 1000:.2f} / {worst / 1000:.2f} (n={len(self.takeover_ms)})"

    def wers(self) -> tuple[str, str, str]:
        if not self.refs:
            return "-", "-", "-"
        return (
            f"{wer(self.refs, self.clean):.3f}",
            f"{wer(self.refs, self.faulty):.3f}",
            f"{wer(self.clean, self.faulty):.3f}",
        )


async def run_round(
    name: str, base: Path, clean: dict[str, str], sessions: int
) -> tuple[ScenarioResult | None, str]:
    """One scenario on a fresh cluster; returns its result, or None and what went wrong."""
    cluster = Cluster(base)
    try:
        return await SCENARIOS[name](cluster, clean, sessions=sessions), ""
    except Exception:
        return None, traceback.format_exc() + "\n" + cluster.logs(2000)
    finally:
        cluster.close()


def table(rows: list[Row]) -> str:
    head = (
        "| scenario | fault injected | sessions | faults | frames sent | lost / dup / "
        "reordered | acked, lost by Redis, re-sent | finals | reconnects | takeover s "
        "(median / worst) | WER clean | WER faulty | faulty vs clean | result |\n"
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n"
    )
    lines = []
    for r in rows:
        w_clean, w_faulty, w_diff = r.wers()
        lines.append(
            f"| {r.name} | {r.fault} | {r.sessions} | {r.faults} | {r.frames} | "
            f"{r.lost} / {r.duplicated} / {r.reordered} | {r.acked_lost} | {r.finals} | "
            f"{r.reconnects} | "
            f"{r.takeover()} | {w_clean} | {w_faulty} | {w_diff} | "
            f"{'ok' if r.ok else 'FAIL'} |"
        )
    return head + "\n".join(lines) + "\n"


def section(rows: list[Row], command: str, seconds: float) -> str:
    when = datetime.date.today().isoformat()
    env = (
        f"{os.cpu_count()}-core {platform.machine()} machine, Python "
        f"{platform.python_version()}, tiny.en int8 on CPU (1 thread per worker), lease 3 s"
    )
    out = [
        START,
        f"Measured {when} on a {env}; command `{command}` ({seconds / 60:.1f} min). "
        "WER columns: corpus WER of the no-fault run and of the faulty run against the "
        "clips' reference texts, and of the faulty run against the no-fault run.",
        "",
        table(rows),
    ]
    for r in rows:
        details = r.notes + [f"**{e}**" for e in r.errors]
        if details:
            out.append(f"- {r.name}: " + "; ".join(details))
    out += ["", END]
    return "\n".join(out)


def write(path: Path, text: str) -> None:
    doc = path.read_text() if path.exists() else f"# Reliability\n\n{START}\n{END}\n"
    if START not in doc:
        doc += f"\n{START}\n{END}\n"
    doc = re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: text, doc, flags=re.S)
    path.write_text(doc)


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2, help="rounds per scenario")
    parser.add_argument("--sessions", type=int, help="sessions per round (default: per scenario)")
    parser.add_argument("--only", help="comma-separated scenarios: " + ", ".join(SCENARIOS))
    parser.add_argument("--write", type=Path, help="replace the generated section of this file")
    args = parser.parse_args()
    names = args.only.split(",") if args.only else list(SCENARIOS)
    unknown = set(names) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenario(s): {', '.join(sorted(unknown))}")
    t0 = time.monotonic()
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="faults-bench-") as tmp:
        base = Path(tmp)
        clean = await clean_run(Cluster(base / "clean"))
        print("no-fault transcripts:", clean, flush=True)
        for name in names:
            row = Row(name)
            started = time.monotonic()
            sessions = args.sessions or DEFAULT_SESSIONS[name]
            for i in range(args.rounds):
                result, error = await run_round(name, base / f"{name}-{i}", clean, sessions)
                if result is None:
                    row.errors.append(f"round {i + 1} crashed: {error.splitlines()[-1]}")
                    print(error, flush=True)
                    continue
                row.add(result, clean)
                print(result.report(), flush=True)
            row.seconds = time.monotonic() - started
            rows.append(row)
    seconds = time.monotonic() - t0
    print(table(rows))
    if args.write:
        command = "python bench/faults.py " + " ".join(sys.argv[1:])
        write(args.write, section(rows, command.strip(), seconds))
        print(f"wrote {args.write}")
    return 0 if all(r.ok for r in rows) else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
