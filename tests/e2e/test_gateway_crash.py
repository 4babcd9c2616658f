"""kill -9 of a gateway while its clients stream: nobody is left to read those tokens, so
the scheduler aborts its requests and frees their blocks; a second gateway's clients are
not disturbed."""

from __future__ import annotations

import threading
import time

import httpx
import openai
import pytest

from shared.figure_records import SystemStatus
from shared.redis_protocol import read_status
from tests.stack import LONG_MAX_TOKENS, Stack

pytestmark = pytest.mark.slow


# The orphans must outlive their detection, 6-8 s after the kill (the liveness key's 5 s
# TTL, then --gateway-timeout 2): 3,000 or 4,000 tokens of a 4,096-token model did not on a
# quiet machine. A long-context model's LONG_MAX_TOKENS run for tens of seconds.
DOOMED_STREAMS, DOOMED_TOKENS = 16, LONG_MAX_TOKENS


def _stream(port: int, model: str, sink: list) -> None:
    """A long streamed completion through the gateway on `port`: each chunk's text in `sink`,
    then the error that ended it, if one did."""
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
    try:
        for chunk in client.completions.create(
            model=model,
            prompt="tell me",
            max_tokens=DOOMED_TOKENS,
            stream=True,
            extra_body={"ignore_eos": True},
        ):
            sink.append(chunk.choices[0].text if chunk.choices else "")
    except (openai.APIError, httpx.HTTPError) as e:
        sink.append(e)


def _wait_everything_freed(stack: Stack) -> SystemStatus:
    """The status once the worker's cache is empty and nothing runs or waits."""
    deadline = time.monotonic() + 30
    while True:
        status = read_status(stack.client, stack.keys)
        if status.workers["w1"].kv_usage == 0 and status.scheduler.running == 0 and status.queue_length == 0:
            return status
        assert time.monotonic() < deadline, (status, stack.log_tail("scheduler"))
        time.sleep(0.2)


def test_gateway_kill_9_aborts_its_requests_and_frees_their_blocks(redis_server, long_model_dir, tmp_path):
    stack = Stack(redis_server.url, long_model_dir, tmp_path)
    try:
        stack.start_scheduler("--gateway-timeout", "2")
        stack.start_worker("w1")
        doomed, survivor = stack.start_gateway("doomed"), stack.start_gateway("survivor")
        stack.wait_workers({"w1"})
        stack.wait_gateway("doomed", doomed)
        stack.wait_gateway("survivor", survivor)

        doomed_chunks: list[list] = [[] for _ in range(DOOMED_STREAMS)]
        threads = [
            threading.Thread(target=_stream, args=(doomed, long_model_dir.name, sink), daemon=True)
            for sink in doomed_chunks
        ]
        for t in threads:
            t.start()
        # Every stream under way (its request accepted and running), not just the first few:
        # one not yet submitted when its gateway dies has nothing for the scheduler to abort.
        deadline = time.monotonic() + 60
        while min(len(sink) for sink in doomed_chunks) < 3:
            assert time.monotonic() < deadline, stack.log_tail()
            time.sleep(0.05)
        assert not any(isinstance(c, Exception) for sink in doomed_chunks for c in sink), doomed_chunks
        stack.kill("doomed")

        # The other gateway still serves while the orphans are cleaned up.
        live = openai.OpenAI(base_url=f"http://127.0.0.1:{survivor}/v1", api_key="x", max_retries=0)
        assert (
            live.completions.create(
                model=long_model_dir.name, prompt="hi", max_tokens=5, extra_body={"ignore_eos": True}
            ).usage.completion_tokens
            == 5
        )

        status = _wait_everything_freed(stack)
        assert status.scheduler.finished.get("abort", 0) == DOOMED_STREAMS
        assert status.scheduler.finished.get("length", 0) == 1, "only the live request ran to its end"
        assert any("gateway" in e.error and "gone" in e.error for e in status.errors)
        stack.check_alive()
    finally:
        stack.stop()
