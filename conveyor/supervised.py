"""The processes the launcher supervises: a service (Child), its stderr forwarded to ours with
its last lines kept for the message of a failed start, and the embedded Redis (RedisChild),
with the same fields. A crashed one waits out a doubling backoff before it starts again.
"""

from __future__ import annotations

import logging
import re
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import IO

from conveyor.commands import service_command
from conveyor.embedded_redis import EmbeddedRedis

log = logging.getLogger("conveyor.launcher")  # the launcher's lines, as one log

MAX_BACKOFF_S = 30.0
TAIL_LINES = 50  # of each child's stderr, kept for the message of a configuration error
ERROR_LINE = re.compile(r"\bERROR\b|\berror:|^[\w.]*(Error|Exception)\b")  # a log line, argparse, a traceback
REDIS_LOG_LINES = (
    3  # of the embedded Redis's log, quoted when it exits: why, if it crashed or could not start
)
REDIS_LOG_SCAN = 50  # the lines searched for its last start


@dataclass
class Child:
    name: str
    service: str
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    next_start: float = 0.0
    started_at: float = 0.0
    tail: deque[str] = field(default_factory=lambda: deque(maxlen=TAIL_LINES))  # its last stderr lines
    _reader: threading.Thread | None = None

    def start(self) -> None:
        # stderr (its log) goes through us, to the terminal as it comes, so that its last
        # lines can be quoted if it cannot start.
        # NOTE: Ctrl-C in the terminal signals the whole process group, and a service must not
        # act on it: the gateway's uvicorn re-raises it as a KeyboardInterrupt traceback once
        # it has shut down, and each would stop in its own order. So a service starts with
        # SIGINT blocked (the mask outlives exec; its handlers never run) and the launcher stops
        # them in order with SIGTERM. It stays in our group, so `kill -- -PGID` (and
        # bench/server.py's CPU accounting) still covers it.
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            self.proc = subprocess.Popen(
                service_command(self.service, sys.executable), env=self.env, stderr=subprocess.PIPE
            )
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)  # a Ctrl-C meanwhile was held, now delivered
        self.started_at = time.monotonic()
        self.tail = deque(maxlen=TAIL_LINES)  # the last run's reader may still be appending to the old one
        self._reader = threading.Thread(
            target=_forward, args=(self.proc.stderr, self.tail), name=f"{self.name}-stderr", daemon=True
        )
        self._reader.start()
        log.info("started %s (pid %d)", self.name, self.proc.pid)

    def last_error(self, wait_s: float = 2.0) -> str:
        """What it said before exiting: its last error line and the lines after it (a
        message over several lines), else its last lines."""
        self.output_done(wait_s)  # the lines written just before it exited
        lines = list(self.tail)
        starts = [i for i, line in enumerate(lines) if ERROR_LINE.search(line)]
        return "\n".join(lines[starts[-1] :][:10] if starts else lines[-5:]) or "(it wrote nothing to stderr)"

    def output_done(self, wait_s: float = 2.0) -> None:
        """Waits until its stderr is all forwarded (until it closes: it and any child of it exited)."""
        if self._reader is not None:
            self._reader.join(wait_s)


class RedisChild:
    """The embedded redis-server, supervised as the services are (the same fields as Child):
    without it every request gets 503. It is restarted whatever its exit code, on the same
    port and data directory, so the services reconnect to the URL they were given and find
    the queue in its append-only file."""

    name = service = "redis"

    def __init__(self, server: EmbeddedRedis):
        self.server = server
        self.proc: subprocess.Popen[bytes] | None = server.process
        self.restarts = 0
        self.next_start = 0.0
        self.started_at = time.monotonic()
        self._announce()

    def start(self) -> None:
        self.server.restart()
        self.proc, self.started_at = self.server.process, time.monotonic()
        self._announce()

    def last_error(self) -> str:
        """Where its log is, and its last lines after it last said it was ready: nothing after
        a kill -9, the reason after a crash or a failed start (the file spans every run)."""
        lines = self.server.log_tail(REDIS_LOG_SCAN).splitlines()
        ready = [i for i, line in enumerate(lines) if "Ready to accept connections" in line]
        said = lines[ready[-1] + 1 :] if ready else lines
        return "\n".join([f"its log: {self.server.log_path}", *said[-REDIS_LOG_LINES:]])

    def _announce(self) -> None:
        s = self.server
        log.info(
            "started redis (pid %d) at %s, data in %s (append-only, appendfsync %s)",
            s.pid,
            s.url,
            s.data_dir,
            s.appendfsync,
        )


Supervised = Child | RedisChild


def _forward(stream: IO[bytes], tail: deque[str]) -> None:
    """Copies a child's stderr to ours line by line, keeping the last lines in `tail`."""
    with stream:
        for raw in iter(stream.readline, b""):
            line = raw.decode(errors="replace")
            sys.stderr.write(line)
            sys.stderr.flush()
            tail.append(line.rstrip())


def backoff(child: Supervised, now: float) -> float:
    """How long a crashed process waits before it starts again: 0.5 s, doubling with each
    crash up to MAX_BACKOFF_S; a process that ran a while before dying starts from 0.5 s."""
    if now - child.started_at > 60:
        child.restarts = 0
    delay = min(MAX_BACKOFF_S, 0.5 * 2**child.restarts)
    child.restarts += 1
    return delay
