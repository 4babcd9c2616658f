"""Faults around the scheduler, with real processes: kill -9 of the scheduler (restarted,
it resumes every unfinished request from the Redis queue; streams continue with no token
lost or repeated), SIGTERM (the same, without waiting for its lease), a second scheduler
started by mistake (it stands by on the lease), a Redis restart (everyone reconnects;
queued requests survive), and kill -9 of Redis with 50 requests accepted and streaming
(`appendfsync always`: every accepted one completes, once, equal to an undisturbed greedy
run). Every scheduler here speculates (n-gram prompt lookup): the faults must not change a
token with it either."""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import zmq

from conveyor.embedded_redis import start_embedded_redis
from conveyor.tiny_model import make_model
from shared import messages as m
from shared.ports import free_port
from shared.redis_protocol import read_status
from tests.gpu_worker.hf_reference import assert_greedy_matches, hf_greedy, keeper_reference
from tests.stack import KEEPER_TOKENS, LONG_MAX_TOKENS, Stack

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("model"), preset="tiny", num_hidden_layers=2, seed=6)


def greedy_workload(model_dir, n: int, seed: int, max_tokens: int):
    """`n` random prompts of 5, 30 or 80 tokens, and HF's greedy output for each."""
    rng = random.Random(seed)
    requests = {
        f"r{i}": ([rng.randrange(3, 4096) for _ in range(rng.choice([5, 30, 80]))], max_tokens)
        for i in range(n)
    }
    outs = hf_greedy(model_dir, [p for p, _ in requests.values()], [n for _, n in requests.values()])
    return requests, dict(zip(requests, outs))


@pytest.fixture(scope="module")
def keeper_expected(model_dir):
    return keeper_reference(model_dir)


@pytest.fixture(scope="module")
def workload(model_dir):
    return greedy_workload(model_dir, 16, seed=1, max_tokens=24)


