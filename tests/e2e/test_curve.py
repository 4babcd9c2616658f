"""CurveZMQ between the scheduler and its workers: a worker holding the key pair serves;
a worker with another key pair, or none, never gets in."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from conveyor.tiny_model import make_model
from shared.curve import make_keys
from shared.redis_protocol import read_scheduler_figures, read_status
from tests.stack import REPO, Stack, service_env

pytestmark = pytest.mark.slow

INTRUDERS = ("wrong-key", "plain")  # a worker with another client key pair, and one with no CURVE at all
SENT = "registered with the scheduler"  # what a worker logs once its registration is sent (worker.py)


def _sent_registration(proc: subprocess.Popen, log_path) -> bool:
    assert proc.poll() is None, f"{log_path.name} exited:\n{log_path.read_text()[-3000:]}"
    return SENT in log_path.read_text()


def _figures_written_since(stack: Stack, t: float) -> bool:
    figures = read_scheduler_figures(stack.client, stack.keys)
    return any(f.updated_at > t for f in figures.values())


def _start_intruder(stack: Stack, model_dir, name: str, *curve_args: str) -> subprocess.Popen:
    """A worker the scheduler must not let in, its output in `name`.log beside the stack's."""
    with open(stack.log_dir / f"{name}.log", "w") as log:  # the worker writes to its own copy
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "services.gpu_worker",
                "--model",
                str(model_dir),
                "--device",
                "cpu",
                "--scheduler-address",
                stack.scheduler_address,
                "--worker-id",
                name,
                "--kv-cache-memory",
                "16MiB",
                *curve_args,
            ],
            cwd=REPO,
            env=service_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def test_only_workers_holding_the_key_pair_get_in(redis_server, tmp_path):
    model_dir = make_model(tmp_path / "m", preset="tiny", num_hidden_layers=1, seed=14)
    keys, other = make_keys(), make_keys()
    stack = Stack(redis_server.url, model_dir, tmp_path)
    intruders = []
    try:
        # --flag=value: a Z85 key may start with "-".
        stack.start_scheduler(
            f"--zmq-server-secret-key={keys['CONVEYOR_ZMQ_SERVER_SECRET_KEY']}",
            f"--zmq-client-public-key={keys['CONVEYOR_ZMQ_CLIENT_PUBLIC_KEY']}",
        )
        server_public = f"--zmq-server-public-key={keys['CONVEYOR_ZMQ_SERVER_PUBLIC_KEY']}"
        stack.start_worker(
            "trusted", server_public, f"--zmq-client-secret-key={keys['CONVEYOR_ZMQ_CLIENT_SECRET_KEY']}"
        )
        wrong_key = [server_public, f"--zmq-client-secret-key={other['CONVEYOR_ZMQ_CLIENT_SECRET_KEY']}"]
        for name, curve_args in zip(INTRUDERS, (wrong_key, [])):
            intruders.append(_start_intruder(stack, model_dir, name, *curve_args))
        stack.wait_workers({"trusted"})
        stack.submit("secret", [5, 6, 7, 8], max_tokens=6)
        stack.wait_finished(["secret"])
        assert len(stack.tokens["secret"]) == 6
        stack.wait_until(
            lambda: all(
                _sent_registration(p, tmp_path / f"{name}.log") for p, name in zip(intruders, INTRUDERS)
            ),
            "the intruders to try to register",
            timeout_s=120.0,
        )
        tried = time.time()
        # A registration that got in would be in the next figures the scheduler writes, once
        # it had a heartbeat interval (1 s) to arrive.
        stack.wait_until(
            lambda: _figures_written_since(stack, tried + 1.0), "figures written after the attempts"
        )
        assert set(read_status(stack.client, stack.keys).workers) == {"trusted"}
        assert all(p.poll() is None for p in intruders), "they are up, just never let in"
    finally:
        for p in intruders:
            p.kill()
            p.wait()
        stack.stop()
