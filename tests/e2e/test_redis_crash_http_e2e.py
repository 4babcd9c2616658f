"""kill -9 of Redis with 50 requests accepted over HTTP and streaming, as a client sees it:
every stream the gateway started completes, once, with the tokens of an undisturbed
greedy run (appendfsync always: the request was on disk before its stream began)."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import time

import httpx
import pytest

from conveyor.embedded_redis import start_embedded_redis
from conveyor.tiny_model import make_model
from shared.ports import free_port
from tests.gpu_worker.hf_reference import assert_greedy_matches, hf_greedy
from tests.stack import Stack

pytestmark = pytest.mark.slow

STREAMS = 50
MAX_TOKENS = 48


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("model"), preset="tiny", num_hidden_layers=2, seed=17)


@pytest.fixture(scope="module")
def prompts_and_expected(model_dir):
    rng = random.Random(50)
    prompts = [[rng.randrange(3, 4096) for _ in range(rng.choice([4, 24, 60]))] for _ in range(STREAMS)]
    return prompts, hf_greedy(model_dir, prompts, MAX_TOKENS)


class Streams:
    """The 50 client streams: the token ids each received, and when each began."""

    def __init__(self, port: int, prompts: list[list[int]]):
        self.url = f"http://127.0.0.1:{port}/v1/completions"
        self.prompts = prompts
        self.tokens: list[list[int]] = [[] for _ in prompts]
        self.finish: list[str | None] = [None] * len(prompts)
        self.started = 0
        self.all_started = asyncio.Event()
        self.model = ""

    async def one(self, client: httpx.AsyncClient, i: int) -> None:
        body = dict(
            model=self.model,
            prompt=self.prompts[i],
            max_tokens=MAX_TOKENS,
            temperature=0,
            stream=True,
            return_token_ids=True,
        )
        async with client.stream("POST", self.url, json=body) as r:
            assert r.status_code == 200, await r.aread()
            self.started += 1
            if self.started == len(self.prompts):
                self.all_started.set()
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                choice = json.loads(line[len("data: ") :])["choices"][0]
                self.tokens[i] += choice["token_ids"]
                self.finish[i] = choice["finish_reason"] or self.finish[i]


async def _run(streams: Streams, crash) -> None:
    limits = httpx.Limits(max_connections=STREAMS + 10)
    async with httpx.AsyncClient(timeout=httpx.Timeout(180.0), limits=limits) as client:
        streams.model = (await client.get(streams.url.replace("completions", "models"))).json()["data"][0][
            "id"
        ]
        tasks = [asyncio.create_task(streams.one(client, i)) for i in range(STREAMS)]
        started = asyncio.create_task(streams.all_started.wait())
        # Until every stream has begun; the first can end before the last begins (a fast machine).
        waiting, deadline = {started, *tasks}, time.monotonic() + 120
        while not started.done() and time.monotonic() < deadline:
            done, waiting = await asyncio.wait(
                waiting, timeout=deadline - time.monotonic(), return_when=asyncio.FIRST_COMPLETED
            )
            for t in done - {started}:  # a stream that failed before the crash: its error, not a timeout
                t.result()
        assert started.done(), f"only {streams.started} of {STREAMS} streams began within 120 s"
        await asyncio.get_running_loop().run_in_executor(None, crash)
        await asyncio.wait_for(asyncio.gather(*tasks), 240)


def test_kill_9_of_redis_under_50_http_streams_loses_none(model_dir, prompts_and_expected, tmp_path):
    prompts, expected = prompts_and_expected
    port, redis_dir = free_port(), tmp_path / "redis"
    server = start_embedded_redis(redis_dir, port=port)  # appendfsync always, the default
    stack = Stack(server.url, model_dir, tmp_path)
    holder = {"server": server}
    unfinished_at_crash = []

    def crash() -> None:
        unfinished_at_crash.append(sum(f is None for f in streams.finish))
        os.kill(holder["server"].pid, signal.SIGKILL)
        holder["server"].process.wait(10)
        time.sleep(1.0)  # an outage: streams go on from what the scheduler holds
        holder["server"] = start_embedded_redis(redis_dir, port=port)

    try:
        gateway_port = stack.start_serving()
        streams = Streams(gateway_port, prompts)
        asyncio.run(_run(streams, crash))
        assert unfinished_at_crash[0] > 0, "the crash must come while streams are running"
        for i, ref in enumerate(expected):
            assert streams.finish[i] in ("stop", "length"), (i, streams.finish[i])
            assert_greedy_matches(streams.tokens[i], ref, f"stream {i}")
        for name in ("scheduler", "w1", "gw"):
            assert stack.procs[name].poll() is None, (
                f"{name} exited across the Redis crash:\n{stack.log_tail(name)}"
            )
    finally:
        stack.stop()
        holder["server"].stop()