def _wait_tokens(stack: Stack, n: int, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while sum(len(t) for t in stack.tokens.values()) < n:
        assert time.monotonic() < deadline, stack.log_tail()
        stack.collect(0.05)


def _waiting(stack: Stack) -> int:
    """The requests the scheduler holds, not yet running, as its latest figures say."""
    figures = read_status(stack.client, stack.keys).scheduler
    return figures.waiting if figures is not None else 0


def submit_all(stack: Stack, requests) -> None:
    for rid, (prompt, max_tokens) in requests.items():
        stack.submit(rid, prompt, max_tokens=max_tokens)


def wait_all_acked(stack: Stack, timeout_s: float = 15.0) -> None:
    # Acknowledged right after the final output is sent (a crash in between replays the
    # request rather than losing it), so allow the scheduler a moment.
    deadline = time.monotonic() + timeout_s
    while stack.client.xlen(stack.keys.requests) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert stack.client.xlen(stack.keys.requests) == 0, "finished requests left in the queue"


def wait_and_check(stack: Stack, requests, expected) -> None:
    stack.wait_finished(requests)
    for rid in requests:
        assert_greedy_matches(stack.tokens[rid], expected[rid], rid)


def test_scheduler_kill_9_resumes_every_request_from_the_queue(
    redis_server, model_dir, workload, keeper_expected, tmp_path
):
    requests, expected = workload
    stack = Stack(
        redis_server.url, model_dir, tmp_path, speculative="draft_model"
    )  # its draft cache is rebuilt too
    try:
        stack.start_scheduler()
        stack.start_worker("w1")
        stack.wait_workers({"w1"})
        keepers = stack.submit_keepers(1)  # running, surely, at the kill
        submit_all(stack, requests)
        _wait_tokens(stack, 30)
        stack.wait_until(lambda: stack.mid_stream(keepers, KEEPER_TOKENS), "a keeper mid-stream")
        stack.kill("scheduler")
        stack.procs["scheduler"].wait(timeout=30)
        stack.start_scheduler(name="scheduler-2")  # as compose or the launcher would restart it
        wait_and_check(stack, requests, expected)
        wait_and_check(stack, keepers, dict.fromkeys(keepers, keeper_expected))
        wait_all_acked(stack)
    finally:
        stack.stop()


def test_scheduler_sigterm_leaves_what_runs_in_the_queue_for_the_next(redis_server, model_dir, tmp_path):
    """A clean stop: what finished is delivered and acknowledged, what runs stays pending in
    Redis; the next scheduler replays it and the stream continues, no token lost or repeated."""
    stack = Stack(redis_server.url, model_dir, tmp_path, speculative=True)
    try:
        stack.start_scheduler()
        stack.start_worker("w1")
        stack.wait_workers({"w1"})
        keepers = stack.submit_keepers(1)
        stack.submit("short", [5, 6, 7], max_tokens=4)
        stack.wait_finished(["short"], timeout_s=60)
        stack.wait_until(lambda: stack.mid_stream(keepers, KEEPER_TOKENS), "a keeper mid-stream")
        stack.kill("scheduler", signal.SIGTERM)
        assert stack.procs["scheduler"].wait(timeout=15) == 0, stack.log_tail("scheduler")
        assert stack.client.xpending(stack.keys.requests, stack.keys.group)["pending"] == 1, "the keeper only"
        stack.start_scheduler(name="scheduler-2")  # the lease was released: it serves at once
        stack.wait_finished(keepers, timeout_s=120)
        assert len(stack.tokens[keepers[0]]) == KEEPER_TOKENS
        wait_all_acked(stack)
    finally:
        stack.stop()


def test_a_second_scheduler_stands_by_until_the_first_is_gone(
    redis_server, model_dir, workload, keeper_expected, tmp_path
):
    requests, expected = workload
    stack = Stack(redis_server.url, model_dir, tmp_path, speculative=True)
    try:
        stack.start_scheduler()
        stack.start_worker("w1")
        stack.wait_workers({"w1"})
        stack.start_scheduler(name="standby")
        deadline = time.monotonic() + 30
        while "standing by" not in stack.log_tail("standby"):
            assert time.monotonic() < deadline, stack.log_tail("standby")
            time.sleep(0.1)
        assert stack.procs["standby"].poll() is None
        holder = stack.client.get(stack.keys.scheduler("scheduler")).decode()
        assert holder.endswith(f":{stack.procs['scheduler'].pid}")
        keepers = stack.submit_keepers(1)
        submit_all(stack, requests)
        _wait_tokens(stack, 20)
        stack.wait_until(lambda: stack.mid_stream(keepers, KEEPER_TOKENS), "a keeper mid-stream")
        stack.kill("scheduler")
        wait_and_check(stack, requests, expected)  # the standby took the lease and finished everything
        wait_and_check(stack, keepers, dict.fromkeys(keepers, keeper_expected))
        holder = stack.client.get(stack.keys.scheduler("scheduler")).decode()
        assert holder.endswith(f":{stack.procs['standby'].pid}")
    finally:
        stack.stop()


def test_redis_restart_loses_no_request(model_dir, workload, tmp_path):
    requests, expected = workload
    port = free_port()
    redis_dir = tmp_path / "redis"
    redis_dir.mkdir()
    server = start_embedded_redis(redis_dir, port=port)
    stack = Stack(server.url, model_dir, tmp_path, speculative=True)
    try:
        stack.start_scheduler()
        # Queued while no worker exists yet, so some are still in the stream at the restart.
        submit_all(stack, requests)
        stack.wait_until(lambda: _waiting(stack) == len(requests), "the scheduler to read the queue")
        server.stop()
        time.sleep(1.0)
        server = start_embedded_redis(redis_dir, port=port)
        stack.start_worker("w1")
        wait_and_check(stack, requests, expected)
        for name in ("scheduler", "w1"):
            assert stack.procs[name].poll() is None, f"{name} survived the Redis restart"
    finally:
        stack.stop()
        server.stop()


STREAMING, LAST = 40, 10  # streaming at the crash / accepted just before it


@pytest.fixture(scope="module")
def workload_50(model_dir):
    return greedy_workload(model_dir, STREAMING + LAST, seed=13, max_tokens=32)


def _wait_streaming(stack: Stack, rids: list[str], timeout_s: float = 120.0) -> None:
    """Until every one of `rids` has streamed a token, so that all are running."""
    deadline = time.monotonic() + timeout_s
    while not all(stack.tokens[r] for r in rids):
        assert time.monotonic() < deadline, stack.log_tail()
        stack.collect(0.05)


def test_kill_9_of_redis_loses_no_accepted_request(model_dir, workload_50, tmp_path):
    requests, expected = workload_50
    port, redis_dir = free_port(), tmp_path / "redis"
    server = start_embedded_redis(redis_dir, port=port)
    stack = Stack(server.url, model_dir, tmp_path, speculative=True)
    try:
        stack.start_scheduler()
        stack.start_worker("w1")
        stack.wait_workers({"w1"})
        rids = list(requests)
        submit_all(stack, {rid: requests[rid] for rid in rids[:STREAMING]})
        _wait_streaming(stack, rids[:STREAMING])
        # The last ten are accepted (XADD answered) microseconds before the crash; with
        # appendfsync always they are fsynced before their reply, none is left in memory.
        submit_all(stack, {rid: requests[rid] for rid in rids[STREAMING:]})
        os.kill(server.pid, signal.SIGKILL)
        server.process.wait(10)
        assert len(stack.final) < len(requests), "the crash must come while requests are running"
        time.sleep(1.0)  # an outage: the scheduler serves what it holds and retries Redis
        server = start_embedded_redis(redis_dir, port=port)
        wait_and_check(stack, requests, expected)  # each finished once (Stack.collect asserts it)
        for name in ("scheduler", "w1"):
            assert stack.procs[name].poll() is None, f"{name} exited across the Redis crash"
        wait_all_acked(stack)  # none stays in the queue to be replayed
    finally:
        stack.stop()
        server.stop()


def test_requests_of_a_vanished_gateway_are_aborted(redis_server, long_model_dir, tmp_path):
    import zmq

    from shared import messages as m
    from shared.redis_protocol import submit

    stack = Stack(redis_server.url, long_model_dir, tmp_path, speculative=True)
    try:
        stack.start_scheduler("--gateway-timeout", "2")
        stack.start_worker("w1")
        stack.wait_workers({"w1"})
        # A second gateway: it submits long requests, then dies (its liveness key lapses).
        ghost = zmq.Context.instance().socket(zmq.PULL)
        ghost.setsockopt(zmq.LINGER, 0)
        address = f"tcp://127.0.0.1:{ghost.bind_to_random_port('tcp://127.0.0.1')}"
        stack.client.set(stack.keys.gateway(address), b"alive", px=1500)
        params = m.SamplingParams(temperature=0.0, max_tokens=LONG_MAX_TOKENS, ignore_eos=True)
        for i in range(3):
            submit(
                stack.client,
                m.SubmitRequest(f"orphan{i}", [5] * 40, params, address, time.time()),
                stack.keys,
            )
        assert ghost.poll(30_000), "the requests run"
        ghost.close()
        # Meanwhile the live gateway's request is untouched.
        stack.submit("live", [7] * 10, max_tokens=8)
        stack.wait_finished(["live"])
        deadline = time.monotonic() + 30
        while stack.client.hget(stack.keys.request("orphan0"), "finish_reason") != b"abort":
            assert time.monotonic() < deadline, stack.log_tail()
            time.sleep(0.2)
        for i in range(3):
            fields = stack.client.hgetall(stack.keys.request(f"orphan{i}"))
            assert fields[b"finish_reason"] == b"abort" and b"gateway gone" in fields[b"error"]
        while read_status(stack.client, stack.keys).workers["w1"].kv_usage != 0:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert stack.client.xlen(stack.keys.requests) == 0
    finally:
        stack.stop()


def _register_wedged_worker(stack: Stack, stop: threading.Event) -> zmq.Socket:
    """A worker whose heartbeat thread lives on (until `stop`) while its main loop is stuck:
    it takes a step and never answers. Returns its main socket."""
    wedged = zmq.Context.instance().socket(zmq.DEALER)
    wedged.setsockopt(zmq.LINGER, 0)
    wedged.setsockopt(zmq.IDENTITY, b"wedged")
    wedged.connect(stack.scheduler_address)
    wedged.send(m.encode(m.RegisterWorker("wedged", "tiny", 4096, 16, 4096, 4096, [0, 2], "cpu", 1)))

    def beat():
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(stack.scheduler_address)
        while not stop.wait(0.5):
            sock.send(m.encode(m.Heartbeat("wedged", time.time())))
        sock.close()

    threading.Thread(target=beat, daemon=True).start()
    return wedged


def test_a_wedged_worker_shows_as_stalled_then_its_requests_move(redis_server, model_dir, tmp_path):
    stack = Stack(redis_server.url, model_dir, tmp_path, speculative=True)
    stop = threading.Event()
    try:
        # The step timeout leaves room for three `conveyor status` runs, side by side, while the
        # worker shows as stalled (each starts a Python process: about 0.5 s, seconds on a busy
        # machine); past it the request moves.
        stack.start_scheduler("--stall-after", "1", "--step-timeout", "10")
        wedged = _register_wedged_worker(stack, stop)
        stack.wait_workers({"wedged"})
        stack.submit("stuck", [5, 6, 7, 8], max_tokens=5)
        assert wedged.poll(10_000) and isinstance(m.decode(wedged.recv()), m.StepPlan), "it got the step"

        deadline = time.monotonic() + 10
        while not read_status(stack.client, stack.keys).workers["wedged"].stalled:
            assert time.monotonic() < deadline, "stalled within seconds"
            time.sleep(0.2)
        with ThreadPoolExecutor(3) as pool:
            shown, check, as_json = pool.map(
                lambda args: stack.conveyor_status(*args), [(), ("--check",), ("--json",)]
            )
        assert "STALLED" in shown.stdout
        assert check.returncode == 1, "no worker serving: not healthy"
        assert json.loads(as_json.stdout)["scheduler"]["stalled_workers"] == 1

        stack.start_worker("w1")  # at the step timeout the request moves here
        stack.wait_finished(["stuck"], timeout_s=120)
        assert len(stack.tokens["stuck"]) == 5
        assert "wedged" not in read_status(stack.client, stack.keys).workers
        wedged.close()
    finally:
        stop.set()
        stack.stop()
