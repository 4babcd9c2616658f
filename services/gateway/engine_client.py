"""The gateway's link to the scheduler: requests go into the Redis stream, outputs come
back over ZeroMQ, to the PULL socket named in each request's `reply_to` (one per gateway,
so several can run), as one `GatewayOutputs` per pass of the scheduler's loop that has
outputs for this gateway (the steps of any number of workers); a task routes each
`RequestOutput` to the queue of the HTTP request waiting for it.

While it runs, the gateway refreshes a liveness key in Redis (`RedisKeys.gateway`): the
scheduler aborts the requests of a gateway whose key stays missing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket

import redis
import zmq
import zmq.asyncio

from services.gateway.errors import RETRY_AFTER_S, ApiError, retry_after
from shared import messages as m
from shared.ownership import Ownership
from shared.redis_keys import RedisKeys
from shared.redis_protocol import queue_load, submit

log = logging.getLogger(__name__)

LIVENESS_REFRESH_S = 1.0
LIVENESS_TTL_S = 5  # missed refreshes this long and the key is gone


class EngineClient:
    def __init__(
        self,
        client: redis.Redis,
        keys: RedisKeys,
        output_bind: str,
        output_advertise: str | None,
        max_queue_len: int,
        max_queue_tokens: int = 1 << 20,
    ):
        self.client = client
        self.keys = keys
        self.max_queue_len = max_queue_len
        self.max_queue_tokens = max_queue_tokens
        self._ownership = Ownership(client, keys)  # aborts go to the scheduler that owns the request
        self._ctx = zmq.asyncio.Context()
        self._sock = self._ctx.socket(zmq.PULL)
        self._sock.setsockopt(zmq.LINGER, 0)
        # No bound: take all as it comes. What we cannot take waits in the scheduler's outbox,
        # which declares a gateway that takes nothing for gateway_timeout gone.
        self._sock.setsockopt(zmq.RCVHWM, 0)
        self._sock.bind(output_bind)  # zmq.ZMQError on a bad or busy address: a start-up error
        self.bound = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.reply_to = advertised_address(self.bound, output_advertise)
        self._routes: dict[str, asyncio.Queue] = {}
        self._admission = asyncio.Lock()
        self._tasks: list[asyncio.Task] = []
        self._background: set[asyncio.Task] = set()
        self._liveness_key = keys.gateway(self.reply_to)

    # ---- lifecycle ------------------------------------------------------------------------
    async def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._receive_loop(), name="gateway-outputs"),
            asyncio.create_task(self._liveness_loop(), name="gateway-liveness"),
        ]
        log.info("receiving outputs on %s (advertised as %s)", self.bound, self.reply_to)

    async def stop(self) -> None:
        """Abort what is still running (the server is going away), then close."""
        if self._routes:
            await self._abort(list(self._routes), "gateway shutting down")
        if self._background:
            await asyncio.wait(self._background, timeout=2)
        for task in self._tasks:
            task.cancel()
        with contextlib.suppress(redis.RedisError):  # it expires by itself
            await asyncio.to_thread(self.client.delete, self._liveness_key)
        self._sock.close()
        self._ctx.term()

    # ---- requests -------------------------------------------------------------------------
    def register(self, request_ids: list[str], queue: asyncio.Queue) -> None:
        for rid in request_ids:
            self._routes[rid] = queue

    def unregister(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            self._routes.pop(rid, None)

    def open_requests(self) -> int:
        """Scheduler requests an HTTP request still waits on (registered, not yet unregistered)."""
        return len(self._routes)

    async def cut_all(self, error: str) -> int:
        """End every open request as the scheduler ends one it aborts for a gone gateway: each
        gets a final GATEWAY_GONE output (a stream's error event, a 503), and the scheduler
        is told to abort it. Returns how many were open."""
        routes = dict(self._routes)
        for rid, queue in routes.items():
            queue.put_nowait(
                m.RequestOutput(
                    rid, finish_reason=m.FinishReason.ERROR, error_code=m.ErrorCode.GATEWAY_GONE, error=error
                )
            )
        if routes:
            await self._abort(list(routes), "gateway shutting down")
        return len(routes)

    async def submit(self, requests: list[m.SubmitRequest]) -> None:
        """Admit and enqueue one HTTP request's scheduler requests, or raise 429 when the queue
        (XLEN: queued + running, across every gateway) is full or its prompt tokens waiting
        to be scheduled would pass max_queue_tokens. NOTE: the check and the XADDs
        happen under one lock, so a burst here cannot overshoot; replicas may by a few."""
        async with self._admission:
            await self._redis(self._admit, requests)

    def _admit(self, requests: list[m.SubmitRequest]) -> None:
        queued, waiting = queue_load(self.client, self.keys)
        if queued >= self.max_queue_len:
            raise ApiError(
                429,
                f"the server is at capacity: {queued} requests are queued or running "
                f"(max_queue_len {self.max_queue_len}); retry after {RETRY_AFTER_S} s",
                code="queue_full",
                headers=retry_after(),
            )
        adding = sum(len(r.prompt_token_ids) for r in requests)
        if waiting + adding > self.max_queue_tokens:
            raise ApiError(
                429,
                f"the server is at capacity: {waiting} prompt tokens wait to be scheduled and this "
                f"request adds {adding} (max_queue_tokens {self.max_queue_tokens}); "
                f"retry after {RETRY_AFTER_S} s",
                code="queue_full",
                headers=retry_after(),
            )
        for req in requests:
            submit(self.client, req, self.keys)

    def abort_soon(self, request_ids: list[str], reason: str) -> None:
        """Abort without waiting: called where the caller may be cancelled (a client gone).
        Outputs still arrive until the caller unregisters the ids."""
        task = asyncio.get_running_loop().create_task(self._abort(request_ids, reason))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _abort(self, request_ids: list[str], reason: str) -> None:
        try:
            await self._redis(
                lambda: [self._ownership.abort(m.AbortRequest(rid, reason)) for rid in request_ids]
            )
        except ApiError as e:
            log.error("could not abort %s: %s", request_ids, e.message)

    async def _redis(self, fn, *args):
        """Runs blocking Redis calls off the event loop; Redis down -> 503."""
        try:
            return await asyncio.to_thread(fn, *args)
        except redis.RedisError as e:
            raise ApiError(
                503, f"the request queue (Redis) is unreachable: {e}", code="redis_unavailable"
            ) from e

    # ---- liveness -------------------------------------------------------------------------
    async def _liveness_loop(self) -> None:
        value = f"{socket.gethostname()}:{os.getpid()}"
        failing = False
        while True:
            try:
                await asyncio.to_thread(self.client.set, self._liveness_key, value, ex=LIVENESS_TTL_S)
                if failing:
                    log.info("Redis reachable again: liveness key refreshed")
                failing = False
            except redis.RedisError as e:
                if not failing:
                    log.error(
                        "cannot refresh the liveness key %s (Redis: %s); retrying", self._liveness_key, e
                    )
                failing = True
            await asyncio.sleep(LIVENESS_REFRESH_S)

    # ---- outputs --------------------------------------------------------------------------
    async def _receive_loop(self) -> None:
        while True:
            data = await self._sock.recv()
            try:
                msg = m.decode(data)
            except m.DecodeError as e:
                log.warning("ignored an undecodable message on the output socket: %s", e)
                continue
            if not isinstance(msg, m.GatewayOutputs):
                log.warning("ignored a %s on the output socket", type(msg).__name__)
                continue
            for out in msg.outputs:
                queue = self._routes.get(out.request_id)
                if queue is not None:  # else: aborted, or finished here already (stop string)
                    queue.put_nowait(out)


def advertised_address(bound: str, advertise: str | None) -> str:
    """What the scheduler connects to: `advertise` with {hostname} and {port} filled in
    (the port this socket got, useful with a "*" port), or the bound endpoint itself."""
    if not advertise:
        return bound
    port = bound.rsplit(":", 1)[-1]
    try:
        return advertise.format(hostname=socket.gethostname(), port=port)
    except (KeyError, IndexError, ValueError) as e:
        raise ValueError(
            f"output_advertise {advertise!r}: only {{hostname}} and {{port}} can be "
            f"filled in ({type(e).__name__}: {e})"
        ) from None
