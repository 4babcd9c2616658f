"""Several schedulers on one request stream, against a real Redis: each entry goes to one
consumer, the owner is recorded on take unless an abort came first, an abort reaches the
owner's own stream, a dead peer's pending entries are taken over (never a live one's), and
the lease is per name."""

from __future__ import annotations

import time

import pytest
import zmq

from conveyor.status import render
from services.scheduler.core import SchedulerCore
from services.scheduler.lease import Lease, LeaseLost
from services.scheduler.peers import Peers
from services.scheduler.queue_reader import QueueReader
from services.scheduler.service import SchedulerService
from shared.config import SchedulerSettings
from shared.figure_records import SchedulerFigures
from shared.messages import AbortRequest, FinishReason, RegisterWorker, SamplingParams, SubmitRequest
from shared.ownership import Ownership, Taken
from shared.redis_protocol import RequestQueue, StatusWriter, queue_load, read_status, submit


def request(n: int) -> SubmitRequest:
    return SubmitRequest(
        request_id=f"r{n}",
        prompt_token_ids=[1, 2, 3],
        sampling=SamplingParams(max_tokens=4),
        reply_to="tcp://127.0.0.1:5555",
        arrival_time=1000.0 + n,
    )


def queue(client, keys, name: str) -> RequestQueue:
    q = RequestQueue(client, keys, consumer=name, aborts=keys.aborts(name))
    q.ensure_group()
    return q


def ids(entries) -> set[str]:
    return {e.message.request_id for e in entries}


def peers_of(client, keys, name: str, max_num_seqs: int = 4) -> Peers:
    return Peers(client, keys, name, max_num_seqs=max_num_seqs, stall_after_s=10.0)


def worker(core: SchedulerCore, worker_id: str, now: float) -> None:
    core.add_worker(RegisterWorker(worker_id, "m", 64, 16, 64, 100, [0], "cpu", 1), now)


def test_each_entry_goes_to_exactly_one_of_two_consumers(redis_client, redis_keys):
    a, b = queue(redis_client, redis_keys, "a"), queue(redis_client, redis_keys, "b")
    for n in range(10):
        submit(redis_client, request(n), redis_keys)
    got_a, got_b = a.read(count=4), b.read(count=100)
    assert len(got_a) == 4 and len(got_b) == 6
    assert ids(got_a) | ids(got_b) == {f"r{n}" for n in range(10)} and not ids(got_a) & ids(got_b)
    assert a.read(count=100, block_ms=10) == [] and b.read(count=100, block_ms=10) == []


def test_an_abort_after_the_take_reaches_the_owner_only(redis_client, redis_keys):
    a, b = queue(redis_client, redis_keys, "a"), queue(redis_client, redis_keys, "b")
    own = Ownership(redis_client, redis_keys)
    submit(redis_client, request(1), redis_keys)
    [entry] = a.read()
    assert own.take("a", [("r1", entry.entry_id)]) == Taken()
    assert own.abort(AbortRequest("r1", "client disconnected")) == "a"
    [entry] = a.read(block_ms=10)
    assert entry.message == AbortRequest("r1", "client disconnected") and entry.stream == redis_keys.aborts(
        "a"
    )
    assert b.read(block_ms=10) == []
    a.ack([entry.entry_id], redis_keys.aborts("a"))
    assert redis_client.xlen(redis_keys.aborts("a")) == 0


def test_an_abort_before_the_take_is_seen_by_the_taker(redis_client, redis_keys):
    own = Ownership(redis_client, redis_keys)
    assert own.abort(AbortRequest("r1", "client disconnected")) is None  # nobody owns it yet
    assert redis_client.ttl(redis_keys.request("r1")) > 0  # a flag nobody takes does not stay forever
    taken = own.take("b", [("r0", "1-0"), ("r1", "2-0")])  # no stream: nobody else holds them
    assert taken == Taken(aborted={"r1": "client disconnected"})
    assert redis_client.hget(redis_keys.request("r0"), "owner") == b"b"
    assert redis_client.hget(redis_keys.request("r1"), "owner") is None


