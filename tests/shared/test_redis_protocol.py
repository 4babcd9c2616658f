"""The durable request queue and the status the scheduler publishes, on a real Redis."""

from __future__ import annotations

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from shared.figure_records import ErrorRecord, SchedulerFigures, SystemStatus
from shared.messages import AbortRequest, Heartbeat, SamplingParams, SubmitRequest, encode
from shared.redis_protocol import (
    QueueEntry,
    RequestQueue,
    StatusWriter,
    durability_problem,
    queue_load,
    read_status,
    submit,
)
from tests.shared.helpers import worker_figures


def request(n: int) -> SubmitRequest:
    return SubmitRequest(
        request_id=f"r{n}",
        prompt_token_ids=[1, 2, n],
        sampling=SamplingParams(max_tokens=n),
        reply_to="tcp://127.0.0.1:5555",
        arrival_time=1000.0 + n,
    )


@pytest.fixture
def queue(redis_client, redis_keys):
    q = RequestQueue(redis_client, redis_keys)
    q.ensure_group()
    return q


# ---- the queue ------------------------------------------------------------------------


def test_submit_then_read_returns_the_message(redis_client, redis_keys, queue):
    entry_id = submit(redis_client, request(1), redis_keys)
    abort_id = submit(redis_client, AbortRequest("r1", reason="client gone"), redis_keys)
    assert queue.read() == [
        QueueEntry(entry_id, request(1)),
        QueueEntry(abort_id, AbortRequest("r1", "client gone")),
    ]
    assert queue.read() == []
    assert queue.pending_count() == 2 and queue.queue_length() == 2


def test_ack_removes_the_entry(redis_client, redis_keys, queue):
    ids = [submit(redis_client, request(n), redis_keys) for n in range(3)]
    queue.read()
    queue.ack(ids[:2])
    assert queue.pending_count() == 1 and queue.queue_length() == 1
    queue.ack(ids[2:])
    queue.ack([])
    assert queue.pending_count() == 0 and queue.queue_length() == 0
    assert redis_client.xlen(redis_keys.requests) == 0


def test_unacked_entries_come_back_after_a_restart_then_new_ones(redis_client, redis_keys, queue):
    ids = [submit(redis_client, request(n), redis_keys) for n in range(5)]
    assert [e.entry_id for e in queue.read()] == ids
    queue.ack([ids[1]])

    # A new scheduler process: same consumer name, fresh RequestQueue.
    restarted = RequestQueue(redis_client, redis_keys)
    new_id = submit(redis_client, request(9), redis_keys)
    replay = restarted.read(count=2) + restarted.read(count=2) + restarted.read(count=2)
    assert [e.entry_id for e in replay] == [ids[0], ids[2], ids[3], ids[4], new_id]
    assert replay[0].message == request(0)
    assert restarted.read(block_ms=10) == []
    assert restarted.pending_count() == 5


def test_replay_pending_returns_entries_delivered_but_never_received(redis_client, redis_keys, queue):
    # As a blocking XREADGROUP whose reply a Redis crash cut off: delivered (pending), not seen.
    assert queue.read() == []  # the start-up replay is done: only new entries from here
    ids = [submit(redis_client, request(n), redis_keys) for n in range(3)]
    redis_client.xreadgroup(redis_keys.group, queue.consumer, {redis_keys.requests: ">"})
    assert queue.read(block_ms=10) == []  # lost to us without a replay
    queue.replay_pending()
    new_id = submit(redis_client, request(7), redis_keys)
    assert [e.entry_id for e in queue.read()] == ids
    assert [e.entry_id for e in queue.read()] == [new_id]


def test_other_consumer_does_not_replay_our_pending(redis_client, redis_keys, queue):
    submit(redis_client, request(1), redis_keys)
    queue.read()
    assert RequestQueue(redis_client, redis_keys, consumer="other").read() == []


def test_entries_submitted_before_the_group_are_read(redis_client, redis_keys):
    ids = [submit(redis_client, request(n), redis_keys) for n in range(2)]
    q = RequestQueue(redis_client, redis_keys)
    q.ensure_group()
    q.ensure_group()  # an existing group is fine
    assert [e.entry_id for e in q.read()] == ids


def test_read_creates_the_group_when_needed(redis_client, redis_keys):
    entry_id = submit(redis_client, request(1), redis_keys)
    assert RequestQueue(redis_client, redis_keys).read() == [QueueEntry(entry_id, request(1))]


