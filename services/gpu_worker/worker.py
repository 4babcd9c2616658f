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

import zmq

from services.gpu_worker.engine import Engine
from services.gpu_worker.tp_group import RankFailure
from shared import messages as m
from shared.curve import secure_client

log = logging.getLogger(__name__)
# After a rank died, the main loop gets this long to leave; a collective that never returns
# (NCCL does not notice a dead peer as gloo does) must not keep a dead worker registered.
LEAVE_DEADLINE_S = 30.0
# engine.close() after serve(): stopping the followers takes at most ~10 s (Followers.stop);
# past this, a collective stuck on a dead or frozen peer holds it, and the process exits.
CLOSE_DEADLINE_S = 20.0


def exit_unless(done: threading.Event, deadline_s: float, what: str) -> None:
    """Exits the process with status 1 unless `done` is set within deadline_s: a thread
    stuck in a collective cannot be interrupted, only left (followers die by PDEATHSIG)."""

    def watch() -> None:
        if not done.wait(deadline_s):
            log.error("%s took over %.0f s; exiting", what, deadline_s)
            os._exit(1)

    threading.Thread(target=watch, name="deadline", daemon=True).start()


def close_engine(engine: Engine) -> None:
    """engine.close(), within CLOSE_DEADLINE_S."""
    closed = threading.Event()
    exit_unless(closed, CLOSE_DEADLINE_S, "closing the engine")
    engine.close()
    closed.set()


class Worker:
    def __init__(
        self,
        engine: Engine,
        info: m.RegisterWorker,
        scheduler_address: str,
        heartbeat_interval: float = 1.0,
        curve: tuple[str, str] | None = None,
    ):
        """`info`: the engine's facts, sent as they are on (re)registering. `curve`: (the
        scheduler's public key, this worker's secret key) to use CurveZMQ."""
        assert info.worker_id == engine.worker_id, (info.worker_id, engine.worker_id)
        self.engine = engine
        self.info = info
        self.heartbeat_interval = heartbeat_interval
        self.stopping = False
        self.failure: str | None = None  # set when a tensor-parallel rank died: the worker leaves
        self._left = threading.Event()
        self.curve = curve
        self.ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
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
        log.info(
            "worker %s registered with the scheduler (%d KV blocks)",
            self.engine.worker_id,
            self.info.num_blocks,
        )
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
        exit_unless(
            self._left, LEAVE_DEADLINE_S, f"worker {self.engine.worker_id}: leaving after a rank died"
        )

    def _heartbeats(self, done: threading.Event) -> None:
        """Beats on a socket of its own (ZeroMQ sockets are not shared between threads),
        so a long step does not look like a dead worker. They stop once a rank has died: a
        step stuck on it must not look like a live worker."""
        sock = self._connect(f"{self.engine.worker_id}/heartbeat", linger_ms=0)
        while not done.wait(self.heartbeat_interval) and self.failure is None:
            sock.send(m.encode(m.Heartbeat(worker_id=self.engine.worker_id, sent_at=time.time())))
        sock.close()

    def handle(self, data: bytes) -> None:
        """Handle one incoming message; none of them ends the process."""
        try:
            msg = m.decode(data)
        except m.DecodeError as e:
            log.warning("undecodable message (%d bytes) ignored: %s", len(data), e)
            self._send(
                m.StepResult(step_id=-1, worker_id=self.engine.worker_id, error=f"undecodable message: {e}")
            )
            return
        if isinstance(msg, m.StepPlan):
            result = self.engine.execute(msg)
            if result.error:
                log.warning("step %d: %s", msg.step_id, result.error)
            self._send(result)
            return
        if isinstance(msg, m.Reregister):
            log.warning(
                "scheduler asks to register again (%s): dropping %d rows", msg.reason, len(self.engine.rows)
            )
            self.engine.rows.clear()
            self._send(self.info)  # register
            return
        log.warning("unexpected %s message ignored", type(msg).__name__)

    def _send(self, msg: m.Message) -> None:
        self.sock.send(m.encode(msg))
