"""The gateway's graceful shutdown (vLLM's --shutdown-timeout). On SIGTERM (or Ctrl-C) it
keeps listening but takes no new work: /health and new requests get 503, so a balancer
moves on. Open requests have shutdown_timeout to finish; those still open then end with an
error event (503) and are aborted in the scheduler, and the server exits. A second signal
stops it at once, as uvicorn alone would.
"""

from __future__ import annotations

import asyncio
import logging
import time

import uvicorn

from services.gateway.app import Gateway
from services.gateway.engine_client import EngineClient

log = logging.getLogger(__name__)

CUT_GRACE_S = 2  # for the requests cut at the end to write their error and close
POLL_S = 0.05


class DrainingServer(uvicorn.Server):
    """uvicorn's server, with a drain between the first signal and its own shutdown."""

    def __init__(self, config: uvicorn.Config, gateway: Gateway, timeout_s: float):
        super().__init__(config)
        self.gateway = gateway
        self.timeout_s = timeout_s
        self._signalled = False
        self._drain: asyncio.Task | None = None

    def handle_exit(self, sig, frame) -> None:
        if self._signalled or not self.started:
            super().handle_exit(sig, frame)  # a second signal, or one before serving: stop now
        else:
            self.gateway.draining = True  # at once: /health says 503 from the next request on
            self._signalled = True  # on_tick starts the drain: a signal handler cannot await

    async def on_tick(self, counter: int) -> bool:
        if self._signalled and self._drain is None:
            self._drain = asyncio.create_task(drain(self.gateway, self.timeout_s), name="gateway-drain")
        if self._drain is not None and self._drain.done():
            if not self._drain.cancelled() and self._drain.exception() is not None:
                log.error("the drain failed; stopping now", exc_info=self._drain.exception())
            self.should_exit = True
        return await super().on_tick(counter)


async def drain(gateway: Gateway, timeout_s: float) -> None:
    """Refuse new work, wait up to timeout_s for the open requests, then cut the rest."""
    gateway.draining = True
    engine = gateway.engine
    log.info(
        "shutting down: new requests get 503; %d open requests have %g s to finish",
        engine.open_requests(),
        timeout_s,
    )
    if await _until_closed(engine, timeout_s):
        log.info("every open request finished")
        return
    n = await engine.cut_all(
        f"the server is shutting down: the request did not finish within the gateway's "
        f"shutdown timeout ({timeout_s:g} s); retry it"
    )
    log.warning("%d requests still open after %g s were ended with an error and aborted", n, timeout_s)
    await _until_closed(engine, CUT_GRACE_S)


async def _until_closed(engine: EngineClient, timeout_s: float) -> bool:
    """Whether every open request closed within timeout_s."""
    deadline = time.monotonic() + timeout_s
    while engine.open_requests() and time.monotonic() < deadline:
        await asyncio.sleep(POLL_S)
    return not engine.open_requests()
