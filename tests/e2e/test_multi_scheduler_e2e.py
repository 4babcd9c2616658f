"""Two schedulers of distinct names serving one request stream, with real processes: each
drives its own worker and both take requests; kill -9 of one (not restarted) leaves every
request to complete exactly once on the survivor, equal to HF greedy; aborts reach the
scheduler that owns the request, and one aborted before any scheduler took it ends as
soon as one does."""

from __future__ import annotations

import time

import pytest

from conveyor.tiny_model import make_model
from shared import messages as m
from shared.ownership import Ownership
from shared.ports import free_port
from tests.e2e.test_scheduler_reliability import greedy_workload, submit_all, wait_all_acked, wait_and_check
from tests.stack import LONG_MAX_TOKENS, Stack

pytestmark = pytest.mark.slow

NAMES = ("s1", "s2")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("model"), preset="tiny", num_hidden_layers=2, seed=6)


def start_pools(stack: Stack, max_num_seqs: int) -> None:
    """Schedulers s1 and s2, each on its own port with one worker (w-s1, w-s2). A small
    max_num_seqs bounds what each reads ahead, so neither can take the whole stream."""
    for name in NAMES:
        address = f"tcp://127.0.0.1:{free_port()}"
        stack._start(
            name,
            "services.scheduler",
            "--redis-url",
            stack.redis_url,
            "--redis-prefix",
            stack.keys.prefix,
            "--scheduler-name",
            name,
            "--scheduler-address",
            address,
            "--heartbeat-timeout",
            "3",
            "--lease-ttl",
            "2",
            "--max-num-seqs",
            str(max_num_seqs),
        )
        stack._start(
            f"w-{name}",
            "services.gpu_worker",
            "--model",
            str(stack.model_dir),
            "--device",
            "cpu",
            "--scheduler-address",
            address,
            "--worker-id",
            f"w-{name}",
            "--kv-cache-memory",
            "64MiB",
        )
    stack.wait_workers({f"w-{name}" for name in NAMES})


def owners(stack: Stack, request_ids) -> dict[str, str]:
    got = {rid: stack.client.hget(stack.keys.request(rid), "owner") for rid in request_ids}
    return {rid: owner.decode() for rid, owner in got.items() if owner is not None}


def pending_of(stack: Stack, consumer: str) -> list[str]:
    """The requests whose queue entries `consumer` read and has not acknowledged."""
    pending = stack.client.xpending_range(
        stack.keys.requests, stack.keys.group, "-", "+", 10_000, consumername=consumer
    )
    entries = [stack.client.xrange(stack.keys.requests, p["message_id"], p["message_id"]) for p in pending]
    return [m.decode(fields[b"msg"]).request_id for found in entries for _, fields in found]


@pytest.fixture(scope="module")
def workload(model_dir):
    return greedy_workload(model_dir, 30, seed=3, max_tokens=24)


def test_kill_9_of_one_of_two_schedulers_leaves_every_request_to_the_other(
    redis_server, model_dir, workload, tmp_path
):
    requests, expected = workload
    stack = Stack(redis_server.url, model_dir, tmp_path)
    try:
        start_pools(stack, max_num_seqs=4)
        submit_all(stack, requests)
        stack.wait_until(
            lambda: set(owners(stack, requests).values()) == set(NAMES), "both schedulers to take some"
        )
        stack.wait_until(lambda: sum(map(len, stack.tokens.values())) >= 40, "tokens to stream")
        stack.kill("s1")
        stack.procs["s1"].wait(timeout=30)
        # What s1 held unfinished is what it had read and not acknowledged when it died (read
        # before s2 may take it: s1's lease lapses 2 s after). A list made before the kill could
        # name requests s1 finished in the meantime.
        unfinished_of_s1 = pending_of(stack, "s1")
        assert unfinished_of_s1, "s1 must hold unfinished requests when it dies"
        wait_and_check(
            stack, requests, expected
        )  # every one finished once (Stack.collect asserts it), equal to HF's
        wait_all_acked(stack)
        assert all(owners(stack, unfinished_of_s1)[rid] == "s2" for rid in unfinished_of_s1)
        assert "took over" in stack.log_tail("s2", lines=200)
    finally:
        stack.stop()


def test_aborts_reach_the_owner_and_an_abort_before_the_take_ends_the_request_at_once(
    redis_server, long_model_dir, tmp_path
):
    stack = Stack(redis_server.url, long_model_dir, tmp_path)
    long = {"max_tokens": LONG_MAX_TOKENS, "ignore_eos": True}
    try:
        start_pools(stack, max_num_seqs=1)  # a pool of one slot each: two requests fill both
        running = [f"long{i}" for i in range(2)]
        for rid in running:
            stack.submit(rid, [5, 6, 7, 8, 9], **long)
        stack.wait_until(lambda: len(owners(stack, running)) == 2, "both requests taken")
        assert sorted(owners(stack, running).values()) == ["s1", "s2"]
        stack.submit("queued", [5, 6, 7, 8, 9], **long)
        time.sleep(1.0)
        assert owners(stack, ["queued"]) == {}, "both pools are full: it waits in Redis for room"
        assert (
            Ownership(stack.client, stack.keys).abort(m.AbortRequest("queued", "client disconnected")) is None
        )
        # One the way the gateway aborts (straight to the owner), one through the shared stream.
        Ownership(stack.client, stack.keys).abort(m.AbortRequest(running[0], "client disconnected"))
        stack.abort(running[1])
        stack.wait_until(lambda: set(running) | {"queued"} <= set(stack.final), "every request to end", 30.0)
        for rid in running + ["queued"]:
            assert stack.final[rid].finish_reason is m.FinishReason.ABORT, rid
            assert len(stack.tokens[rid]) < long["max_tokens"], rid
        assert stack.tokens["queued"] == [], "it was never run"
        assert stack.client.hget(stack.keys.request("queued"), "owner") is None, (
            "taken as aborted: nobody owns it"
        )
        wait_all_acked(stack)
    finally:
        stack.stop()
