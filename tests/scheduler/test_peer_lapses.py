"""A scheduler's lease that lapsed, and a dead peer's backlog, against a real Redis: the
check after a lapse counts only requests a peer now holds (and runs again if Redis failed
it), an entry a peer took over before our loop took it is left to that peer, and a
takeover claims about one pool's room per interval rather than the whole backlog."""

from __future__ import annotations

import time

import pytest

from services.scheduler.core import SchedulerCore
from services.scheduler.lease import LeaseLost
from services.scheduler.service import SchedulerService
from shared.config import SchedulerSettings
from shared.figure_records import SchedulerFigures
from shared.redis_protocol import StatusWriter, submit
from tests.scheduler.test_peers import peers_of, queue, request, worker


def serving(client, keys, name: str = "a") -> SchedulerService:
    settings = SchedulerSettings(redis_prefix=keys.prefix, scheduler_name=name)
    service = SchedulerService(settings, SchedulerCore(), client)
    service.queue.ensure_group()
    assert service.lease.acquire()
    return service


def test_the_check_after_a_lapse_runs_again_when_redis_failed_it(redis_client, redis_keys):
    service = serving(redis_client, redis_keys)
    submit(redis_client, request(1), redis_keys)
    service._read_queue(service.queue.read())
    redis_client.delete(redis_keys.scheduler("a"))  # it expired during an outage...
    assert peers_of(redis_client, redis_keys, "b").take_over(redis_keys.scheduler, SchedulerCore()) == 1
    # ...and right after it the check's XPENDING fails: the stream is not a stream for a moment.
    moved = f"{redis_keys.prefix}:moved"
    redis_client.rename(redis_keys.requests, moved)
    redis_client.set(redis_keys.requests, b"not a stream")
    service._redis(service._renew_lease)  # the lease is taken again; the failed check is logged
    assert service.lease.lapsed, "not checked yet"
    redis_client.delete(redis_keys.requests)
    redis_client.rename(moved, redis_keys.requests)
    with pytest.raises(LeaseLost, match="peers took over 1 of our requests"):
        service._renew_lease()


def test_a_lone_scheduler_whose_ack_reply_was_lost_keeps_serving_after_a_lapse(redis_client, redis_keys):
    service = serving(redis_client, redis_keys)
    for n in (1, 2):
        submit(redis_client, request(n), redis_keys)
    read = service.queue.read()
    service._read_queue(read)
    service.core.abort("r1")
    service._send_outputs()
    service._bookkeeping()  # r1's XACK goes out...
    service._unacked.append(
        read[0].entry_id
    )  # ...and applies, but its reply is lost: it is acked again later
    redis_client.delete(redis_keys.scheduler("a"))  # the outage outlasted the TTL
    service._renew_lease()  # nobody took r2: it goes on serving
    assert not service.lease.lapsed and set(service.core.requests) == {"r2"}


def test_entries_beyond_the_first_thousand_pending_are_checked_too(redis_client, redis_keys):
    a = queue(redis_client, redis_keys, "a")
    for n in range(1030):
        submit(redis_client, request(n), redis_keys)
    assert len(a.read(count=1029)) == 1029  # pending under a, not yet replayed into its core
    [last] = a.read(count=10)
    peers_a = peers_of(redis_client, redis_keys, "a")
    assert peers_a.taken_from_us([last.entry_id]) == 0, "still ours, however many lower ids are pending"
    assert peers_of(redis_client, redis_keys, "b").take_over(redis_keys.scheduler, SchedulerCore()) == 1030
    assert peers_a.taken_from_us([last.entry_id]) == 1


def test_an_entry_a_peer_took_over_before_our_loop_took_it_stays_the_peers(redis_client, redis_keys):
    service = serving(redis_client, redis_keys)
    submit(redis_client, request(1), redis_keys)
    read = service.queue.read()  # as the reader's buffered batch, not yet taken by the loop
    redis_client.delete(redis_keys.scheduler("a"))  # our lease lapsed meanwhile
    assert peers_of(redis_client, redis_keys, "b").take_over(redis_keys.scheduler, SchedulerCore()) == 1
    b = serving(redis_client, redis_keys, "b")
    b.queue.replay_pending()
    b._read_queue(b.queue.read())
    service._read_queue(read)
    assert set(b.core.requests) == {"r1"} and not service.core.requests, "one pool runs it"
    assert redis_client.hget(redis_keys.request("r1"), "owner") == b"b"
    service._flush()
    assert redis_client.xpending(redis_keys.requests, redis_keys.group)["consumers"] == [
        {"name": b"b", "pending": 1}
    ], "not acked by us: b's entry"


def test_a_dead_peers_backlog_is_shared_by_the_survivors_with_room(redis_client, redis_keys):
    a = queue(redis_client, redis_keys, "a")
    for n in range(10):
        submit(redis_client, request(n), redis_keys)
    assert len(a.read()) == 10  # then a dies: its lease key is gone
    survivors = {}
    for name in ("b", "c", "idle"):
        writer = StatusWriter(redis_client, redis_keys, scheduler_name=name)
        writer.figures(SchedulerFigures(updated_at=time.time()))
        writer.flush()
        redis_client.set(redis_keys.scheduler(name), b"host:1", px=60_000)
        survivors[name] = (peers_of(redis_client, redis_keys, name, max_num_seqs=2), SchedulerCore())
    for name, (peers, core) in survivors.items():
        peers.refresh_peers()
        if name != "idle":
            worker(core, f"w-{name}", time.monotonic())
    assert [p.take_over(redis_keys.scheduler, core) for p, core in survivors.values()] == [2, 2, 0], (
        "each its room; a pool without a worker none"
    )
    peers_b, core_b = survivors["b"]
    for n in range(2):
        core_b.add_request(request(100 + n))  # its pool is full now...
    assert peers_b.take_over(redis_keys.scheduler, core_b) == 2, (
        "...and still it drains max_num_seqs per interval"
    )
    peers_b.live_peers = set()  # alone: as a single scheduler, all of them
    assert peers_b.take_over(redis_keys.scheduler, core_b) == 4
