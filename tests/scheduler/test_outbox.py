"""A gateway that stops reading its outputs, against a real Redis and real ZeroMQ sockets
(small buffers, filled at once): what it does not take waits in the scheduler's outbox and
comes once it reads again, each final output once, its request acknowledged only then; one
that never reads again is declared gone after gateway_timeout and its requests are aborted
(their status says so); a stop sends what it can and leaves the rest in the queue. Another
gateway is served throughout."""

from __future__ import annotations

import time
from collections import defaultdict

import pytest
import zmq

from services.scheduler.core import SchedulerCore
from services.scheduler.outbox import Outbox
from services.scheduler.service import STOP_FLUSH_S, SchedulerService
from shared import messages as m
from shared.config import SchedulerSettings
from shared.redis_protocol import read_status, submit
from tests.scheduler.fake_worker import FakeWorker
from tests.scheduler.helpers import expected_tokens

PROMPT = [11, 12, 13, 14]
GONE_AFTER_S = 3.0  # gateway_timeout: long enough for the set-up on a busy machine
FILLER = list(range(1000, 201_000))  # about 600 kB a message: a few fill the kernel's buffers


class FakeGateway:
    """A gateway's real PULL socket that reads only when the test says so: with `small`
    buffers it is soon full; without, ZeroMQ takes all, as a real gateway's (RCVHWM 0)."""

    def __init__(self, ctx: zmq.Context, client, keys, small: bool = True):
        self.sock = ctx.socket(zmq.PULL)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.RCVHWM, 1 if small else 0)
        if small:
            self.sock.setsockopt(zmq.RCVBUF, 4096)
        self.reply_to = f"tcp://127.0.0.1:{self.sock.bind_to_random_port('tcp://127.0.0.1')}"
        client.set(keys.gateway(self.reply_to), b"test", ex=600)  # alive, as a real one keeps itself
        self.outputs: dict[str, list[m.RequestOutput]] = defaultdict(list)

    def read(self) -> None:
        while True:
            try:
                data = self.sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            for out in m.decode(data).outputs:
                self.outputs[out.request_id].append(out)

    def read_until_finished(self, rid: str, timeout_s: float = 10.0) -> None:
        """Read (ZeroMQ hands over one message at a time here) until `rid`'s final output."""
        deadline = time.monotonic() + timeout_s
        while not (self.outputs[rid] and self.outputs[rid][-1].finish_reason):
            assert time.monotonic() < deadline, f"{rid}: no final output"
            self.sock.poll(50)
            self.read()

    def tokens(self, rid: str) -> list[int]:
        """Its tokens, checked to come in order, and its final output to come once, last."""
        outs = self.outputs[rid]
        assert [o.finish_reason is not None for o in outs].count(True) == 1 and outs[-1].finish_reason, outs
        tokens: list[int] = []
        for out in outs:
            assert out.index == len(tokens), f"{rid}: tokens {len(tokens)}..{out.index} never came"
            tokens += out.token_ids
        return tokens


@pytest.fixture
def ctx():
    ctx = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


@pytest.fixture
def worker():
    return FakeWorker("w1", num_blocks=1024)


@pytest.fixture
def serving():
    """Makes services as `_serving` does, and closes their outboxes after the test: a context
    left to the garbage collector with its sockets open blocks in term() for ever."""
    made: list[SchedulerService] = []

    def make(client, keys, worker: FakeWorker, gateway_timeout: float) -> SchedulerService:
        made.append(_serving(client, keys, worker, gateway_timeout))
        return made[-1]

    yield make
    for service in made:
        service.outbox.close(0)


def _serving(client, keys, worker: FakeWorker, gateway_timeout: float) -> SchedulerService:
    settings = SchedulerSettings(
        redis_prefix=keys.prefix, gateway_timeout=gateway_timeout, stats_interval=0.1
    )
    service = SchedulerService(settings, SchedulerCore(), client)
    service.outbox.close(0)
    service.outbox = Outbox(service.poller, gateway_timeout, sndhwm=1)  # ZeroMQ holds one message a gateway
    service.queue.ensure_group()
    assert service.lease.acquire()
    service.core.add_worker(worker.register(), time.monotonic())
    return service


