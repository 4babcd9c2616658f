"""Serving one generation over HTTP: as SSE chunks, or as one JSON body. Either way a client
that goes away aborts its choices: Starlette cancels a stream on disconnect (and
`GenerationStream` closes the generation whatever happened), a plain request races its
generation against the connection's `http.disconnect`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from services.gateway.errors import scheduler_error
from services.gateway.generation import ChoiceText, Generation
from services.gateway.responses import DONE, ChatFormat, CompletionFormat, sse
from services.gateway.served_model import ServedModel
from shared.messages import FinishReason

log = logging.getLogger(__name__)

CLIENT_CLOSED = 499  # nginx's code: the client went away before the answer


class GenerationStream(StreamingResponse):
    """An SSE response that always closes its generation (aborting what still runs)."""

    def __init__(self, gen: Generation, fmt: CompletionFormat):
        super().__init__(
            _sse_events(gen, fmt),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self.gen = gen

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.gen.close()


async def _sse_events(gen: Generation, fmt: CompletionFormat) -> AsyncIterator[bytes]:
    try:
        for chunk in fmt.opening_chunks():
            yield sse(chunk)
        async for delta in gen.deltas():
            if delta.finish_reason is FinishReason.ERROR:
                yield sse(scheduler_error(delta.error_code, delta.error).body())
                return
            yield sse(fmt.chunk(delta))
        if gen.plan.include_usage:
            await gen.settle()
            yield sse(fmt.usage_chunk())
        yield DONE
    finally:
        gen.close()


async def respond(gen: Generation, request: Request, fmt: CompletionFormat) -> Response | StreamingResponse:
    if gen.plan.stream:
        return GenerationStream(gen, fmt)
    try:
        results = await _collect_unless_disconnected(gen, request)
    finally:
        gen.close()
    if results is None:
        return Response(status_code=CLIENT_CLOSED)
    for r in results:
        if r.finish_reason is FinishReason.ERROR:
            raise scheduler_error(r.error_code, r.error)
    return JSONResponse(fmt.response(results))


async def _collect(gen: Generation) -> list[ChoiceText]:
    results = [ChoiceText(c.index) for c in gen.choices]
    async for delta in gen.deltas():
        results[delta.index].add(delta)
    await gen.settle()
    return results


async def _collect_unless_disconnected(gen: Generation, request: Request) -> list[ChoiceText] | None:
    """The results, or None when the client disconnected first."""
    collect = asyncio.ensure_future(_collect(gen))
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({collect, gone}, return_when=asyncio.FIRST_COMPLETED)
        if collect.done():
            return collect.result()
        log.info("client of %s disconnected; aborting", gen.plan.request_id)
        return None
    finally:
        for task in (collect, gone):
            task.cancel()


async def _disconnected(request: Request) -> None:
    # NOTE: the body was read already, so the next ASGI message is `http.disconnect`, sent
    # when the connection drops (or once our response is complete).
    while (await request.receive())["type"] != "http.disconnect":
        pass


def formatter(kind: str, model: ServedModel, gen: Generation) -> CompletionFormat:
    return (ChatFormat if kind == "chat" else CompletionFormat)(model, gen)
