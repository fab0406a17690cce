"""What the capacity benchmarks share: clips, the machine, `streamscribe up` as a child
process, per-process CPU and memory from /proc, and the section writer for
docs/benchmarks.md. Nothing here measures anything by itself."""

from __future__ import annotations

import contextlib
import csv
import datetime
import json
import os
import platform
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT.parent / "shared" / "audio" / "real"
# Three speakers, 10.6-11 s each, recognised to their last word by tiny.en, with pauses
# between utterances and at the loop point: looped to fill a capacity run. (Not
# librispeech-1272-141231-0002: looped, tiny.en drops the end of its long sentence, and
# "final lag", measured from the last recognised word, then reads 4.5 s at any load.)
DEFAULT_CLIPS = ("jfk", "fleurs-en-000", "fleurs-en-006")
CLK_TCK = os.sysconf("SC_CLK_TCK")


# --- clips -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClipRef:
    id: str
    path: Path
    reference: str
    duration_s: float


def load_manifest(folder: Path = REAL) -> dict[str, ClipRef]:
    with open(folder / "manifest.tsv", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    return {
        r["id"]: ClipRef(r["id"], folder / r["file"], r["reference"], float(r["duration_s"]))
        for r in rows
    }


def pick_clips(ids: Sequence[str], folder: Path = REAL) -> list[ClipRef]:
    manifest = load_manifest(folder)
    missing = [i for i in ids if i not in manifest]
    if missing:
        raise SystemExit(f"unknown clip id(s) {', '.join(missing)} in {folder}/manifest.tsv")
    return [manifest[i] for i in ids]


def stage_clips(clips: Sequence[ClipRef], dest: Path) -> list[Path]:
    """Copy the WAVs and write each reference as FILE.txt beside it (what `loadtest` reads
    for WER); the shared clip folder itself is read-only."""
    dest.mkdir(parents=True, exist_ok=True)
    out = []
    for c in clips:
        wav = dest / c.path.name
        shutil.copyfile(c.path, wav)
        wav.with_suffix(".txt").write_text(c.reference + "\n")
        out.append(wav)
    return out


# --- the machine -------------------------------------------------------------------------


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def machine() -> str:
    return (
        f"{os.cpu_count()}-core {platform.machine()} VM ({cpu_model()}), "
        f"Python {platform.python_version()}"
    )


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} / {five:.2f} / {fifteen:.2f}"


def system_busy_s() -> float:
    """CPU seconds all cores have spent busy since boot (not idle, not waiting on I/O)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


def wait_quiet(max_wait_s: float = 180.0, cores: float = 0.3, window_s: float = 2.0) -> float:
    """Wait (bounded) until the machine uses less than `cores` cores over a window: other
    people share it. Returns the last measured busy cores (the figure to report)."""
    deadline = time.monotonic() + max_wait_s
    while True:
        b0, t0 = system_busy_s(), time.monotonic()
        time.sleep(window_s)  # the measuring window, not a synchronisation
        busy = (system_busy_s() - b0) / (time.monotonic() - t0)
        if busy < cores or time.monotonic() >= deadline:
            return busy


def speed_ms(loops: int = 3) -> float:
    """How fast this machine runs Python now: the best of `loops` timings of a fixed
    loop of 2,000,000 additions, in ms (lower is faster). On this shared VM such a loop's
    time has varied by a factor of up to 1.8 within an hour, and every process's CPU
    per frame moves with it, so the ingest tables print it beside each run."""
    best = float("inf")
    for _ in range(loops):
        t = time.perf_counter()
        total = 0
        for i in range(2_000_000):
            total += i
        best = min(best, time.perf_counter() - t)
    return 1000 * best


def today() -> str:
    return datetime.date.today().isoformat()


def replace_section(path: Path, heading: str, section: str) -> None:
    """Replace the `## heading` section of a markdown file (or append it)."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    start = text.find(heading + "\n")
    if start < 0:
        text = text.rstrip() + "\n\n" + section.rstrip() + "\n"
    else:
        end = text.find("\n## ", start + len(heading))
        rest = text[end + 1 :] if end >= 0 else ""
        text = text[:start] + section.rstrip() + "\n" + ("\n" + rest if rest else "")
    path.write_text(text)


def model_heading(heading: str, model: str) -> str:
    """A benchmark's section heading; a model other than tiny.en gets a section of its own."""
    return heading if model == "tiny.en" else f"{heading} ({model})"


def engine_text(model: str, device: str) -> str:
    """How a section names the model and where it ran (the worker's compute type)."""
    return f"{model} int8 CPU" if device == "cpu" else f"{model} on {device}, its own compute type"


