"""The request stream read without polling: a thread waits in a blocking XREADGROUP and
hands each batch to the scheduler's loop, waking it through an inproc ZeroMQ socket. The
loop then sleeps on its sockets alone: no Redis round trip while idle, no 5 ms reads.
It reads new requests only while the loop says it has `room`, so that a full pool leaves
them to an idle peer; its own abort stream it reads always.
"""

from __future__ import annotations

import logging
import threading

import redis
import zmq

from shared.redis_keys import RedisKeys
from shared.redis_protocol import QueueEntry, RequestQueue

log = logging.getLogger(__name__)

BLOCK_MS = 500  # one XREADGROUP waits this long: bounds how long stop() takes
BATCH = 1024
NO_ROOM_BLOCK_MS = 50  # while there is no room, read aborts only, this long: room is seen again soon
RETRY_MAX_S = 5.0


def blocking_client(client: redis.Redis, block_ms: int) -> redis.Redis:
    """A client of the same server with its own connections, whose socket timeout outlasts
    a blocking read (the scheduler's own client times out in 2 s, so that the loop never stalls)."""
    pool = client.connection_pool
    kwargs = {**pool.connection_kwargs, "socket_timeout": block_ms / 1000 + 2.0}
    return redis.Redis(connection_pool=type(pool)(connection_class=pool.connection_class, **kwargs))


class QueueReader:
    """`wake` turns readable when a batch is ready; `take()` returns it. One batch at a
    time: the thread reads the next only once the loop took the last, so a pass is handed
    at most one batch. Alone (no room bound) a scheduler still reads a flood whole, batch
    by batch; with live peers, what exceeds its room waits in Redis (peers.room)."""

    def __init__(
        self,
        client: redis.Redis,
        keys: RedisKeys,
        ctx: zmq.Context[zmq.Socket[bytes]],
        block_ms: int = BLOCK_MS,
        consumer: str = "scheduler",
        aborts: str | None = None,
    ):
        self._client = blocking_client(client, block_ms)
        self._queue = RequestQueue(self._client, keys, consumer, aborts)
        self.room: int | None = None  # new requests the loop can take (None: no bound); see set_room
        self._took = False  # the loop took a batch and has not said its room since
        self._block_ms = block_ms
        self._ctx = ctx
        self._address = f"inproc://conveyor-queue-reader-{id(self)}"
        self.wake = ctx.socket(zmq.PAIR)
        self.wake.bind(self._address)
        self._batch: list[QueueEntry] = []
        self._lock = threading.Lock()
        self._taken = threading.Event()
        self._taken.set()
        self._stop = threading.Event()
        self._replay = threading.Event()
        self._thread = threading.Thread(target=self._run, name="queue-reader", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def take(self) -> list[QueueEntry]:
        """The batch read (empty when none); the thread may read the next one."""
        while True:
            try:
                self.wake.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
        with self._lock:
            batch, self._batch = self._batch, []
        if self.room is None:
            self._taken.set()
        else:
            self._took = (
                True  # NOTE: the next read waits for set_room: a room from before this batch would overshoot
            )
        return batch

    def set_room(self, room: int | None) -> None:
        """The loop's room once it has placed what it took: the next read may go ahead."""
        self.room = room
        if self._took:
            self._took = False
            self._taken.set()

    def replay_pending(self) -> None:
        """Read our pending entries again (entries were claimed from a dead peer); the
        thread does it before its next read, so a read in progress cannot undo it."""
        self._replay.set()

    def stop(self) -> None:
        self._stop.set()
        self._taken.set()
        self._thread.join(self._block_ms / 1000 + 5.0)
        self.wake.close()
        self._client.close()

    def _run(self) -> None:
        signal = self._ctx.socket(zmq.PAIR)
        signal.setsockopt(zmq.LINGER, 0)
        signal.connect(self._address)
        try:
            self._read_until_stopped(signal)
        finally:
            signal.close()

    def _read_batch(self) -> list[QueueEntry]:
        if self._replay.is_set():
            self._replay.clear()
            self._queue.replay_pending()
        room = self.room
        if room is None or room > 0:
            return self._queue.read(count=min(BATCH, room or BATCH), block_ms=self._block_ms)
        entries = self._queue.read(count=BATCH, block_ms=NO_ROOM_BLOCK_MS, new_requests=False)
        if self._queue.aborts is None and not entries:
            self._stop.wait(NO_ROOM_BLOCK_MS / 1000)  # nothing to block on
        return entries

    def _read_until_stopped(self, signal: zmq.Socket[bytes]) -> None:
        backoff = 0.0
        while not self._stop.is_set():
            self._taken.wait()
            try:
                entries = self._read_batch()
            except redis.RedisError as e:
                if not backoff:
                    log.error("reading the request queue failed (%s): retrying with backoff", e)
                self._queue.replay_pending()  # a batch may have been lost in flight
                backoff = min(max(2 * backoff, 0.1), RETRY_MAX_S)
                self._stop.wait(backoff)
                continue
            if backoff:
                log.info("the request queue is readable again")
                backoff = 0.0
            if entries:
                with self._lock:
                    self._batch = entries
                    self._taken.clear()
                signal.send(b"", zmq.NOBLOCK)  # at most one in flight: one batch at a time
