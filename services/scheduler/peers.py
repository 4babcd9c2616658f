"""This scheduler among its peers, when several of distinct names share the request stream:
how many new requests its pool has room for (with live peers only), taking requests (owner
recorded unless an abort came first), forwarding aborts to their owners, and taking over a
dead peer's.
The atomic steps are shared/ownership.py's scripts; this module decides when to use them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

import redis

from services.scheduler.core import SchedulerCore
from shared.figure_records import STALE_AFTER_S
from shared.messages import AbortRequest
from shared.ownership import Ownership, Taken
from shared.redis_keys import RedisKeys
from shared.redis_protocol import read_scheduler_figures

log = logging.getLogger(__name__)

# Requests held per sequence slot of the pool. NOTE: more would refill a finishing request's
# slot without a Redis round trip, but would unbalance the pools: one that reads first could
# take twice its share of a burst, and its peer's workers would idle.
READ_AHEAD = 1


class Peers:
    def __init__(
        self, client: redis.Redis, keys: RedisKeys, name: str, max_num_seqs: int, stall_after_s: float
    ):
        self.name = name
        self.max_num_seqs = max_num_seqs
        self.stall_after_s = stall_after_s
        self.client = client
        self.keys = keys
        self.ownership = Ownership(client, keys)
        self.live_peers: set[str] = set()  # as of the last refresh_peers()

    def refresh_peers(self) -> None:
        """Who else serves: the schedulers whose figures are fresh."""
        now = time.time()
        self.live_peers = {
            name
            for name, f in read_scheduler_figures(self.client, self.keys).items()
            if name != self.name and now - f.updated_at <= STALE_AFTER_S
        }

    def room(self, core: SchedulerCore) -> int | None:
        """New requests to read now (None: no bound). Alone, everything, as a single
        scheduler always did: requests wait here, where their queue timeout runs and their
        tokens count towards the gateway's max_queue_tokens. With live peers, only the free
        sequence slots of the workers that serve, so that the rest of the stream waits in
        Redis for whichever pool has room; none without such a worker (none yet, or the last
        one died), or it would hold requests that a peer's workers could run."""
        if not self.live_peers:
            return None
        return max(0, READ_AHEAD * self.max_num_seqs * self._serving(core) - len(core.requests))

    def _serving(self, core: SchedulerCore) -> int:
        """Workers that serve: registered, and no step of theirs stalled."""
        now = time.monotonic()
        return sum(1 for w in core.workers.values() if not w.stalled(now, self.stall_after_s))

    def take(self, entries: Sequence[tuple[str, str]]) -> Taken:
        """Record us as the owner of these (request_id, entry_id); see Ownership.take."""
        taken = self.ownership.take(self.name, entries)
        for entry_id, peer in taken.elsewhere.items():
            log.warning(
                "entry %s was taken over by %s while our lease had lapsed: left to it", entry_id, peer
            )
        return taken

    def forward_abort(self, message: AbortRequest) -> None:
        """An abort read from the shared stream: to the owner's abort stream (ours too)."""
        self.ownership.abort(message)

    def take_over(self, liveness_key: Callable[[str], str], core: SchedulerCore) -> int:
        """Claim the pending entries of every peer whose liveness key expired: all when
        alone, else at most max(room, max_num_seqs) this interval, and none while no worker
        of ours serves. The rest wait for the next interval or another peer, so that one
        survivor does not get a whole backlog. Returns how many (the caller reads them as
        its own pending entries). NOTE: at least max_num_seqs, because the reader fills a
        freed slot with a new arrival at once while this runs once per interval: under load
        the room here is mostly 0, and the dead peer's requests would wait behind every arrival."""
        room = self.room(core)
        limit = None if room is None else max(room, self.max_num_seqs) if self._serving(core) else 0
        claimed = self.ownership.take_over(self.name, liveness_key, limit)
        for peer, n in claimed.items():
            log.warning(
                "scheduler %s is gone (its liveness key expired): took over %d of its requests", peer, n
            )
        return sum(claimed.values())

    def taken_from_us(self, held: Sequence[str]) -> int:
        """How many of the entries of requests we run are now pending under another
        consumer (a peer took them over while our lease had lapsed). One no longer pending
        at all (acknowledged, or lost with Redis's data) is nobody else's."""
        return len(self.ownership.pending_elsewhere(self.name, held))
