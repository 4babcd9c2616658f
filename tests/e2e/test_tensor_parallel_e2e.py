"""A tensor-parallel worker in the real system: a scheduler, one worker of 2 ranks and one
of 1; kill -9 of the TP worker's follower rank mid-stream takes that worker down (it says
WorkerLeaving and exits 1), and every request completes on the other worker, its stream
unbroken and equal to HF greedy."""

from __future__ import annotations

import random
import signal

import psutil
import pytest

from conveyor.tiny_model import make_model
from shared.redis_protocol import read_status
from tests.gpu_worker.hf_reference import assert_greedy_matches, hf_greedy
from tests.stack import Stack

pytestmark = pytest.mark.slow

MAX_TOKENS = 160  # long enough that a request is still streaming when the kill comes


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("model"), preset="tiny", num_hidden_layers=2, seed=6)


def test_kill_9_of_a_follower_rank_moves_its_requests(redis_server, model_dir, tmp_path):
    rng = random.Random(3)
    prompts = {f"r{i}": [rng.randrange(3, 4096) for _ in range(rng.choice([5, 30, 80]))] for i in range(8)}
    expected = dict(zip(prompts, hf_greedy(model_dir, list(prompts.values()), MAX_TOKENS)))
    stack = Stack(redis_server.url, model_dir, tmp_path)
    try:
        stack.start_scheduler("--stats-interval", "0.2")
        stack.start_worker("tp2", "--tensor-parallel-size", "2")
        stack.start_worker("tp1")
        stack.wait_workers({"tp2", "tp1"})
        follower = psutil.Process(stack.procs["tp2"].pid).children()[0]
        assert "tp_follower" in " ".join(follower.cmdline())
        for rid, prompt in prompts.items():
            stack.submit(rid, prompt, max_tokens=MAX_TOKENS, ignore_eos=True)

        stack.wait_until(
            lambda: stack.mid_stream(prompts, MAX_TOKENS, "tp2"), "the TP worker to run a request", 120
        )
        stack._expected_dead.add("tp2")  # it exits by design once its rank is gone
        follower.send_signal(signal.SIGKILL)

        assert stack.procs["tp2"].wait(timeout=60) == 1
        assert "tensor-parallel rank failed" in stack.log_tail("tp2", lines=200)
        stack.wait_finished(prompts, timeout_s=300)
        for rid in prompts:
            assert_greedy_matches(stack.tokens[rid], expected[rid], rid)
        stack.wait_until(
            lambda: read_status(stack.client, stack.keys).scheduler.migrations > 0,
            "the TP worker's requests to be migrated",
            10,
        )
        assert "tp2" not in read_status(stack.client, stack.keys).workers
    finally:
        stack.stop()
