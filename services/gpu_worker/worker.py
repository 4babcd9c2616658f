"""The worker process's loop: register with the scheduler over ZeroMQ, then execute each
StepPlan it receives and answer with a StepResult, until SIGTERM.

Bad messages are logged and answered with an error result; they never end the process. A
tensor-parallel rank that dies does: the worker tells the scheduler it is leaving (which
moves its requests elsewhere) and stops, with `failure` saying why.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from typing import Optional

import zmq

from services.gpu_worker.engine import Engine
from services.gpu_worker.tp_group import RankFailure
from shared import messages as m
from shared.curve import secure_client

log = logging.getLogger(__name__)
# After a rank died, the main loop gets this long to leave; a collective that never returns
# (NCCL does not notice a dead peer as gloo does) must not keep a dead worker registered.
LEAVE_DEADLINE_S = 30.0


class Worker:
    def __init__(self, engine: Engine, info: m.RegisterWorker, scheduler_address: str,
                 heartbeat_interval: float = 1.0, curve: Optional[tuple[str, str]] = None):
        """`info`: the engine's facts, sent as they are on (re)registering. `curve`: (the
        scheduler's public key, this worker's secret key) to use CurveZMQ."""
        assert info.worker_id == engine.worker_id, (info.worker_id, engine.worker_id)
        self.engine = engine
        self.info = info
        self.heartbeat_interval = heartbeat_interval
        self.stopping = False
        self.failure: Optional[str] = None  # set when a tensor-parallel rank died: the worker leaves
        self._left = threading.Event()
        self.curve = curve
        self.ctx = zmq.Context.instance()
        self.scheduler_address = scheduler_address
        self.sock = self._connect(engine.worker_id, linger_ms=1000)
        engine.model.watch_ranks(self._rank_died)

    def _connect(self, identity: str, linger_ms: int) -> zmq.Socket:
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.IDENTITY, identity.encode())
        sock.setsockopt(zmq.LINGER, linger_ms)
        if self.curve is not None:
            secure_client(sock, *self.curve)
        sock.connect(self.scheduler_address)
        return sock

    def install_signal_handlers(self) -> None:
        # SIGTERM lets the current step finish; the loop then says goodbye and returns.
        signal.signal(signal.SIGTERM, lambda *_: setattr(self, "stopping", True))
        signal.signal(signal.SIGINT, lambda *_: setattr(self, "stopping", True))

    def serve(self) -> None:
        self._send(self.info)  # register
        log.info("worker %s registered with the scheduler (%d KV blocks)", self.engine.worker_id, self.info.num_blocks)
        done = threading.Event()
        beats = threading.Thread(target=self._heartbeats, args=(done,), name="heartbeat", daemon=True)
        beats.start()
        while not self.stopping and self.failure is None:
            if not self.sock.poll(timeout=200):  # wakes up to notice SIGTERM or a dead rank
                continue
            try:
                self.handle(self.sock.recv())
            except RankFailure as e:  # the step in flight is lost with the worker: the scheduler moves it
                self._rank_died(str(e))
        done.set()
        beats.join()
        reason = "shutdown" if self.failure is None else f"tensor-parallel rank failed: {self.failure}"
        self._send(m.WorkerLeaving(worker_id=self.engine.worker_id, reason=reason))
        log.info("worker %s left (%s)", self.engine.worker_id, reason)
        self.sock.close()
        self._left.set()

    def _rank_died(self, reason: str) -> None:
        """From the follower watcher's thread or the main loop: leave, within LEAVE_DEADLINE_S."""
        if self.failure is not None:
            return
        log.error("worker %s cannot go on: %s", self.engine.worker_id, reason)
        self.failure = reason
        threading.Thread(target=self._exit_unless_left, name="leave-deadline", daemon=True).start()

    def _exit_unless_left(self) -> None:
        if not self._left.wait(LEAVE_DEADLINE_S):
            log.error("worker %s: the main loop is stuck after a rank died; exiting", self.engine.worker_id)
            os._exit(1)

    def _heartbeats(self, done: threading.Event) -> None:
        """Beats on a socket of its own (ZeroMQ sockets are not shared between threads),
        so a long step does not look like a dead worker."""
        sock = self._connect(f"{self.engine.worker_id}/heartbeat", linger_ms=0)
        while not done.wait(self.heartbeat_interval):
            sock.send(m.encode(m.Heartbeat(worker_id=self.engine.worker_id, sent_at=time.time())))
        sock.close()

    def handle(self, data: bytes) -> None:
        """Handle one incoming message; none of them ends the process."""
        try:
            msg = m.decode(data)
        except m.DecodeError as e:
            log.warning("undecodable message (%d bytes) ignored: %s", len(data), e)
            self._send(m.StepResult(step_id=-1, worker_id=self.engine.worker_id, error=f"undecodable message: {e}"))
            return
        if isinstance(msg, m.StepPlan):
            result = self.engine.execute(msg)
            if result.error:
                log.warning("step %d: %s", msg.step_id, result.error)
            self._send(result)
            return
        if isinstance(msg, m.Reregister):
            log.warning("scheduler asks to register again (%s): dropping %d rows", msg.reason, len(self.engine.rows))
            self.engine.rows.clear()
            self._send(self.info)  # register
            return
        log.warning("unexpected %s message ignored", type(msg).__name__)

    def _send(self, msg: m.Message) -> None:
        self.sock.send(m.encode(msg))
