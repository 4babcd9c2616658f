"""kill -9 of Redis while 50 requests are accepted and streaming, then a restart on the same
port and data directory: with the embedded Redis's `appendfsync always`, every request whose
XADD returned is on disk, so each one completes, once, with the tokens of an undisturbed
greedy run; the scheduler and worker ride out the outage and reconnect."""

from __future__ import annotations

import os
import random
import signal
import time

import pytest

from shared.embedded_redis import free_port, start_embedded_redis
from shared.tiny_model import make_model
from tests.gpu_worker.hf_reference import assert_greedy_matches, hf_greedy
from tests.stack import Stack

pytestmark = pytest.mark.slow

STREAMING, LAST = 40, 10  # streaming at the crash / accepted just before it


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("model"), preset="tiny", num_hidden_layers=2, seed=6)


@pytest.fixture(scope="module")
def workload(model_dir):
    rng = random.Random(13)
    requests = {f"r{i}": ([rng.randrange(3, 4096) for _ in range(rng.choice([5, 20, 40]))], 32)
                for i in range(STREAMING + LAST)}
    outs = hf_greedy(model_dir, [p for p, _ in requests.values()], [n for _, n in requests.values()])
    return requests, dict(zip(requests, outs))


def _wait_streaming(stack: Stack, rids: list[str], timeout_s: float = 120.0) -> None:
    """Until every one of `rids` has streamed a token, so that all are running."""
    deadline = time.monotonic() + timeout_s
    while not all(stack.tokens[r] for r in rids):
        assert time.monotonic() < deadline, stack.log_tail()
        stack.collect(0.05)


def test_kill_9_of_redis_loses_no_accepted_request(model_dir, workload, tmp_path):
    requests, expected = workload
    port, redis_dir = free_port(), tmp_path / "redis"
    server = start_embedded_redis(redis_dir, port=port)
    stack = Stack(server.url, model_dir, tmp_path)
    try:
        stack.start_scheduler()
        stack.start_worker("w1")
        stack.wait_workers({"w1"})
        rids = list(requests)
        for rid in rids[:STREAMING]:
            stack.submit(rid, requests[rid][0], max_tokens=requests[rid][1])
        _wait_streaming(stack, rids[:STREAMING])
        # The last ten are accepted (XADD answered) microseconds before the crash; with
        # appendfsync always they are fsynced before their reply, none is left in memory.
        for rid in rids[STREAMING:]:
            stack.submit(rid, requests[rid][0], max_tokens=requests[rid][1])
        os.kill(server.pid, signal.SIGKILL)
        server.process.wait(10)
        assert len(stack.final) < len(requests), "the crash must come while requests are running"
        time.sleep(1.0)  # an outage: the scheduler serves what it holds and retries Redis
        server = start_embedded_redis(redis_dir, port=port)
        stack.wait_finished(requests)
        for rid in requests:
            assert_greedy_matches(stack.tokens[rid], expected[rid], rid)
            assert len(stack.tokens[rid]) == len(expected[rid].tokens), f"{rid}: a token repeated or lost"
        for name in ("scheduler", "w1"):
            assert stack.procs[name].poll() is None, f"{name} exited across the Redis crash"
        # Every finished request is acknowledged once Redis is back: none stays to replay.
        deadline = time.monotonic() + 15
        while stack.client.xlen(stack.keys.requests) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert stack.client.xlen(stack.keys.requests) == 0, "finished requests left in the queue"
    finally:
        stack.stop()
        server.stop()
