"""`python -m conveyor status` shows a queue that someone fills with requests, the workers
and their KV use, and the recent errors — read from a real Redis that a real scheduler
process writes."""

from __future__ import annotations

import json
import time

import pytest
import redis

from conveyor.tiny_model import make_model
from shared.figure_records import STALE_AFTER_S
from shared.redis_protocol import read_scheduler_figures, record_startup_failure
from tests.stack import Stack

pytestmark = pytest.mark.slow


def _wait(predicate, timeout_s=30.0):
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def test_status_shows_the_queue_workers_and_errors(redis_server, tmp_path):
    model_dir = make_model(tmp_path / "m", preset="tiny", num_hidden_layers=1, seed=2)
    stack = Stack(redis_server.url, model_dir, tmp_path)
    try:
        stack.start_scheduler()
        for i in range(7):  # no worker yet: they wait in the queue
            stack.submit(f"q{i}", [5, 6, 7, 8], max_tokens=4)
        stack.client.xadd(stack.keys.requests, {b"msg": b"garbage"})
        _wait(
            lambda: (
                (json.loads(stack.conveyor_status("--json").stdout)["scheduler"] or {}).get("waiting") == 7
            )
        )

        # As a worker that cannot start records it (tests/gpu_worker/test_worker_process.py).
        record_startup_failure(
            stack.client, stack.keys, "w-bad", "unsupported architecture ['MambaForCausalLM']"
        )
        out = stack.conveyor_status().stdout
        assert "scheduler   alive" in out
        assert "7 requests in the stream" in out and "waiting 7" in out
        assert "(no worker registered)" in out
        assert "worker w-bad failed to start: unsupported architecture ['MambaForCausalLM']" in out
        assert "rejected" in out, "the garbage entry is among the recent errors"
        assert stack.conveyor_status("--check").returncode == 1, "no worker: not serving"
        assert stack.conveyor_status("--check", "--scheduler-only").returncode == 0

        stack.start_worker("w-status")
        stack.wait_finished([f"q{i}" for i in range(7)])
        # Figures are refreshed about every second, acknowledgements follow the last output.
        _wait(
            lambda: all(
                text in stack.conveyor_status().stdout
                for text in ("w-status", "serving", "0 requests in the stream", "finished    length 7")
            )
        )
        assert stack.conveyor_status("--check").returncode == 0
    finally:
        stack.stop()
    # With the scheduler gone, its figures go stale (STALE_AFTER_S after their last write)
    # and the check fails.
    with redis.Redis.from_url(stack.redis_url) as client:
        written = max(f.updated_at for f in read_scheduler_figures(client, stack.keys).values())
    time.sleep(max(0.0, written + STALE_AFTER_S + 0.5 - time.time()))
    assert stack.conveyor_status("--check", "--scheduler-only").returncode == 1
    assert "NOT RUNNING" in stack.conveyor_status().stdout