def fmt(value: float | None, digits: int = 1) -> str:
    """A figure for a table: `-` when there is none."""
    return "-" if value is None else f"{value:.{digits}f}"


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


# --- processes ---------------------------------------------------------------------------


def children(pid: int) -> list[int]:
    out: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            text = (task / "children").read_text().split()
            out += [int(p) for p in text]
    return out


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far (its threads included)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds of each thread of a process."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            out[int(task.name)] = cpu_s_of(task / "stat")
    return out


def cpu_s_of(stat_path: Path) -> float:
    fields = stat_path.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def python_thread_names(pid: int) -> dict[int, str]:
    """Native thread id -> Python thread name, from `py-spy dump` (empty without py-spy).
    Threads it does not list are native pools (CTranslate2's, here)."""
    exe = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))
    if exe is None:
        return {}
    try:
        out = subprocess.run(
            [exe, "dump", "--nonblocking", "-p", str(pid)],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return {}
    names = {}
    for line in out.splitlines():
        m = re.match(r'Thread (0x[0-9A-Fa-f]+|\d+) \(([^)]*)\): "(.*)"', line)
        if m:
            names[int(m.group(1), 0)] = m.group(3)
    return names


THREAD_GROUPS = ("ctranslate2", "vad", "engine-py", "event loop", "other")


def group_thread(name: str | None) -> str:
    if name is None:
        return "ctranslate2"  # not a Python thread: CTranslate2's compute pool
    if name.startswith("vad"):
        return "vad"
    if name.startswith("engine"):
        return "engine-py"
    if name == "MainThread":
        return "event loop"
    return "other"


def worker_thread_cores(
    pid: int, before: dict[int, float], after: dict[int, float], wall_s: float
) -> dict[str, float]:
    """Average cores used per thread group of the worker between two `thread_cpu` calls."""
    names = python_thread_names(pid)
    out = dict.fromkeys(THREAD_GROUPS, 0.0)
    for tid, cpu in after.items():
        out[group_thread(names.get(tid))] += (cpu - before.get(tid, 0.0)) / wall_s
    return out


def streamscribe() -> list[str]:
    """The `streamscribe` console command, or the same entry point through this Python."""
    found = shutil.which("streamscribe")
    return [found] if found else [sys.executable, "-m", "shared.cli"]


class UpService:
    """`streamscribe up` in a child process with its own state dir and a free port."""

    def __init__(
        self,
        state_dir: Path,
        args: Sequence[str],
        log_path: Path,
        pythonpath: str | None = None,
    ) -> None:
        self.state_dir = state_dir
        self.args = list(args)
        self.log_path = log_path
        # Another checkout's code, first on the path of `up` and every process it starts
        # (a `git worktree` of an older commit: A/B of two versions, bench/ab.py).
        self.pythonpath = pythonpath
        self.proc: subprocess.Popen[bytes] | None = None
        self.info: dict[str, Any] = {}
        self.pids: dict[str, int] = {}  # the first process of each role
        self.role_pids: dict[str, list[int]] = {}  # every one (`up --workers N`: N workers)

    def start(self, timeout_s: float = 300.0) -> None:
        from shared.embedded import free_port

        self.state_dir.mkdir(parents=True, exist_ok=True)
        cmd = [
            *streamscribe(),
            "up",
            "--state-dir",
            str(self.state_dir),
            "--port",
            str(free_port()),
            *self.args,
        ]
        env = None
        if self.pythonpath:
            env = {**os.environ, "PYTHONPATH": self.pythonpath}
            cmd = [sys.executable, "-m", "shared.cli", *cmd[len(streamscribe()) :]]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                cmd,
                stdout=log,
                stderr=log,
                cwd=self.pythonpath or ROOT,
                env=env,
                start_new_session=True,
            )
        up_json = self.state_dir / "up.json"
        deadline = time.monotonic() + timeout_s
        while not up_json.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                tail = self.log_path.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"streamscribe up did not come up:\n{tail}")
            time.sleep(0.2)
        self.info = json.loads(up_json.read_text())
        for pid in children(self.proc.pid):
            line = cmdline(pid)
            for role in ("gateway", "worker", "valkey"):
                if role in line:
                    self.pids.setdefault(role, pid)
                    self.role_pids.setdefault(role, []).append(pid)
                    break

    @property
    def url(self) -> str:
        return str(self.info["url"])

    @property
    def cafile(self) -> str | None:
        value = self.info.get("cafile")
        return str(value) if value else None

    @property
    def redis_url(self) -> str:
        return str(self.info["redis_url"])

    def cpu(self) -> dict[str, float]:
        """CPU seconds so far per role, summed over its processes (several workers)."""
        out: dict[str, float] = {}
        for role, pids in self.role_pids.items():
            for pid in pids:
                with contextlib.suppress(OSError):
                    out[role] = out.get(role, 0.0) + cpu_s(pid)
        return out

    def rss_mib(self) -> dict[str, float]:
        """Resident memory now per role, MiB, summed over its processes."""
        out: dict[str, float] = {}
        for role, pids in self.role_pids.items():
            for pid in pids:
                with contextlib.suppress(OSError):
                    out[role] = out.get(role, 0.0) + rss_bytes(pid) / (1 << 20)
        return out

    def stop(self, timeout_s: float = 60.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)  # `up` drains the gateway, then the worker
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            started = [p for pids in self.role_pids.values() for p in pids]
            for pid in [*started, self.proc.pid]:  # only what we started
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            self.proc.wait()


