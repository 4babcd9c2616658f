"""Conveyor's protocol over Redis, for every process: gateways `submit` requests, the
scheduler reads them (`RequestQueue`) and publishes status and figures (`StatusWriter`),
anyone reads those back typed (`read_status`). Key names are in redis_keys.py.

The queue is a stream read through a consumer group. An entry stays pending until its
request ends (finished, aborted, failed), then `ack` removes it, so a scheduler that
restarts reads its unfinished work again and the stream only ever holds unfinished work.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec
import redis
from redis.typing import EncodableT, FieldT, KeyT, StreamIdT

from shared.figure_records import (
    STARTUP_FAILURE_TTL_S,
    ErrorRecord,
    SchedulerFigures,
    StartupFailure,
    SystemStatus,
    WorkerFigures,
    combined,
)
from shared.messages import AbortRequest, RequestStatus, SubmitRequest, decode, encode
from shared.redis_keys import RedisKeys

MSG_FIELD = b"msg"
FINISHED_PREFIX = "finished_"  # SchedulerFigures.finished, one hash field per reason
# Reading processes (gateways, `conveyor status`, bench) wait on Redis this long; the
# scheduler much less, so that an outage never stalls its loop.
TIMEOUTS_S, SCHEDULER_TIMEOUTS_S = (5.0, 3.0), (2.0, 1.0)  # (socket, connect)


def connect(url: str, scheduler: bool = False) -> redis.Redis:
    """A client for Conveyor's Redis (binary replies: entries are msgpack)."""
    timeout, connect_timeout = SCHEDULER_TIMEOUTS_S if scheduler else TIMEOUTS_S
    return redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=connect_timeout)


@dataclass
class QueueEntry:
    entry_id: str
    message: SubmitRequest | AbortRequest | None  # None when the entry could not be decoded
    error: str | None = None  # why it could not be decoded
    stream: str = field(default="", compare=False)  # the stream it was read from: where to ack it


def submit(
    client: redis.Redis,
    message: SubmitRequest | AbortRequest,
    keys: RedisKeys = RedisKeys(),
    maxlen: int | None = None,
) -> str:
    """XADD {msg: encode(message)}; returns the entry id. `maxlen` trims the stream
    approximately (XADD MAXLEN ~), dropping the oldest entries, pending or not."""
    if not isinstance(message, (SubmitRequest, AbortRequest)):
        raise TypeError(
            f"the request queue takes SubmitRequest or AbortRequest, not {type(message).__name__}"
        )
    entry_id = client.xadd(keys.requests, {MSG_FIELD: encode(message)}, maxlen=maxlen)
    return _str(entry_id)


