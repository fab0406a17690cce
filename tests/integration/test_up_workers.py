"""`streamscribe up --workers N` for real: the command's own processes (embedded Valkey, a
gateway, N workers with the null engine), real WebSockets, `status` and `loadtest`."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

CLI = (sys.executable, "-m", "shared.cli")


def test_up_starts_several_workers_that_all_serve_and_all_stop(tmp_path: Path) -> None:
    """`up --workers 2` starts two worker processes one after the other and names each;
    `status` sees both alive with their slots; sessions run through them; each worker's
    own metrics endpoint (`--worker-metrics`, any free port) counts what it decoded;
    Ctrl-C stops the gateway, then both workers, and `up` exits 0."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # Run as a user would: the console script, from a folder that holds a `shared` folder
    # of its own (which once shadowed this package in the children `up` starts).
    script = Path(sys.executable).with_name("streamscribe")
    assert script.exists(), "the package is installed (README's test command)"
    cwd = tmp_path / "somewhere"
    (cwd / "shared").mkdir(parents=True)
    argv = [
        str(script), "up", "--port", "0", "--state-dir", str(tmp_path), "--workers", "2",
        "--engine", "null", "--slots", "3", "--certfile", "none",
        "--worker-metrics", "127.0.0.1:0",
    ]  # fmt: skip
    up = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        cwd=cwd,
        start_new_session=True,
    )
    lines: list[str] = []
    try:
        assert up.stdout is not None
        for line in up.stdout:
            lines.append(line)
            if line.startswith("Try: "):
                break
        else:
            raise AssertionError("".join(lines))
        shown = "".join(lines)
        metrics = re.findall(
            r"  worker ([12]) of 2: 3 slots, metrics on (http://127\.0\.0\.1:\d+/metrics)\n", shown
        )
        assert [n for n, _ in metrics] == ["1", "2"], shown
        assert metrics[0][1] != metrics[1][1], shown
        status = subprocess.run(
            [*CLI, "status", "--state-dir", str(tmp_path), "--json"],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
        )
        assert status.returncode == 0, status.stderr
        workers = json.loads(status.stdout)["workers"]
        alive = [w for w in workers["rows"] if w["alive"]]
        assert len(alive) == 2 and {w["slots"] for w in alive} == {3}, workers
        assert len({w["worker_id"] for w in alive}) == 2
        report = tmp_path / "load.json"
        load_argv = [
            *CLI, "loadtest", "--state-dir", str(tmp_path), "--sessions", "6",
            "--pace", "0", "--no-progress", "--json", str(report),
        ]  # fmt: skip
        load = subprocess.run(
            load_argv,
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
        )
        assert load.returncode == 0, load.stdout + load.stderr
        assert json.loads(report.read_text())["completed"] == 6
        finals = 0.0
        for _, url in metrics:
            with urllib.request.urlopen(url, timeout=30) as answer:
                body = answer.read().decode()
            found = re.search(r"^streamscribe_worker_decodes_final_total (\S+)$", body, re.M)
            assert found is not None
            finals += float(found[1])
        assert finals > 0
    finally:
        os.killpg(up.pid, signal.SIGINT)
        rest, _ = up.communicate(timeout=60)
    assert up.returncode == 0, "".join(lines) + rest
    assert "Traceback" not in rest, rest
    stops = [m.start() for m in re.finditer(r"worker \S+ stopping", rest)]
    assert len(stops) == 2, rest
    assert rest.index("gateway draining") < min(stops), rest
