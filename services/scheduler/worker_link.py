"""The scheduler's side that faces its workers: the ZeroMQ ROUTER socket they connect to
(bound once the lease is ours, CURVE-encrypted when keys are set: shared/curve.py), their
messages applied to the core as they come, each idle worker's next step sent, and silent
ones dropped. Their figures and status go to Redis through the service's StatusWriter.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import zmq

from services.scheduler.core import SchedulerCore
from services.scheduler.figure_builder import FigureBuilder
from services.scheduler.request_spans import RequestSpans
from shared import messages as m
from shared.config import SchedulerSettings
from shared.curve import secure_server
from shared.figure_records import ErrorRecord
from shared.redis_protocol import StatusWriter

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 64 << 20  # a bigger message on the worker socket is refused by ZeroMQ


class WorkerLink:
    def __init__(
        self,
        ctx: zmq.Context[zmq.Socket[bytes]],
        settings: SchedulerSettings,
        core: SchedulerCore,
        status: StatusWriter,
        figures: FigureBuilder,
        spans: RequestSpans,
        on_error: Callable[[str], None],
    ):
        self.settings = settings
        self.core = core
        self.status = status
        self.figures = figures
        self.spans = spans
        self._on_error = on_error  # what it could not make sense of: recorded, never fatal
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # sending to a vanished worker raises
        self.sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
        self.sock.setsockopt(zmq.LINGER, 0)
        s = settings
        self._auth = (
            secure_server(self.sock, s.zmq_server_secret_key, s.zmq_client_public_key)
            if s.zmq_server_secret_key
            else None
        )
        self.sock.bind(s.scheduler_address)

    def receive(self) -> None:
        """Every message waiting now, applied as it is read."""
        while True:
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(frames) != 2:
                log.warning("ignored a worker message of %d frames", len(frames))
                continue
            identity, data = frames
            try:
                msg = m.decode(data)
            except m.DecodeError as e:
                self._on_error(f"undecodable message from {identity[:64]!r}: {e}")
                continue
            self._apply(identity, msg)

    def _apply(self, identity: bytes, msg: m.Message) -> None:
        now = time.monotonic()
        if isinstance(msg, m.RegisterWorker):
            self.core.add_worker(msg, now)
            self.status.worker(msg.worker_id, self.figures.worker(msg.worker_id))
        elif isinstance(msg, (m.Heartbeat, m.StepResult)):
            w = self.core.workers.get(msg.worker_id)
            if w is None:
                # A worker we don't know (we restarted, or it was dropped as silent): it
                # must forget its rows and register again.
                self._send(msg.worker_id, m.Reregister("unknown to this scheduler"))
                return
            w.last_seen = now
            if isinstance(msg, m.StepResult):
                self.figures.on_timings(msg.worker_id, msg.timings)
                self.spans.step_done(msg)
                self.core.on_step_result(msg)
        elif isinstance(msg, m.WorkerLeaving):
            self.core.remove_worker(msg.worker_id, f"left: {msg.reason}")
            self.status.remove_worker(msg.worker_id)
        else:
            self._on_error(f"unexpected {type(msg).__name__} on the worker socket from {identity[:64]!r}")

    def drop_silent(self) -> None:
        """Workers that stopped answering, or whose step runs too long, are dropped: their
        requests are requeued."""
        s = self.settings
        for wid in self.core.check_workers(time.monotonic(), s.heartbeat_timeout, s.step_timeout):
            self.status.remove_worker(wid)
            self.status.error(
                ErrorRecord(
                    worker=wid, error="worker stopped answering; its requests were requeued", time=time.time()
                )
            )

    def dispatch(self) -> None:
        """Each idle worker's next step, if it has one."""
        now, mono = time.time(), time.monotonic()
        for wid in list(self.core.workers):
            plan = self.core.next_plan(wid, now, mono)
            if plan is not None:
                self.spans.step_sent(wid, plan)
                self._send(wid, plan)

    def _send(self, worker_id: str, msg: m.Message) -> None:
        try:
            self.sock.send_multipart([worker_id.encode(), m.encode(msg)], zmq.NOBLOCK)
        except zmq.ZMQError as e:  # EHOSTUNREACH: it disconnected
            if worker_id in self.core.workers:
                self.core.remove_worker(worker_id, f"unreachable ({e})")
                self.status.remove_worker(worker_id)

    def close(self) -> None:
        """Workers stay up: a restarted scheduler asks them to register again."""
        self.sock.close()
        if self._auth is not None:
            self._auth.stop()
