"""Every Redis key Conveyor uses, in one place (the README lists them for operators).

All keys share a prefix (CONVEYOR_REDIS_PREFIX, default "conveyor") so several
deployments, or tests, can share one Redis server.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RedisKeys:
    prefix: str = "conveyor"

    @property
    def requests(self) -> str:
        """Stream of SubmitRequest / AbortRequest entries (field "msg", msgpack)."""
        return f"{self.prefix}:requests"

    @property
    def group(self) -> str:
        """Consumer group of the request stream; an entry is XACKed when its request ends."""
        return "schedulers"

    def request(self, request_id: str) -> str:
        """Hash: status (queued, running, finished, error), worker, token counts, finish_reason;
        `owner` (the scheduler that took it) and `abort` (the reason, once aborted)."""
        return f"{self.prefix}:request:{request_id}"

    @property
    def workers(self) -> str:
        """Hash: worker_id -> JSON with capacity, KV usage, running/waiting, throughput."""
        return f"{self.prefix}:workers"

    @property
    def schedulers(self) -> str:
        """Hash: scheduler name -> JSON of its figures (SchedulerFigures), each refreshed
        about every second by its scheduler."""
        return f"{self.prefix}:schedulers"

    @property
    def errors(self) -> str:
        """List of recent errors (JSON), newest first, capped."""
        return f"{self.prefix}:errors"

    @property
    def startup_failures(self) -> str:
        """Hash: worker_id -> JSON (StartupFailure) of why it could not start, which the
        gateway's 503 and `conveyor status` show; the hash expires when no worker has
        failed for STARTUP_FAILURE_TTL_S."""
        return f"{self.prefix}:startup_failures"

    def gateway(self, reply_to: str) -> str:
        """A gateway's liveness: set with a short expiry and refreshed while it runs. The
        scheduler aborts the requests of a gateway whose key stays missing."""
        return f"{self.prefix}:gateway:{reply_to}"

    def scheduler(self, name: str) -> str:
        """The named scheduler's lease and liveness (SET NX with expiry, renewed while it
        serves): a second scheduler of that name stands by, and peers take over the
        pending requests of a name whose key expired."""
        return f"{self.prefix}:scheduler:{name}"

    def aborts(self, name: str) -> str:
        """Stream of AbortRequest entries for the requests the named scheduler owns (read
        through the group, like the request stream); the owner is `request(id)`'s `owner`."""
        return f"{self.prefix}:scheduler:{name}:aborts"
