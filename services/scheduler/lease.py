"""Exactly one scheduler of each name serves at a time: it holds its name's lease in Redis
(SET NX with an expiry) and renews it every second. A second scheduler of that name,
started by mistake, or a restarted one, stands by until the lease is free: two schedulers
never drive the same workers. The key is also the name's liveness: peers take over the
requests of a name whose key expired (shared/ownership.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import redis

log = logging.getLogger(__name__)

# Renew only if we still hold it: compare-and-expire in one atomic step.
_RENEW = (
    "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) "
    "else return 0 end"
)
_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end"


class LeaseLost(Exception):
    """Another scheduler holds the lease: this one must stop serving at once."""


class Lease:
    def __init__(self, client: redis.Redis, key: str, holder: str, ttl_s: float):
        self.client = client
        self.key = key
        self.holder = holder
        self.ttl_ms = int(ttl_s * 1000)
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)
        self.lapsed = False  # renew() had to take it again: peers may have taken our requests meanwhile

    def acquire(self) -> bool:
        return bool(self.client.set(self.key, self.holder, nx=True, px=self.ttl_ms))

    def stand_by(self, name: str, stopping: Callable[[], bool]) -> bool:
        """Take the lease of the scheduler `name`, waiting while another holds it; False if
        `stopping` says so first. A Redis outage is waited out like a holder."""
        announced = False
        while not stopping():
            try:
                if self.acquire():
                    return True
                holder = self.current_holder()
            except redis.RedisError as e:
                holder = f"unknown (Redis: {e})"
            if not announced:
                log.warning(
                    "another scheduler named %s (%s) holds the lease; standing by until it is free",
                    name,
                    holder,
                )
                announced = True
            time.sleep(1.0)
        return False

    def renew(self) -> bool:
        """True while we hold it. If it vanished (expired during a Redis outage, or a
        Redis restart lost it) we take it again when nobody else has."""
        if self._renew(keys=[self.key], args=[self.holder, self.ttl_ms]) == 1:
            return True
        self.lapsed = self.acquire()
        return self.lapsed

    def current_holder(self) -> str | None:
        value = self.client.get(self.key)
        return value.decode() if isinstance(value, bytes) else value

    def release(self) -> None:
        self._release(keys=[self.key], args=[self.holder])