def step(service: SchedulerService, worker: FakeWorker) -> None:
    """One pass of the scheduler's loop around one step of the worker."""
    plan = service.core.next_plan(worker.worker_id, time.time(), time.monotonic())
    if plan is not None:
        service.core.on_step_result(worker.execute(plan))
    service._send_outputs()
    service._bookkeeping()


def take(service: SchedulerService, client, keys, gateway: FakeGateway, rid: str, max_tokens: int) -> None:
    params = m.SamplingParams(temperature=0.0, max_tokens=max_tokens)
    submit(client, m.SubmitRequest(rid, PROMPT, params, gateway.reply_to, time.time()), keys)
    service._read_queue(service.queue.read())
    assert rid in service.core.requests


def fill(service: SchedulerService, gateway: FakeGateway) -> int:
    """Filler outputs to `gateway` until its socket stays full and they wait in the outbox
    (the kernel's send buffer grows for a while); returns how many."""
    for n in range(200):
        service.core.outputs.append((gateway.reply_to, m.RequestOutput(f"filler-{n}", FILLER)))
        service._send_outputs()
        if service.outbox.waiting() >= 2:
            time.sleep(0.3)  # what ZeroMQ's I/O thread and the kernel still take
            service.outbox.flush()
            if service.outbox.waiting() >= 2:
                return n + 1
        time.sleep(0.01)
    raise AssertionError("the gateway's socket never filled")


