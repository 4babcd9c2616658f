"""Whether the gateways that sent our requests are still there, by the liveness key each
refreshes in Redis. A key must stay missing for the whole timeout before its gateway counts
as gone, so a Redis restart or a slow refresh never aborts live clients.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import redis

from shared.redis_keys import RedisKeys


class GatewayLiveness:
    def __init__(self, client: redis.Redis, keys: RedisKeys, timeout_s: float):
        self.client = client
        self.keys = keys
        self.timeout_s = timeout_s
        self._seen: dict[str, float] = {}  # reply_to -> when its liveness key was last there

    def missing(self, gateways: Iterable[str]) -> list[str]:
        """Those of `gateways` (the ones with requests here) whose key has been missing for
        timeout_s, in one round trip; the others' are watched from now on."""
        gateways = list(gateways)
        if not gateways:
            self._seen.clear()
            return []
        pipe = self.client.pipeline(transaction=False)
        for reply_to in gateways:
            pipe.exists(self.keys.gateway(reply_to))
        now = time.monotonic()
        gone = []
        for reply_to, alive in zip(gateways, pipe.execute()):
            seen = self._seen.setdefault(reply_to, now)
            if alive:
                self._seen[reply_to] = now
            elif now - seen > self.timeout_s:
                gone.append(reply_to)
        for reply_to in set(self._seen) - set(gateways):
            del self._seen[reply_to]
        return gone

    def forget(self, reply_to: str) -> None:
        """It was declared gone: should it submit again, its key is watched afresh."""
        self._seen.pop(reply_to, None)
