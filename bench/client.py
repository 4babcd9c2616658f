"""Replays a workload against an OpenAI-compatible server over HTTP, streaming.

Each request is sent at its arrival offset (offline workloads send everything at t=0), or
with a concurrency limit (the workload's max_concurrency) as soon as a slot is free, to
`POST /v1/completions` with the prompt as token ids, `max_tokens`, `ignore_eos`, greedy,
and `stream_options.include_usage`; a chat request (a user message, stopping at EOS) to
`POST /v1/chat/completions`, with its sampling settings. The time of every chunk that
carries output is recorded, and the token counts are taken from the final usage: a request
that stops at EOS produces as many tokens as it happens to.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time

import httpx

from bench.metrics import RequestRecord, progress_bar
from bench.workloads import Request, Workload

POOL = httpx.Limits(max_connections=1000, max_keepalive_connections=1000)
# Queued requests of an offline run may wait minutes on a CPU before their first byte.
READ_TIMEOUT_S = 3600.0


def endpoint(req: Request) -> str:
    return "/v1/chat/completions" if req.message else "/v1/completions"


def request_body(req: Request, model: str | None = None) -> dict:
    body: dict = (
        {"messages": [{"role": "user", "content": req.message}]} if req.message else {"prompt": req.prompt}
    )
    body.update(
        max_tokens=req.max_tokens,
        temperature=req.temperature,
        stream=True,
        stream_options={"include_usage": True},
    )
    if req.ignore_eos:
        body["ignore_eos"] = True
    if req.top_p != 1.0:
        body["top_p"] = req.top_p
    if req.seed is not None:
        body["seed"] = req.seed
    if model:
        body["model"] = model
    return body


async def send_one(
    client: httpx.AsyncClient, url: str, req: Request, index: int, t0: float, model: str | None = None
) -> RequestRecord:
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
    if done and rec.first_token is None and not req.ignore_eos and rec.finish_reason == "stop":
        # NOTE: the first token was EOS: no text, the closing chunk is its only sign.
        rec.first_token = rec.end
        rec.chunk_times.append(rec.end)
    if not done:
        rec.error = "stream ended without data: [DONE]"
    elif rec.first_token is None:
        rec.error = "no output chunk before [DONE]"
    else:
        rec.error = _short_error(req, rec)
    return rec


def _short_error(req: Request, rec: RequestRecord) -> str | None:
    """Why a finished stream does not count: with ignore_eos anything but exactly max_tokens
    means the server cut it short; without, it must end by EOS (stop) or at max_tokens (length)."""
    n, finish = rec.output_tokens, rec.finish_reason
    if req.ignore_eos:
        ok = n == req.max_tokens
    else:
        ok = (finish == "stop" and 1 <= n <= req.max_tokens) or (finish == "length" and n == req.max_tokens)
    if ok:
        return None
    return f"finished early (finish_reason={finish}): {n} of {req.max_tokens} tokens (usage)"


def _take_chunk(rec: RequestRecord, chunk: dict, now: float) -> None:
    if "error" in chunk:
        rec.error = f"error chunk: {json.dumps(chunk['error'])[:300]}"
        return
    choices = chunk.get("choices") or []
    if choices:
        choice = choices[0]
        delta = choice.get("delta")  # chat; completions carry `text`
        text = (delta.get("content") if delta is not None else choice.get("text")) or ""
        # NOTE: a chunk counts as output when it has text, or when it is not only the closing
        # finish_reason: the gateway may send "" for a token that ends mid-character. Chat's
        # opening chunk (the role, empty content) carries no token.
        opening = delta is not None and "role" in delta and not text
        if not opening and (text or choice.get("finish_reason") is None):
            if rec.first_token is None:
                rec.first_token = now
            rec.chunk_times.append(now)
        rec.text += text
        if choice.get("finish_reason"):
            rec.finish_reason = choice["finish_reason"]
    usage = chunk.get("usage")
    if usage:
        rec.output_tokens = int(usage.get("completion_tokens", 0))
        rec.prompt_tokens = int(usage.get("prompt_tokens", rec.prompt_tokens))


async def replay(
    base_url: str,
    workload: Workload,
    model: str | None = None,
    progress: bool = True,
    desc: str = "",
    transport: httpx.AsyncBaseTransport | None = None,
) -> list[RequestRecord]:
    """Sends every request at its arrival offset, or, with the workload's max_concurrency,
    as soon as fewer than that many are in flight; returns one record per request, in
    order. `transport` replaces the network (tests)."""
    base = base_url.rstrip("/")
    timeout = httpx.Timeout(30.0, read=READ_TIMEOUT_S)
    bar = progress_bar(len(workload), desc or workload.name) if progress else None
    errors = 0
    async with httpx.AsyncClient(limits=POOL, timeout=timeout, transport=transport) as client:
        t0 = time.perf_counter()
        slots = (
            asyncio.Semaphore(workload.max_concurrency)
            if workload.max_concurrency
            else contextlib.nullcontext()
        )

        async def at_arrival(i: int, req: Request) -> RequestRecord:
            delay = req.arrival - (time.perf_counter() - t0)
            if delay > 0:
                await asyncio.sleep(delay)
            nonlocal errors
            async with slots:
                rec = await send_one(client, base + endpoint(req), req, i, t0, model)
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


def run_workload(
    base_url: str, workload: Workload, model: str | None = None, progress: bool = True, desc: str = ""
) -> list[RequestRecord]:
    return asyncio.run(replay(base_url, workload, model, progress, desc))