class RequestQueue:
    """One consumer of the request stream's consumer group: `read` returns its pending
    entries (read by a previous run of the scheduler, never acknowledged), then new ones.
    With `aborts` (a scheduler's own abort stream, read through the same group) new reads
    take both streams in one blocking call."""

    def __init__(
        self,
        client: redis.Redis,
        keys: RedisKeys = RedisKeys(),
        consumer: str = "scheduler",
        aborts: str | None = None,
    ):
        if client.get_connection_kwargs().get("decode_responses"):
            raise ValueError(
                "RequestQueue needs a Redis client with decode_responses=False (entries are binary msgpack)"
            )
        self.client = client
        self.keys = keys
        self.consumer = consumer
        self.aborts = aborts
        self._group_ready = False
        # Where the replay of our pending entries has got to; None once it is done.
        # NOTE: XREADGROUP with an explicit id returns pending entries *after* that id, and
        # they stay pending until acked, so the cursor must advance or we'd replay forever.
        self._pending_cursor: str | None = "0"

    def ensure_group(self) -> None:
        """Create the group (and the stream) if missing, at id 0: earlier entries are read too."""
        for stream in (self.keys.requests, self.aborts):
            if stream is None:
                continue
            try:
                self.client.xgroup_create(stream, self.keys.group, id="0", mkstream=True)
            except redis.ResponseError as e:
                if "BUSYGROUP" not in str(e):
                    raise
        self._group_ready = True

    def read(
        self, count: int = 1024, block_ms: int | None = None, new_requests: bool = True
    ) -> list[QueueEntry]:
        """Up to `count` entries: our pending ones until none are left, then new ones
        (waiting up to `block_ms` for one when given); with `new_requests` False, new ones
        of the abort stream only. Undecodable entries come back with message=None and
        `error` set; the caller acks them like any other."""
        if not self._group_ready:
            self.ensure_group()
        if self._pending_cursor is not None:
            # Our pending aborts are not replayed: the request's abort flag, seen when a
            # replayed request is taken again, stands for them (shared/ownership.py).
            entries = self._xreadgroup({self.keys.requests: self._pending_cursor}, count, None)
            if entries:
                self._pending_cursor = entries[-1].entry_id
                return entries
            self._pending_cursor = None
        streams: dict[KeyT, StreamIdT] = {self.keys.requests: ">"} if new_requests else {}
        if self.aborts is not None:
            streams[self.aborts] = ">"
        return self._xreadgroup(streams, count, block_ms) if streams else []

    def replay_pending(self) -> None:
        """Read our pending entries again from the start, then new ones. After a lost
        connection: Redis may have delivered (and persisted as pending) entries whose reply
        never reached us, and ">" never returns those again. The caller skips the ones it holds."""
        self._pending_cursor = "0"

    def ack(self, entry_ids: Sequence[str], stream: str | None = None) -> None:
        """Acknowledge and delete: a finished request leaves the stream (`stream`: default
        the request stream)."""
        if not entry_ids:
            return
        stream = stream or self.keys.requests
        pipe = self.client.pipeline(transaction=True)
        pipe.xack(stream, self.keys.group, *entry_ids)
        pipe.xdel(stream, *entry_ids)
        pipe.execute()

    def pending_count(self) -> int:
        """Entries read by any consumer of the group but not yet acknowledged."""
        try:
            return _pending_from_reply(self.client.xpending(self.keys.requests, self.keys.group))
        except redis.ResponseError as e:
            return _pending_from_reply(e)

    def queue_length(self) -> int:
        return self.client.xlen(self.keys.requests)

    def _xreadgroup(
        self, streams: dict[KeyT, StreamIdT], count: int, block_ms: int | None
    ) -> list[QueueEntry]:
        try:
            # A Redis reply: RESP2 gives [[stream, entries]], RESP3 {stream: [entries]}, each entry
            # [id, {field: value}] (fields None once deleted); redis-py's annotation has no one shape.
            reply: Any = self.client.xreadgroup(
                self.keys.group, self.consumer, streams, count=count, block=block_ms
            )
        except redis.ResponseError as e:
            if "NOGROUP" not in str(e):
                raise
            # The stream was deleted under us (FLUSHDB, a Redis without persistence restarted).
            self.ensure_group()
            return []
        by_stream = reply.items() if isinstance(reply, dict) else reply or []
        return [
            _entry(entry_id, fields, _str(stream))
            for stream, entries in by_stream
            for entry_id, fields in entries
        ]


def _entry(entry_id: bytes | str, fields: dict[bytes, bytes] | None, stream: str = "") -> QueueEntry:
    entry = _decoded(_str(entry_id), fields)
    entry.stream = stream
    return entry


def _decoded(entry_id: str, fields: dict[bytes, bytes] | None) -> QueueEntry:
    if not fields:
        # A pending entry whose stream entry was deleted (XDEL, MAXLEN) comes back empty.
        return QueueEntry(entry_id, None, "entry has no fields (deleted from the stream?)")
    data = fields.get(MSG_FIELD)
    if data is None:
        return QueueEntry(
            entry_id, None, f"entry has no field 'msg' (fields: {sorted(_str(k) for k in fields)})"
        )
    try:
        message = decode(data)
    except ValueError as e:  # msgspec.DecodeError names the offending field
        return QueueEntry(entry_id, None, f"undecodable message: {e}")
    if not isinstance(message, (SubmitRequest, AbortRequest)):
        return QueueEntry(
            entry_id, None, f"unexpected message type {type(message).__name__} in the request queue"
        )
    return QueueEntry(entry_id, message)