def test_a_dead_peers_entries_are_taken_over_a_live_ones_never(redis_client, redis_keys):
    a, b, c = (queue(redis_client, redis_keys, n) for n in "abc")
    for n in range(5):
        submit(redis_client, request(n), redis_keys)
    assert len(a.read()) == 5
    for name in "abc":
        redis_client.set(redis_keys.scheduler(name), b"host:1", px=60_000)
    peers_b, peers_c = peers_of(redis_client, redis_keys, "b"), peers_of(redis_client, redis_keys, "c")
    core = SchedulerCore()
    assert peers_b.take_over(redis_keys.scheduler, core) == 0, "a is alive: nothing is taken"
    redis_client.delete(redis_keys.scheduler("a"))  # its lease expired
    assert peers_b.take_over(redis_keys.scheduler, core) == 5, "alone (no live peers): all of them"
    assert peers_c.take_over(redis_keys.scheduler, core) == 0, "already taken, by one claimer only"
    b.replay_pending()  # as the scheduler does after a takeover
    assert ids(b.read()) == {f"r{n}" for n in range(5)}
    c.replay_pending()
    assert c.read(block_ms=10) == []
    assert peers_b.taken_from_us([e.entry_id for e in a.read()]) == 0
    a.replay_pending()
    assert a.read(block_ms=10) == [], "a's pending entries are b's now"


def test_a_scheduler_whose_lease_lapsed_learns_that_its_requests_were_taken(redis_client, redis_keys):
    a, b = queue(redis_client, redis_keys, "a"), queue(redis_client, redis_keys, "b")
    for n in range(3):
        submit(redis_client, request(n), redis_keys)
    held = [e.entry_id for e in a.read()]
    peers_a = peers_of(redis_client, redis_keys, "a")
    assert peers_a.taken_from_us(held) == 0
    peers_of(redis_client, redis_keys, "b").take_over(redis_keys.scheduler, SchedulerCore())
    assert peers_a.taken_from_us(held) == 3
    assert len(b.read()) == 3


def test_the_lease_is_per_name(redis_client, redis_keys):
    first = Lease(redis_client, redis_keys.scheduler("a"), "host:1", 5.0)
    same_name = Lease(redis_client, redis_keys.scheduler("a"), "host:2", 5.0)
    other = Lease(redis_client, redis_keys.scheduler("b"), "host:3", 5.0)
    assert first.acquire() and not same_name.acquire() and other.acquire()
    redis_client.delete(redis_keys.scheduler("a"))  # expired during an outage
    assert first.renew() and first.lapsed


def test_a_full_pool_reads_aborts_but_no_new_requests(redis_client, redis_keys):
    queue(redis_client, redis_keys, "a")
    reader = QueueReader(
        redis_client, redis_keys, zmq.Context.instance(), consumer="a", aborts=redis_keys.aborts("a")
    )
    reader.set_room(0)
    reader.start()
    try:
        submit(redis_client, request(1), redis_keys)
        Ownership(redis_client, redis_keys).take("a", [("r9", "1-0")])
        Ownership(redis_client, redis_keys).abort(AbortRequest("r9", "client disconnected"))
        assert reader.wake.poll(2000)
        assert [e.message for e in reader.take()] == [AbortRequest("r9", "client disconnected")]
        time.sleep(0.3)
        assert not reader.wake.poll(0), "no room: the request stays in Redis for a peer"
        reader.set_room(1)
        assert reader.wake.poll(2000)
        assert ids(reader.take()) == {"r1"}
    finally:
        reader.stop()


def test_room_is_unbounded_alone_and_the_serving_workers_free_slots_with_peers(redis_client, redis_keys):
    core = SchedulerCore()
    peers = peers_of(redis_client, redis_keys, "a")
    peers.refresh_peers()
    assert peers.room(core) is None, "alone it reads as a single scheduler always did"
    for name, age in (("a", 0.0), ("b", 1.0), ("gone", 60.0)):
        writer = StatusWriter(redis_client, redis_keys, scheduler_name=name)
        writer.figures(SchedulerFigures(updated_at=time.time() - age))
        writer.flush()
    peers.refresh_peers()
    assert peers.live_peers == {"b"}
    assert peers.room(core) == 0, "no worker yet (or the last one died): b's workers can run them"
    worker(core, "w1", time.monotonic())
    assert peers.room(core) == 4
    worker(core, "w2", time.monotonic())
    for n in range(3):
        core.add_request(request(n))
    assert peers.room(core) == 5
    core.next_plan("w1", time.time(), time.monotonic() - 11.0)  # its step has run 11 s: stalled
    assert core.workers["w1"].in_flight is not None and peers.room(core) == 1, "only w2 serves"
    core.add_request(request(3))  # w1 admitted the first three: one for w2
    core.next_plan("w2", time.time(), time.monotonic() - 11.0)
    assert core.workers["w2"].in_flight is not None
    assert peers.room(core) == 0, "none of its workers serves"


