"""A test-side stand-in for the scheduler's socket: binds a ROUTER like the real one, talks
to one worker process, and never waits without a deadline (a lost plan fails the test in
seconds instead of hanging the run)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import zmq

from shared import messages as m

REPO = Path(__file__).resolve().parents[2]


def start_worker(*args: str, log=subprocess.PIPE) -> subprocess.Popen:
    """`log`: where its output goes; a pipe only when the test reads it (a full pipe blocks)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.Popen(
        [sys.executable, "-m", "services.gpu_worker", *args],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
    )


class FakeScheduler:
    def __init__(self, send_timeout_s: float = 30.0):
        self.sock = zmq.Context.instance().socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        # A ROUTER silently drops what exceeds a peer's high-water mark; mandatory routing
        # makes a full pipe block the send instead, and SNDTIMEO bounds that block
        # (zmq.Again), so no message is ever lost without the test knowing.
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.sock.setsockopt(zmq.SNDTIMEO, int(send_timeout_s * 1000))
        port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        self.address = f"tcp://127.0.0.1:{port}"
        self.identity = b""  # the worker's main socket, learnt from its first message
        self.heartbeats = 0  # heartbeats skipped so far

    def recv(self, timeout_s: float = 60.0, skip_heartbeats: bool = True) -> m.Message:
        """The worker's next message within timeout_s. The deadline covers the whole wait:
        a worker that only heartbeats (it dropped or never got a plan) fails here too."""
        deadline = time.monotonic() + timeout_s
        while (left_s := deadline - time.monotonic()) > 0:
            # Rounded up, and the deadline checked again: zmq's poll takes whole milliseconds
            # and may wake just before the deadline, which must not end the wait early.
            if not self.sock.poll(math.ceil(left_s * 1000)):
                continue
            identity, data = self.sock.recv_multipart()
            msg = m.decode(data)
            if isinstance(msg, m.Heartbeat):
                self.heartbeats += 1  # they come from a socket of their own: keep `identity`
                if skip_heartbeats:
                    continue
            else:
                self.identity = identity
            return msg
        raise TimeoutError(f"no message but heartbeats from the worker within {timeout_s} s")

    def recv_until(self, last: Callable[[m.Message], bool], timeout_s: float) -> list[m.Message]:
        """Every message up to and including the first that `last` accepts, all within one
        deadline of timeout_s (TimeoutError otherwise)."""
        deadline = time.monotonic() + timeout_s
        got = [self.recv(deadline - time.monotonic())]
        while not last(got[-1]):
            got.append(self.recv(deadline - time.monotonic()))
        return got

    def send_raw(self, data: bytes, identity: bytes | None = None) -> None:
        self.sock.send_multipart([identity or self.identity, data])

    def execute(self, plan: m.StepPlan, timeout_s: float = 60.0) -> m.StepResult:
        self.send_raw(m.encode(plan))
        result = self.recv(timeout_s)
        assert isinstance(result, m.StepResult)
        return result

    def close(self) -> None:
        self.sock.close()