class StatusWriter:
    """Collects one scheduler iteration's status and figure updates and writes them in ONE
    pipeline (`flush`): one round trip per iteration, never one per token. Updates of the
    same thing merge (the latest wins); those a flush could not deliver go with the next."""

    def __init__(
        self,
        client: redis.Redis,
        keys: RedisKeys = RedisKeys(),
        finished_ttl_s: int = 3600,
        scheduler_name: str = "scheduler",
    ):
        self.client = client
        self.keys = keys
        self.finished_ttl_s = finished_ttl_s
        self.scheduler_name = scheduler_name  # whose figures these are
        # Each request's fields, typed as redis-py's hset takes them (a Mapping's keys are invariant).
        self._requests: dict[str, dict[FieldT, EncodableT]] = {}
        self._expire: set[str] = set()
        self._workers: dict[str, bytes | None] = {}  # None: remove
        self._figures: bytes | None = None  # this scheduler's, when there are new ones
        self._errors: list[tuple[bytes, int]] = []

    def request_status(self, request_id: str, **fields: str | int | float) -> None:
        """HSET the request's hash; a final status (finished, error) also starts its TTL."""
        if not fields:
            raise ValueError(f"request_status({request_id!r}) needs at least one field")
        for name, value in fields.items():
            if isinstance(value, bool) or not isinstance(value, (str, int, float)):
                raise TypeError(
                    f"request status field {name!r} must be str, int or float, not {type(value).__name__}"
                )
        status = fields.get("status")
        if status is not None:
            fields["status"] = RequestStatus(status).value  # ValueError on a status nobody reads
        self._requests.setdefault(request_id, {}).update(fields.items())
        if status is not None and RequestStatus(status).is_final:
            self._expire.add(request_id)

    def worker(self, worker_id: str, figures: WorkerFigures) -> None:
        self._workers[worker_id] = msgspec.json.encode(figures)

    def remove_worker(self, worker_id: str) -> None:
        self._workers[worker_id] = None

    def figures(self, figures: SchedulerFigures) -> None:
        self._figures = msgspec.json.encode(figures)

    def error(self, record: ErrorRecord, keep: int = 100) -> None:
        """Record an error in the list of recent errors (newest first), capped at `keep`."""
        assert keep >= 1, keep
        self._errors.append((msgspec.json.encode(record), keep))
        del self._errors[:-keep]  # bounded while Redis is unreachable

    def flush(self) -> None:
        """Send everything collected in one pipeline; nothing when nothing was collected.
        On a connection error or timeout the updates are kept and the error re-raised
        (the caller retries)."""
        if not (self._requests or self._workers or self._figures is not None or self._errors):
            return
        pipe = self.client.pipeline(transaction=False)
        for request_id, fields in self._requests.items():
            key = self.keys.request(request_id)
            pipe.hset(key, mapping=fields)
            if request_id in self._expire:
                pipe.expire(key, self.finished_ttl_s)
        for worker_id, info in self._workers.items():
            if info is None:
                pipe.hdel(self.keys.workers, worker_id)
            else:
                pipe.hset(self.keys.workers, worker_id, info)
        if self._figures is not None:
            pipe.hset(self.keys.schedulers, self.scheduler_name, self._figures)
        for info, keep in self._errors:
            pipe.lpush(self.keys.errors, info)
            pipe.ltrim(self.keys.errors, 0, keep - 1)
        try:
            pipe.execute()
        except (redis.ConnectionError, redis.TimeoutError):
            raise  # keep the updates for the retry
        except redis.RedisError:
            self._clear()  # every command ran; one was wrong, and resending won't fix it
            raise
        self._clear()

    def _clear(self) -> None:
        for updates in (self._requests, self._expire, self._workers, self._errors):
            updates.clear()
        self._figures = None