@pytest.mark.parametrize(
    "fields, error",
    [
        ({b"msg": b"\xc1junk"}, "undecodable"),
        ({b"other": b"x"}, "no field 'msg'"),
        ({b"msg": encode(Heartbeat("w0", 1.0))}, "Heartbeat"),
    ],
)
def test_bad_entry_is_reported_and_reading_continues(redis_client, redis_keys, queue, fields, error):
    first = submit(redis_client, request(1), redis_keys)
    bad = redis_client.xadd(redis_keys.requests, fields).decode()
    last = submit(redis_client, request(2), redis_keys)
    entries = queue.read()
    assert [e.entry_id for e in entries] == [first, bad, last]
    assert entries[1].message is None and error in entries[1].error
    assert entries[0].error is None and entries[2].message == request(2)
    queue.ack([bad])
    assert queue.queue_length() == 2


def test_pending_entry_deleted_from_the_stream_is_reported(redis_client, redis_keys, queue):
    entry_id = submit(redis_client, request(1), redis_keys)
    queue.read()
    redis_client.xdel(redis_keys.requests, entry_id)
    [entry] = RequestQueue(redis_client, redis_keys).read()
    assert entry.entry_id == entry_id and entry.message is None and entry.error


def test_submit_rejects_other_messages(redis_client, redis_keys):
    with pytest.raises(TypeError, match="Heartbeat"):
        submit(redis_client, Heartbeat("w0", 1.0), redis_keys)


def test_queue_needs_a_bytes_client(redis_server, redis_keys):
    with pytest.raises(ValueError, match="decode_responses"):
        RequestQueue(redis.Redis.from_url(redis_server.url, decode_responses=True), redis_keys)


# ---- status -----------------------------------------------------------------------------


def test_status_is_written_only_on_flush_in_one_round_trip(redis_client, redis_keys):
    writer = StatusWriter(redis_client, redis_keys)
    writer.request_status("r1", status="running", worker="w0", num_generated_tokens=1)
    writer.request_status("r1", num_generated_tokens=2)
    writer.worker("w0", worker_figures("w0", running=1))
    writer.figures(SchedulerFigures(updated_at=1.0, running=1, tokens_per_s=12.5))
    writer.error(ErrorRecord(worker="w0", error="boom", time=1.0))
    assert redis_client.keys(f"{redis_keys.prefix}:*") == []

    def commands_processed() -> int:
        return redis_client.info("stats")["total_commands_processed"]

    def commands_sent_by(action) -> int:
        before = commands_processed()
        action()
        return commands_processed() - before - 1  # the first INFO counts itself

    assert commands_sent_by(lambda: None) == 0
    # One pipeline of 5 writes (3 HSETs, LPUSH, LTRIM): updates to r1 were merged, and
    # nothing went out per update call.
    assert commands_sent_by(writer.flush) == 5
    assert redis_client.hgetall(redis_keys.request("r1")) == {
        b"status": b"running",
        b"worker": b"w0",
        b"num_generated_tokens": b"2",
    }
    assert redis_client.ttl(redis_keys.request("r1")) == -1  # running: no expiry
    assert commands_sent_by(writer.flush) == 0  # nothing collected: no round trip


def test_finished_request_expires(redis_client, redis_keys):
    writer = StatusWriter(redis_client, redis_keys, finished_ttl_s=60)
    writer.request_status("done", status="finished", finish_reason="stop")
    writer.request_status("failed", status="error", error="worker died")
    writer.request_status("queued", status="queued")
    writer.flush()
    assert 0 < redis_client.ttl(redis_keys.request("done")) <= 60
    assert 0 < redis_client.ttl(redis_keys.request("failed")) <= 60
    assert redis_client.ttl(redis_keys.request("queued")) == -1


def test_request_status_rejects_unstorable_values(redis_client, redis_keys):
    writer = StatusWriter(redis_client, redis_keys)
    with pytest.raises(TypeError, match="'usage'"):
        writer.request_status("r1", usage={"prompt_tokens": 3})


def test_request_status_rejects_a_status_nobody_reads(redis_client, redis_keys):
    with pytest.raises(ValueError, match="'leaving'"):
        StatusWriter(redis_client, redis_keys).request_status("r1", status="leaving")


