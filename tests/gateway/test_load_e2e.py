"""The gateway under load: 100 concurrent streams each equal to its request run alone,
clients that vanish mid-request leave no KV block behind, and a burst beyond the queue's
limit is refused with 429 + Retry-After while every accepted request completes."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from shared.redis_protocol import read_status
from tests.gateway.conftest import metric_value, start_gateway
from tests.stack import LONG_MAX_TOKENS

pytestmark = pytest.mark.slow

PROMPTS = [f"Request number {i} says: " + "word " * (i * 3) for i in range(10)]


def _model(gateway_model_dir) -> str:
    return gateway_model_dir.name


def test_hundred_concurrent_streams_match_each_request_alone(gateway, gateway_model_dir):
    model = _model(gateway_model_dir)
    kw = dict(model=model, max_tokens=16, temperature=0, extra_body={"ignore_eos": True})
    alone_client = gateway.openai(max_retries=0)
    alone = {p: alone_client.completions.create(prompt=p, **kw).choices[0].text for p in PROMPTS}

    async def one(client, prompt):
        stream = await client.completions.create(prompt=prompt, stream=True, **kw)
        text, finish = "", None
        async for chunk in stream:
            text += chunk.choices[0].text
            finish = chunk.choices[0].finish_reason or finish
        return prompt, text, finish

    async def burst():
        async with gateway.async_openai(max_retries=0, timeout=120) as client:
            return await asyncio.gather(*(one(client, PROMPTS[i % 10]) for i in range(100)))

    results = asyncio.run(burst())
    assert len(results) == 100
    for prompt, text, finish in results:
        assert finish == "length"
        assert text == alone[prompt]


def _wait_idle(stack, timeout_s: float = 30.0) -> dict:
    """Until the scheduler's figures show nothing running and every KV block free."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = read_status(stack.client, stack.keys)
        idle = (
            status.scheduler is not None
            and status.scheduler.running == 0
            and status.scheduler.waiting == 0
            and all(w.kv_usage == 0 for w in status.workers.values())
        )
        if idle or time.monotonic() > deadline:
            return status
        time.sleep(0.2)


def test_disconnected_clients_free_every_kv_block(gateway, gateway_model_dir):
    stack = gateway.stack
    before = gateway.metrics()
    body = {
        "model": _model(gateway_model_dir),
        "prompt": "a long story " * 20,
        "max_tokens": LONG_MAX_TOKENS,
        "ignore_eos": True,
        "temperature": 0,
    }

    async def stream_then_vanish(client: httpx.AsyncClient):
        async with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
            assert r.status_code == 200
            n = 0
            async for line in r.aiter_lines():
                n += bool(line)
                if n >= 3:
                    return  # leaving the block closes the connection mid-stream

    async def wait_then_vanish(client: httpx.AsyncClient):
        with pytest.raises(httpx.ReadTimeout):
            await client.post(
                "/v1/chat/completions",
                timeout=1.5,
                json={
                    "model": body["model"],
                    "max_tokens": LONG_MAX_TOKENS,
                    "ignore_eos": True,
                    "messages": [{"role": "user", "content": "tell me everything"}],
                },
            )

    async def run():
        async with httpx.AsyncClient(base_url=gateway.url, headers=gateway.headers(), timeout=60) as client:
            await asyncio.gather(
                *(stream_then_vanish(client) for _ in range(6)), *(wait_then_vanish(client) for _ in range(2))
            )

    asyncio.run(run())
    # Left running, these would take far longer than this (8 x LONG_MAX_TOKENS tokens).
    status = _wait_idle(stack, timeout_s=15)
    assert status.workers and all(w.kv_usage == 0 for w in status.workers.values()), status.workers
    assert status.scheduler.running == 0
    after = gateway.metrics()
    aborted = 'finished_reason="abort"'
    assert (
        metric_value(after, "conveyor:request_success_total", aborted)
        - metric_value(before, "conveyor:request_success_total", aborted)
        == 8
    )
    assert (
        metric_value(after, "conveyor:scheduler_request_finished_total", aborted)
        - metric_value(before, "conveyor:scheduler_request_finished_total", aborted)
        >= 8
    )
    assert metric_value(after, "conveyor:kv_cache_usage_perc") == 0
    assert metric_value(after, "conveyor:generation_tokens_total") > 0


def test_burst_beyond_the_queue_limit_gets_429_and_accepted_requests_complete(stack, gateway_model_dir):
    gw = start_gateway(stack, "gateway-small-queue", "--max-queue-len", "5")
    # Each accepted request runs long enough (~0.2 s or more) to keep its queue place through the
    # burst: with 8 tokens, a fast machine turned over 20 places during one burst of 60.
    body = {"model": _model(gateway_model_dir), "prompt": "overload", "max_tokens": 200, "ignore_eos": True}

    async def run():
        async with httpx.AsyncClient(
            base_url=gw.url, timeout=120, limits=httpx.Limits(max_connections=100)
        ) as client:
            return await asyncio.gather(*(client.post("/v1/completions", json=body) for _ in range(60)))

    responses = asyncio.run(run())
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 429}, codes
    refused = [r for r in responses if r.status_code == 429]
    accepted = [r for r in responses if r.status_code == 200]
    assert len(refused) >= 30 and len(accepted) >= 5, codes
    for r in refused:
        assert int(r.headers["Retry-After"]) >= 1
        assert "max_queue_len 5" in r.json()["error"]["message"]
    for r in accepted:
        out = r.json()
        assert out["choices"][0]["finish_reason"] == "length" and out["usage"]["completion_tokens"] == 200
    assert metric_value(gw.metrics(), "conveyor:requests_rejected_total", 'status="429"') == len(refused)