def read_status(client: redis.Redis, keys: RedisKeys = RedisKeys()) -> SystemStatus:
    """What the scheduler last published, in one round trip. A record that does not
    decode raises `msgspec.ValidationError` (a ValueError) naming the field."""
    pipe = client.pipeline(transaction=False)
    pipe.hgetall(keys.schedulers)
    pipe.hgetall(keys.workers)
    pipe.lrange(keys.errors, 0, -1)
    pipe.xlen(keys.requests)
    pipe.xpending(keys.requests, keys.group)
    pipe.hgetall(keys.startup_failures)
    schedulers, workers, errors, queue_length, pending, failures = pipe.execute(raise_on_error=False)
    for reply in (schedulers, workers, errors, queue_length, failures):
        if isinstance(reply, Exception):
            raise reply
    schedulers = _scheduler_figures(schedulers)
    return SystemStatus(
        scheduler=combined(list(schedulers.values())),
        schedulers=schedulers,
        workers={_str(k): msgspec.json.decode(v, type=WorkerFigures) for k, v in workers.items()},
        errors=[msgspec.json.decode(e, type=ErrorRecord) for e in errors],
        queue_length=queue_length,
        pending=_pending_from_reply(pending),
        startup_failures={_str(k): msgspec.json.decode(v, type=StartupFailure) for k, v in failures.items()},
    )


def record_startup_failure(
    client: redis.Redis, keys: RedisKeys, worker_id: str, error: str, ttl_s: int = STARTUP_FAILURE_TTL_S
) -> None:
    """A worker that cannot start says why, for the gateway's 503 and `conveyor status`
    (compose restarts it, so the error would otherwise be only in its log)."""
    pipe = client.pipeline(transaction=True)
    pipe.hset(
        keys.startup_failures, worker_id, msgspec.json.encode(StartupFailure(error=error, time=time.time()))
    )
    pipe.expire(keys.startup_failures, ttl_s)
    pipe.execute()


def read_scheduler_figures(client: redis.Redis, keys: RedisKeys = RedisKeys()) -> dict[str, SchedulerFigures]:
    """Each scheduler's last figures, by name (those of stopped ones included)."""
    return _scheduler_figures(client.hgetall(keys.schedulers))


def figure_fields(figures: SchedulerFigures) -> dict[str, int | float]:
    """The scheduler's figures as flat fields (`finished_<reason>`), as the benchmarks tabulate them."""
    fields = msgspec.to_builtins(figures)
    finished = fields.pop("finished")
    return {**fields, **{FINISHED_PREFIX + reason: n for reason, n in finished.items()}}


def queue_load(client: redis.Redis, keys: RedisKeys = RedisKeys()) -> tuple[int, int]:
    """(requests queued or running, prompt tokens waiting to be scheduled: the live
    schedulers' figures, about a second old, 0 before any wrote them): what a gateway
    admits against."""
    pipe = client.pipeline(transaction=False)
    pipe.xlen(keys.requests)
    pipe.hgetall(keys.schedulers)
    queued, schedulers = pipe.execute()
    figures = combined(list(_scheduler_figures(schedulers).values()))
    return queued, figures.queued_tokens if figures else 0


def durability_problem(client: redis.Redis) -> str | None:
    """Why an accepted request could be lost in a Redis crash, read from the server's own
    settings (docs/durability.md); None when it is durable (appendonly yes, appendfsync
    always). A server that refuses CONFIG GET (many managed ones) is reported as unverified."""
    try:
        # A Redis reply: bytes here (decode_responses off), whatever redis-py's annotation says.
        reply: dict[Any, Any] = client.config_get("append*")
    except redis.ResponseError as e:
        return f"cannot verify the request queue's durability (CONFIG GET refused: {e})"
    config = {_str(k): _str(v) for k, v in reply.items()}
    if config.get("appendonly") != "yes":
        return "appendonly is off: a Redis crash or restart loses the request queue"
    if config.get("appendfsync") != "always":
        return (
            f"appendfsync is {config.get('appendfsync')!r}, not 'always': a Redis crash can lose "
            "the requests accepted in its last second"
        )
    return None


def _scheduler_figures(reply: Mapping[bytes | str, bytes | str]) -> dict[str, SchedulerFigures]:
    return {_str(name): msgspec.json.decode(v, type=SchedulerFigures) for name, v in reply.items()}


def _pending_from_reply(reply: Any) -> int:  # XPENDING's reply (a dict), or the error it raised
    if isinstance(reply, redis.ResponseError) and "NOGROUP" in str(reply):
        return 0  # no group yet: nothing was read
    if isinstance(reply, Exception):
        raise reply
    return int(reply["pending"])


def _str(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