def test_a_request_aborted_before_it_was_taken_ends_at_once_and_is_acked(redis_client, redis_keys):
    settings = SchedulerSettings(redis_prefix=redis_keys.prefix, scheduler_name="a")
    service = SchedulerService(settings, SchedulerCore(), redis_client)
    service.queue.ensure_group()
    submit(redis_client, request(1), redis_keys)
    submit(redis_client, request(2), redis_keys)
    Ownership(redis_client, redis_keys).abort(AbortRequest("r1", "client disconnected"))
    service._read_queue(service.queue.read())
    assert set(service.core.requests) == {"r2"}
    [(_, out)] = [o for o in service.core.outputs if o[1].request_id == "r1"]
    assert out.finish_reason is FinishReason.ABORT
    assert redis_client.hget(redis_keys.request("r2"), "owner") == b"a"
    service._send_outputs()  # its final output goes out: then its entry is acked
    service._bookkeeping()
    assert redis_client.xlen(redis_keys.requests) == 1, "r1's entry is acked and deleted, r2's stays"


def test_status_shows_each_scheduler_and_sums_the_live_ones(redis_client, redis_keys):
    now = time.time()
    for name, running, queued_tokens, age in (("a", 3, 100, 0.0), ("b", 4, 20, 1.0), ("gone", 50, 999, 60.0)):
        writer = StatusWriter(redis_client, redis_keys, scheduler_name=name)
        writer.figures(
            SchedulerFigures(
                updated_at=now - age, running=running, queued_tokens=queued_tokens, finished={"stop": running}
            )
        )
        writer.flush()
    status = read_status(redis_client, redis_keys)
    assert set(status.schedulers) == {"a", "b", "gone"} and status.schedulers["b"].running == 4
    assert status.scheduler.running == 7 and status.scheduler.finished == {"stop": 7}
    assert status.scheduler.updated_at == now
    assert queue_load(redis_client, redis_keys) == (0, 120), "the gateway admits against the live ones"
    text = render(status, now, "here")
    assert "scheduler   alive" in text and "running 7" in text
    [line_b] = [line for line in text.splitlines() if line.startswith("b ")]
    assert line_b.split()[1:4] == ["0", "4", "0"] and line_b.endswith("alive")
    assert "NOT RUNNING (figures 60 s old)" in text


def test_the_next_read_waits_until_the_loop_has_placed_what_it_took(redis_client, redis_keys):
    queue(redis_client, redis_keys, "a")
    for n in range(3):
        submit(redis_client, request(n), redis_keys)
    reader = QueueReader(
        redis_client, redis_keys, zmq.Context.instance(), consumer="a", aborts=redis_keys.aborts("a")
    )
    reader.set_room(1)
    reader.start()
    try:
        assert reader.wake.poll(2000) and len(reader.take()) == 1
        time.sleep(0.3)
        assert not reader.wake.poll(0), "its room from before that batch would overshoot"
        reader.set_room(2)
        assert reader.wake.poll(2000) and len(reader.take()) == 2
    finally:
        reader.stop()


def test_a_scheduler_whose_requests_were_taken_while_its_lease_lapsed_stops(redis_client, redis_keys):
    settings = SchedulerSettings(redis_prefix=redis_keys.prefix, scheduler_name="a")
    service = SchedulerService(settings, SchedulerCore(), redis_client)
    service.queue.ensure_group()
    assert service.lease.acquire()
    submit(redis_client, request(1), redis_keys)
    service._read_queue(service.queue.read())
    service._renew_lease()  # renewed in time: nothing happens
    redis_client.delete(redis_keys.scheduler("a"))  # it expired during an outage...
    service._renew_lease()  # ...and was taken again before any peer looked: still all ours
    redis_client.delete(redis_keys.scheduler("a"))
    assert (
        peers_of(redis_client, redis_keys, "b").take_over(redis_keys.scheduler, SchedulerCore()) == 1
    )  # a peer did
    with pytest.raises(LeaseLost, match="peers took over 1 of our requests"):
        service._renew_lease()
