"""The scheduler with real Redis and two real worker processes on a tiny model: greedy
outputs equal Hugging Face's for 50 mixed requests, also when one worker is killed with
SIGKILL mid-run, and when the two have different block sizes (16 and 32); bad input on
every channel is survived. The scheduler speculates (n-gram prompt lookup): proposals are
verified in the same batches, and outputs stay equal to Hugging Face's."""

from __future__ import annotations

import random
import time

import pytest
import zmq

from conveyor.tiny_model import make_model
from shared.figure_records import SystemStatus
from shared.redis_protocol import read_status
from tests.gpu_worker.hf_reference import assert_greedy_matches, hf_greedy, keeper_reference
from tests.stack import KEEPER_TOKENS, Stack

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("model"), preset="tiny", num_hidden_layers=2, seed=4)


@pytest.fixture(scope="module")
def keeper_expected(model_dir):
    return keeper_reference(model_dir)


@pytest.fixture(scope="module")
def workload(model_dir):
    rng = random.Random(0)
    requests = {}
    for i in range(50):
        n = rng.choice([1, 3, 17, 40, 90, 200]) + rng.randrange(5)
        requests[f"req-{i}"] = ([rng.randrange(3, 4096) for _ in range(n)], rng.randrange(1, 20))
    # generate stops at EOS, as the scheduler does.
    outs = hf_greedy(model_dir, [p for p, _ in requests.values()], [n for _, n in requests.values()])
    return requests, dict(zip(requests, outs))


@pytest.fixture
def stack(redis_server, model_dir, tmp_path):
    s = Stack(redis_server.url, model_dir, tmp_path, speculative=True)
    s.start_scheduler("--max-num-batched-tokens", "256", "--max-prefill-chunk", "64")
    s.start_worker("w1")
    s.start_worker("w2")
    s.wait_workers({"w1", "w2"})
    yield s
    s.stop()


@pytest.fixture
def mixed_stack(redis_server, model_dir, tmp_path):
    # A draft model's cache moves with its requests too: each worker drafts with its own.
    s = Stack(redis_server.url, model_dir, tmp_path, speculative="draft_model")
    s.start_scheduler("--max-num-batched-tokens", "256", "--max-prefill-chunk", "64")
    s.start_worker("bs16", "--block-size", "16")
    s.start_worker("bs32", "--block-size", "32")
    s.wait_workers({"bs16", "bs32"})
    yield s
    s.stop()


