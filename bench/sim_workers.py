"""Model-free workers simulated in one thread, speaking the real worker protocol to real
scheduler processes: each registers, heartbeats, and answers every StepPlan with a StepResult
after a step time drawn from STEP_MS. bench.scheduler_ceiling and bench.one_queue drive them.
"""

from __future__ import annotations

import heapq
import os
import random
import time
from dataclasses import dataclass, field

import zmq

from shared import messages as m

STEP_MS = (15.0, 40.0)  # a 0.5B-8B model's decode step on one GPU
BLOCK_SIZE = 16
HEARTBEAT_S = 1.0


@dataclass
class SimWorker:
    """One worker's rows (request_id -> [tokens, computed, last token index]) and timings."""

    worker_id: str
    sock: zmq.Socket
    rng: random.Random
    rows: dict[str, list[int]] = field(default_factory=dict)
    result_sent_at: float | None = None  # when the last result left, if rows were left unfinished
    steps: int = 0
    busy_s: float = 0.0
    gaps: list[float] = field(default_factory=list)
    batch_sizes: list[int] = field(default_factory=list)

    def apply(self, plan: m.StepPlan) -> m.StepResult:
        """Track rows as the engine does (so the plan must be consistent) and sample a token
        wherever the real engine would."""
        for rid in plan.finished_ids:
            self.rows.pop(rid, None)
        for new in plan.new_requests:
            total = new.num_prompt_tokens + new.sampling.max_tokens
            self.rows[new.request_id] = [len(new.token_ids), new.num_computed_tokens, total]
        sampled = {}
        for rid, n in plan.num_scheduled_tokens.items():
            row = self.rows[rid]
            assert row[1] + n <= row[0], f"{rid}: scheduled beyond its tokens"
            row[1] += n
            if row[1] == row[0]:
                sampled[rid] = 10 + (row[0] % 1000)  # never an EOS id (0)
                row[0] += 1
        return m.StepResult(plan.step_id, self.worker_id, sampled_token_ids=sampled)

    def unfinished(self) -> bool:
        return any(row[0] < row[2] for row in self.rows.values())


class Simulator:
    """All simulated workers in one thread: a poller over their sockets and a heap of
    results due. `lag` records how late this process sent results (its own share of the
    delay, on a shared machine)."""

    def __init__(self, addresses: list[str], n: int, num_blocks: int, seed: int = 0):
        ctx = zmq.Context.instance()
        self.workers = []
        self.poller = zmq.Poller()
        for i in range(n):
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.IDENTITY, f"sim-{i}".encode())
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(addresses[i % len(addresses)])
            w = SimWorker(f"sim-{i}", sock, random.Random(seed * 100_003 + i))
            self.workers.append(w)
            self.poller.register(sock, zmq.POLLIN)
            sock.send(
                m.encode(
                    m.RegisterWorker(
                        w.worker_id, "sim", 1 << 20, BLOCK_SIZE, num_blocks, 1000, [0], "sim", os.getpid()
                    )
                )
            )
        self.by_sock = {w.sock: w for w in self.workers}
        self.due: list[tuple[float, int, bytes]] = []  # (when, worker index, encoded result)
        self.lag: list[float] = []
        self._heartbeat_at = time.monotonic() + HEARTBEAT_S

    def reset_figures(self) -> None:
        for w in self.workers:
            w.steps, w.busy_s, w.gaps, w.batch_sizes = 0, 0.0, [], []
        self.lag = []

    def run_until(self, deadline: float, done=lambda: False) -> None:
        while (now := time.monotonic()) < deadline and not done():
            wait = min(deadline, self._heartbeat_at, self.due[0][0] if self.due else deadline) - now
            for sock, _ in self.poller.poll(max(0.0, wait) * 1000):
                self._receive(self.by_sock[sock])
            self._send_due()
            if time.monotonic() >= self._heartbeat_at:
                for w in self.workers:
                    w.sock.send(m.encode(m.Heartbeat(w.worker_id, time.time())))
                self._heartbeat_at += HEARTBEAT_S

    def _receive(self, w: SimWorker) -> None:
        while True:
            try:
                msg = m.decode(w.sock.recv(zmq.NOBLOCK))
            except zmq.Again:
                return
            if not isinstance(msg, m.StepPlan):
                raise RuntimeError(f"{w.worker_id}: unexpected {type(msg).__name__} from the scheduler")
            now = time.monotonic()
            if w.result_sent_at is not None:
                w.gaps.append(now - w.result_sent_at)
            result = w.apply(msg)
            step_s = w.rng.uniform(*STEP_MS) / 1000
            w.steps += 1
            w.busy_s += step_s
            w.batch_sizes.append(len(msg.num_scheduled_tokens))
            heapq.heappush(self.due, (now + step_s, int(w.worker_id[4:]), m.encode(result)))

    def _send_due(self) -> None:
        now = time.monotonic()
        while self.due and self.due[0][0] <= now:
            when, index, data = heapq.heappop(self.due)
            w = self.workers[index]
            w.sock.send(data)
            sent = time.monotonic()
            self.lag.append(sent - when)
            w.result_sent_at = sent if w.unfinished() else None

    def close(self) -> None:
        for w in self.workers:
            w.sock.close()
