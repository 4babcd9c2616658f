"""The scheduler process's plumbing around SchedulerCore: ZeroMQ to the workers
(worker_link.py) and the gateways (outbox.py), the Redis request stream in (read by
queue_reader's thread), status out. Several schedulers of distinct names may share the
stream, each with its own workers (peers.py).

One loop, asleep until a worker message or new queue entries arrive (or a gateway that
was full takes more). Each pass: take them, drop silent workers, hand every idle worker its
next step, send the outputs (one message per gateway, through outbox.py), then write to
Redis what the pass produced: the acknowledgements of the requests whose final outputs went
out, those of the abort entries read, and the status, each in one pipeline (so up to three
round trips, none when there is nothing to write); once every stats_interval it also
writes the figures, renews its lease and checks gateways and peers. Workers step
concurrently; the loop never waits for one, nor for a gateway, to serve another.

SIGTERM: no new entries are read; the outputs produced go out, finished requests are
acknowledged, and the requests still running stay in the Redis queue for the next scheduler.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
from collections import defaultdict
from collections.abc import Callable

import redis
import zmq

from services.scheduler.core import SchedulerCore
from services.scheduler.figure_builder import FigureBuilder
from services.scheduler.gateway_liveness import GatewayLiveness
from services.scheduler.lease import Lease, LeaseLost
from services.scheduler.outbox import Outbox
from services.scheduler.peers import Peers
from services.scheduler.queue_reader import QueueReader
from services.scheduler.redis_backoff import RedisBackoff
from services.scheduler.request_spans import RequestSpans
from services.scheduler.worker_link import WorkerLink
from shared import messages as m
from shared.config import SchedulerSettings
from shared.figure_records import ErrorRecord
from shared.redis_keys import RedisKeys
from shared.redis_protocol import QueueEntry, RequestQueue, StatusWriter
from shared.tracing import tracer_for

log = logging.getLogger(__name__)

MAX_WAIT_S = 0.25  # the longest sleep of an idle loop: bounds how late SIGTERM and timeouts are seen
EXIT_LEASE_LOST = 3
STOP_FLUSH_S = 2.0  # at a stop, how long outputs still waiting for a slow gateway may take to go out


class SchedulerService:
    def __init__(self, settings: SchedulerSettings, core: SchedulerCore, client: redis.Redis):
        self.settings = settings
        self.core = core
        self.keys = RedisKeys(settings.redis_prefix)
        self.name = settings.scheduler_name
        self.queue = RequestQueue(client, self.keys, consumer=self.name, aborts=self.keys.aborts(self.name))
        self.status = StatusWriter(client, self.keys, scheduler_name=self.name)
        self.lease = Lease(
            client,
            self.keys.scheduler(self.name),
            f"{socket.gethostname()}:{os.getpid()}",
            settings.lease_ttl,
        )
        self.peers = Peers(client, self.keys, self.name, settings.max_num_seqs, settings.stall_after)
        self.ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        self._link: WorkerLink | None = None  # bound once the lease is ours
        self.poller = zmq.Poller()
        self.outbox = Outbox(self.poller, settings.gateway_timeout)
        self._gone: set[str] = set()  # gateways declared gone: what is addressed to them is dropped
        self.stopping = False
        self._last_stats = 0.0
        self.figures = FigureBuilder(core, settings.stall_after)
        self.spans = RequestSpans(
            tracer_for("scheduler", settings.otlp_traces_endpoint, settings.otlp_traces_protocol)
        )
        self._unacked: list[str] = []  # finished entries whose XACK has not reached Redis yet
        self._unacked_aborts: list[str] = []  # the same, of our abort stream
        self.redis_backoff = RedisBackoff()
        self.liveness = GatewayLiveness(client, self.keys, settings.gateway_timeout)
        self._reader: QueueReader | None = None  # started once the lease is ours

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, lambda *_: setattr(self, "stopping", True))
        signal.signal(signal.SIGINT, lambda *_: setattr(self, "stopping", True))

    @property
    def link(self) -> WorkerLink:
        assert self._link is not None, "the worker socket is bound in serve(), once the lease is ours"
        return self._link

    @property
    def reader(self) -> QueueReader:
        assert self._reader is not None, "the queue is read from serve(), once the lease is ours"
        return self._reader

    def serve(self) -> int:
        """Serve until SIGTERM; returns the process exit code."""
        if not self.lease.stand_by(self.name, lambda: self.stopping):
            return 0
        link = self._link = WorkerLink(
            self.ctx, self.settings, self.core, self.status, self.figures, self.spans, self._record_error
        )
        self.queue.ensure_group()
        reader = self._reader = QueueReader(
            self.queue.client, self.keys, self.ctx, consumer=self.name, aborts=self.queue.aborts
        )
        self.poller.register(link.sock, zmq.POLLIN)
        self.poller.register(reader.wake, zmq.POLLIN)
        self._redis(self.peers.refresh_peers)  # before the first read: a backlog is not for us alone
        reader.set_room(self.peers.room(self.core))
        reader.start()
        log.info(
            "scheduler %s (%s) listening for workers on %s",
            self.name,
            self.lease.holder,
            self.settings.scheduler_address,
        )
        code = 0
        try:
            while not self.stopping:
                self.run_once()
        except LeaseLost as e:
            log.error("%s; stopping so that no request is served by two schedulers", e)
            code = EXIT_LEASE_LOST
        reader.stop()
        if code == 0:
            self._hand_back()
        link.close()
        self.outbox.close(STOP_FLUSH_S)
        if code == 0:
            self._redis(self.lease.release)
        log.info("scheduler stopped")
        return code

    def _hand_back(self) -> None:
        """A clean stop, once no more entries are read: the outputs produced go out (for up
        to STOP_FLUSH_S), the requests they finish are acknowledged, and those still running
        stay unacknowledged in the Redis queue: this scheduler restarted replays them, and
        its peers take them over once its lease is released."""
        self._send_outputs()  # those of the last pass's bookkeeping (expiries, aborts)
        if not self.outbox.drain(STOP_FLUSH_S):
            log.warning(
                "%d messages of outputs not taken by their gateways in %g s; their requests stay "
                "in the queue and run again",
                self.outbox.waiting(),
                STOP_FLUSH_S,
            )
        self._collect_status()
        self.redis_backoff.retry_now()  # one last try
        self._redis(self._flush)
        if self.core.requests:
            log.info(
                "%d requests still running are left in the queue for the next scheduler",
                len(self.core.requests),
            )

    def run_once(self) -> None:
        ready = dict(self.poller.poll(self._wait_ms()))
        if self.link.sock in ready:
            self.link.receive()
        if self.reader.wake in ready:
            self._read_queue(self.reader.take())
        # NOTE: what came during this pass first: a long pass (a burst of arrivals) must not
        # make workers that did send heartbeats look silent.
        self.link.receive()
        self.link.drop_silent()
        self.link.dispatch()
        self._send_outputs()
        self._bookkeeping()
        self.reader.set_room(self.peers.room(self.core))

    def _wait_ms(self) -> int:
        """Until the next figures are due (or MAX_WAIT_S): nothing else needs a pass unless
        a socket has something to read."""
        due = self._last_stats + self.settings.stats_interval - time.monotonic()
        return max(0, round(1000 * min(due, MAX_WAIT_S)))

    # ---- queue and gateways ---------------------------------------------------------------
    def _read_queue(self, entries: list[QueueEntry]) -> None:
        for entry in [e for e in entries if e.stream == self.queue.aborts]:
            if isinstance(entry.message, m.AbortRequest):
                self.core.abort(entry.message.request_id, entry.message.reason)  # one of ours (or finished)
            else:
                self._record_error(f"abort entry {entry.entry_id} rejected: {entry.error or 'not an abort'}")
            self._unacked_aborts.append(entry.entry_id)
        # Replayed after a lost connection or a takeover: running here, or finished and being acked.
        entries = [e for e in entries if e.stream != self.queue.aborts and not self._holds(e)]
        submits = [
            (e.message.request_id, e.entry_id) for e in entries if isinstance(e.message, m.SubmitRequest)
        ]
        try:
            taken = self.peers.take(submits)
            for e in entries:
                if isinstance(e.message, m.AbortRequest):
                    self.peers.forward_abort(e.message)  # to its owner, whoever that is (us too)
        except redis.RedisError as e:
            # Not taken, so not served: they stay pending here and are read again.
            log.error("could not take %d requests (Redis: %s); reading them again", len(submits), e)
            self.reader.replay_pending()
            return
        for entry in entries:
            if entry.entry_id not in taken.elsewhere:  # a peer's now: neither run nor acked here
                self._read_entry(entry, taken.aborted)

    def _read_entry(self, entry: QueueEntry, aborted: dict[str, str]) -> None:
        msg = entry.message
        if msg is None:
            self._record_error(f"queue entry {entry.entry_id} rejected: {entry.error}")
        elif isinstance(msg, m.SubmitRequest) and self.core.add_request(msg, entry.entry_id):
            self._gone.discard(msg.reply_to)  # it submits: it is back (or it never left)
            self.spans.started(msg)
            if msg.request_id in aborted:  # aborted before it was taken: it ends at once, acked as it ends
                self.core.abort(msg.request_id, aborted[msg.request_id])
            return
        # Acked now: undecodable, an abort forwarded to its owner, or refused (its error output
        # is in core.outputs).
        self._unacked.append(entry.entry_id)

    def _holds(self, entry: QueueEntry) -> bool:
        """Whether this entry was read before: its request runs here, or it awaits its XACK."""
        if entry.entry_id in self._unacked or self.outbox.holds(entry.entry_id):
            return True
        req = (
            self.core.requests.get(entry.message.request_id)
            if isinstance(entry.message, m.SubmitRequest)
            else None
        )
        return req is not None and req.entry_id == entry.entry_id

    def _send_outputs(self) -> None:
        """This pass's outputs, one message per gateway. A request finished in it is
        acknowledged once its final output is handed to ZeroMQ (outbox.py); a gateway that
        took none for gateway_timeout is gone."""
        # NOTE: both drained at once: a request's final output and its finish come together.
        entries = {r.request_id: r.entry_id for r in self.core.finished if r.entry_id}
        self.core.finished.clear()
        by_gateway: dict[str, list[m.RequestOutput]] = defaultdict(list)
        for reply_to, out in self.core.outputs:
            by_gateway[reply_to].append(out)
            self.spans.output(out)
        self.core.outputs.clear()
        now = time.monotonic()
        for reply_to, outs in by_gateway.items():
            ends = [
                entries[o.request_id] for o in outs if o.finish_reason is not None and o.request_id in entries
            ]
            if reply_to in self._gone:  # its requests were aborted for it: nobody reads these
                self._unacked.extend(ends)
            else:
                self.outbox.send(reply_to, outs, ends, now)
        self.outbox.flush()
        for reply_to in self.outbox.stuck(now):
            self._gateway_gone(reply_to, f"it took no output for {self.settings.gateway_timeout:g} s")

    def _gateway_gone(self, reply_to: str, why: str) -> None:
        """Nobody reads this gateway's outputs: abort its requests (their status says
        gateway_gone), drop what waits for it, and send it nothing more until it submits again."""
        rids = [rid for rid, req in self.core.requests.items() if req.reply_to == reply_to]
        for rid in rids:
            self.core.abort(rid, "gateway gone")
        left = self.outbox.drop(reply_to)
        self._unacked.extend(left.entry_ids)  # finished: their final outputs are what was lost
        self._gone.add(reply_to)
        self.liveness.forget(reply_to)
        lost = (
            f"; {left.messages} messages of outputs undelivered, the last of {len(left.entry_ids)} finished "
            "requests among them"
            if left.messages
            else ""
        )
        self._record_error(f"gateway {reply_to} is gone ({why}): {len(rids)} requests aborted{lost}")

    # ---- Redis bookkeeping -------------------------------------------------------------------
    def _bookkeeping(self) -> None:
        self._collect_status()
        if time.monotonic() - self._last_stats >= self.settings.stats_interval:
            self.core.expire_queued(time.time())
            self._write_figures()
            self._redis(self._renew_lease)
            self._redis(self._abort_orphans)
            self._redis(self._take_over)
            self._forget_gone()
        self._redis(self._flush)

    def _collect_status(self) -> None:
        """What the next _flush writes: acks of the final outputs sent, status, errors."""
        self._unacked.extend(self.outbox.take_delivered())
        for rid, fields in self.core.status_updates.items():
            self.status.request_status(rid, **fields)
        self.core.status_updates.clear()
        for e in self.core.errors:
            self.status.error(ErrorRecord(**e, time=time.time()))
        self.core.errors.clear()

    def _flush(self) -> None:
        """A round trip for each that has something to write: acks, abort acks, status."""
        if self._unacked:
            self.queue.ack(self._unacked)
            self._unacked = []
        if self._unacked_aborts:
            self.queue.ack(self._unacked_aborts, self.queue.aborts)
            self._unacked_aborts = []
        self.status.flush()

    def _abort_orphans(self) -> None:
        """Abort the requests of gateways that are gone: nobody would read their tokens."""
        gateways = dict.fromkeys(req.reply_to for req in self.core.requests.values())
        for reply_to in self.liveness.missing(gateways):
            self._gateway_gone(
                reply_to, f"its liveness key was missing for {self.settings.gateway_timeout:g} s"
            )

    def _forget_gone(self) -> None:
        """A gateway declared gone is forgotten once nothing more can be addressed to it: none
        of its requests is left, nor an output of theirs (an abort's, sent in the next pass)."""
        self._gone &= {r.reply_to for r in self.core.requests.values()} | {to for to, _ in self.core.outputs}

    def _renew_lease(self) -> None:
        if not self.lease.renew():
            raise LeaseLost(f"the lease is now held by {self.lease.current_holder()}")
        if self.lease.lapsed:  # it expired: a peer may have taken over our requests meanwhile
            # NOTE: cleared only once checked: if Redis fails the check, the next renewal runs it.
            # Entries read but not yet taken need no check: the take leaves a peer's to it.
            taken = self.peers.taken_from_us([r.entry_id for r in self.core.requests.values() if r.entry_id])
            if taken:
                raise LeaseLost(f"our lease lapsed and peers took over {taken} of our requests")
            self.lease.lapsed = False

    def _take_over(self) -> None:
        self.peers.refresh_peers()
        if self.peers.take_over(self.keys.scheduler, self.core):
            self.reader.replay_pending()  # read as our own pending entries, as after a restart

    def _redis(self, action: Callable[[], object]) -> None:
        """Run a Redis action unless Redis is known to be down (redis_backoff.py):
        acknowledgements and status wait meanwhile."""
        self.redis_backoff.run(action)

    def _write_figures(self) -> None:
        scheduler, workers = self.figures.interval()
        self.status.figures(scheduler)
        for wid, figures in workers.items():
            self.status.worker(wid, figures)
        self._last_stats = time.monotonic()

    def _record_error(self, text: str) -> None:
        log.warning("%s", text)
        self.status.error(ErrorRecord(error=text, time=time.time()))
