"""Malformed internal traffic: thousands of broken messages on the scheduler's worker
socket, in the Redis request stream, and on a worker's socket. Each is rejected and
logged; no process crashes; correct requests are still served afterwards."""

from __future__ import annotations

import random
import time

import msgpack
import pytest
import zmq

from conveyor.tiny_model import make_model
from shared import messages as m
from shared.redis_protocol import read_status
from tests.gpu_worker.fake_scheduler import FakeScheduler, start_worker
from tests.stack import Stack

pytestmark = pytest.mark.slow

TAGS = [
    "step_plan",
    "step_result",
    "register_worker",
    "heartbeat",
    "worker_leaving",
    "submit",
    "abort",
    "outputs",
    "reregister",
    "shutdown",
    "bogus",
    "",
]


def _junk_value(rng: random.Random, depth: int = 0):
    kind = rng.randrange(9 if depth < 3 else 6)
    if kind == 0:
        return rng.randrange(-(2**63), 2**63)
    if kind == 1:
        return rng.random() * rng.choice([1, 1e308, -1e-308])
    if kind == 2:
        return "".join(chr(rng.randrange(0x20, 0x2FFF)) for _ in range(rng.randrange(20)))
    if kind == 3:
        return rng.randbytes(rng.randrange(20))
    if kind == 4:
        return None
    if kind == 5:
        return rng.choice([True, False])
    if kind == 6:
        return [_junk_value(rng, depth + 1) for _ in range(rng.randrange(6))]
    return {
        rng.choice(
            [
                "step_id",
                "worker_id",
                "request_id",
                "type",
                "new_requests",
                "token_ids",
                "num_scheduled_tokens",
                "block_ids",
                "x",
            ]
        ): _junk_value(rng, depth + 1)
        for _ in range(rng.randrange(6))
    }


def malformed_messages(n: int, seed: int) -> list[bytes]:
    """Random bytes, truncated real messages, and well-formed msgpack of the wrong shape
    (real tags with fields of the wrong type, unknown tags, deep nesting)."""
    rng = random.Random(seed)
    real = [
        m.encode(m.StepResult(3, "w", sampled_token_ids={"a": 1})),
        m.encode(m.Heartbeat("w", 1.0)),
        m.encode(m.StepPlan(1, num_scheduled_tokens={"a": 1})),
    ]
    out = []
    i = 0
    while len(out) < n:
        i += 1
        kind = i % 4
        if kind == 0:
            out.append(rng.randbytes(rng.randrange(1, 200)))
        elif kind == 1:
            msg = rng.choice(real)
            out.append(msg[: rng.randrange(len(msg))])
        else:
            body = _junk_value(rng) if kind == 2 else {}
            if not isinstance(body, dict):
                body = {"payload": body}
            body["type"] = rng.choice(TAGS)
            if kind == 3:
                body.update({k: _junk_value(rng) for k in ("step_id", "worker_id", "sampled_token_ids")})
            out.append(msgpack.packb(body, use_bin_type=True))
        try:  # what happens to decode is a real message, not a malformed one: drop it
            m.decode(out[-1])
            out.pop()
        except m.DecodeError:
            pass
    return out


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("model"), preset="tiny", num_hidden_layers=1, seed=8)


def test_scheduler_survives_a_thousand_malformed_messages_on_each_channel(redis_server, model_dir, tmp_path):
    stack = Stack(redis_server.url, model_dir, tmp_path)
    try:
        stack.start_scheduler()
        stack.start_worker("w1")
        stack.wait_workers({"w1"})
        dealer = zmq.Context.instance().socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.setsockopt(zmq.IDENTITY, b"intruder")
        dealer.connect(stack.scheduler_address)
        for payload in malformed_messages(1000, seed=1):
            dealer.send(payload)
        for payload in malformed_messages(1000, seed=2):
            stack.client.xadd(stack.keys.requests, {b"msg": payload})
        stack.client.xadd(stack.keys.requests, {b"other-field": b"1"})
        stack.submit("after", [5, 6, 7], max_tokens=6)
        stack.wait_finished(["after"], timeout_s=120)
        assert len(stack.tokens["after"]) == 6 and stack.final["after"].finish_reason == "length"
        stack.check_alive()
        dealer.close()
        deadline = time.monotonic() + 30
        while stack.client.xlen(stack.keys.requests) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert stack.client.xlen(stack.keys.requests) == 0, (
            "malformed entries were acknowledged, not left to rot"
        )
        assert read_status(stack.client, stack.keys).errors, "rejections were recorded"
    finally:
        stack.stop()


def test_worker_survives_a_thousand_malformed_messages(model_dir, tmp_path):
    scheduler = FakeScheduler()
    with open(tmp_path / "worker.log", "w") as log:  # the worker writes to its own copy
        proc = start_worker(
            "--model",
            str(model_dir),
            "--scheduler-address",
            scheduler.address,
            "--device",
            "cpu",
            "--kv-cache-memory",
            "16MiB",
            "--worker-id",
            "w",
            log=log,
        )
    try:
        reg = scheduler.recv()
        assert isinstance(reg, m.RegisterWorker)
        junk = malformed_messages(1000, seed=3)
        # Plans that decode but make no sense: each must be refused without changing state.
        sp = m.SamplingParams(temperature=0.0)
        plans = [
            m.encode(p)
            for p in (
                m.StepPlan(1, [m.NewRequest("a", [], 0, sp, [])], num_scheduled_tokens={"a": 1}),
                m.StepPlan(2, [m.NewRequest("a", [1, 2], 5, sp, [0])], num_scheduled_tokens={"a": 2}),
                m.StepPlan(3, [m.NewRequest("a", [10**9], 1, sp, [0])], num_scheduled_tokens={"a": 1}),
                m.StepPlan(4, [m.NewRequest("a", [1, 2, 3], 3, sp, [-1])], num_scheduled_tokens={"a": 3}),
                m.StepPlan(5, [m.NewRequest("a", [1] * 40, 40, sp, [0])], num_scheduled_tokens={"a": 40}),
                m.StepPlan(6, num_scheduled_tokens={"a": -4}),
                m.StepPlan(7, cached_requests=[m.CachedRequest("nobody", [1], 3)]),
            )
        ]
        # FakeScheduler's sends never drop (a full pipe blocks them, within a deadline), and
        # every message gets exactly one answer, in order: all of them must come back.
        for payload in junk + plans:
            scheduler.send_raw(payload)
        answers = scheduler.recv_until(
            lambda msg: isinstance(msg, m.StepResult) and msg.step_id == 7, timeout_s=180
        )
        assert all(isinstance(a, m.StepResult) and a.error for a in answers), "nothing malformed is executed"
        assert [a.step_id for a in answers] == [-1] * len(junk) + list(range(1, 8))
        ok = scheduler.execute(
            m.StepPlan(8, [m.NewRequest("good", [5, 6, 7], 3, sp, [0])], num_scheduled_tokens={"good": 3})
        )
        assert ok.error is None and "good" in ok.sampled_token_ids
        assert proc.poll() is None
        assert "undecodable message" in (tmp_path / "worker.log").read_text(), "rejections are logged"
    finally:
        proc.kill()
        proc.wait()
        scheduler.close()
