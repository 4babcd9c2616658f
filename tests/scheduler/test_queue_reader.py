"""The scheduler's queue reader on a real Redis: a submitted request wakes the loop's socket
at once, idle it costs a blocking read per half second rather than a read per 5 ms, and a
flood is handed over one batch at a time."""

from __future__ import annotations

import time

import zmq

from services.scheduler.queue_reader import BLOCK_MS, QueueReader
from shared.messages import SamplingParams, SubmitRequest
from shared.redis_protocol import RequestQueue, submit


def request(n: int) -> SubmitRequest:
    return SubmitRequest(
        request_id=f"r{n}",
        prompt_token_ids=[1, 2, 3],
        sampling=SamplingParams(max_tokens=4),
        reply_to="tcp://127.0.0.1:5555",
        arrival_time=1000.0 + n,
    )


def xreadgroup_calls(client) -> int:
    return int(client.info("commandstats").get("cmdstat_xreadgroup", {}).get("calls", 0))


def started(redis_client, redis_keys) -> QueueReader:
    RequestQueue(redis_client, redis_keys).ensure_group()
    reader = QueueReader(redis_client, redis_keys, zmq.Context.instance())
    reader.start()
    return reader


def test_a_request_wakes_the_loop_and_idle_costs_no_polling(redis_client, redis_keys):
    reader = started(redis_client, redis_keys)
    try:
        time.sleep(0.3)  # the replay of pending entries is over: now blocked on new ones
        redis_client.config_resetstat()
        time.sleep(2.0)
        assert xreadgroup_calls(redis_client) <= 2000 / BLOCK_MS + 1, "one blocking read per BLOCK_MS"
        t0 = time.monotonic()
        submit(redis_client, request(1), redis_keys)
        assert reader.wake.poll(2000), "the wake socket turns readable"
        assert time.monotonic() - t0 < 0.5
        [entry] = reader.take()
        assert entry.message.request_id == "r1"
        assert reader.take() == [] and not reader.wake.poll(0)
    finally:
        reader.stop()


def test_a_flood_is_handed_over_one_batch_at_a_time(redis_client, redis_keys):
    for n in range(1500):
        submit(redis_client, request(n), redis_keys)
    reader = started(redis_client, redis_keys)
    try:
        assert reader.wake.poll(2000)
        time.sleep(0.3)  # time enough to read more, were it not waiting for take()
        first = reader.take()
        assert len(first) == 1024
        assert reader.wake.poll(2000)
        second = reader.take()
        assert [e.message.request_id for e in first + second] == [f"r{n}" for n in range(1500)]
    finally:
        reader.stop()
