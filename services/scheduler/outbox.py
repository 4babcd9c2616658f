"""Outputs on their way to the gateways: one PUSH socket and one queue per gateway.

A gateway that does not read fills its socket; what it has not taken then waits here, in
order, and goes out as soon as it reads again (the loop's poller wakes for that), while
every other gateway is served as before. A gateway whose oldest waiting message is older
than the deadline cannot keep up: `stuck()` names it and the service declares it gone.

Each message carries the queue entries of the requests it finishes. They are acknowledged
only once it is handed to ZeroMQ (`take_delivered`), so a final output still waiting here
when the scheduler stops is not lost: its request stays in the Redis queue and runs again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import zmq

from shared import messages as m

log = logging.getLogger(__name__)

# Messages ZeroMQ holds for one gateway beyond the kernel's buffers; the rest waits here,
# where its age is known.
SNDHWM = 1000


@dataclass
class _Message:
    data: bytes
    entry_ids: list[str]  # of the requests it finishes: acknowledged once it is sent
    queued_at: float  # monotonic


@dataclass
class _Link:
    sock: zmq.Socket[bytes]
    waiting: deque[_Message] = field(default_factory=deque)
    watched: bool = False  # registered for POLLOUT: the loop wakes when it can take more


@dataclass
class Undelivered:
    """What a gateway declared gone leaves behind: its messages, and the queue entries of
    the finished requests whose final outputs were among them."""

    messages: int = 0
    entry_ids: list[str] = field(default_factory=list)


class Outbox:
    def __init__(self, poller: zmq.Poller, stuck_after_s: float, sndhwm: int = SNDHWM):
        # NOTE: a context of its own, so that stopping can wait (boundedly) for ZeroMQ to
        # deliver what it holds without waiting on the worker socket's context.
        self._ctx = zmq.Context()
        self._poller = poller
        self.stuck_after_s = stuck_after_s
        self._sndhwm = sndhwm
        self._links: dict[str, _Link] = {}
        self._delivered: list[str] = []
        self._held: set[str] = set()  # entry ids of messages still waiting here

    def send(self, reply_to: str, outputs: list[m.RequestOutput], entry_ids: list[str], now: float) -> None:
        """Queue one message to `reply_to` behind what waits for it, and send what it takes."""
        link = self._links.get(reply_to) or self._connect(reply_to)
        link.waiting.append(_Message(m.encode(m.GatewayOutputs(outputs)), entry_ids, now))
        self._held.update(entry_ids)
        self._push(link)

    def flush(self) -> None:
        """Send what waits, as far as each gateway takes it; never blocks."""
        for link in self._links.values():
            if link.waiting:
                self._push(link)

    def stuck(self, now: float) -> list[str]:
        """Gateways whose oldest waiting message is older than the deadline."""
        return [
            reply_to
            for reply_to, link in self._links.items()
            if link.waiting and now - link.waiting[0].queued_at > self.stuck_after_s
        ]

    def drop(self, reply_to: str) -> Undelivered:
        """Forget a gateway (it is gone): close its socket, discard what waits for it."""
        link = self._links.pop(reply_to, None)
        if link is None:
            return Undelivered()
        self._watch(link, False)
        link.sock.close(linger=0)
        entry_ids = [e for msg in link.waiting for e in msg.entry_ids]
        self._held.difference_update(entry_ids)
        return Undelivered(len(link.waiting), entry_ids)

    def take_delivered(self) -> list[str]:
        """Entry ids whose final outputs were handed to ZeroMQ since the last call."""
        delivered, self._delivered = self._delivered, []
        return delivered

    def holds(self, entry_id: str) -> bool:
        """Whether the final output of this entry's request waits here (finished, not acked)."""
        return entry_id in self._held

    def waiting(self, reply_to: str | None = None) -> int:
        """Messages waiting here, for `reply_to` or for every gateway."""
        links = (
            self._links.values()
            if reply_to is None
            else [self._links[reply_to]]
            if reply_to in self._links
            else []
        )
        return sum(len(link.waiting) for link in links)

    def drain(self, timeout_s: float) -> bool:
        """At a stop: send what waits for up to timeout_s; True once nothing waits."""
        deadline = time.monotonic() + timeout_s
        self.flush()
        while self.waiting() and time.monotonic() < deadline:
            poller = zmq.Poller()
            for link in self._links.values():
                if link.waiting:
                    poller.register(link.sock, zmq.POLLOUT)
            poller.poll(max(1, round(1000 * (deadline - time.monotonic()))))
            self.flush()
        return not self.waiting()

    def close(self, linger_s: float) -> None:
        """Close every socket, giving ZeroMQ up to linger_s to deliver what it holds."""
        for link in self._links.values():
            self._watch(link, False)
            link.sock.close(linger=round(1000 * linger_s))
        self._links.clear()
        # term() returns once the lingering sockets are done; in a thread, so that a
        # gateway that never reads holds the stop up for linger_s at most.
        closer = threading.Thread(target=self._ctx.term, name="outbox-close", daemon=True)
        closer.start()
        closer.join(linger_s + 0.5)

    # ---- internals ------------------------------------------------------------------------
    def _connect(self, reply_to: str) -> _Link:
        sock = self._ctx.socket(zmq.PUSH)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, self._sndhwm)
        try:
            sock.connect(reply_to)
        except zmq.ZMQError as e:  # its messages wait, and it is declared gone past the deadline
            log.warning("cannot reach gateway %r: %s", reply_to, e)
        link = self._links[reply_to] = _Link(sock)
        return link

    def _push(self, link: _Link) -> None:
        while link.waiting:
            msg = link.waiting[0]
            try:
                link.sock.send(msg.data, zmq.NOBLOCK)
            except zmq.Again:  # full: the rest waits for POLLOUT
                break
            link.waiting.popleft()
            self._delivered.extend(msg.entry_ids)
            self._held.difference_update(msg.entry_ids)
        self._watch(link, bool(link.waiting))

    def _watch(self, link: _Link, on: bool) -> None:
        if on and not link.watched:
            self._poller.register(link.sock, zmq.POLLOUT)
        elif link.watched and not on:
            self._poller.unregister(link.sock)
        link.watched = on