@contextlib.contextmanager
def running_up(
    state_dir: Path, args: Sequence[str], log_path: Path, pythonpath: str | None = None
) -> Iterator[UpService]:
    service = UpService(state_dir, args, log_path, pythonpath)
    service.start()
    try:
        yield service
    finally:
        service.stop()


def worker_stats(redis_url: str) -> dict[str, float]:
    """The (one) worker's heartbeat hash: decode counts and its engine's busy fraction."""
    import redis

    from shared import keys
    from shared.keys import WorkerId

    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        ids = cast(list[str], client.zrange(keys.WORKERS, 0, -1))
        out: dict[str, float] = {}
        for wid in ids:
            info = cast(dict[str, str], client.hgetall(keys.worker_info(WorkerId(wid))))
            for k, v in info.items():
                with contextlib.suppress(ValueError):
                    out[k] = out.get(k, 0.0) + float(v)
        return out
    finally:
        client.close()


def streamed_audio_s(report: dict[str, Any]) -> float:
    """Audio seconds sent over all sessions of a `streamscribe loadtest --json` report."""
    return sum(float(s["audio_s_sent"]) for s in report["per_session"])


def interims_per_session_s(report: dict[str, Any]) -> float:
    """Interim results received per session-second of audio sent, over a whole report."""
    audio_s = streamed_audio_s(report)
    interims = sum(int(s["interims_received"]) for s in report["per_session"])
    return interims / audio_s if audio_s else 0.0


def run_loadtest(
    url: str,
    audio: Sequence[Path],
    sessions: int,
    json_out: Path,
    *,
    extra: Sequence[str] = (),
    cafile: str | None = None,
    timeout_s: float = 900.0,
) -> dict[str, Any]:
    """`streamscribe loadtest --json` in its own process; returns the JSON report."""
    cmd = [
        *streamscribe(),
        "loadtest",
        "--url",
        url,
        "--sessions",
        str(sessions),
        "--audio",
        *[str(a) for a in audio],
        "--json",
        str(json_out),
        "--no-progress",
        *extra,
    ]
    if cafile:
        cmd += ["--cafile", cafile]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if not json_out.exists():
        raise RuntimeError(f"loadtest wrote no report (exit {proc.returncode}):\n{proc.stderr}")
    report: dict[str, Any] = json.loads(json_out.read_text())
    report["loadtest_cpu_s"] = (after.ru_utime - before.ru_utime) + (
        after.ru_stime - before.ru_stime
    )
    report["loadtest_table"] = proc.stdout
    return report


def start_child(
    cmd: Sequence[str], ready_prefix: str, log_path: Path, timeout_s: float = 120.0
) -> tuple[subprocess.Popen[bytes], str]:
    """Start a process (own session) and wait for its stdout line starting with
    `ready_prefix`; returns it and the rest of that line. stderr goes to `log_path`; our
    services print nothing else on stdout, so the pipe never fills."""
    import selectors

    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            list(cmd), stdout=subprocess.PIPE, stderr=log, cwd=ROOT, start_new_session=True
        )
    assert proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout_s
    buf = b""
    try:
        while time.monotonic() < deadline:
            if not sel.select(timeout=0.5):
                if proc.poll() is not None:
                    break
                continue
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                break
            buf += chunk
            for line in buf.decode(errors="replace").splitlines():
                if line.startswith(ready_prefix):
                    return proc, line[len(ready_prefix) :].strip()
    finally:
        sel.close()
    stop_child(proc)
    raise RuntimeError(f"{cmd[0]} {' '.join(cmd[1:3])}: no {ready_prefix!r} line; see {log_path}")


def stop_child(proc: subprocess.Popen[bytes], timeout_s: float = 30.0) -> None:
    """SIGTERM, bounded wait, then SIGKILL of this one process."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()
