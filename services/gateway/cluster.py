"""What the system behind this gateway can serve, from the scheduler's figures in Redis:
a 503 while `shared.figure_records.health` says nothing can (requests would only wait), and the
limits requests are validated against, the workers' (the model directory's before any).
"""

from __future__ import annotations

import asyncio
import time

import redis

from services.gateway.errors import ApiError, retry_after
from services.gateway.served_model import ContextLimits
from shared.figure_records import SystemStatus, health, serving_workers
from shared.redis_keys import RedisKeys
from shared.redis_protocol import read_status


def worker_limits(status: SystemStatus, now: float, fallback: ContextLimits) -> ContextLimits:
    """The limits of the workers that serve (of any registered one, if none serves right
    now), never beyond `fallback` (the model's own, or the gateway's --max-model-len)."""
    workers = serving_workers(status, now) or status.workers
    if not workers:
        return fallback
    longest = max(w.max_len for w in workers.values())
    vocab = min(w.registered.vocab_size for w in workers.values())
    return ContextLimits(min(longest, fallback.max_model_len), min(vocab, fallback.vocab_size))


class ClusterStatus:
    """`read_status`, cached for `max_age_s` so a burst of requests reads Redis once."""

    def __init__(self, client: redis.Redis, keys: RedisKeys, fallback: ContextLimits, max_age_s: float = 0.5):
        self.client = client
        self.keys = keys
        self.fallback = fallback
        self.max_age_s = max_age_s
        self._status: SystemStatus | None = None
        self._read_at = 0.0
        self._lock = asyncio.Lock()

    async def read(self, max_age_s: float | None = None) -> SystemStatus:
        max_age = self.max_age_s if max_age_s is None else max_age_s
        async with self._lock:
            if self._status is None or time.monotonic() - self._read_at > max_age:
                try:
                    self._status = await asyncio.to_thread(read_status, self.client, self.keys)
                except redis.RedisError as e:
                    raise ApiError(503, f"Redis is unreachable: {e}", code="redis_unavailable") from e
                self._read_at = time.monotonic()
            return self._status

    async def limits(self) -> ContextLimits:
        """What requests are validated against. With Redis unreachable, the fallback: the
        request is then refused by `require_ready`, not by a guess about its length."""
        try:
            status = await self.read()
        except ApiError:
            return self.fallback
        return worker_limits(status, time.time(), self.fallback)

    async def require_ready(self) -> None:
        """Raise 503 naming the reason when requests cannot be served."""
        reason = health(await self.read(), time.time())
        if reason is not None:
            raise ApiError(503, f"no worker is available: {reason}", code="no_worker", headers=retry_after())
