"""The scheduler's Redis writes while Redis may be down: an action is skipped while Redis is
known to be down and retried with backoff, so the loop never stalls on it. Serving goes on
meanwhile for the requests already here (tokens flow over ZeroMQ).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import redis

log = logging.getLogger(__name__)

FIRST_RETRY_S = 0.1
RETRY_MAX_S = 5.0  # while Redis is down, try it again at most this often


class RedisBackoff:
    def __init__(self) -> None:
        self._retry_at = 0.0  # while Redis is down: when to try it again
        self._backoff = FIRST_RETRY_S

    def run(self, action: Callable[[], object]) -> None:
        """Run a Redis action unless Redis is known to be down; a RedisError it raises
        marks Redis down and puts the next try off."""
        now = time.monotonic()
        if now < self._retry_at:
            return
        try:
            action()
        except redis.RedisError as e:
            if self._backoff == FIRST_RETRY_S:
                log.error("Redis unreachable (%s): serving what is here, retrying with backoff", e)
            self._retry_at = now + self._backoff
            self._backoff = min(self._backoff * 2, RETRY_MAX_S)
            return
        if self._backoff != FIRST_RETRY_S:
            log.info("Redis reachable again")
            self._backoff = FIRST_RETRY_S

    def retry_now(self) -> None:
        """The next action runs whatever the backoff (a last try at a stop)."""
        self._retry_at = 0.0
