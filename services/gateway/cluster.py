"""Whether the system behind this gateway can serve: the scheduler's figures in Redis.

The scheduler rewrites its figures about every second (`updated_at`); figures older than
STALE_AFTER_S mean it is gone. Requests are refused with 503 while no scheduler is alive
or no worker is registered, since they would only wait. /health says the same.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Optional

import redis

from services.gateway.errors import ApiError
from services.scheduler.redis_queue import read_status
from shared.redis_keys import RedisKeys

STALE_AFTER_S = 5.0


def unavailable_reason(status: dict[str, Any], now: float) -> Optional[str]:
    """Why nothing can be served right now, or None when it can."""
    updated_at = status["stats"].get("updated_at")
    if not isinstance(updated_at, (int, float)):
        return "no scheduler has published its figures yet (is the scheduler running?)"
    age = now - updated_at
    if age > STALE_AFTER_S:
        return f"the scheduler's figures are {age:.1f} s old (more than {STALE_AFTER_S:g} s): is it running?"
    live = [w for w, info in status["workers"].items() if not info.get("leaving")]
    if not live:
        return "no worker is registered with the scheduler"
    return None


class ClusterStatus:
    """`read_status`, cached for `max_age_s` so a burst of requests reads Redis once."""

    def __init__(self, client: redis.Redis, keys: RedisKeys, max_age_s: float = 0.5):
        self.client = client
        self.keys = keys
        self.max_age_s = max_age_s
        self._status: Optional[dict] = None
        self._read_at = 0.0
        self._lock = asyncio.Lock()

    async def read(self, max_age_s: Optional[float] = None) -> dict[str, Any]:
        max_age = self.max_age_s if max_age_s is None else max_age_s
        async with self._lock:
            if self._status is None or time.monotonic() - self._read_at > max_age:
                try:
                    self._status = await asyncio.to_thread(read_status, self.client, self.keys)
                except redis.RedisError as e:
                    raise ApiError(503, f"Redis is unreachable: {e}", code="redis_unavailable") from e
                self._read_at = time.monotonic()
            return self._status

    async def require_ready(self) -> None:
        """Raise 503 naming the reason when requests cannot be served."""
        reason = unavailable_reason(await self.read(), time.time())
        if reason is not None:
            raise ApiError(503, f"no worker is available: {reason}", code="no_worker",
                           headers={"Retry-After": "1"})
