"""Replays a workload against an OpenAI-compatible server over HTTP, streaming.

Each request is sent at its arrival offset (no concurrency limit: offline workloads send
everything at t=0) to `POST /v1/completions` with the prompt as token ids, `max_tokens`,
`ignore_eos`, greedy, and `stream_options.include_usage`; the time of every chunk that
carries output is recorded, and the output token count is taken from the final usage.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Optional

import httpx

from bench.metrics import RequestRecord, progress_bar
from bench.workloads import Request, Workload

POOL = httpx.Limits(max_connections=1000, max_keepalive_connections=1000)
# Queued requests of an offline run may wait minutes on a CPU before their first byte.
READ_TIMEOUT_S = 3600.0


def request_body(req: Request, model: Optional[str] = None) -> dict:
    body = {"prompt": req.prompt, "max_tokens": req.max_tokens, "ignore_eos": True, "temperature": 0.0,
            "stream": True, "stream_options": {"include_usage": True}}
    if model:
        body["model"] = model
    return body


async def send_one(client: httpx.AsyncClient, url: str, req: Request, index: int, t0: float,
                   model: Optional[str] = None) -> RequestRecord:
    """One streamed completion; failures are recorded in the record, never raised."""
    rec = RequestRecord(index, len(req.prompt), req.max_tokens, req.arrival, tag=req.tag)
    rec.start = time.perf_counter() - t0
    done = False
    try:
        async with client.stream("POST", url, json=request_body(req, model)) as resp:
            if resp.status_code != 200:
                body = (await resp.aread()).decode(errors="replace")
                rec.error = f"HTTP {resp.status_code}: {body[:300]}"
                return rec
            async for line in resp.aiter_lines():
                now = time.perf_counter() - t0
                if not line.startswith("data:"):
                    continue  # blank separators, SSE comments
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                _take_chunk(rec, json.loads(data), now)
                if rec.error:
                    return rec
    except (httpx.HTTPError, json.JSONDecodeError, OSError) as e:
        rec.error = f"{type(e).__name__}: {e}"[:300]
        return rec
    rec.end = time.perf_counter() - t0
    if not done:
        rec.error = "stream ended without data: [DONE]"
    elif rec.first_token is None:
        rec.error = "no output chunk before [DONE]"
    elif rec.output_tokens != req.max_tokens:
        # ignore_eos: anything but exactly max_tokens means the server cut the request short.
        rec.error = (f"finished early (finish_reason={rec.finish_reason}): "
                     f"{rec.output_tokens} of {req.max_tokens} tokens (usage)")
    return rec


def _take_chunk(rec: RequestRecord, chunk: dict, now: float) -> None:
    if "error" in chunk:
        rec.error = f"error chunk: {json.dumps(chunk['error'])[:300]}"
        return
    choices = chunk.get("choices") or []
    # NOTE: a chunk counts as output when it has text, or when it is not only the closing
    # finish_reason: the gateway may send "" for a token that ends mid-character.
    if choices and (choices[0].get("text") or choices[0].get("finish_reason") is None):
        if rec.first_token is None:
            rec.first_token = now
        rec.chunk_times.append(now)
    if choices and choices[0].get("finish_reason"):
        rec.finish_reason = choices[0]["finish_reason"]
    usage = chunk.get("usage")
    if usage:
        rec.output_tokens = int(usage.get("completion_tokens", 0))


async def replay(base_url: str, workload: Workload, model: Optional[str] = None, progress: bool = True,
                 desc: str = "", transport: Optional[httpx.AsyncBaseTransport] = None) -> list[RequestRecord]:
    """Sends every request at its arrival offset; returns one record per request, in order.
    `transport` replaces the network (tests)."""
    url = base_url.rstrip("/") + "/v1/completions"
    timeout = httpx.Timeout(30.0, read=READ_TIMEOUT_S)
    bar = progress_bar(len(workload), desc or workload.name) if progress else None
    errors = 0
    async with httpx.AsyncClient(limits=POOL, timeout=timeout, transport=transport) as client:
        t0 = time.perf_counter()

        async def at_arrival(i: int, req: Request) -> RequestRecord:
            delay = req.arrival - (time.perf_counter() - t0)
            if delay > 0:
                await asyncio.sleep(delay)
            nonlocal errors
            rec = await send_one(client, url, req, i, t0, model)
            errors += rec.error is not None
            if bar is not None:
                bar.update(1)
                if rec.error:
                    bar.set_postfix_str(f"{errors} failed, last: {rec.error[:60]}", refresh=False)
            return rec

        try:
            return list(await asyncio.gather(*(at_arrival(i, r) for i, r in enumerate(workload.requests))))
        finally:
            if bar is not None:
                bar.close()


def run_workload(base_url: str, workload: Workload, model: Optional[str] = None,
                 progress: bool = True, desc: str = "") -> list[RequestRecord]:
    return asyncio.run(replay(base_url, workload, model, progress, desc))