def run_until(service, worker, predicate, what: str, timeout_s: float = 20.0, read: tuple = ()) -> None:
    """Step until `predicate()`, reading the gateways in `read`; fails past the deadline."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        step(service, worker)
        for gw in read:
            gw.read()


def finished(gateway: FakeGateway, rid: str) -> bool:
    return bool(gateway.outputs[rid]) and gateway.outputs[rid][-1].finish_reason is not None


def status(client, keys, rid: str) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in client.hgetall(keys.request(rid)).items()}


def test_what_a_full_gateway_did_not_take_comes_once_it_reads_again(
    redis_client, redis_keys, ctx, worker, serving
):
    slow, fast = (
        FakeGateway(ctx, redis_client, redis_keys),
        FakeGateway(ctx, redis_client, redis_keys, small=False),
    )
    service = serving(redis_client, redis_keys, worker, gateway_timeout=60)
    fillers = fill(service, slow)
    take(service, redis_client, redis_keys, slow, "r-slow", 5)
    take(service, redis_client, redis_keys, fast, "r-fast", 5)
    run_until(
        service,
        worker,
        lambda: not service.core.requests and finished(fast, "r-fast"),
        "both requests to finish",
        read=(fast,),
    )

    assert fast.tokens("r-fast") == expected_tokens("r-fast", len(PROMPT), 5), "the other gateway was served"
    assert status(redis_client, redis_keys, "r-slow")["status"] == "finished"
    # Its final output waits behind the filler: its entry is not acknowledged yet.
    assert redis_client.xlen(redis_keys.requests) == 1
    [entry] = redis_client.xrange(redis_keys.requests)
    assert service.outbox.holds(entry[0].decode())

    # It reads again: the loop's poller wakes for it, and everything comes in order, once.
    deadline = time.monotonic() + 20
    while not finished(slow, "r-slow"):
        assert time.monotonic() < deadline, "the waiting outputs never came"
        slow.read()
        service.poller.poll(50)
        step(service, worker)
    assert slow.tokens("r-slow") == expected_tokens("r-slow", len(PROMPT), 5)
    assert len([rid for rid in slow.outputs if rid.startswith("filler-")]) == fillers
    step(service, worker)
    assert redis_client.xlen(redis_keys.requests) == 0, "acknowledged once its final output went out"
    assert service.outbox.waiting() == 0


def test_a_gateway_that_never_reads_again_is_gone_and_its_requests_aborted(
    redis_client, redis_keys, ctx, worker, serving
):
    stuck, fast = (
        FakeGateway(ctx, redis_client, redis_keys),
        FakeGateway(ctx, redis_client, redis_keys, small=False),
    )
    service = serving(redis_client, redis_keys, worker, gateway_timeout=GONE_AFTER_S)
    fill(service, stuck)
    filled = time.monotonic()
    take(service, redis_client, redis_keys, stuck, "r-done", 2)  # finishes: its final output waits
    take(service, redis_client, redis_keys, stuck, "r-long", 10_000)  # still running when it is declared gone
    take(service, redis_client, redis_keys, fast, "r-other", 10_000)
    run_until(service, worker, lambda: "r-done" not in service.core.requests, "r-done to finish")
    assert not service._gone
    time.sleep(max(0.0, GONE_AFTER_S - (time.monotonic() - filled) + 0.1))
    run_until(
        service, worker, lambda: "r-long" not in service.core.requests, "r-long to be aborted", 5.0, (fast,)
    )

    long = status(redis_client, redis_keys, "r-long")
    assert long["finish_reason"] == "abort" and long["error_code"] == "gateway_gone", long
    errors = [e.error for e in read_status(redis_client, redis_keys).errors]
    assert any(
        f"gateway {stuck.reply_to} is gone (it took no output for 3 s)" in e
        and "1 requests aborted" in e
        and "1 finished requests" in e
        for e in errors
    ), errors
    # Nothing of the gone one waits (the other's latest output may, on a busy machine).
    assert service.outbox.waiting(stuck.reply_to) == 0
    assert stuck.reply_to not in service.outbox.stuck(time.monotonic() + 60)

    # The other gateway is served on; r-done's entry (its final output lost with its gateway) is acked.
    n = len(fast.outputs["r-other"])
    run_until(service, worker, lambda: len(fast.outputs["r-other"]) > n + 5, "more of r-other", 10.0, (fast,))
    left = [e[0].decode() for e in redis_client.xrange(redis_keys.requests)]
    assert left == [service.core.requests["r-other"].entry_id]
    service.core.abort("r-other")
    run_until(service, worker, lambda: finished(fast, "r-other"), "r-other's end", 10.0, (fast,))
    fast.tokens("r-other")
    # Nothing more went to the gone gateway (what it may still read is filler).
    time.sleep(0.2)
    stuck.read()
    assert not {"r-done", "r-long"} & set(stuck.outputs)


def test_a_stop_sends_what_it_can_and_leaves_the_rest_in_the_queue(
    redis_client, redis_keys, ctx, worker, serving
):
    stuck, fast = (
        FakeGateway(ctx, redis_client, redis_keys),
        FakeGateway(ctx, redis_client, redis_keys, small=False),
    )
    service = serving(redis_client, redis_keys, worker, gateway_timeout=60)
    fill(service, stuck)
    take(service, redis_client, redis_keys, stuck, "r-waiting", 2)
    take(service, redis_client, redis_keys, fast, "r-sent", 2)
    take(service, redis_client, redis_keys, fast, "r-running", 10_000)
    run_until(
        service, worker, lambda: not {"r-waiting", "r-sent"} & set(service.core.requests), "two to finish"
    )

    started = time.monotonic()
    service._hand_back()
    assert time.monotonic() - started < STOP_FLUSH_S + 1.0, "the stop is bounded"
    fast.read_until_finished("r-sent")
    assert fast.tokens("r-sent") == expected_tokens("r-sent", len(PROMPT), 2)
    # Left for the next scheduler: the request still running, and the one whose final output
    # its gateway never took (it runs again, and its gateway drops the tokens it had).
    left = {m.decode(fields[b"msg"]).request_id for _, fields in redis_client.xrange(redis_keys.requests)}
    assert left == {"r-running", "r-waiting"}
    service.outbox.close(0)