def _status_after(stack: Stack, ready, timeout_s: float = 10.0) -> SystemStatus:
    """Figures are written about every second: wait until they show what `ready` expects."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = read_status(stack.client, stack.keys)
        if ready(status) or time.monotonic() > deadline:
            return status
        time.sleep(0.1)


def _check(stack: Stack, requests, expected):
    for rid in requests:
        assert_greedy_matches(stack.tokens[rid], expected[rid], rid)
        final = stack.final[rid]
        assert final.usage.completion_tokens == len(stack.tokens[rid])
        assert final.finish_reason in ("stop", "length")


def test_fifty_requests_on_two_workers_match_hf(stack, workload):
    requests, expected = workload
    for rid, (prompt, max_tokens) in requests.items():
        stack.submit(rid, prompt, max_tokens=max_tokens)
    stack.wait_finished(requests)
    _check(stack, requests, expected)
    status = _status_after(
        stack, lambda s: s.scheduler.finished.get("stop", 0) + s.scheduler.finished.get("length", 0) == 50
    )
    assert status.queue_length == 0 and status.pending == 0, "every finished request was acknowledged"
    assert all(w.steps > 0 for w in status.workers.values()), "both workers served"
    assert status.scheduler.spec_drafts > 0, "proposals were verified in these batches"
    assert stack.client.hget(stack.keys.request("req-0"), "status") == b"finished"


def _kill_mid_run_loses_nothing(stack: Stack, workload, keeper_expected, workers: tuple[str, str]) -> None:
    """Submit the workload and long keepers, SIGKILL the worker a keeper is mid-stream on
    once tokens flow (requests wait in one queue: which worker admits them depends on which
    plans first), and check every output against HF: the survivor finished the moved
    requests and the scheduler lived on."""
    requests, expected = workload
    keepers = stack.submit_keepers(4)  # the victim surely holds one when it dies
    for rid, (prompt, max_tokens) in requests.items():
        stack.submit(rid, prompt, max_tokens=max_tokens)
    stack.wait_until(
        lambda: (
            sum(len(t) for t in stack.tokens.values()) >= 40
            and any(stack.mid_stream(keepers, KEEPER_TOKENS, w) for w in workers)
        ),
        "a keeper mid-stream",
    )
    victim = next(w for w in workers if stack.mid_stream(keepers, KEEPER_TOKENS, w))
    survivor = next(w for w in workers if w != victim)
    stack.kill(victim)
    stack.wait_finished([*keepers, *requests])  # raises if the scheduler dies meanwhile
    _check(stack, requests, expected)
    for rid in keepers:
        assert_greedy_matches(stack.tokens[rid], keeper_expected, rid)
    status = _status_after(stack, lambda s: s.scheduler.migrations >= 1 and set(s.workers) == {survivor})
    assert status.scheduler.migrations >= 1 and set(status.workers) == {survivor}
    assert status.scheduler.spec_drafts > 0, "proposals were verified through the fault"


def test_kill_9_of_a_worker_mid_run_loses_nothing(stack, workload, keeper_expected):
    _kill_mid_run_loses_nothing(stack, workload, keeper_expected, ("w1", "w2"))


def test_migration_between_block_sizes_16_and_32_matches_hf(mixed_stack, workload, keeper_expected):
    """Requests moved from the worker of one block size continue on the one of the other,
    their prefix hashes computed for it."""
    status = read_status(mixed_stack.client, mixed_stack.keys)
    assert {w: f.registered.block_size for w, f in status.workers.items()} == {"bs16": 16, "bs32": 32}
    _kill_mid_run_loses_nothing(mixed_stack, workload, keeper_expected, ("bs16", "bs32"))


def test_bad_input_is_survived(stack, workload):
    requests, expected = workload
    # Garbage on the workers' socket, a plan result from a worker nobody knows, a garbage
    # queue entry, and a duplicate request id.
    from shared import messages as m
    from shared.redis_protocol import submit

    dealer = zmq.Context.instance().socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.setsockopt(zmq.IDENTITY, b"ghost")
    dealer.connect(stack.scheduler_address)
    dealer.send(b"\xc1\x00 junk")
    dealer.send(m.encode(m.StepResult(step_id=5, worker_id="ghost")))
    assert dealer.poll(5000), "an unknown worker is asked to register"
    assert isinstance(m.decode(dealer.recv()), m.Reregister)
    dealer.close()
    stack.client.xadd(stack.keys.requests, {b"msg": b"not msgpack at all"})

    prompt, max_tokens = requests["req-3"]
    stack.submit(
        "dup", prompt, max_tokens=KEEPER_TOKENS, ignore_eos=True
    )  # still running when its twin comes
    # The same id again, from another gateway: refused with an error sent to that gateway.
    other = zmq.Context.instance().socket(zmq.PULL)
    other.setsockopt(zmq.LINGER, 0)
    other_addr = f"tcp://127.0.0.1:{other.bind_to_random_port('tcp://127.0.0.1')}"
    submit(
        stack.client, m.SubmitRequest("dup", prompt, m.SamplingParams(), other_addr, time.time()), stack.keys
    )
    stack.submit("req-3", prompt, max_tokens=max_tokens)
    assert other.poll(30000)
    refused = m.decode(other.recv()).outputs[0]
    assert refused.finish_reason == "error" and "duplicate" in refused.error
    assert refused.error_code == m.ErrorCode.INVALID_REQUEST
    other.close()
    stack.wait_finished(["req-3", "dup"])
    assert_greedy_matches(stack.tokens["req-3"], expected["req-3"], "req-3")
    assert len(stack.tokens["dup"]) == KEEPER_TOKENS, "the original request was not disturbed"
    errors = [e.error for e in read_status(stack.client, stack.keys).errors]
    assert any("undecodable" in e for e in errors)
    assert any("rejected" in e for e in errors)
    assert any("duplicate" in e for e in errors)
    stack.check_alive()