def test_errors_list_is_capped_newest_first(redis_client, redis_keys):
    writer = StatusWriter(redis_client, redis_keys)
    for n in range(7):
        writer.error(ErrorRecord(error=f"e{n}", time=float(n)), keep=3)
        if n % 2:
            writer.flush()
    writer.flush()
    assert [e.error for e in read_status(redis_client, redis_keys).errors] == ["e6", "e5", "e4"]


def test_remove_worker(redis_client, redis_keys):
    writer = StatusWriter(redis_client, redis_keys)
    writer.worker("w0", worker_figures("w0", running=1))
    writer.worker("w1", worker_figures("w1", running=2))
    writer.flush()
    writer.remove_worker("w0")
    writer.flush()
    assert redis_client.hkeys(redis_keys.workers) == [b"w1"]


def test_updates_survive_a_failed_flush(redis_server, redis_client, redis_keys):
    unreachable = redis.Redis(host="127.0.0.1", port=1, retry=Retry(NoBackoff(), 0))
    writer = StatusWriter(unreachable, redis_keys)
    writer.request_status("r1", status="running")
    writer.figures(SchedulerFigures(updated_at=1.0, running=1))
    with pytest.raises(redis.ConnectionError):
        writer.flush()
    writer.client = redis_client  # Redis is back
    writer.flush()
    assert redis_client.hget(redis_keys.request("r1"), "status") == b"running"
    assert b'"running":1' in redis_client.hget(redis_keys.schedulers, "scheduler")


def test_read_status_returns_what_was_published(redis_client, redis_keys, queue):
    assert read_status(redis_client, redis_keys) == SystemStatus(
        scheduler=None, workers={}, errors=[], queue_length=0, pending=0
    )
    for n in range(3):
        submit(redis_client, request(n), redis_keys)
    queue.read(count=2)
    writer = StatusWriter(redis_client, redis_keys)
    figures = SchedulerFigures(
        updated_at=1234.5, running=2, tokens_per_s=12.5, finished={"stop": 4, "abort": 1}
    )
    writer.figures(figures)
    writer.worker("w0", worker_figures("w0", kv_usage=0.6, step_ms=3.5))
    writer.error(ErrorRecord(error="first", time=1.0))
    writer.error(ErrorRecord(error="second", time=2.0, worker="w0", step_id=7))
    writer.flush()
    # Operators read the hash with redis-cli: one JSON per scheduler name.
    assert b'"finished":{"stop":4,"abort":1}' in redis_client.hget(redis_keys.schedulers, "scheduler")
    assert read_status(redis_client, redis_keys) == SystemStatus(
        scheduler=figures,
        schedulers={"scheduler": figures},
        workers={"w0": worker_figures("w0", kv_usage=0.6, step_ms=3.5)},
        errors=[
            ErrorRecord(error="second", time=2.0, worker="w0", step_id=7),
            ErrorRecord(error="first", time=1.0),
        ],
        queue_length=3,
        pending=2,
    )


def test_a_record_that_does_not_decode_names_its_field(redis_client, redis_keys):
    redis_client.hset(redis_keys.schedulers, "s1", b'{"updated_at": 1.0, "running": "many"}')
    with pytest.raises(ValueError, match="running"):
        read_status(redis_client, redis_keys)


def test_queue_load_counts_requests_and_waiting_tokens(redis_client, redis_keys):
    assert queue_load(redis_client, redis_keys) == (0, 0)
    submit(redis_client, request(1), redis_keys)
    writer = StatusWriter(redis_client, redis_keys)
    writer.figures(SchedulerFigures(updated_at=1.0, queued_tokens=300))
    writer.flush()
    assert queue_load(redis_client, redis_keys) == (1, 300)


def test_read_status_without_a_group(redis_client, redis_keys):
    submit(redis_client, request(1), redis_keys)
    assert read_status(redis_client, redis_keys).pending == 0
    assert RequestQueue(redis_client, redis_keys).pending_count() == 0


def test_durability_problem_reads_the_servers_settings(redis_client):
    assert durability_problem(redis_client) is None  # the embedded server's default
    try:
        redis_client.config_set("appendfsync", "everysec")
        assert "appendfsync is 'everysec', not 'always'" in durability_problem(redis_client)
        redis_client.config_set("appendonly", "no")
        assert "appendonly is off" in durability_problem(redis_client)
    finally:
        redis_client.config_set("appendonly", "yes")
        redis_client.config_set("appendfsync", "always")
    assert durability_problem(redis_client) is None
